"""Allocator benchmark: a synthetic 1,000-tensor x 30-format instance at several budgets.

Bytes come from the real format byte formulas (``Format.nbytes``) of transformer-like shapes; errors fall
roughly as 2^(-2·bpw) (each extra bit quarters the error) with a per-format quality factor, per-tensor
sensitivity spread over orders of magnitude and noise.  For each budget the exact ILP and the Lagrangian
path are timed; the baseline computed in the same run is the best *uniform* format that fits.  Prints a
table, writes bench/results/allocate.json and allocate.png.

    python bench/allocate.py [--tensors 1000] [--seed 0] [--time-limit 60]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bitalloc.allocate import allocate
from bitalloc.formats import get_format
from bitalloc.measure import MeasureRow, Measurement, TensorInfo

FORMATS = (
    [f"int{b}-g{g}" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
    + ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "fp16"]
)
BUDGETS_BPW = (2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0)
RESULTS = Path(__file__).resolve().parent / "results"


def synthetic(n_tensors: int, seed: int) -> Measurement:
    rng = np.random.default_rng(seed)
    quality = {f: float(rng.uniform(0.75, 1.25)) for f in FORMATS}
    quality["fp16"] = 1.0
    tensors, rows = [], []
    d_choices = (1024, 1536, 2048, 3072)
    layer_shapes = lambda d: [(d, d), (d // 4, d), (d // 4, d), (d, d), (4 * d, d), (4 * d, d), (d, 4 * d)]
    i = 0
    while len(tensors) < n_tensors:
        d = int(rng.choice(d_choices))
        depth_sens = float(rng.lognormal(0, 1.0))
        for j, shape in enumerate(layer_shapes(d)):
            if len(tensors) == n_tensors:
                break
            name = f"layer{i}.w{j}"
            numel = shape[0] * shape[1]
            tensors.append(TensorInfo(name, shape, numel))
            sens = depth_sens * float(rng.lognormal(0, 1.0)) * numel * 1e-6
            for f in FORMATS:
                fmt = get_format(f)
                nbytes = fmt.nbytes(shape)
                bpw = 8.0 * nbytes / numel
                err = sens * quality[f] * 2.0 ** (-2.0 * bpw) * float(rng.lognormal(0, 0.15))
                rows.append(MeasureRow(name, f, nbytes, err, err * float(rng.lognormal(0, 0.3))))
        i += 1
    total = sum(t.numel for t in tensors)
    fixed = 2 * 4 * 1024 * i  # norms at fp16
    return Measurement(tuple(tensors), tuple(rows), fixed, total + fixed // 2, {"synthetic": f"seed{seed}"})


def best_uniform(m: Measurement, budget_bytes: int) -> tuple[str, float] | None:
    best = None
    for f in FORMATS:
        rows = [r for r in m.rows if r.format == f]
        if sum(r.bytes for r in rows) + m.fixed_bytes <= budget_bytes:
            err = math.fsum(r.fisher_error or 0.0 for r in rows)
            if best is None or err < best[1]:
                best = (f, err)
    return best


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=60.0)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    small = synthetic(20, args.seed + 1)
    small_plan, small_t = timed(lambda: allocate(small, "4bpw", method="ilp", time_limit=args.time_limit))
    m, build_t = timed(lambda: synthetic(args.tensors, args.seed))
    print(f"instance: {len(m.tensors)} tensors x {len(FORMATS)} formats ({len(m.rows)} rows), "
          f"{m.total_params / 1e9:.2f} B params, built in {build_t:.1f} s")
    print(f"small instance (20 x {len(FORMATS)}): ILP {small_t * 1e3:.1f} ms, {small_plan.status}")

    records = []
    hdr = (f"{'budget':>7} {'uniform':>8} {'ilp s':>7} {'ilp status':>11} {'ilp gap':>9} {'lag s':>7} "
           f"{'lag gap':>9} {'lag/ilp':>9} {'ilp/unif':>9} {'use %':>7} {'auto s':>7} {'auto':>9}")
    print(hdr)
    print("-" * len(hdr))
    for bpw in BUDGETS_BPW:
        budget = f"{bpw}bpw"
        ilp, t_ilp = timed(lambda: allocate(m, budget, method="ilp", time_limit=args.time_limit))
        lag, t_lag = timed(lambda: allocate(m, budget, method="lagrange"))
        auto, t_auto = timed(lambda: allocate(m, budget, method="auto", time_limit=args.time_limit))
        uni = best_uniform(m, ilp.budget_bytes)
        rec = {
            "budget": budget, "budget_bytes": ilp.budget_bytes,
            "ilp": {"seconds": t_ilp, "error": ilp.error, "status": ilp.status, "gap_rel": ilp.gap_rel,
                    "total_bytes": ilp.total_bytes, "solver": ilp.solver},
            "lagrange": {"seconds": t_lag, "error": lag.error, "status": lag.status, "gap_rel": lag.gap_rel,
                         "lower_bound": lag.lower_bound, "total_bytes": lag.total_bytes},
            "auto": {"seconds": t_auto, "error": auto.error, "solver": auto.solver, "gap_rel": auto.gap_rel},
            "uniform": {"format": uni[0], "error": uni[1]} if uni else None,
            "lagrange_over_ilp": lag.error / ilp.error,
            "ilp_over_uniform": ilp.error / uni[1] if uni else None,
            "budget_use": ilp.total_bytes / ilp.budget_bytes,
        }
        records.append(rec)
        print(f"{budget:>7} {uni[0] if uni else '-':>8} {t_ilp:7.2f} {ilp.status:>11} {ilp.gap_rel:9.1e} "
              f"{t_lag:7.2f} {lag.gap_rel:9.1e} {rec['lagrange_over_ilp']:9.6f} "
              f"{rec['ilp_over_uniform'] if uni else float('nan'):9.4f} {100 * rec['budget_use']:7.3f} "
              f"{t_auto:7.2f} {auto.solver:>9}")

    out = {
        "instance": {"tensors": len(m.tensors), "formats": len(FORMATS), "rows": len(m.rows),
                     "total_params": m.total_params, "seed": args.seed},
        "small": {"tensors": 20, "formats": len(FORMATS), "ilp_seconds": small_t, "status": small_plan.status},
        "budgets": records,
    }
    (RESULTS / "allocate.json").write_text(json.dumps(out, indent=2))
    plot(records, len(m.tensors))
    print(f"wrote {RESULTS / 'allocate.json'} and {RESULTS / 'allocate.png'}")


def plot(records: list[dict], n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bpw = [float(r["budget"].removesuffix("bpw")) for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.semilogy(bpw, [r["ilp"]["error"] for r in records], "o-", label="ILP (exact)")
    a1.semilogy(bpw, [r["lagrange"]["error"] for r in records], "x--", label="Lagrangian")
    a1.semilogy(bpw, [r["lagrange"]["lower_bound"] for r in records], ":", label="LP bound")
    ub = [(b, r["uniform"]["error"]) for b, r in zip(bpw, records) if r["uniform"]]
    a1.semilogy([b for b, _ in ub], [e for _, e in ub], "s-", label="best uniform format")
    a1.set_xlabel("budget (bpw)")
    a1.set_ylabel("predicted error (Fisher)")
    a1.legend()
    a1.set_title(f"{n} tensors x {len(FORMATS)} formats")
    w = 0.35
    x = np.arange(len(bpw))
    a2.bar(x - w / 2, [r["ilp"]["seconds"] for r in records], w, label="ILP")
    a2.bar(x + w / 2, [r["lagrange"]["seconds"] for r in records], w, label="Lagrangian")
    a2.set_xticks(x, [str(b) for b in bpw])
    a2.set_xlabel("budget (bpw)")
    a2.set_ylabel("seconds")
    a2.set_yscale("log")
    a2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "allocate.png", dpi=120)


if __name__ == "__main__":
    main()
