"""GPTQ vs RTN on real SmolLM2-135M layers with real calibration inputs (``python bench/gptq.py``).

For q_proj, o_proj, gate_proj and down_proj of four layers spread over depth, the input Hessians
``H = E[xxᵀ]`` are collected with forward hooks on calibration windows (Shakespeare comedies) and, separately,
on held-out windows (tragedies).  Each weight is quantized with RTN and with GPTQ onto the *same* fitted grid
(fit and GPTQ use the calibration Hessian) and scored by the layer-output error ``tr(ΔW H ΔWᵀ)`` on the
held-out Hessian.  The ratio GPTQ/RTN is computed in the same run (no hard-coded baseline).  Degenerate
Hessians (dead columns, rank-deficient, indefinite) are run too and must complete with finite output.

Second table: for the 32-wide GGUF types, GPTQ whose fp16 scales are refit to its codes and rounded again
(``gptq_refit``, :data:`bitalloc.rounding.GPTQ_REFITS` rounds, each row keeping its best round; what
``quantize_weight`` does) vs plain GPTQ on the same fitted grid, again on the held-out Hessian (ratio refit /
plain), and vs the previous scheme in the same run (three rounds, the last kept for every row; ratio and time).

Writes ``bench/results/gptq.json`` and ``bench/results/gptq.png`` and prints the table.
"""
from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bitalloc.data import default_calibration_files, default_eval_files, read_texts, token_windows  # noqa: E402
from bitalloc.formats import get_format  # noqa: E402
from bitalloc.rounding import GPTQ_REFITS, gptq_refit, gptq_round, gptq_round_many, rtn_round  # noqa: E402
from bitalloc.rounding.gptq import gptq_factor  # noqa: E402
from bitalloc.formats.refit import layer_output_error  # noqa: E402

LAYERS = (0, 10, 20, 29)
MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
FORMATS = ("int3-g128", "int4-g128", "int3-row", "int4-row")
REFIT_FORMATS = ("q8_0", "q5_1", "q5_0", "iq4_nl", "q4_0")
CTX, N_CALIB, N_HELDOUT = 512, 16, 8
OUT = Path(__file__).resolve().parent / "results"


def windows(tokenizer, files: list[Path], n: int) -> torch.Tensor:
    """``n`` non-overlapping ``CTX``-token windows, taken evenly spread from each of the given texts."""
    per = -(-n // len(files))
    out = []
    for f in files:
        w = token_windows(tokenizer, read_texts(f), CTX)
        out.append(w[torch.linspace(0, len(w) - 1, per).long()])
    return torch.cat(out)[:n]


@torch.no_grad()
def input_hessians(model, wins: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``E[xxᵀ]`` over all tokens of the inputs of the named linears (float64 accumulation)."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def hook(name):
        def f(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            acc[name] = acc.get(name, 0) + x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]
        return f

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(wins), 4):
            model(input_ids=wins[i : i + 4])
    finally:
        for h in handles:
            h.remove()
    return {n: (acc[n] / count[n]).to(torch.float32) for n in names}


def quantize_pair(w: torch.Tensor, h: torch.Tensor, fmt_id: str) -> dict[str, torch.Tensor]:
    """RTN and GPTQ reconstructions of ``w`` on one grid, exactly as ``quantize_weight`` builds them.

    The grid is fitted once (importance = diag H, as ``quantize_weight`` does) and shared by both methods;
    the GPTQ codes go through the format's ``encode``/``decode`` and must decode to the GPTQ values.
    """
    fmt = get_format(fmt_id)
    grid = fmt.fit(w, torch.diagonal(h).clamp_min(0))
    codes, values = gptq_round(w, h, grid)
    decoded = fmt.decode(fmt.encode(codes, grid, tuple(w.shape)))
    if not torch.equal(decoded, values):
        raise AssertionError(f"{fmt_id}: encode/decode of GPTQ codes differs from grid values")
    return {"rtn": rtn_round(w, grid)[1], "gptq": values}


#: the rounds of the refit scheme before each row kept its best round (the last of three rounds was kept)
PREVIOUS_ROUNDS = 3


def refit_triple(w: torch.Tensor, h: torch.Tensor, fmt_id: str, seconds: dict[str, float]) -> dict[str, torch.Tensor]:
    """Plain GPTQ, the previous refit scheme (``PREVIOUS_ROUNDS`` rounds of GPTQ then a refit, the last round
    kept for every row) and GPTQ with scale refits as the library does it now (``GPTQ_REFITS`` rounds, each row
    keeping its best round), all from one fitted grid; each scheme's seconds are added to ``seconds`` (one
    factorisation each).  The refit codes and grid go through ``encode``/``decode`` and must decode to the same
    values."""
    fmt = get_format(fmt_id)
    grid = fmt.fit(w, torch.diagonal(h).clamp_min(0))
    plain = gptq_round(w, h, grid)[1]
    t = time.perf_counter()
    factor, g = gptq_factor(h), grid
    for _ in range(PREVIOUS_ROUNDS):
        codes = gptq_round_many(w, factor, [g])[0][0]
        g = fmt.refine(w, codes, g, h)
    last = g.values(codes)
    t1 = time.perf_counter()
    codes, refit = gptq_refit(w, h, grid, fmt, GPTQ_REFITS)
    seconds["previous"] = seconds.get("previous", 0.0) + t1 - t
    seconds["now"] = seconds.get("now", 0.0) + time.perf_counter() - t1
    values = refit.values(codes)
    if not torch.equal(fmt.decode(fmt.encode(codes, refit, tuple(w.shape))), values):
        raise AssertionError(f"{fmt_id}: encode/decode of the refit grid differs from its values")
    return {"gptq": plain, "previous": last, "refit": values}


def score_pairs(model, names: list[str], formats: tuple[str, ...], pair: Callable, h_cal: dict, h_held: dict
                ) -> tuple[list[tuple], float]:
    """``(tensor, format, shape, reconstructions, held-out errors, calibration errors)`` of ``pair(w, H_calib,
    format)`` for every named weight and format, and the seconds spent in ``pair``."""
    out, seconds = [], 0.0
    for name in names:
        w = model.get_submodule(name).weight.detach().to(torch.float32)
        for f in formats:
            t = time.time()
            q = pair(w, h_cal[name], f)
            seconds += time.time() - t
            e = {m: layer_output_error(w, v, h_held[name]) for m, v in q.items()}
            e_cal = {m: layer_output_error(w, v, h_cal[name]) for m, v in q.items()}
            out.append((name, f, list(w.shape), q, e, e_cal))
    return out, seconds


def degenerate_cases(w: torch.Tensor, h: torch.Tensor, x_few: torch.Tensor) -> list[dict]:
    """Pathological Hessians built from a real one: each must complete with finite output."""
    n = h.shape[0]
    dead = h.clone()
    cols = torch.arange(0, n, 7)
    dead[cols, :] = 0
    dead[:, cols] = 0
    vals, vecs = torch.linalg.eigh(h.double())
    vals[:3] = -2.0 * vals.mean()
    cases = {
        f"dead columns ({len(cols)} zeroed)": dead,
        f"rank-deficient ({x_few.shape[0]} tokens < {n} cols)": (x_few.T @ x_few / x_few.shape[0]).float(),
        "indefinite (3 negative eigenvalues)": ((vecs * vals) @ vecs.T).float(),
        "all-zero": torch.zeros_like(h),
    }
    grid = get_format("int4-g128").fit(w, torch.diagonal(h).clamp_min(0))
    rtn = grid.snap(w)[1]
    rows = []
    for name, hh in cases.items():
        codes, values = gptq_round(w, hh, grid)
        ok = bool(torch.isfinite(values).all()) and torch.equal(values, grid.values(codes))
        ref = h  # scored on the healthy calibration Hessian
        rows.append({"case": name, "finite": ok,
                     "ratio_vs_rtn": layer_output_error(w, values, ref) / layer_output_error(w, rtn, ref)})
    return rows


def _bars(ax, rows: list[dict], formats: tuple[str, ...], ylabel: str, title: str, key: str = "ratio") -> None:
    tensors = list(dict.fromkeys(r["tensor"] for r in rows))
    width = 0.8 / len(formats)
    for k, f in enumerate(formats):
        ys = [next(r[key] for r in rows if r["tensor"] == t and r["format"] == f) for t in tensors]
        ax.bar([i + (k - (len(formats) - 1) / 2) * width for i in range(len(tensors))], ys, width, label=f)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0, max(1.2, max(r[key] for r in rows) * 1.1))
    ax.set_xticks(range(len(tensors)))
    ax.set_xticklabels([t.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                        for t in tensors], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(ncol=len(formats), fontsize=8, loc="upper left")


def plot(results: list[dict], refits: list[dict], path: Path) -> None:
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(12, 13))
    _bars(a1, results, FORMATS, "held-out output error, GPTQ / RTN",
          "SmolLM2-135M (rescaled): GPTQ vs RTN on the same grid")
    _bars(a2, refits, REFIT_FORMATS, "held-out output error, refit / plain GPTQ",
          f"GGUF 32-wide types: GPTQ with {GPTQ_REFITS} scale refits vs plain GPTQ")
    _bars(a3, refits, REFIT_FORMATS, "held-out output error, now / previous",
          f"refits now ({GPTQ_REFITS} rounds, each row its best) vs before ({PREVIOUS_ROUNDS} rounds, the last)",
          key="vs_previous")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from bitalloc.models.rescale import load_reference

    torch.set_num_threads(1)  # small sequential ops: threads only add sync cost on a shared 2-core machine
    t0 = time.time()
    model, tokenizer = load_reference(rescaled=True)
    calib_files, held_files = default_calibration_files(), default_eval_files()
    calib, held = windows(tokenizer, calib_files, N_CALIB), windows(tokenizer, held_files, N_HELDOUT)
    names = [f"model.layers.{i}.{m}" for i in LAYERS for m in MODULES]
    h_cal, h_held = input_hessians(model, calib, names), input_hessians(model, held, names)
    t_stats = time.time() - t0
    scored, t_gptq = score_pairs(model, names, FORMATS, quantize_pair, h_cal, h_held)
    results = [{"tensor": name, "shape": shape, "format": f,
                "rtn_err": e["rtn"], "gptq_err": e["gptq"], "ratio": e["gptq"] / e["rtn"],
                "ratio_calib": e_cal["gptq"] / e_cal["rtn"],
                "finite": bool(all(torch.isfinite(v).all() for v in q.values()))}
               for name, f, shape, q, e, e_cal in scored]
    schemes: dict[str, float] = {}
    scored, t_refit = score_pairs(model, names, REFIT_FORMATS, partial(refit_triple, seconds=schemes), h_cal, h_held)
    refits = [{"tensor": name, "format": f, "gptq_err": e["gptq"], "refit_err": e["refit"],
               "previous_err": e["previous"], "ratio": e["refit"] / e["gptq"],
               "ratio_calib": e_cal["refit"] / e_cal["gptq"], "vs_previous": e["refit"] / e["previous"],
               "vs_previous_calib": e_cal["refit"] / e_cal["previous"]}
              for name, f, _shape, _q, e, e_cal in scored]
    refit_summary = {f: {k: math.exp(sum(math.log(r[k]) for r in refits if r["format"] == f) / len(names))
                         for k in ("ratio", "ratio_calib", "vs_previous", "vs_previous_calib")}
                     for f in REFIT_FORMATS}
    # degenerate Hessians on a real layer; rank-deficient from 64 real tokens' inputs
    probe = "model.layers.10.self_attn.q_proj"
    x_few: list[torch.Tensor] = []
    hd = model.get_submodule(probe).register_forward_pre_hook(lambda _m, a: x_few.append(a[0][0, :64]))
    with torch.no_grad():
        model(input_ids=calib[:1])
    hd.remove()
    degenerate = degenerate_cases(model.get_submodule(probe).weight.detach().float(), h_cal[probe], x_few[0])

    summary = {f: math.exp(sum(math.log(r["ratio"]) for r in results if r["format"] == f) / len(names))
               for f in FORMATS}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gptq.json").write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (rescaled, bitalloc.models.rescale.load_reference)",
        "grids": "Format.fit(w, diag H_calib) shared by RTN and GPTQ (what quantize_weight does)",
        "calibration": {"files": [f.name for f in calib_files], "windows": N_CALIB, "ctx": CTX},
        "heldout": {"files": [f.name for f in held_files], "windows": N_HELDOUT, "ctx": CTX},
        "metric": "tr(dW H dW^T) with H = E[xx^T] on held-out tokens; ratio = GPTQ / RTN",
        "geomean_ratio": summary, "results": results, "degenerate": degenerate,
        "refit": {"rounds": GPTQ_REFITS, "previous_rounds": PREVIOUS_ROUNDS,
                  "metric": "held-out tr(dW H dW^T); ratio = GPTQ with scale refits / plain GPTQ; vs_previous = "
                            "refits now (each row its best round) / the previous scheme (the last round for all rows)",
                  "geomean": refit_summary, "results": refits,
                  "seconds": {k: round(v, 2) for k, v in schemes.items()},
                  "time_ratio_now_vs_previous": schemes["now"] / schemes["previous"]},
        "seconds": {"stats": round(t_stats, 1), "quantize": round(t_gptq, 1), "refit": round(t_refit, 1),
                    "total": round(time.time() - t0, 1)},
    }, indent=1))
    plot(results, refits, OUT / "gptq.png")

    print("metric: held-out tr(dW H dW^T); ratio = GPTQ/RTN on the same fitted grid (calibration ratio in brackets)")
    print(f"{'tensor':34s}" + "".join(f"{f:>20s}" for f in FORMATS))
    for name in names:
        row = [r for r in results if r["tensor"] == name]
        print(f"{name.removeprefix('model.'):34s}" + "".join(
            f"{r['ratio']:>11.3f} [{r['ratio_calib']:.3f}]" for r in row))
    print(f"{'geomean':34s}" + "".join(f"{summary[f]:>20.3f}" for f in FORMATS))
    print(f"GGUF 32-wide types: GPTQ with {GPTQ_REFITS} scale refits / plain GPTQ, held-out [calibration]")
    print(f"{'tensor':34s}" + "".join(f"{f:>20s}" for f in REFIT_FORMATS))
    for name in names:
        row = [r for r in refits if r["tensor"] == name]
        print(f"{name.removeprefix('model.'):34s}" + "".join(
            f"{r['ratio']:>11.3f} [{r['ratio_calib']:.3f}]" for r in row))
    print(f"{'geomean':34s}" + "".join(
        f"{refit_summary[f]['ratio']:>11.3f} [{refit_summary[f]['ratio_calib']:.3f}]" for f in REFIT_FORMATS))
    print(f"{'now / previous scheme':34s}" + "".join(
        f"{refit_summary[f]['vs_previous']:>11.3f} [{refit_summary[f]['vs_previous_calib']:.3f}]"
        for f in REFIT_FORMATS))
    print(f"refit time: now ({GPTQ_REFITS} rounds, best per row) {schemes['now']:.1f}s, previous "
          f"({PREVIOUS_ROUNDS} rounds, the last) {schemes['previous']:.1f}s, ratio {schemes['now'] / schemes['previous']:.3f}")
    print("degenerate Hessians (layer 10 q_proj, int4-g128):")
    for d in degenerate:
        print(f"  {d['case']:45s} finite={d['finite']}  GPTQ/RTN on healthy H = {d['ratio_vs_rtn']:.3f}")
    print(f"time: stats {t_stats:.0f}s, quantize {t_gptq:.0f}s, refit {t_refit:.0f}s, total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
