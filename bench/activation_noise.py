"""How well the measurement predicts the cost of llama.cpp's activation rounding, per kind of linear.

llama.cpp's CPU backend rounds every matmul input to 8 bits: Q8_0 (blocks of 32) for the 32-wide GGUF types,
Q8_K (blocks of 256) for the K-quants.  The measurement adds ``½ Σ_j grad_sq_j E[((x − R(x))·w_j)²]`` for it
(:mod:`bitalloc.activations`).  This bench compares that prediction, summed over every linear of one kind
(q_proj, …, down_proj, the tied lm_head), with the KLD the rounding really causes: the float rescaled SmolLM2
with only that kind's inputs rounded (:mod:`bitalloc.export.llamacpp_emulation`), against the float model, on
held-out windows.  Weights stay float: the rounding's cost alone.  The row that moves allocations on this model
is down_proj's Q8_K − Q8_0 difference (the only tensors both kinds of type can store).

Writes bench/results/activation_noise.json and .png and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitalloc.calibrate import fisher_pass, stream_blocks  # noqa: E402
from bitalloc.data import default_calibration_files, default_eval_files, read_texts, token_windows  # noqa: E402
from bitalloc.evaluate import evaluate  # noqa: E402
from bitalloc.export.llamacpp_emulation import llamacpp_matmuls  # noqa: E402
from bitalloc.models.rescale import load_reference  # noqa: E402
from bitalloc.pipeline import CachedReference  # noqa: E402
from bitalloc.stats import LinearStats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TYPE_OF = {"q8_0": "q8_0", "q8_k": "q6_k"}  # a GGUF type whose kernels use that activation rounding
log = logging.getLogger("activation_noise")


def kind_of(name: str) -> str:
    """``q_proj`` … ``down_proj`` for a block linear (module or weight name), else ``lm_head``."""
    parts = name.removesuffix(".weight").split(".")
    return parts[-1] if ".layers." in name else "lm_head"


def predicted(model: nn.Module, calib: torch.Tensor, fisher_windows: int) -> dict[tuple[str, str], float]:
    """``{(kind, rounding): ½ Σ g·act}`` summed over the linears of that kind, from the calibration windows."""
    grads = fisher_pass(model, None, calib[:fisher_windows], batch_size=2, progress=False)
    out: dict[tuple[str, str], float] = defaultdict(float)
    for block in stream_blocks(model, None, calib, fisher=grads, progress=False, roundings=list(TYPE_OF)):
        for name, st in block.items():
            for role in st.roles:
                if isinstance(role, LinearStats) and role.grad_sq is not None:
                    for r, act in role.act_noise.items():
                        out[(kind_of(name), r)] += 0.5 * float(role.grad_sq.double() @ act)
    return dict(out)


def float_reference(model: nn.Module, evals: torch.Tensor) -> CachedReference:
    """The float model's logits on ``evals``, computed now (before any rounding hook) and cached."""
    ref = CachedReference(model)
    evaluate(model, ref, evals)
    return ref


def emulated(model: nn.Module, evals: torch.Tensor, types: dict[str, str], ref: CachedReference) -> tuple[float, float]:
    """(KLD, top-1) of the model with the named linears' inputs rounded, against the float logits ``ref``
    (:func:`float_reference`), scored as every bitalloc evaluation is (:func:`bitalloc.evaluate.evaluate`)."""
    with llamacpp_matmuls(model, types):
        r = evaluate(model, ref, evals)
    return r.kld, r.top1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--fisher-windows", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_reference(rescaled=True)
    calib = token_windows(tok, read_texts(default_calibration_files()), args.ctx, args.calib_windows)
    evals = token_windows(tok, read_texts(default_eval_files()), args.ctx, args.eval_windows)
    pred = predicted(model, calib, args.fisher_windows)
    log.info("predicted in %.0f s", time.perf_counter() - t0)
    ref = float_reference(model, evals)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    rows = []
    for (kind, r), p in sorted(pred.items()):
        kld, top1 = emulated(model, evals, {n: TYPE_OF[r] for n in linears if kind_of(n) == kind}, ref)
        rows.append({"kind": kind, "rounding": r, "predicted": p, "emulated_kld": kld, "emulated_top1": top1,
                     "ratio": p / kld if kld > 0 else None})
    every = {n: "q8_0" for n in linears}
    kld, top1 = emulated(model, evals, every, ref)
    total = sum(p for (_, r), p in pred.items() if r == "q8_0")
    rows.append({"kind": "all", "rounding": "q8_0", "predicted": total, "emulated_kld": kld, "emulated_top1": top1,
                 "ratio": total / kld if kld > 0 else None})
    down = {r["rounding"]: r for r in rows if r["kind"] == "down_proj"}
    diff = None
    if {"q8_0", "q8_k"} <= set(down):
        p = down["q8_k"]["predicted"] - down["q8_0"]["predicted"]
        e = down["q8_k"]["emulated_kld"] - down["q8_0"]["emulated_kld"]
        diff = {"predicted": p, "emulated_kld": e, "ratio": p / e if e > 0 else None}
    body = {"settings": vars(args), "rows": rows, "down_proj_q8_k_minus_q8_0": diff,
            "seconds": time.perf_counter() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "activation_noise.json").write_text(json.dumps(body, indent=1) + "\n")
    plot(rows, RESULTS / "activation_noise.png")
    print(f"{'kind':10} {'rounding':8} {'predicted':>10} {'emulated':>10} {'top-1':>7} {'pred/emul':>9}")
    for r in rows:
        ratio = f"{r['ratio']:9.2f}" if r["ratio"] is not None else "        -"
        print(f"{r['kind']:10} {r['rounding']:8} {r['predicted']:10.5f} {r['emulated_kld']:10.5f} "
              f"{r['emulated_top1']:7.4f} {ratio}")
    if diff is not None:
        print(f"down_proj Q8_K - Q8_0: predicted {diff['predicted']:.5f}, emulated {diff['emulated_kld']:.5f}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    labels = [f"{r['kind']}\n{r['rounding']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar([i - 0.2 for i in x], [r["predicted"] for r in rows], 0.4, label="predicted (½ Σ g·act)")
    ax.bar([i + 0.2 for i in x], [r["emulated_kld"] for r in rows], 0.4, label="emulated KLD")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("KLD (nats/token)")
    ax.set_title("Cost of llama.cpp's activation rounding, by kind of linear (rescaled SmolLM2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
