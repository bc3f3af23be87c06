"""Check the Pareto benchmark's choice of "best uniform format" by measuring the alternatives.

``bench/pareto.py`` picks, per budget, the uniform format with the least *predicted* error among those that fit.
This script quantizes the rescaled SmolLM2 uniformly to each format given here (same calibration and
evaluation windows as the Pareto benchmark) and reports the *measured* KLD, so a reader can see whether a
larger-but-unpicked uniform format would have been a harder baseline.

Writes bench/results/uniform_check.json and prints a table.
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
from bitalloc.models.view import ModelView
from bitalloc.pipeline import CachedReference, plan_for_assignments
from bitalloc.quantize import quantize_model, restore, snapshot, uniform_assignments

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int4-g128,int3-g128")
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS / "uniform_check.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model, tok = load_reference(rescaled=True)
    reference = CachedReference(copy.deepcopy(model))
    view = ModelView(model)
    calib = token_windows(tok, read_texts(default_calibration_files()), args.ctx, args.calib_windows)
    evals = token_windows(tok, read_texts(default_eval_files()), args.ctx, args.eval_windows)
    saved = snapshot(model)
    rows = []
    for fmt in [f for f in args.formats.split(",") if f]:
        t0 = time.perf_counter()
        restore(model, saved)
        assign = uniform_assignments(model, fmt, view)
        plan = plan_for_assignments(view, assign, f"uniform {fmt}")
        quantize_model(model, view, assign, calib, method=args.method, progress=False)
        r = evaluate(model, reference, evals)
        rows.append({"format": fmt, "method": args.method, "bytes": plan.total_bytes, "bpw": plan.bpw,
                     "kld": r.kld, "ppl": r.ppl, "top1": r.top1, "seconds": time.perf_counter() - t0})
    Path(args.out).write_text(json.dumps({"calib_windows": int(calib.shape[0]), "eval_windows": int(evals.shape[0]),
                                          "ctx": args.ctx, "rows": rows}, indent=1) + "\n")
    print(f"{'format':<12} {'method':<6} {'bpw':>7} {'kld':>9} {'ppl':>9} {'top1':>7}")
    for r in rows:
        print(f"{r['format']:<12} {r['method']:<6} {r['bpw']:>7.4f} {r['kld']:>9.5f} {r['ppl']:>9.3f} {r['top1']:>7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
