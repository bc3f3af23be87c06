"""``bitalloc nest MODEL --out ART`` (one nested artifact) and ``bitalloc extract ART --budget B --out DIR`` /
``--gguf OUT.gguf`` (the model of any size from it, in seconds, with no calibration text): :mod:`bitalloc.nest`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from .common import _job_dir, _texts
from .options import add_calib, add_common, add_job, add_model, add_out


def cmd_nest(args: argparse.Namespace) -> int:
    from ..data import default_calibration_files
    from ..jobs.nest import NestConfig, run_nest
    from ..nest import artifact_bytes
    from ..nest.build import check_options
    from ..nest.codes import DESCENT_PASSES
    from ..nest.refit import default_refit

    passes = DESCENT_PASSES if args.descent_passes is None else args.descent_passes
    refit = default_refit(args.group, args.max_bits) if args.refit_depths is None else args.refit_depths
    check_options(args.group, args.max_bits, args.outliers, passes, refit)  # before the model is loaded
    out = Path(args.out)
    config = NestConfig(model=Path(args.model) if args.model else None, out=out,
                        calib_texts=tuple(_texts(args.calib, default_calibration_files)), windows=args.windows,
                        ctx=args.ctx, fisher=bool(args.fisher), fisher_windows=args.fisher_windows, group=args.group,
                        max_bits=args.max_bits, outliers=args.outliers, passes=passes, refit=refit,
                        job_dir=_job_dir(args, out), keep_job=args.keep_job, overwrite=args.overwrite,
                        progress=not args.quiet, device=getattr(args, "device", "cpu"))
    t0 = time.perf_counter()
    info = run_nest(config)
    size = artifact_bytes(out)
    print(f"nested {len(info['tensors'])} tensors (int{2}..int{args.max_bits}, groups of {args.group}, {args.outliers} "
          f"exact per row, {refit} refit depths, {passes} descent passes) in "
          f"{time.perf_counter() - t0:.0f} s -> {out} ({size} B, {8 * size / info['total_params']:.3f} bits per "
          f"weight on disk){'; GGUFs can be extracted' if info.get('gguf_template') else ''}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ..nest import extract_gguf, extract_packed

    if (args.out is None) == (args.gguf is None):
        raise InputError("extract writes one output: give --out DIR (a packed directory) or --gguf OUT.gguf")
    t0 = time.perf_counter()
    if args.gguf is not None:
        w = extract_gguf(args.art, args.budget, args.gguf, objective=args.objective, verify=not args.no_verify,
                         overwrite=args.overwrite)
        print(f"extracted {args.gguf}: {w.file_size} B, {w.n_tensors} tensors, verified, in "
              f"{time.perf_counter() - t0:.1f} s")
        return 0
    info = extract_packed(args.art, args.budget, args.out, objective=args.objective, verify=not args.no_verify,
                          overwrite=args.overwrite)
    print(f"extracted {args.out}: {info['bytes']} B ({info['bpw']:.4f} bpw, budget {args.budget}), verified, in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``nest`` and ``extract`` on the subcommand set ``sub``."""
    p = sub.add_parser("nest", help="one nested artifact from which any size is extracted in seconds",
                       description="Calibrate once and store every tensor as nested integer codes (bit-planes: "
                       "depth k is exactly int{k}-g{G}) with the measured error of every depth; `bitalloc extract` "
                       "then writes the best model at any budget without calibration or rounding.")
    add_model(p)
    add_calib(p, 32)
    p.add_argument("--group", type=int, default=64, help="columns per scale: 32, 64 or 128 (default 64; 128 reaches "
                   "smaller models; 32 with --outliers 0 lets a GGUF source's artifact extract GGUFs: its int4/int5 "
                   "depths are exactly Q4_1/Q5_1)")
    p.add_argument("--max-bits", type=int, default=6, help="deepest depth, 2..8 (default 6): the largest model the "
                   "artifact holds, and about its size")
    p.add_argument("--outliers", type=int, default=0, help="elements per row stored exactly by every depth: 0, 1, 2, "
                   "4, 8 or 16 (default 0; they keep a massive-activation channel's weights from setting one range for "
                   "every depth, at 4 bytes each; GGUF extraction needs 0)")
    p.add_argument("--descent-passes", type=int, default=None, metavar="N",
                   help="sweeps of coordinate descent on every depth's output error after the joint rounding, 0..16 "
                   "(default: bitalloc.nest.codes.DESCENT_PASSES, 2; 0 = the joint rounding alone; with the refit "
                   "depths they took `nest` of SmolLM2-135M from about 6 to 20 min on 2 cores)")
    p.add_argument("--refit-depths", type=int, default=None, metavar="N",
                   help="the N shallowest depths get their own scale and zero per group, refit to their codes (2 bytes "
                   "per group each; their prefixes stay exactly int{k}-g{G}); default: as many as add at most 12%% to "
                   "the artifact (3 at --group 64 --max-bits 6); 0 = every depth on the shared lattice (which is refit to "
                   "the codes either way)")
    p.add_argument("--no-fisher", dest="fisher", action="store_false",
                   help="skip the gradient pass: allocate by layer-output error instead of Fisher-weighted error")
    p.add_argument("--fisher-windows", type=int, default=8, metavar="N", help="windows of the gradient pass (default 8)")
    add_out(p, "artifact directory (must not exist)", "replace an existing artifact")
    add_job(p)
    add_common(p)
    p.set_defaults(func=cmd_nest)

    e = sub.add_parser("extract", help="the model of a budget from a nested artifact (seconds, no calibration)",
                       description="Allocate from the artifact's stored errors under --budget (exact to the byte) "
                       "and write the chosen prefixes as a packed directory (--out) or a GGUF (--gguf).")
    e.add_argument("art", metavar="ART", help="nested artifact (from `bitalloc nest`)")
    e.add_argument("--budget", required=True, help="bits per weight over all weights (3.5bpw) or a size (90MB, 0.1GiB)")
    e.add_argument("--gguf", metavar="OUT.gguf", help="write a GGUF instead of a packed directory")
    e.add_argument("--objective", choices=("fisher", "output"), default=None,
                   help="allocation objective (default: fisher when the artifact has it)")
    e.add_argument("--no-verify", action="store_true", help="skip checking the tensors read against the manifest")
    add_out(e, "packed output directory (must not exist)", "replace an existing output", required=False)
    add_common(e)
    e.set_defaults(func=cmd_extract)
