"""GGUF ``fit`` speed and quality: this tree's implementation vs the committed one (``python bench/gguf_fit.py``).

The baseline is the GGUF code of a git revision (``--base``, default ``HEAD``) loaded from ``git show`` into a
temporary package in the same process, so both sides run on the same tensors, the same thread count and the
same load.  For every GGUF type and every tensor that the type can store it reports the fit time per tensor
(best of ``--repeat``) before/after and the speed-up, and the importance-weighted SQNR of the fitted grid with
RTN codes, ``10·log10(Σ wt·w² / Σ wt·(w - ŵ)²)`` in dB, before/after.

Tensors: ``random`` (normal and Laplace matrices of SmolLM2 shapes, random importance) and, unless
``--no-real``, ``real``: q/k/gate/down/o projections of a few layers of the function-preserving rescaled
SmolLM2-135M (``bitalloc.models.rescale.load_reference``, ~40 s to load) with a random smooth importance
(the measurement's Hessian diagonal is not needed to compare two fits).

Writes ``bench/results/gguf_fit.json`` and ``bench/results/gguf_fit.png`` and prints the table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import bitalloc.formats.gguf  # noqa: E402,F401  (registers the GGUF types)
from bitalloc.formats import get_format  # noqa: E402
from bitalloc.rounding.rtn import rtn_round  # noqa: E402

log = logging.getLogger("bench.gguf_fit")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
TYPES = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "iq4_nl", "q3_k", "q2_k")
RANDOM_SHAPES = ((1536, 576), (576, 1536), (192, 576))
LAYERS = (0, 15, 29)
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
FILES = ("gguf_common", "gguf_legacy", "gguf_kquants")
RENAMES = (("from .base ", "from bitalloc.formats.base "), ("from ..errors ", "from bitalloc.errors "),
           ("from .fit ", "from bitalloc.formats.fit "), ("from .refit ", "from bitalloc.formats.refit "),
           # revisions before the scale search and the refit moved into formats/
           ("from ..rounding.rtn ", "from bitalloc.formats.fit "),
           ("from ..rounding.refit ", "from bitalloc.formats.refit "),
           ("from .gguf_common ", "from {pkg}.gguf_common "))


def load_baseline(rev: str, tmp: Path) -> dict[str, type]:
    """The GGUF format classes of git revision ``rev`` as a throwaway package under ``tmp`` (not registered)."""
    pkg = "_gguf_base_" + "".join(c for c in rev if c.isalnum())
    d = tmp / pkg
    d.mkdir()
    (d / "__init__.py").write_text("")
    for f in FILES:
        src = subprocess.run(["git", "show", f"{rev}:src/bitalloc/formats/{f}.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        for a, b in RENAMES:
            src = src.replace(a, b.format(pkg=pkg))
        (d / f"{f}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    leg, kq = importlib.import_module(f"{pkg}.gguf_legacy"), importlib.import_module(f"{pkg}.gguf_kquants")
    return {"legacy": leg.GGUFLegacy, "kquant": kq.GGUFKQuant}


def random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for r, c in RANDOM_SHAPES:
        out[f"normal-{r}x{c}"] = 0.02 * torch.randn(r, c, generator=g)
        u = torch.rand(r, c, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
        out[f"laplace-{r}x{c}"] = -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())
    return out


def real_tensors() -> dict[str, torch.Tensor]:
    from bitalloc.models.rescale import load_reference

    model, _ = load_reference(rescaled=True)
    sd = model.state_dict()
    return {f"L{i}.{m}": sd[f"model.layers.{i}.{m}.weight"].detach().clone().float()
            for i in LAYERS for m in MODULES}


def importance_for(w: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(w.shape[1], generator=g).pow(2) * 10 + 0.01


def sqnr(fmt, w: torch.Tensor, imp: torch.Tensor, grid) -> float:
    _, vals = rtn_round(w, grid)
    sig = (imp * w.double() ** 2).sum()
    err = (imp * (w.double() - vals.double()) ** 2).sum()
    return float(10 * torch.log10(sig / err.clamp_min(1e-300)))


def timed_fit(fmt, w: torch.Tensor, imp: torch.Tensor, repeat: int):
    best, grid = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        grid = fmt.fit(w, imp)
        best = min(best, time.perf_counter() - t0)
    return best, grid


def run(tensors: dict[str, torch.Tensor], kind: str, types, base, repeat: int) -> list[dict]:
    rows = []
    for t in types:
        new = get_format(t)
        old = (base["kquant"] if t.endswith("_k") else base["legacy"])(t)
        for i, (name, w) in enumerate(tensors.items()):
            if not new.supports(tuple(w.shape)):
                continue
            imp = importance_for(w, i)
            t_old, g_old = timed_fit(old, w, imp, repeat)
            t_new, g_new = timed_fit(new, w, imp, repeat)
            rows.append({"kind": kind, "type": t, "tensor": name, "shape": list(w.shape), "t_old": t_old,
                         "t_new": t_new, "sqnr_old": sqnr(old, w, imp, g_old), "sqnr_new": sqnr(new, w, imp, g_new)})
            r = rows[-1]
            log.info("%s %-6s %-24s %.3fs -> %.3fs  %.3f -> %.3f dB", kind, t, name, t_old, t_new,
                     r["sqnr_old"], r["sqnr_new"])
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for kind in sorted({r["kind"] for r in rows}):
        for t in TYPES:
            rs = [r for r in rows if r["kind"] == kind and r["type"] == t]
            if not rs:
                continue
            d = [r["sqnr_new"] - r["sqnr_old"] for r in rs]
            t_old, t_new = sum(r["t_old"] for r in rs) / len(rs), sum(r["t_new"] for r in rs) / len(rs)
            out.append({"kind": kind, "type": t, "n": len(rs), "t_old": t_old, "t_new": t_new,
                        "speedup": t_old / t_new, "dsqnr_mean": sum(d) / len(d), "dsqnr_min": min(d),
                        "dsqnr_max": max(d)})
    return out


def plot(summary: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for kind, mk in (("random", "o"), ("real", "s")):
        s = [r for r in summary if r["kind"] == kind]
        if not s:
            continue
        x = range(len(s))
        axes[0].scatter(x, [r["speedup"] for r in s], marker=mk, label=kind)
        axes[1].scatter(x, [r["dsqnr_mean"] for r in s], marker=mk, label=kind)
        for ax in axes:
            ax.set_xticks(list(x), [r["type"] for r in s], rotation=45)
    axes[0].set_ylabel("fit speed-up (old time / new time)")
    axes[1].set_ylabel("SQNR new - old (dB, mean over tensors)")
    axes[1].axhline(0, color="k", lw=0.5)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision of the baseline implementation")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 tensors (~40 s load)")
    ap.add_argument("--repeat", type=int, default=1, help="fits per timing (best of)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    types = [t for t in args.types.split(",") if t]
    with tempfile.TemporaryDirectory() as tmp:
        base = load_baseline(args.base, Path(tmp))
        rows = run(random_tensors(), "random", types, base, args.repeat)
        if not args.no_real:
            rows += run(real_tensors(), "real", types, base, args.repeat)
    summary = summarize(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gguf_fit.json").write_text(json.dumps({"base": args.base, "threads": args.threads,
                                                   "summary": summary, "rows": rows}, indent=1))
    plot(summary, OUT / "gguf_fit.png")
    print(f"{'kind':7s} {'type':7s} {'n':>3s} {'old s':>8s} {'new s':>8s} {'speedup':>8s} "
          f"{'dSQNR mean':>11s} {'min':>8s} {'max':>8s}")
    for r in summary:
        print(f"{r['kind']:7s} {r['type']:7s} {r['n']:3d} {r['t_old']:8.3f} {r['t_new']:8.3f} {r['speedup']:8.2f} "
              f"{r['dsqnr_mean']:+11.4f} {r['dsqnr_min']:+8.4f} {r['dsqnr_max']:+8.4f}")
    allr = [r for r in rows]
    if allr:
        tot_old, tot_new = sum(r["t_old"] for r in allr), sum(r["t_new"] for r in allr)
        d = [r["sqnr_new"] - r["sqnr_old"] for r in allr]
        print(f"all: {tot_old:.2f}s -> {tot_new:.2f}s ({tot_old / tot_new:.2f}x); dSQNR mean {sum(d) / len(d):+.4f} "
              f"min {min(d):+.4f} dB")


if __name__ == "__main__":
    main()
