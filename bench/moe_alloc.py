"""MoE allocation: per-expert formats vs one format per layer and projection (what GGUF's stacked ffn_*_exps
force), at the same byte budget, on a tiny RANDOM (untrained) Qwen3-MoE-shaped model.

The model (hidden 128, 2 layers, 8 experts, top-2, vocab 512) is random and fed random token ids: the numbers
compare the two allocations on one model, they say nothing about trained MoE LLMs.  Calibration and
evaluation windows are disjoint draws.  For each budget: measure once (GPTQ errors, Fisher objective),
allocate freely and with every layer's experts tied per projection (``allocate.Constraints(tie_groups=...)``
from :func:`bitalloc.models.experts.expert_stacks`), quantize each plan with GPTQ and score KLD against the fp
model.  Prints a table, writes bench/results/moe_alloc.json.

    PYTHONPATH=src python bench/moe_alloc.py [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from bitalloc.budget import Constraints
from bitalloc.evaluate import evaluate
from bitalloc.models.experts import expert_stacks, unfuse_experts
from bitalloc.models.view import ModelView
from bitalloc.pipeline import make_plan, measure_model
from bitalloc.quantize import quantize_model

log = logging.getLogger("bench.moe_alloc")
RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ["int2-g32", "int3-g32", "int4-g32", "int5-g32", "int6-g32", "int8-g32"]
BUDGETS = ["3.25bpw", "3.5bpw", "4bpw", "4.5bpw", "5bpw"]
VOCAB, CTX = 512, 64


def build(seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.05,
                         tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # a decisive, uneven router (a few experts get most tokens)
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    unfuse_experts(model)
    return model.requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(args.seed + 100)
    calib = torch.randint(0, VOCAB, (16, CTX), generator=gen)
    heldout = torch.randint(0, VOCAB, (16, CTX), generator=gen)
    ref = build(args.seed)
    view = ModelView(ref)
    t0 = time.time()
    m = measure_model(ref, view, calib, FORMATS, "gptq", progress=False)
    tied = Constraints(tie_groups=tuple(names for _b, _p, names in expert_stacks(view)))
    rows = []
    for budget in BUDGETS:
        row = {"budget": budget}
        for label, cons in (("per_expert", None), ("tied", tied)):
            plan = make_plan(m, budget, cons)
            cand = build(args.seed)
            quantize_model(cand, None, plan, calib, "gptq", progress=False)
            r = evaluate(cand, ref, heldout)
            expert_fmts = sorted({f for n, f in plan.assignments.items() if ".experts." in n})
            row[label] = {"bytes": plan.total_bytes, "bpw": plan.bpw, "predicted_error": plan.error, "kld": r.kld,
                          "top1": r.top1, "expert_formats": expert_fmts}
        rows.append(row)
    out = {"model": "random Qwen3-MoE-shaped: hidden 128, 2 layers, 8 experts top-2, vocab 512 (untrained)",
           "calibration": f"{tuple(calib.shape)} random ids", "evaluation": f"{tuple(heldout.shape)} random ids",
           "formats": FORMATS, "method": "gptq", "objective": m.objectives[0], "seed": args.seed,
           "seconds": round(time.time() - t0, 1), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_alloc.json").write_text(json.dumps(out, indent=1) + "\n")
    hdr = f"{'budget':>8} | {'per-expert B':>12} {'KLD':>9} | {'tied B':>9} {'KLD':>9} | tied/per-expert KLD"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        a, b = r["per_expert"], r["tied"]
        lines.append(f"{r['budget']:>8} | {a['bytes']:>12} {a['kld']:>9.5f} | {b['bytes']:>9} {b['kld']:>9.5f} | "
                     f"{b['kld'] / a['kld']:.3f}")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
