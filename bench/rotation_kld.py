"""End-to-end KLD gain of rotations (``python bench/rotation_kld.py [BASE ...]``).

The rescaled SmolLM2-135M with every block linear in BASE, against the same with the recorded rotation
``had-BASE`` (W·R stored, decoding applies Rᵀ), with the folded v/o rotation (``models.rotate.rotate_vo_``, an
exact change of the model), with the folded residual-stream rotation (``res``: ``models.rotate.rotate_residual_``,
what ``--rotate residual --untie-head`` does) and with combinations (``vo+had``, ``res+had``, ``res+vo``).  The tied
embedding is kept in q8_0 (the rescaled copy leaves it on its Q8_0 grid, so it adds no error and every variant
without ``res`` has the same bytes).  ``res`` needs the head untied (SmolLM2's final norm is not uniform): the
rotated embedding and the head's own copy are both q8_0, so those rows carry one more q8_0 matrix of vocab x
hidden (reported in ``bytes``) and q8_0's error on the rotated embedding, which no longer sits on its grid.  GPTQ on ``--calib`` comedy windows of 512
tokens, KLD against the fp model on ``--eval`` tragedy windows (second half of each window scored).

Writes bench/results/rotation_kld.json and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

from bitalloc.data import default_calibration_files, default_eval_files, read_texts, token_windows
from bitalloc.evaluate import evaluate
from bitalloc.models.rescale import load_reference
from bitalloc.models.rotate import rotate_residual_, rotate_vo_
from bitalloc.quantize import quantize_model, uniform_assignments

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("plain", "had", "vo", "vo+had", "res", "res+had", "res+vo")


def run(base: str, variant: str, ref: torch.nn.Module, calib: torch.Tensor, held: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    parts = set(variant.split("+")) - {"plain"}
    if not parts <= {"vo", "res", "had"}:
        raise SystemExit(f"unknown variant {variant!r} (parts: plain, vo, res, had)")
    model = copy.deepcopy(ref)
    if "res" in parts:
        rotate_residual_(model, seed=0, untie=True)
    if "vo" in parts:
        rotate_vo_(model, seed=0)
    fid = ("had-" if "had" in parts else "") + base
    plan = uniform_assignments(model, fid)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in plan:
            plan[name] = "q8_0"
    q = quantize_model(model, None, plan, calib, "gptq", progress=False)
    r = evaluate(model, ref, held)
    return {"base": base, "variant": variant, "format": fid, "bytes": sum(t.nbytes() for t in q.values()),
            "kld": r.kld, "ppl": r.ppl, "ref_ppl": r.ref_ppl, "top1": r.top1, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bases", nargs="*", default=["int3-g128"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="rotation_kld", help="results file name (bench/results/NAME.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    ref, tok = load_reference(rescaled=True)
    calib = token_windows(tok, read_texts(default_calibration_files()), 512, args.calib)
    held = token_windows(tok, read_texts(default_eval_files()), 512, args.eval)
    rows = []
    for base in args.bases:
        for v in args.variants.split(","):
            rows.append(run(base, v, ref, calib, held))
            r = rows[-1]
            print(f"{base:<12} {v:<8} {r['bytes']:>10} B  kld {r['kld']:.5f}  ppl {r['ppl']:.3f} (ref {r['ref_ppl']:.3f})"
                  f"  top1 {r['top1']:.4f}  {r['seconds']:.0f} s", flush=True)
    for base in args.bases:
        plain = next((r for r in rows if r["base"] == base and r["variant"] == "plain"), None)
        if plain is not None:
            for r in rows:
                if r["base"] == base and r is not plain:
                    r["kld_over_plain"] = r["kld"] / plain["kld"]
                    print(f"{base:<12} {r['variant']:<8} KLD / plain = {r['kld_over_plain']:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({
        "bench": "rotation_kld", "model": "SmolLM2-135M-Instruct, rescaled (seed 0, sigma 0.1)", "method": "gptq",
        "calib_windows": int(calib.shape[0]), "eval_windows": int(held.shape[0]), "ctx": 512,
        "embedding": "q8_0 (on its grid in the rescaled copy: no error; res rows: the rotated embedding and the "
                     "untied head in q8_0)", "threads": torch.get_num_threads(),
        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
