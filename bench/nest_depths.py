"""Why one nested artifact does not reach direct quantization: the error of every depth, tensor by tensor.

``python bench/nest_depths.py`` takes the linears of a few blocks of the rescaled SmolLM2 (comedies for the
Hessians, as bench/anysize.py) and, for every depth ``k`` of a ``--max-bits`` nest with ``--group`` columns per
scale, sums over those tensors the output error ``tr(ΔW H ΔWᵀ)`` (bitalloc.measure.output_error) of:

* **direct GPTQ** ``int{k}-g{G}`` (its own clipped range, its own GPTQ codes): what bench/anysize.py's "direct"
  allocates from;
* **direct RTN** of the same format (its own range, nearest codes);
* **nested, every depth** (what ``bitalloc nest`` stores: one range for all depths, the joint GPTQ of
  :func:`bitalloc.nest.codes.nested_codes` with its default depth weights, then its coordinate descent on every
  depth's output error, :mod:`bitalloc.nest.descent`, and its default refit depths, :mod:`bitalloc.nest.refit`),
  the same **without the refit depths**, **without either**, and with the depths weighed with another
  **emphasis** (1: each relative to its own error only; 2: each deeper one twice the one above);
* **nested, one depth weighed**: the same shared range, the joint rounding with weight on depth ``m`` only (every
  other depth is then what its top bits give): the best a nest can do at one depth, at the others' expense;
* **nested, two depths weighed** (``--pairs``): what two depths cost each other.

Printed and written (bench/results/nest_depths.json, .png): the ratio of each to direct GPTQ, per depth.  A ratio
near 1 at every depth of one variant is what the issue's ≤ 1.15× at every budget would need.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.pareto import block_linears, png_bytes  # noqa: E402
from bitalloc.io.atomic import atomic_write  # noqa: E402
from bitalloc.measure import output_error  # noqa: E402
from bitalloc.nest.artifact import depth_of  # noqa: E402
from bitalloc.nest.build import nest_tensor  # noqa: E402
from bitalloc.nest.codes import DESCENT_PASSES, MIN_DEPTH, depth_weights  # noqa: E402
from bitalloc.nest.descent import DEPTH_EMPHASIS  # noqa: E402
from bitalloc.nest.refit import default_refit  # noqa: E402
from bitalloc.rounding import dequantize, quantize_weight  # noqa: E402

log = logging.getLogger("bench.nest_depths")
RESULTS = Path(__file__).resolve().parent / "results"
NO_REFIT = "nested, every depth, no refit"
NO_DESCENT = "nested, every depth, neither descent nor refit"
#: Variants whose depths are weighed with another emphasis than the default (bitalloc.nest.descent.relative_weights).
EMPHASIS = {"nested, every depth, emphasis 1": 1.0, "nested, every depth, emphasis 2": 2.0}


def variants(depth: int, pairs: list[tuple[int, int]]) -> dict[str, dict[int, float] | str]:
    """Name -> depth weights of a nested rounding, or the direct method ("gptq"/"rtn").  Every nested variant takes
    ``bitalloc nest``'s default descent passes and refit depths, but for those named without them."""
    ks = range(MIN_DEPTH, depth + 1)
    out: dict[str, dict[int, float] | str] = {"direct gptq": "gptq", "direct rtn": "rtn",
                                              "nested, every depth": depth_weights(depth),
                                              NO_REFIT: depth_weights(depth), NO_DESCENT: depth_weights(depth),
                                              **{v: depth_weights(depth) for v in EMPHASIS}}
    for m in ks:
        out[f"nested, depth {m} only"] = {k: float(k == m) for k in ks}
    for a, b in pairs:  # relative weights as the default's: a bin of width ∝ 2^-k leaves an error ∝ 4^-k
        out[f"nested, depths {a}+{b}"] = {k: (4.0 ** (k - a) if k in (a, b) else 0.0) for k in ks}
    return out


def tensor_errors(name: str, w: torch.Tensor, stats, group: int, depth: int,
                  vs: dict[str, dict[int, float] | str]) -> dict[str, dict[int, float]]:
    """``{variant: {depth: output error}}`` of one tensor; the nested ones are the rows ``bitalloc nest`` measures
    and stores (:func:`bitalloc.nest.build.nest_tensor`), with each variant's depth weights."""
    ks = list(range(MIN_DEPTH, depth + 1))
    out: dict[str, dict[int, float]] = {}
    for variant, how in vs.items():
        if isinstance(how, str):
            out[variant] = {k: output_error(dequantize(quantize_weight(w, f"int{k}-g{group}", hessian=stats.hessian,
                                                                       method=how)) - w, stats) for k in ks}
        else:
            _, rows = nest_tensor(name, w, stats, group, depth, how,
                                  passes=0 if variant == NO_DESCENT else DESCENT_PASSES,
                                  refit=0 if variant in (NO_DESCENT, NO_REFIT) else default_refit(group, depth),
                                  emphasis=EMPHASIS.get(variant, DEPTH_EMPHASIS))
            out[variant] = {depth_of(r.format): r.output_error for r in rows}
    return out


def plot_png(ratios: dict[str, dict[int, float]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in ratios.items():
        ks = sorted(r)
        style = "k--" if name == "direct gptq" else ("o-" if "every" in name or "rtn" in name else ".:")
        ax.plot(ks, [r[k] for k in ks], style, label=name, alpha=1.0 if style != ".:" else 0.7)
    ax.axhline(1.15, color="tab:red", lw=0.8, label="goal 1.15x")
    ax.set_yscale("log")
    ax.set_xlabel("depth (bits)")
    ax.set_ylabel("output error / direct GPTQ's (sum over tensors)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="0,15,29", help="blocks whose linears are scored")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--max-bits", type=int, default=6)
    ap.add_argument("--pairs", default="3-5,4-6", help="pairs of depths weighed together ('' = none)")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="nest_depths")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    blocks = sorted({int(b) for b in args.blocks.split(",") if b})
    pairs = [tuple(int(x) for x in p.split("-")) for p in args.pairs.split(",") if p]
    vs = variants(args.max_bits, pairs)  # type: ignore[arg-type]
    per_tensor: dict[str, dict[str, dict[int, float]]] = {}
    for name, w, stats in block_linears(blocks, args.ctx, args.calib_windows):
        t = time.perf_counter()
        per_tensor[name] = tensor_errors(name, w, stats, args.group, args.max_bits, vs)
        log.info("%s: %.1f s", name, time.perf_counter() - t)
    ks = list(range(MIN_DEPTH, args.max_bits + 1))
    total = {v: {k: sum(e[v][k] for e in per_tensor.values()) for k in ks} for v in vs}
    ratios = {v: {k: total[v][k] / total["direct gptq"][k] for k in ks} for v in vs}
    res = {"model": "SmolLM2-135M-Instruct, rescaled (seed 0, sigma 0.1)", "calibration": "comedies",
           "calib_windows": args.calib_windows, "ctx": args.ctx, "blocks": blocks, "group": args.group,
           "max_bits": args.max_bits, "tensors": sorted(per_tensor),
           "variants": {v: (w if isinstance(w, str) else {str(k): x for k, x in w.items()}) for v, w in vs.items()},
           "total_error": {v: {str(k): x for k, x in t.items()} for v, t in total.items()},
           "ratio_to_direct_gptq": {v: {str(k): x for k, x in r.items()} for v, r in ratios.items()},
           "seconds": time.perf_counter() - t0,
           "command": "python bench/nest_depths.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{args.name}.json", overwrite=True) as fh:
        fh.write((json.dumps(res, indent=1) + "\n").encode())
    title = (f"nested vs direct, per depth: {len(per_tensor)} linears of blocks {blocks} of rescaled SmolLM2, "
             f"g{args.group}")
    with atomic_write(out / f"{args.name}.png", overwrite=True) as fh:
        fh.write(plot_png(ratios, title))
    width = max(len(v) for v in vs)
    print(f"{'output error / direct GPTQ':<{width}} " + " ".join(f"{'int' + str(k):>7}" for k in ks))
    for v in vs:
        print(f"{v:<{width}} " + " ".join(f"{ratios[v][k]:>7.2f}" for k in ks))
    print(f"({len(per_tensor)} tensors, {res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
