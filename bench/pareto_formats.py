"""The new candidate formats in the allocation: KLD at equal bytes against the int-only allocation and against
the uniform formats users pick by hand (``python bench/pareto_formats.py``).

On the function-preserving rescaled SmolLM2-135M-Instruct, calibrated on the comedies and evaluated on the
tragedies (context 512, second half of each window scored), all with GPTQ:

* one measurement of every tensor x (the integer candidates of ``bench/pareto.py`` + ``--new`` formats); the
  int-only table is its subset, so both allocations see exactly the same errors for the shared formats;
* per budget (2.5-4.5 bpw over ALL weights): the allocation from the int-only table and the allocation from the
  full table, quantized and evaluated: the ratio new/int KLD (goal < 1, never > 1);
* the uniform ``--uniform`` formats (every allocated tensor in NF4 / MXFP4 / NVFP4: what users pick by hand; the
  embedding is stored in the format too, norms in fp16 as everywhere) and, at each of their exact sizes, the
  allocation with the new formats (the int-only one at the first uniform's size): allocated/uniform KLD at
  equal bytes.

``--cache DIR`` keeps the measurement (formats added later are measured alone and merged) and every finished
point; pass ``--fresh`` after changing the code.  Writes bench/results/pareto_formats.{json,png} and prints the
table.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bitalloc.jobs.store import Job  # noqa: E402
from bitalloc.jobs.sweep import save_point, saved_points  # noqa: E402
from bitalloc.pipeline import make_plan, measure_model, uniform_plan  # noqa: E402
from bitalloc.sweep import Point, format_table, sweep  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pareto import FORMATS, bench_inputs, cached_measurement, digest, peak_rss_mib  # noqa: E402

log = logging.getLogger("bench.pareto_formats")
RESULTS = Path(__file__).resolve().parent / "results"
NEW = "nf4,fp4-g32,fp4-g64,mxfp4,nvfp4,fp8,fp3-e1m1-g32,fp5-e2m2-g64,fp6-e2m3-g64"
UNIFORM = "nf4,mxfp4,nvfp4"


def run_sweep(model, view, table, budgets, calib, evals, reference, cache: Path | None, tag: str,
              uniform: list[str]) -> list[Point]:
    key = digest(tag, table.to_json(), budgets, uniform, calib, evals)
    with contextlib.ExitStack() as stack:
        job = None if cache is None else stack.enter_context(Job(cache / f"points-{key}", {"points": key}))
        return sweep(model, view, {"gptq": table}, budgets, ["gptq"], calib, evals, reference, uniform=uniform,
                     done=None if job is None else saved_points(job),
                     on_point=None if job is None else functools.partial(save_point, job))


def plan_formats(table, budget: str) -> dict[str, float]:
    """Share of the allocated bytes per format in the plan of ``budget``."""
    plan = make_plan(table, budget)
    total = sum(e.bytes for e in plan.entries)
    out: dict[str, float] = {}
    for e in plan.entries:
        out[e.format] = out.get(e.format, 0.0) + e.bytes / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def plot(int_pts: list[Point], new_pts: list[Point], uni: list[Point], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    for pts, label, style in ((int_pts, "allocated, int candidates", "o-"),
                              (new_pts, "allocated, int + new formats", "s-")):
        pts = sorted(pts, key=lambda p: p.bytes)
        ax.plot([p.bytes / 2**20 for p in pts], [p.kld for p in pts], style, label=label)
    for p in uni:
        ax.scatter([p.bytes / 2**20], [p.kld], marker="x", s=60, zorder=5)
        ax.annotate(f"uniform {p.label}", (p.bytes / 2**20, p.kld), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("KLD vs fp reference (tragedies)")
    ax.set_title("rescaled SmolLM2-135M, GPTQ: new formats in the allocation")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2.5bpw,3bpw,3.5bpw,4bpw,4.5bpw")
    ap.add_argument("--int-formats", default=FORMATS)
    ap.add_argument("--new", default=NEW, help="the new candidate formats added to the int ones")
    ap.add_argument("--uniform", default=UNIFORM, help="uniform baselines (must be among --new)")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--cache", default=str(RESULTS.parent.parent / ".cache" / "pareto_formats"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="pareto_formats")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ints = [f for f in args.int_formats.split(",") if f]
    new = [f for f in args.new.split(",") if f]
    uniform = [f for f in args.uniform.split(",") if f]
    if not set(uniform) <= set(new):
        raise SystemExit("--uniform formats must be among --new")
    budgets = [b for b in args.budgets.split(",") if b]

    model, tok, reference, view, calib, evals = bench_inputs(args.ctx, args.calib_windows, args.eval_windows)
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        if args.fresh:
            import shutil
            for f in cache.glob("measure-*"):
                f.unlink()
            for d in cache.glob("points-*"):
                shutil.rmtree(d)

    settings = ("rescaled SmolLM2 seed 0 sigma 0.1", args.ctx, args.fisher_windows, "gptq")

    def measure(fmts: list[str]):
        return measure_model(model, view, calib, fmts, "gptq", True, fisher_windows=calib[: args.fisher_windows])

    full, runs = cached_measurement(cache, digest(settings, calib), ints + new, measure)
    int_table = full.subset(ints)
    sizes = [uniform_plan(full, f).total_bytes for f in uniform]
    all_budgets = budgets + [f"{s}B" for s in sizes]

    # the int-only allocation at the bpw budgets and at the first uniform's size (the last point of its curve);
    # the allocation with the new formats at every budget and every uniform's size
    int_budgets = budgets + all_budgets[len(budgets):len(budgets) + 1]
    int_pts = run_sweep(model, view, int_table, int_budgets, calib, evals, reference, cache, "int", [])
    new_all = run_sweep(model, view, full, all_budgets, calib, evals, reference, cache, "new", uniform)
    new_pts = [p for p in new_all if p.kind == "allocated"]
    uni_pts = [p for p in new_all if p.kind == "uniform"]

    rows = []
    for b in all_budgets:
        a_int = next((p for p in int_pts if p.budget == b), None)
        a_new = next(p for p in new_pts if p.budget == b)
        u = next((p for p, s in zip(uni_pts, sizes) if f"{s}B" == b), None)
        rows.append({"budget": b, "uniform": None if u is None else u.label,
                     "int_kld": None if a_int is None else a_int.kld, "new_kld": a_new.kld,
                     "new_over_int": None if a_int is None else a_new.kld / a_int.kld,
                     "int_bytes": None if a_int is None else a_int.bytes, "new_bytes": a_new.bytes,
                     "uniform_kld": None if u is None else u.kld, "uniform_bytes": None if u is None else u.bytes,
                     "new_over_uniform": None if u is None else a_new.kld / u.kld,
                     "int_over_uniform": None if u is None or a_int is None else a_int.kld / u.kld,
                     "new_plan_formats": plan_formats(full, b)})
    result = {
        "bench": "pareto_formats", "model": "SmolLM2-135M-Instruct, rescaled (seed 0, sigma 0.1)",
        "calibration": "comedies", "evaluation": "tragedies", "ctx": args.ctx, "method": "gptq",
        "calib_windows": int(calib.shape[0]), "eval_windows": int(evals.shape[0]),
        "int_formats": ints, "new_formats": new, "uniform": uniform, "objective": full.objectives[0],
        "measure_runs": runs, "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib(),
        "total_seconds": time.perf_counter() - t0, "comparison": rows,
        "points": {"int": [asdict(p) for p in int_pts], "new": [asdict(p) for p in new_all]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(int_pts, new_pts, uni_pts, out / f"{args.name}.png")
    print(format_table(int_pts + new_all))
    print()
    print(f"{'budget':<12} {'int KLD':>9} {'new KLD':>9} {'new/int':>8} {'uniform':>8} {'unif KLD':>9} "
          f"{'new/unif':>9}  top formats of the new plan")
    for r in rows:
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(r["new_plan_formats"].items())[:4])
        uk = "-" if r["uniform_kld"] is None else f"{r['uniform_kld']:.5f}"
        nu = "-" if r["new_over_uniform"] is None else f"{r['new_over_uniform']:.3f}"
        ik = "-" if r["int_kld"] is None else f"{r['int_kld']:.5f}"
        ni = "-" if r["new_over_int"] is None else f"{r['new_over_int']:.3f}"
        print(f"{r['budget']:<12} {ik:>9} {r['new_kld']:>9.5f} {ni:>8} "
              f"{r['uniform'] or '-':>8} {uk:>9} {nu:>9}  {top}")
    print(f"measurement {sum(r['seconds'] for r in runs):.0f} s; total {time.perf_counter() - t0:.0f} s -> "
          f"{out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
