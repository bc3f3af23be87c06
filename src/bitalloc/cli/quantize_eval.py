"""``bitalloc quantize`` (a verified packed directory or compressed-tensors checkpoint) and ``bitalloc eval`` (its
quality vs the reference)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .common import DEFAULT_FORMATS, MODEL_HELP, _job_dir, _load_model, _texts, _windows, print_timings, run_config
from .options import (
    EVAL_TEXT_HELP, add_calib, add_common, add_constraints, add_ctx, add_job, add_measure_opts, add_model, add_out,
    add_recover, add_reuse_rounding, add_rotate, add_screen,
)


OUTPUTS = ("packed", "compressed-tensors", "vllm")


class _DefaultFormats(str):
    """``--formats`` left at its default (so ``--to compressed-tensors`` may replace it by what it can express)."""


class _ToAction(argparse.Action):
    """``--to``: with ``compressed-tensors`` the default candidate formats become the ones it can express (an
    explicit ``--formats`` is kept, and refused by the run config if it holds one it cannot)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        if values in ("compressed-tensors", "vllm") and isinstance(getattr(namespace, "formats", None),
                                                                  _DefaultFormats):
            from ..targets.compressed_tensors import default_formats
            from ..targets.vllm import VLLM_DEFAULT_FORMATS

            namespace.formats = _DefaultFormats(default_formats(namespace.formats) if values == "compressed-tensors"
                                                else VLLM_DEFAULT_FORMATS)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..budget import Budget
    from ..jobs.run import run_export
    from ..measure import Measurement
    from ..plan import Plan
    from ..targets.compressed_tensors import CompressedTensorsTarget
    from ..targets.packed import PackedTarget

    out = Path(args.out)
    if args.plan and not args.measurement:
        raise InputError("--plan needs --measurement (the plan is re-validated against its table)")
    if args.plan:  # a bad plan is refused before the model is loaded (re-read against it in the job)
        Plan.load(args.plan, Measurement.load(args.measurement))
    config = run_config(
        args, out, _job_dir(args, out), budgets=(Budget.parse(args.budget),) if args.budget else (),
        constraints="fused" if args.to == "vllm" else args.constraints, uniform_format=args.format,
        measurement=Path(args.measurement) if args.measurement else None, plan=Path(args.plan) if args.plan else None,
        output=args.to,  # compressed-tensors: the formats it cannot express are refused here, before any load
    )
    res = run_export(config, CompressedTensorsTarget(out, config.formats) if args.to in ("compressed-tensors", "vllm")
                     else PackedTarget(out))
    if res.plan is not None:
        print(res.plan.summary())
    info = res.written.info
    print(f"wrote {out}: {info['bytes']} B ({info['bytes'] / 2**20:.2f} MiB, {info['bpw']:.4f} bpw), verified")
    print_timings(res.timings)
    return 0



def cmd_eval(args: argparse.Namespace) -> int:
    from ..api import load_packed
    from ..data import default_eval_files
    from ..evaluate import check_same_architecture, evaluate
    from ..models.sources import default_model_path, meta_model
    from .options import placement_of

    # checked against its manifest first (packed, compressed-tensors, or the --budget model of a nested artifact)
    cand, info = load_packed(args.dir, verify=not args.no_verify, budget=args.budget)
    check_same_architecture(cand, meta_model(args.reference or default_model_path()), "packed directory's model")
    ref, tok = _load_model(args.reference)
    files = _texts(args.text, default_eval_files)
    windows = _windows(tok, files, args.windows, args.ctx)
    r = evaluate(cand, ref, windows, progress=not args.quiet, placement=placement_of(args, ref))
    res = {**r.to_dict(), "bytes": info["bytes"], "bpw": info["bpw"]}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"ppl {r.ppl:.4f} (reference {r.ref_ppl:.4f})  kld {r.kld:.6f}  top1 {r.top1:.4f}  "
              f"{info['bytes']} B ({info['bpw']:.4f} bpw)  over {r.ntokens} tokens")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``quantize`` and ``eval`` on the subcommand set ``sub``."""
    p = sub.add_parser("quantize", help="quantize a model under a budget (or uniformly) and save it",
                       description="Measure (or reuse --measurement), allocate (or reuse --plan), quantize "
                       "sequentially block by block and write a verified packed directory that bitalloc.load() reads.")
    add_model(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="byte budget over all weights: 3.5bpw, 120MB, 1.2GiB, 88201792B")
    g.add_argument("--format", metavar="FMT", help="uniform baseline: every allocated tensor in FMT (e.g. int4-g128)")
    add_calib(p, 32)
    add_measure_opts(p, DEFAULT_FORMATS, "gptq", 8)
    p.set_defaults(formats=_DefaultFormats(DEFAULT_FORMATS))
    p.add_argument("--to", choices=OUTPUTS, default="packed", action=_ToAction,
                   help="output: a packed directory (bitalloc.load), a compressed-tensors checkpoint (transformers "
                   "loads it; default formats then the symmetric ints and fp16), or vllm: the same checkpoint from "
                   "only the formats vLLM has kernels for (4/8-bit ints, fp8, nvfp4, fp16), with --constraints fused "
                   "(vLLM fuses q/k/v and gate/up) (default packed)")
    add_screen(p)
    add_reuse_rounding(p)
    add_recover(p)
    add_rotate(p)
    p.add_argument("--measurement", metavar="TABLE", help="reuse a measurement table instead of measuring")
    p.add_argument("--plan", metavar="PLAN", help="use this (possibly edited) plan; needs --measurement")
    add_constraints(p)
    add_out(p, "output directory (must not exist)", "replace an existing output directory")
    add_job(p)
    add_common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity, KLD and top-1 agreement of a quantized model vs its reference",
                       description="Evaluate a packed directory against the fp reference on held-out text "
                       "(context windows scored on their second half, as llama.cpp's perplexity tool does).")
    p.add_argument("dir", metavar="DIR", help="packed directory (or compressed-tensors folder) from `bitalloc quantize`, "
                   "or a nested artifact from `bitalloc nest` with --budget")
    p.add_argument("--budget", help="with a nested artifact: the size to extract and evaluate (3.5bpw, 90MB)")
    p.add_argument("--reference", metavar="MODEL", help=MODEL_HELP.replace("model:", "reference model:"))
    p.add_argument("--text", nargs="+", metavar="TEXT", help=EVAL_TEXT_HELP)
    p.add_argument("--windows", type=int, default=32, metavar="N", help="evaluation windows (default 32)")
    add_ctx(p)
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking DIR against its manifest.json (bitalloc.json is still validated)")
    p.add_argument("--json", action="store_true", help="print JSON: ppl, ref_ppl, kld, top1, ntokens, bytes, bpw")
    add_common(p)
    p.set_defaults(func=cmd_eval)
