"""Measurement and rounding kernels against the formulations they replaced, same run, same inputs
(``python bench/measure_kernels.py [--threads 2] [--repeats 2] [--tokens 6144] [--skip-refit-noise]``).

1. **The scale refit's normal equations** (``bitalloc.formats.refit._normal_equations``: ``z·H`` one group at a
   time over a whole batch of rows, a ``rows x group x cols`` BLAS product per group) against the previous
   formulation, kept here as the baseline (:func:`batched_over_groups`: one einsum batched over groups on a few
   rows at a time).  For each weight shape, the six 32-wide GGUF types that refit (q8_0, q5_1, q5_0, q4_1, q4_0,
   iq4_nl; with and without offsets), codes from nearest rounding on each format's fitted grid, a realistic
   Hessian (``bench/measure_speed.tensor_and_stats``).
2. **Activation noise** ``Σ_tokens (d·w_j)²`` of a group of weights reading one input: per batch ``d Wᵀ``
   (``output_noise``, the previous way, still used where it is cheaper) against the residuals' Gram matrix per
   batch and ``w_jᵀ G w_j`` once (``residual_gram`` / ``gram_noise``), on Gaussian activations of the input width
   (the cost depends only on the shapes) in batches of 1024 tokens; ``runner_picks``: which of the two the block
   runner takes for these shapes and tokens (``gram_pays``).
3. **One factorisation per weight**: GPTQ rounds a weight in row blocks of at most ``ROW_CHUNK_ELEMS`` elements
   (the measurement: of its stack of formats), and each block factorised the Hessian again (~cols³); now
   ``GPTQ.prepare`` factorises it once for all blocks.  The baseline is the same rounder with the per-block
   factorisation (:class:`PerBlockGPTQ`: ``prepare`` hands the raw Hessian on).  ``quantize_weight`` into
   int4-g128 (the scaling bench's format) and q4_1 (a refitting GGUF type) on a 1B Llama's linears, and
   ``measure_tensor`` over the 11 GGUF types on SmolLM2's down projection (two row blocks of eleven formats);
   the outputs must be byte-identical (checked).

Shapes: SmolLM2-135M's and a 1B-class Llama's (2048 wide, 5632 MLP), so that the ratios are not one model's.
Each path runs ``--repeats`` times, alternating, and the fastest is kept; the ratio is baseline ÷ library.  The
largest relative difference between the two results is recorded (float rounding only).  Other processes on the
machine move absolute times: read the ratios.

Writes ``bench/results/measure_kernels.json`` and ``.png`` and prints the tables (``--replot``: the PNG again from
the JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.measure_speed import tensor_and_stats  # noqa: E402
from bench.pareto import png_bytes  # noqa: E402
from bitalloc.activations import get_rounding, gram_noise, gram_pays, output_noise, residual_gram  # noqa: E402
from bitalloc.formats import get_format  # noqa: E402
from bitalloc.formats.refit import BATCH_BYTES, _normal_equations  # noqa: E402
from bitalloc.measure import measure_tensor  # noqa: E402
from bitalloc.rounding import quantize_weight  # noqa: E402
from bitalloc.rounding.methods import GPTQ  # noqa: E402
from bitalloc.rounding.rtn import rtn_round  # noqa: E402
from bitalloc.targets.gguf import GGUF_FORMATS  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
REFIT_FORMATS = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
#: (model, tensor, rows, cols)
REFIT_SHAPES = (("SmolLM2-135M", "q/o", 576, 576), ("SmolLM2-135M", "k/v", 192, 576),
                ("SmolLM2-135M", "gate/up", 1536, 576), ("SmolLM2-135M", "down", 576, 1536),
                ("1B Llama", "q/o", 2048, 2048), ("1B Llama", "gate/up", 5632, 2048))
#: (model, group, input width, output channels reading it)
NOISE_SHAPES = (("SmolLM2-135M", "q+k+v", 576, 960), ("SmolLM2-135M", "gate+up", 576, 3072),
                ("SmolLM2-135M", "tied head", 576, 49152), ("1B Llama", "q+k+v", 2048, 2560),
                ("1B Llama", "gate+up", 2048, 11264))
#: (model, tensor, rows, cols, what): "quantize" = quantize_weight into int4-g128 and q4_1, "measure" =
#: measure_tensor over the 11 GGUF types
FACTOR_SHAPES = (("SmolLM2-135M", "down", 576, 1536, "measure"), ("1B Llama", "q/o", 2048, 2048, "quantize"),
                 ("1B Llama", "gate/up", 5632, 2048, "quantize"), ("1B Llama", "down", 2048, 5632, "quantize"))


class PerBlockGPTQ(GPTQ):
    """GPTQ as it was: no preparation, so every row block factorises the Hessian itself."""

    name = "gptq-per-block"

    def prepare(self, hessian, device):
        return hessian


def batched_over_groups(w: torch.Tensor, z: torch.Tensor, group_size: int, hessian: torch.Tensor,
                        with_offset: bool):
    """The previous formulation of the refit's normal equations (no ``active`` mask): ``z_gᵀ H`` for every group
    at once by one einsum batched over groups, on as many rows as keep that ``rows x groups x cols`` product
    within ``BATCH_BYTES``."""
    rows, cols = (int(d) for d in w.shape)
    nb = cols // group_size
    h = hessian.to(dtype=torch.float64)
    h = (h + h.T) * 0.5
    hb = h.reshape(nb, group_size, cols)
    hs = hb.sum(1) if with_offset else None
    m_oo = hs.reshape(nb, nb, group_size).sum(-1) if with_offset else None
    step = max(1, BATCH_BYTES // (8 * nb * cols))
    for a in range(0, rows, step):
        sl = slice(a, min(a + step, rows))
        zb = z[sl].to(torch.float64).reshape(-1, nb, group_size)
        wr = w[sl].to(torch.float64)
        y = torch.einsum("rbi,bij->rbj", zb, hb)
        y4 = y.reshape(-1, nb, nb, group_size)
        m = torch.einsum("rbcj,rcj->rbc", y4, zb)
        rhs = torch.einsum("rbj,rj->rb", y, wr)
        if with_offset:
            m_so = y4.sum(-1)
            top = torch.cat([m, m_so], 2)
            bottom = torch.cat([m_so.transpose(1, 2), m_oo.expand(top.shape[0], nb, nb)], 2)
            m = torch.cat([top, bottom], 1)
            rhs = torch.cat([rhs, wr @ hs.T], 1)
        yield sl, m, rhs


def _best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def refit_rows(repeats: int) -> list[dict]:
    out = []
    for model, tensor, rows, cols in REFIT_SHAPES:
        w, st = tensor_and_stats(rows, cols, 0, torch.device("cpu"))
        h = st.roles[0].hessian
        imp = torch.diagonal(h).clamp_min(0)
        t_new = t_old = 0.0
        worst = 0.0
        for fid in REFIT_FORMATS:
            fmt = get_format(fid)
            grid = fmt.fit(w, imp)
            z = grid.level_values(rtn_round(w, grid)[0])
            offset = not fmt.spec.symmetric  # as the format's refine (gguf_legacy)

            def run(fn):
                eqs = list(fn(w, z, 32, h, offset))
                return torch.cat([m.reshape(m.shape[0], -1) for _, m, _ in eqs]), torch.cat([b for _, _, b in eqs])

            best_new = best_old = float("inf")
            for _ in range(repeats):  # alternating, fastest kept
                a, (m_new, b_new) = _best(lambda: run(_normal_equations), 1)
                b, (m_old, b_old) = _best(lambda: run(batched_over_groups), 1)
                best_new, best_old = min(best_new, a), min(best_old, b)
            t_new += best_new
            t_old += best_old
            worst = max(worst, _rel(m_old, m_new), _rel(b_old, b_new))
        out.append({"model": model, "tensor": tensor, "shape": [rows, cols], "formats": list(REFIT_FORMATS),
                    "library_seconds": round(t_new, 4), "baseline_seconds": round(t_old, 4),
                    "speedup": round(t_old / t_new, 3), "max_rel_diff": worst})
        print(f"refit {model:<13}{tensor:<9}{rows:>6}x{cols:<6}{t_old:>9.3f}{t_new:>9.3f}{t_old / t_new:>8.2f}x  "
              f"{worst:.1e}", flush=True)
    return out


def noise_rows(tokens: int, repeats: int) -> list[dict]:
    rnd = get_rounding("q8_0")
    out = []
    g = torch.Generator().manual_seed(1)
    for model, group, width, outputs in NOISE_SHAPES:
        w = torch.randn(outputs, width, generator=g) * 0.03
        batches = [torch.randn(1024, width, generator=g) * 2 for _ in range(max(1, tokens // 1024))]
        residuals = [rnd.residual(x) for x in batches]

        def direct():
            return sum(output_noise(d, w) for d in residuals)

        def gram():
            return gram_noise(sum(residual_gram(d) for d in residuals), w)

        t_dir = t_gram = float("inf")
        for _ in range(repeats):
            a, want = _best(direct, 1)
            b, got = _best(gram, 1)
            t_dir, t_gram = min(t_dir, a), min(t_gram, b)
        rel = _rel(want, got)
        picks = "gram" if gram_pays(width, outputs, 1024 * len(batches)) else "direct"
        out.append({"model": model, "group": group, "input": width, "outputs": outputs,
                    "tokens": 1024 * len(batches), "direct_seconds": round(t_dir, 4), "gram_seconds": round(t_gram, 4),
                    "speedup": round(t_dir / t_gram, 3), "max_rel_diff": rel, "runner_picks": picks})
        print(f"noise {model:<13}{group:<10}{width:>6}->{outputs:<7}{t_dir:>9.3f}{t_gram:>9.3f}"
              f"{t_dir / t_gram:>8.2f}x  {rel:.1e}  (the runner takes: {picks})", flush=True)
    return out


def _qbytes(q) -> list:
    return [(k, q.parts[k].contiguous().view(torch.uint8).tolist()) for k in sorted(q.parts)]


def factor_rows(repeats: int) -> list[dict]:
    out = []
    for model, tensor, rows, cols, what in FACTOR_SHAPES:
        w, st = tensor_and_stats(rows, cols, 0, torch.device("cpu"))
        h = st.roles[0].hessian
        if what == "measure":
            formats = list(GGUF_FORMATS)

            def run(rounder):
                return measure_tensor(tensor, w, st, formats, rounder)
        else:
            formats = ["int4-g128", "q4_1"]

            def run(rounder):
                return [_qbytes(quantize_weight(w, f, hessian=h, method=rounder)) for f in formats]
        t_new = t_old = float("inf")
        for _ in range(repeats):  # alternating, fastest kept
            a, got = _best(lambda: run(GPTQ()), 1)
            b, want = _best(lambda: run(PerBlockGPTQ()), 1)
            t_new, t_old = min(t_new, a), min(t_old, b)
        same = got == want
        out.append({"model": model, "tensor": tensor, "shape": [rows, cols], "path": what, "formats": formats,
                    "library_seconds": round(t_new, 3), "baseline_seconds": round(t_old, 3),
                    "speedup": round(t_old / t_new, 3), "identical": same})
        print(f"factor {model:<12}{tensor:<9}{rows:>6}x{cols:<6}{t_old:>9.2f}{t_new:>9.2f}{t_old / t_new:>8.2f}x  "
              f"{what}, identical: {same}", flush=True)
        if not same:
            raise SystemExit(f"{model} {tensor}: the outputs differ from the per-block factorisation's")
    return out


def plot(result: dict) -> None:
    panels = []
    if "refit" in result:
        panels.append((result["refit"], "scale refit normal equations (6 GGUF types)", "baseline_seconds",
                       "library_seconds", ("before: one product over all groups, few rows",
                                           "now: groups batched, all rows")))
    if "activation_noise" in result:
        panels.append((result["activation_noise"], "activation noise (Q8_0)", "direct_seconds", "gram_seconds",
                       ("per batch d·Wᵀ", "Gram matrix Σ d dᵀ, then w G wᵀ")))
    if "factor" in result:
        panels.append((result["factor"], "GPTQ over a weight's row blocks", "baseline_seconds", "library_seconds",
                       ("a factorisation per row block", "one per weight")))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4), squeeze=False)
    for ax, (rows, title, k_before, k_now, names) in zip(axes[0], panels):
        labels = [f"{r['model'].split('-')[0]} {r.get('tensor', r.get('group'))}"
                  + (f" ({r['path']})" if "path" in r else "") for r in rows]
        x = range(len(rows))
        before, now = [r[k_before] for r in rows], [r[k_now] for r in rows]
        ax.bar([i - 0.2 for i in x], before, 0.4, label=names[0])
        ax.bar([i + 0.2 for i in x], now, 0.4, label=names[1])
        for i, r in enumerate(rows):
            picks = f"\nrunner: {r['runner_picks']}" if "runner_picks" in r else ""
            ax.annotate(f"{r['speedup']:.1f}x{picks}", (i, max(before[i], now[i])), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (fastest of repeats)")
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    (OUT / "measure_kernels.png").write_bytes(png_bytes(fig))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=6144, help="activation tokens per noise shape (batches of 1024)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the saved JSON")
    ap.add_argument("--skip-refit-noise", action="store_true",
                    help="only the factorisation rows; the saved JSON's refit and noise rows are kept")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((OUT / "measure_kernels.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    print(f"{'':<6}{'model':<13}{'tensor':<9}{'shape':>13}{'before':>9}{'now':>9}{'ratio':>9}  max rel diff")
    result = {"command": "python " + " ".join(sys.argv), "threads": args.threads, "repeats": args.repeats}
    if args.skip_refit_noise:
        saved = json.loads((OUT / "measure_kernels.json").read_text())
        result.update({k: saved[k] for k in ("refit", "activation_noise")},
                      refit_noise_command=saved.get("refit_noise_command", saved["command"]))
    else:
        result.update(refit=refit_rows(args.repeats), activation_noise=noise_rows(args.tokens, args.repeats),
                      refit_noise_command=result["command"])
    result["factor"] = factor_rows(args.repeats)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "measure_kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result)


if __name__ == "__main__":
    main()
