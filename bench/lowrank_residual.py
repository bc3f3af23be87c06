"""Does a low-rank correction stored beside a quantized weight pay for its bytes (the recovery issue's optional item)?

``python bench/lowrank_residual.py`` takes the linears of a few blocks of the rescaled SmolLM2 (comedies for the
Hessians, as bench/anysize.py) and, for each base format ``f`` (GPTQ), the residual ``E = W − Q``.  The best rank-``r``
correction ``A·B`` (fp16 factors, ``r·(rows + cols)·2`` bytes) of the output error ``tr(E H Eᵀ) = ‖E·L‖²`` (``H = L·Lᵀ``)
is the truncated SVD of ``E·L`` (LQER / LoRC-style, fit to the final codes), so the share of the error it removes
is the energy of the top ``r`` singular values.  The same extra bytes spent on the next format up
(``int{b+1}-g64``) are the allocator's alternative.

Printed and written (bench/results/lowrank_residual.json, .png), summed over the tensors: error removed and bits per
weight added, for each rank and for the next format, and the *halvings of the error per added bit per weight* of
each (the allocator prefers whichever is larger).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.pareto import block_linears, png_bytes  # noqa: E402
from bitalloc.formats import get_format  # noqa: E402
from bitalloc.io.atomic import atomic_write  # noqa: E402
from bitalloc.measure import output_error  # noqa: E402
from bitalloc.rounding import dequantize, quantize_weight  # noqa: E402

log = logging.getLogger("bench.lowrank_residual")
RESULTS = Path(__file__).resolve().parent / "results"


def tensor_rows(w: torch.Tensor, stats, base: str, up: str, ranks: list[int]) -> dict:
    """Errors of one tensor: base, next format, and the energy the top singular values of ``E·L`` hold."""
    rows, cols = w.shape
    h = stats.hessian.to(torch.float64)
    jitter = 1e-8 * float(h.diagonal().mean())
    while True:  # the smallest jitter that factorises H (a dead input column makes it singular)
        lfac, info = torch.linalg.cholesky_ex(h + jitter * torch.eye(cols, dtype=h.dtype))
        if int(info) == 0:
            break
        jitter *= 10
    e = w.to(torch.float64) - dequantize(quantize_weight(w, base, hessian=stats.hessian, method="gptq")).double()
    s2 = torch.linalg.svdvals(e @ lfac).square()
    return {"numel": rows * cols, "base_error": output_error(e.float(), stats),
            "svd_energy": float(s2.sum()),
            "kept": {r: float(s2[:r].sum()) for r in ranks},
            "extra_bytes": {r: r * (rows + cols) * 2 for r in ranks},
            "up_error": output_error(dequantize(quantize_weight(w, up, hessian=stats.hessian, method="gptq")) - w,
                                     stats),
            "up_extra_bytes": get_format(up).nbytes((rows, cols)) - get_format(base).nbytes((rows, cols))}


def summarise(per: list[dict], ranks: list[int]) -> dict:
    n = sum(p["numel"] for p in per)
    base = sum(p["base_error"] for p in per)
    energy = sum(p["svd_energy"] for p in per)
    out = {"bpw_added": {}, "error_removed": {}, "halvings_per_bpw": {}}
    for r in ranks:
        kept = sum(p["kept"][r] for p in per) / energy
        bpw = 8 * sum(p["extra_bytes"][r] for p in per) / n
        out["bpw_added"][f"rank {r}"], out["error_removed"][f"rank {r}"] = bpw, kept
        out["halvings_per_bpw"][f"rank {r}"] = -math.log2(1 - kept) / bpw
    up = sum(p["up_error"] for p in per)
    bpw = 8 * sum(p["up_extra_bytes"] for p in per) / n
    out["bpw_added"]["next format"], out["error_removed"]["next format"] = bpw, 1 - up / base
    out["halvings_per_bpw"]["next format"] = math.log2(base / up) / bpw
    return out


def plot_png(summary: dict[str, dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for base, s in summary.items():
        keys = [k for k in s["bpw_added"] if k.startswith("rank")]
        line = ax.plot([s["bpw_added"][k] for k in keys], [1 - s["error_removed"][k] for k in keys], "o-",
                       label=f"{base} + rank-r fp16 correction")
        ax.plot([s["bpw_added"]["next format"]], [1 - s["error_removed"]["next format"]], "s", ms=9,
                color=line[0].get_color(), label=f"{base} -> next format")
    ax.set_xlabel("bits per weight added")
    ax.set_ylabel("output error left (share of the base format's)")
    ax.set_yscale("log")
    ax.set_title("low-rank correction of the GPTQ residual vs one more bit (rescaled SmolLM2)", fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="2,15,29", help="blocks whose linears are scored")
    ap.add_argument("--bases", default="int2-g64:int3-g64,int3-g64:int4-g64", help="base:next format pairs")
    ap.add_argument("--ranks", default="4,16,64")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="lowrank_residual")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    blocks = sorted({int(b) for b in args.blocks.split(",") if b})
    ranks = [int(r) for r in args.ranks.split(",") if r]
    pairs = [tuple(p.split(":")) for p in args.bases.split(",") if p]
    per: dict[str, list[dict]] = {b: [] for b, _ in pairs}
    for name, w, stats in block_linears(blocks, args.ctx, args.calib_windows):
        for base, up in pairs:
            per[base].append(tensor_rows(w, stats, base, up, ranks))
        log.info("%s done", name)
    summary = {base: summarise(rows, ranks) for base, rows in per.items()}
    res = {"model": "SmolLM2-135M-Instruct, rescaled (seed 0, sigma 0.1)", "calibration": "comedies",
           "calib_windows": args.calib_windows, "ctx": args.ctx, "blocks": blocks, "tensors": len(per[pairs[0][0]]),
           "pairs": [list(p) for p in pairs], "ranks": ranks, "summary": summary,
           "seconds": time.perf_counter() - t0,
           "command": "python bench/lowrank_residual.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{args.name}.json", overwrite=True) as fh:
        fh.write((json.dumps(res, indent=1) + "\n").encode())
    with atomic_write(out / f"{args.name}.png", overwrite=True) as fh:
        fh.write(plot_png(summary))
    print(f"{'base':<10} {'added':<12} {'bpw':>6} {'error removed':>14} {'halvings/bpw':>13}")
    for base, s in summary.items():
        for k in s["bpw_added"]:
            print(f"{base:<10} {k:<12} {s['bpw_added'][k]:>6.2f} {100 * s['error_removed'][k]:>13.1f}% "
                  f"{s['halvings_per_bpw'][k]:>13.2f}")
    print(f"({res['tensors']} tensors, {res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
