"""``bitalloc gguf IN.gguf --budget SIZE -o OUT.gguf``: the best per-tensor llama.cpp types at a file size.

IN may be F32/F16 or already quantized (dequantized on load); it is also the template whose metadata
(architecture, tokenizer, chat template...) the output keeps.  The command parses its options and the input's
headers (:func:`bitalloc.targets.gguf.preflight`: what the job could only refuse after measuring is refused
first), builds the run config and runs the staged job (:func:`bitalloc.jobs.run.run_export`) to the GGUF target
(:class:`bitalloc.targets.gguf.GGUFTarget`): after ``kill -9`` the same command continues from the last
checkpoint and writes a byte-identical file; ``OUT.gguf.manifest.json`` beside it lists the SHA-256 of the
file and of every tensor's raw bytes, and the file is re-read and checked against it before success.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, output_exists
from .common import check_rotation_of, print_timings
from .options import METHODS, add_recover, add_reuse_rounding, add_rotate, add_screen, recover_of, rotate_of

if TYPE_CHECKING:  # pragma: no cover
    from ..jobs.config import RunConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser | None:
    """Register ``gguf`` (when gguf-py is installed)."""
    try:
        from ..targets.gguf import GGUF_FORMATS
    except ImportError:
        return None
    p = subparsers.add_parser(
        "gguf", help="a llama.cpp GGUF with the best per-tensor types at a file size",
        description="Measure each tensor's sensitivity to every GGUF block type its shape allows, choose the "
        "types (exact allocation) so the output FILE fits --budget, quantize with GPTQ onto the llama.cpp "
        "grids and write a verified GGUF that keeps every metadata key of the input.",
    )
    p.add_argument("input", metavar="IN.gguf", help="input GGUF (F32, F16 or quantized: dequantized first)")
    p.add_argument("--budget", required=True, help="output file size (95MB, 90MiB, 0.1GiB, 98000000B) or bpw")
    p.add_argument("-o", "--out", required=True, metavar="OUT.gguf", help="output GGUF (must not exist)")
    p.add_argument("--calib", nargs="+", metavar="TEXT",
                   help="calibration text files or directories of .txt (default: Shakespeare comedies)")
    p.add_argument("--windows", type=int, default=32, metavar="N", help="calibration windows (default 32)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--formats", default=",".join(GGUF_FORMATS), metavar="F,F,...",
                   help="candidate GGUF types (default: all of them; each tensor gets those its shape allows)")
    p.add_argument("--method", choices=METHODS, default="gptq", help="rounding (default gptq)")
    add_screen(p)
    add_reuse_rounding(p)
    add_recover(p)
    add_rotate(p)
    p.add_argument("--measure-method", choices=METHODS, default=None,
                   help="rounding when measuring each tensor x type (default: --method); rtn measures about "
                   "twice as fast, GPTQ predicts the errors of a GPTQ output more closely")
    p.add_argument("--no-fisher", dest="fisher", action="store_false",
                   help="allocate by layer-output error instead of Fisher-weighted error")
    p.add_argument("--fisher-windows", type=int, default=8, metavar="N", help="windows of the gradient pass")
    p.add_argument("--activations", choices=("cpu", "none"), default="cpu",
                   help="llama.cpp's CPU backend rounds every matmul input to 8 bits (Q8_0 blocks of 32 for the "
                   "32-wide types, Q8_K blocks of 256 for K-quants); cpu (default) counts that error when choosing "
                   "types, none measures the weights alone (e.g. for a GPU backend, whose kernels round differently)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--job", metavar="DIR", help="job directory for checkpoints (default OUT.gguf.job); rerunning "
                   "the same command after an interruption continues from the last checkpoint")
    p.add_argument("--keep-job", action="store_true", help="keep the job directory after success")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.set_defaults(func=cmd_gguf)
    return p


def measure_method(args: argparse.Namespace) -> str:
    """The rounding of the measurement: ``--measure-method``, else ``--method``."""
    return getattr(args, "measure_method", None) or args.method


def activations(args: argparse.Namespace) -> str:
    """``--activations``: ``cpu`` (llama.cpp's CPU activation rounding measured) or ``none``."""
    return getattr(args, "activations", None) or "cpu"


def run_config_of(args: argparse.Namespace) -> RunConfig:
    """The run config of ``bitalloc gguf``; the budget is parsed here, once."""
    from ..budget import Budget
    from ..data import default_calibration_files
    from ..jobs.config import RunConfig, default_job_dir
    from ..targets.gguf import gguf_formats

    out = Path(args.out)
    return RunConfig(
        device=str(getattr(args, "device", "cpu")),
        model=Path(args.input), calib_texts=tuple(Path(p) for p in args.calib) if args.calib else
        tuple(default_calibration_files()), windows=args.windows, ctx=args.ctx,
        job_dir=Path(args.job) if args.job else default_job_dir(out), formats=tuple(gguf_formats(args.formats)),
        method=args.method, measure_method=measure_method(args), fisher=bool(args.fisher),
        fisher_windows=args.fisher_windows, activation_noise=activations(args) == "cpu",
        budgets=(Budget.parse(args.budget),), overwrite=args.overwrite, keep_job=args.keep_job,
        progress=not args.quiet, screen=bool(args.screen), recover=recover_of(args), output="gguf",
        reuse_rounding=bool(args.reuse_rounding), **rotate_of(args),
    )


def gguf_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """The job fingerprint of ``bitalloc gguf`` (input and calibration text digests, the options)."""
    from ..targets.gguf import GGUFTarget

    return run_config_of(args).fingerprint({"target": GGUFTarget.kind})


def cmd_gguf(args: argparse.Namespace) -> int:
    from ..export.gguf import read_template
    from ..jobs.run import run_export
    from ..models.sources import meta_model
    from ..targets.gguf import GGUFTarget, preflight

    src, out = Path(args.input), Path(args.out)
    if src.suffix.lower() != ".gguf":
        raise InputError(f"{src}: the input must be a .gguf file")
    config = run_config_of(args)
    if out.exists() and not args.overwrite and not config.job_dir.exists():
        raise output_exists(out)
    tpl = read_template(src)
    preflight(tpl, config.formats, config.budget)
    if config.rotate:
        check_rotation_of(lambda: meta_model(src), config.rotate, config.untie)
    limit = tpl.metadata.get(f"{tpl.arch}.context_length")
    if isinstance(limit, int) and not isinstance(limit, bool) and args.ctx > limit:
        raise InputError(f"--ctx {args.ctx} is longer than the model's context of {limit} tokens "
                         f"({tpl.arch}.context_length of {src}); give --ctx {limit} or less")
    t0 = time.perf_counter()
    res = run_export(config, GGUFTarget(out, tpl))
    w, cap = res.written, res.capacity
    mix = ""
    if res.plan is not None:
        counts: dict[str, int] = {}
        for e in res.plan.entries:
            counts[e.format] = counts.get(e.format, 0) + 1
        mix = " [" + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + \
            f"], predicted error {res.plan.error:.4g}"
    budget = f", budget {cap.limit} B{' of tensor data' if cap.unit == 'tensor data' else ''}" if cap else ""
    print(f"wrote {w.path}: {w.file_size} B ({w.file_size / 2**20:.2f} MiB{budget}), {w.n_tensors} tensors{mix}, "
          f"verified against {w.path.name}.manifest.json, in {time.perf_counter() - t0:.0f} s")
    print_timings(res.timings)
    return 0
