"""The ``bitalloc`` command: measure, plan, quantize, eval, sweep, demo (and gguf when installed).

Thin: parses options, calls the library, prints.  Every user mistake (a :class:`BitallocError`) is one line
``error: <message>`` on stderr and exit status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import BitallocError, InputError

log = logging.getLogger("bitalloc")

DEFAULT_FORMATS = (
    "int2-g32,int2-g64,int2-g128,int3-g32,int3-g64,int3-g128,int4-g32,int4-g64,int4-g128,"
    "int5-g64,int5-g128,int6-g128,int8-g128,fp16"
)
DEMO_FORMATS = "int2-g64,int3-g64,int3-g128,int4-g64,int4-g128,int8-g128"
DEMO_BUDGETS = "3.5bpw,4.5bpw"
MODEL_HELP = "model: a Hugging Face directory (safetensors) or a .gguf file (default: the packaged SmolLM2-135M-Instruct)"


# ------------------------------------------------------------------------------------------- helpers
def _load_model(source: str | None) -> tuple[Any, Any]:
    from .models.sources import default_model_path, load_model

    # weights in a memory-mapped spill file, resident one block at a time (values identical to a whole load)
    return load_model(source if source else default_model_path(), low_memory=True)


def _texts(paths: Sequence[str] | None, default: Callable[[], list[Path]]) -> list[Path]:
    return [Path(p) for p in paths] if paths else default()


def _windows(tokenizer: Any, paths: Sequence[Path], n: int, ctx: int) -> Any:
    from .data import read_texts, token_windows

    if tokenizer is None:
        raise InputError("the model has no tokenizer, so text cannot be tokenized")
    return token_windows(tokenizer, read_texts(paths), ctx, n)


def _calib(args: argparse.Namespace, tokenizer: Any) -> Any:
    from .data import default_calibration_files

    files = _texts(args.calib, default_calibration_files)
    return files, _windows(tokenizer, files, args.windows, args.ctx)


def _formats(text: str) -> list[str]:
    from .formats import get_format

    ids = [f.strip() for f in text.split(",") if f.strip()]
    if not ids:
        raise InputError("--formats is empty")
    return [get_format(f).id for f in ids]


def _budgets(text: str) -> list[str]:
    from .budget import Budget

    out = [b.strip() for b in text.split(",") if b.strip()]
    if not out:
        raise InputError("--budgets is empty")
    for b in out:
        Budget.parse(b)
    return out


def _constraints(name: str | None, view: Any) -> Any:
    from .budget import Constraints
    from .pipeline import fused_constraints

    if name in (None, "none"):
        return Constraints()
    return fused_constraints(view)


def _check_out(path: str, overwrite: bool) -> Path:
    p = Path(path)
    if p.exists() and not overwrite:
        raise InputError(f"output {p} already exists (use --overwrite to replace it)")
    return p


def _precheck(args: argparse.Namespace) -> None:
    """Fail on malformed options and missing files before the (slow) model load."""
    from .budget import Budget
    from .data import expand_paths
    from .formats import get_format

    for attr in ("calib", "eval", "text"):
        if getattr(args, attr, None):
            expand_paths(getattr(args, attr))
    if getattr(args, "budget", None):
        Budget.parse(args.budget)
    if getattr(args, "budgets", None):
        _budgets(args.budgets)
    if getattr(args, "format", None):
        get_format(args.format)
    if getattr(args, "formats", None):
        _formats(args.formats)
    for attr in ("windows", "eval_windows", "fisher_windows"):
        v = getattr(args, attr, None)
        if v is not None and v < 1:
            raise InputError(f"--{attr.replace('_', '-')} must be at least 1, got {v}")
    if getattr(args, "ctx", 512) < 4:
        raise InputError(f"--ctx must be at least 4, got {args.ctx}")
    for attr in ("measurement", "plan", "table"):
        v = getattr(args, attr, None)
        if v and not Path(v).is_file():
            raise InputError(f"file not found: {v}")


def _measure(args: argparse.Namespace, model: Any, view: Any, calib: Any, checkpoints: Any = None) -> Any:
    """The measurement table; ``checkpoints`` (a :class:`bitalloc.resume.MeasureCheckpoints`) resumes it."""
    from .pipeline import measure_model

    fisher_w = calib[: args.fisher_windows] if args.fisher else None
    resume = checkpoints.kwargs() if checkpoints is not None else {}
    return measure_model(model, view, calib, _formats(args.formats), args.method, args.fisher,
                         progress=not args.quiet, fisher_windows=fisher_w, **resume)


def _measure_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option that changes a measurement table."""
    return {"formats": ",".join(_formats(args.formats)), "method": args.method, "fisher": bool(args.fisher),
            "fisher_windows": args.fisher_windows, "windows": args.windows, "ctx": args.ctx}


def _inputs_fingerprint(model_arg: str | None, calib: Sequence[str] | None, options: dict[str, Any]) -> dict[str, Any]:
    """A job fingerprint: digests of the model files and of the calibration text, and the options."""
    from .data import default_calibration_files, expand_paths
    from .models.sources import default_model_path
    from .resume import model_digests, text_digest

    model = Path(model_arg) if model_arg else default_model_path()
    files = expand_paths(_texts(calib, default_calibration_files))
    return {"version": 1, "model": model_digests(model), "calibration": text_digest(files), "options": options}


# ------------------------------------------------------------------------------------------ commands
def cmd_measure(args: argparse.Namespace) -> int:
    from .models.view import ModelView
    from .resume import default_job_dir, run_measure_job

    out = Path(args.out)
    fmts = _formats(args.formats)  # fail on a bad id before loading anything
    job_dir = Path(args.job) if args.job else default_job_dir(out)
    if out.exists() and not args.overwrite and not job_dir.exists():
        raise InputError(f"output {out} already exists (use --overwrite to replace it)")
    t0 = time.perf_counter()

    def measure(model: Any, tok: Any, checkpoints: Any) -> Any:
        return _measure(args, model, ModelView(model), _calib(args, tok)[1], checkpoints)

    m = run_measure_job(out, job_dir, _inputs_fingerprint(args.model, args.calib, _measure_options(args)),
                        lambda: _load_model(args.model), measure, keep_job=args.keep_job, overwrite=args.overwrite)
    print(f"measured {len(m.tensors)} tensors x {len(fmts)} formats in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .budget import Constraints
    from .measure import Measurement
    from .pipeline import make_plan

    out = _check_out(args.out, args.overwrite)
    m = Measurement.load(args.table)
    cons = Constraints()
    if args.constraints == "fused":
        groups = _fused_from_names([t.name for t in m.tensors])
        cons = Constraints(tie_groups=groups)
    p = make_plan(m, args.budget, cons, args.objective)
    p.save(out)
    print(p.summary())
    print(f"-> {out}")
    return 0


def _fused_from_names(names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """q/k/v and gate/up of each block, found by name (the table holds no module structure)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        for kind, members in (("qkv", ("q_proj", "k_proj", "v_proj")), ("gu", ("gate_proj", "up_proj"))):
            for mem in members:
                if n.endswith(f".{mem}.weight"):
                    groups.setdefault((n[: -len(f"{mem}.weight")], kind), []).append(n)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


def _quantize_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes the output of ``quantize``: model and text digests, and the options."""
    options = {
        **_measure_options(args), "budget": args.budget, "format": args.format, "constraints": args.constraints,
        "measurement": _digest_or_none(args.measurement), "plan": _digest_or_none(args.plan),
    }
    return _inputs_fingerprint(args.model, args.calib, options)


def _digest_or_none(path: str | None) -> str | None:
    from .io.atomic import file_digest

    return file_digest(path) if path else None


def cmd_quantize(args: argparse.Namespace) -> int:
    from .measure import Measurement
    from .pipeline import check_measurement, make_plan, plan_for_assignments
    from .plan import Plan
    from .quantize import uniform_assignments
    from .resume import QuantizeSteps, default_job_dir, run_quantize_job

    out = Path(args.out)
    if args.plan and not args.measurement:
        raise InputError("--plan needs --measurement (the plan is re-validated against its table)")
    given = Measurement.load(args.measurement) if args.measurement else None
    job_dir = Path(args.job) if args.job else default_job_dir(out)
    if out.exists() and not args.overwrite and not job_dir.exists():
        raise InputError(f"output {out} already exists (use --overwrite to replace it)")

    def plan_of(measurement: Any, model: Any, view: Any) -> Any:
        if args.format:
            return plan_for_assignments(view, uniform_assignments(model, args.format, view), f"uniform {args.format}")
        check_measurement(measurement, model)
        if args.plan:
            return Plan.load(args.plan, measurement)
        return make_plan(measurement, args.budget, _constraints(args.constraints, view))

    def measure_of(model: Any, view: Any, calib: Any, checkpoints: Any) -> Any:
        return given if given is not None else _measure(args, model, view, calib, checkpoints)

    steps = QuantizeSteps(
        load=lambda: _load_model(args.model),
        calibration=lambda tok: _calib(args, tok)[1],
        measure=None if args.format else measure_of,
        plan=plan_of,
        method=args.method,
        progress=not args.quiet,
    )
    info = run_quantize_job(out, job_dir, _quantize_fingerprint(args), steps, keep_job=args.keep_job,
                            overwrite=args.overwrite, report=lambda p: print(p.summary()))
    print(f"wrote {out}: {info['bytes']} B ({info['bytes'] / 2**20:.2f} MiB, {info['bpw']:.4f} bpw), verified")
    return 0


def quantize_model_cli(model: Any, view: Any, plan: Any, calib: Any, args: argparse.Namespace) -> Any:
    from .quantize import quantize_model

    return quantize_model(model, view, plan, calib, method=args.method, progress=not args.quiet)


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import load
    from .data import default_eval_files
    from .evaluate import evaluate
    from .export.packed import read_packed

    info, _ = read_packed(args.dir)
    cand = load(args.dir)
    ref, tok = _load_model(args.reference)
    files = _texts(args.text, default_eval_files)
    windows = _windows(tok, files, args.windows, args.ctx)
    r = evaluate(cand, ref, windows, progress=not args.quiet)
    res = {**r.to_dict(), "bytes": info["bytes"], "bpw": info["bpw"]}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"ppl {r.ppl:.4f} (reference {r.ref_ppl:.4f})  kld {r.kld:.6f}  top1 {r.top1:.4f}  "
              f"{info['bytes']} B ({info['bpw']:.4f} bpw)  over {r.ntokens} tokens")
    return 0


def _sweep_fingerprint(args: argparse.Namespace, title: str) -> dict[str, Any]:
    """Everything that changes the outputs of ``sweep`` / ``demo``: model, calibration and evaluation text
    digests, and the options (the title is drawn in the PNG)."""
    from .data import default_eval_files, expand_paths
    from .resume import text_digest

    options = {
        **_measure_options(args), "budgets": ",".join(_budgets(args.budgets)), "eval_windows": args.eval_windows,
        "uniform": ",".join(_formats(args.uniform)) if args.uniform else None, "constraints": args.constraints,
        "uniform_candidates": 2, "title": title,
    }
    fp = _inputs_fingerprint(args.model, args.calib, options)
    fp["evaluation"] = text_digest(expand_paths(_texts(args.eval, default_eval_files)))
    return fp


def _run_sweep(args: argparse.Namespace, title: str) -> int:
    from .data import check_disjoint, default_calibration_files, default_eval_files
    from .resume import default_job_dir
    from .sweep import format_table
    from .sweep_job import OUTPUTS, SweepSteps, run_sweep_job

    budgets = _budgets(args.budgets)
    formats = _formats(args.formats)
    uniform = tuple(_formats(args.uniform)) if args.uniform else None
    out = Path(args.out)
    eval_files = _texts(args.eval, default_eval_files)
    check_disjoint(_texts(args.calib, default_calibration_files), eval_files)  # before the (slow) model load
    job_dir = Path(args.job) if args.job else default_job_dir(out)
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if existing and not args.overwrite and not job_dir.exists():
        raise InputError(f"output {out} already holds {', '.join(existing)} (use --overwrite to replace it)")
    steps = SweepSteps(
        load=lambda: _load_model(args.model),
        load_reference=lambda: _load_model(args.model)[0],
        calibration=lambda tok: _calib(args, tok)[1],
        evaluation=lambda tok: _windows(tok, eval_files, args.eval_windows, args.ctx),
        measure=lambda model, view, calib, ckpt: _measure(args, model, view, calib, ckpt),
        constraints=lambda view: _constraints(args.constraints, view),
        budgets=tuple(budgets), method=args.method, title=title, uniform=uniform,
        extra=(("ctx", args.ctx), ("formats", formats)), progress=not args.quiet,
    )
    res = run_sweep_job(out, job_dir, _sweep_fingerprint(args, title), steps, keep_job=args.keep_job,
                        overwrite=args.overwrite)
    print(format_table(res.points))
    print(f"measurement {res.measure_seconds:.0f} s; results: {', '.join(str(p) for p in res.paths)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    return _run_sweep(args, f"bitalloc sweep ({args.method})")


def cmd_demo(args: argparse.Namespace) -> int:
    return _run_sweep(args, "SmolLM2-135M-Instruct: allocated vs uniform (demo)")


# ---------------------------------------------------------------------------------------------- parser
def _add_calib(p: argparse.ArgumentParser, windows: int, required: bool = False) -> None:
    p.add_argument("--calib", nargs="+", metavar="TEXT", required=required,
                   help="calibration text files or directories of .txt (default: Shakespeare comedies)")
    p.add_argument("--windows", type=int, default=windows, metavar="N",
                   help=f"calibration windows of --ctx tokens (default {windows})")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")


def _add_measure_opts(p: argparse.ArgumentParser, formats: str, method: str, fisher_windows: int) -> None:
    p.add_argument("--formats", default=formats, metavar="F,F,...",
                   help=f"candidate formats, comma-separated (default {formats})")
    p.add_argument("--method", choices=("gptq", "rtn"), default=method,
                   help=f"rounding method for measuring errors and quantizing (default {method})")
    p.add_argument("--no-fisher", dest="fisher", action="store_false",
                   help="skip the gradient pass: allocate by layer-output error instead of Fisher-weighted error")
    p.add_argument("--fisher-windows", type=int, default=fisher_windows, metavar="N",
                   help=f"windows used by the Fisher (gradient) pass (default {fisher_windows})")


def _add_job(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", metavar="DIR", help="job directory for checkpoints (default OUT.job); rerunning the "
                   "same command after an interruption continues from the last checkpoint")
    p.add_argument("--keep-job", action="store_true", help="keep the job directory after success")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitalloc",
        description="Fit a language model into a byte budget with the least quality loss: measure each tensor's "
        "sensitivity to candidate formats, allocate formats exactly under the budget, quantize (RTN/GPTQ), "
        "evaluate and export.  Budgets: '3.5bpw' (bits per weight over ALL weights), '120MB', '1.2GiB', '88201792B'.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("measure", help="measure every tensor x candidate format (bytes, predicted error)",
                       description="Calibrate on text and write the measurement table (JSON) used by every budget.")
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    _add_calib(p, 32)
    _add_measure_opts(p, DEFAULT_FORMATS, "gptq", 8)
    p.add_argument("--out", required=True, help="output table (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_job(p)
    _add_common(p)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("plan", help="allocate formats under a budget from a measurement table",
                       description="Solve the exact allocation (ILP) for one budget and write an editable plan.")
    p.add_argument("table", metavar="TABLE", help="measurement table from `bitalloc measure`")
    p.add_argument("--budget", required=True, help="e.g. 3.5bpw, 120MB, 1.2GiB, 88201792B")
    p.add_argument("--constraints", choices=("none", "fused"), default="none",
                   help="fused: q/k/v and gate/up of each block share one format (default none)")
    p.add_argument("--objective", choices=("fisher", "output"), default=None,
                   help="error to minimise (default: fisher when the table has it)")
    p.add_argument("--out", required=True, help="output plan (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quantize", help="quantize a model under a budget (or uniformly) and save it",
                       description="Measure (or reuse --measurement), allocate (or reuse --plan), quantize "
                       "sequentially block by block and write a verified packed directory that bitalloc.load() reads.")
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="byte budget over all weights: 3.5bpw, 120MB, 1.2GiB, 88201792B")
    g.add_argument("--format", metavar="FMT", help="uniform baseline: every allocated tensor in FMT (e.g. int4-g128)")
    _add_calib(p, 32)
    _add_measure_opts(p, DEFAULT_FORMATS, "gptq", 8)
    p.add_argument("--measurement", metavar="TABLE", help="reuse a measurement table instead of measuring")
    p.add_argument("--plan", metavar="PLAN", help="use this (possibly edited) plan; needs --measurement")
    p.add_argument("--constraints", choices=("none", "fused"), default="none",
                   help="fused: q/k/v and gate/up of each block share one format (default none)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_job(p)
    _add_common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity, KLD and top-1 agreement of a quantized model vs its reference",
                       description="Evaluate a packed directory against the fp reference on held-out text "
                       "(context windows scored on their second half, as llama.cpp's perplexity tool does).")
    p.add_argument("dir", metavar="DIR", help="packed directory from `bitalloc quantize`")
    p.add_argument("--reference", metavar="MODEL", help=MODEL_HELP.replace("model:", "reference model:"))
    p.add_argument("--text", nargs="+", metavar="TEXT", help="evaluation text (default: Hamlet and Macbeth)")
    p.add_argument("--windows", type=int, default=32, metavar="N", help="evaluation windows (default 32)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--json", action="store_true", help="print JSON: ppl, ref_ppl, kld, top1, ntokens, bytes, bpw")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    for name, budgets, windows, fmts, method, help_ in (
        ("sweep", None, 32, DEFAULT_FORMATS, "gptq", "many budgets from one measurement: table + PNG of size vs KLD"),
        ("demo", DEMO_BUDGETS, 16, DEMO_FORMATS, "rtn", "the packaged SmolLM2 at several budgets vs uniform (no arguments needed)"),
    ):
        p = sub.add_parser(name, help=help_, description=help_ + "; uniform baselines are on the same axes.")
        if name == "sweep":
            p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
            p.add_argument("--budgets", required=True, help="comma-separated budgets, e.g. 2.5bpw,3bpw,4bpw")
        else:
            p.set_defaults(model=None)
            p.add_argument("--budgets", default=budgets, help=f"comma-separated budgets (default {budgets})")
        _add_calib(p, windows)
        _add_measure_opts(p, fmts, method, 4)
        p.add_argument("--eval", nargs="+", metavar="TEXT", help="evaluation text (default: Hamlet and Macbeth)")
        p.add_argument("--eval-windows", type=int, default=8 if name == "demo" else 16, metavar="N",
                       help="evaluation windows")
        p.add_argument("--uniform", metavar="F,F,...",
                       help="fixed uniform baselines (default: the best uniform format that fits each budget)")
        p.add_argument("--constraints", choices=("none", "fused"), default="none",
                       help="fused: q/k/v and gate/up of each block share one format")
        p.add_argument("--out", default="bitalloc-demo" if name == "demo" else None, required=name == "sweep",
                       help="output directory for measurement.json, sweep.json, sweep.png")
        p.add_argument("--overwrite", action="store_true", help="replace existing results in the output directory")
        _add_job(p)
        _add_common(p)
        p.set_defaults(func=cmd_sweep if name == "sweep" else cmd_demo)

    try:  # the GGUF export adds its own subcommand when present
        from . import gguf_cmd
    except ImportError:
        gguf_cmd = None  # type: ignore[assignment]
    if gguf_cmd is not None:
        gguf_cmd.add_parser(sub)
    return parser


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss), in MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def _log_peak_memory() -> None:
    """One line ``peak memory: N MiB`` on stderr, whatever the verbosity."""
    mem = logging.getLogger("bitalloc.memory")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    mem.addHandler(handler)
    mem.propagate = False
    mem.setLevel(logging.INFO)
    try:
        mem.info("peak memory: %d MiB", round(peak_memory_mib()))
    finally:
        mem.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _precheck(args)
        if getattr(args, "quiet", False) and args.command != "plan":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # -q: no progress bars from transformers either
        rc = int(args.func(args) or 0)
        if args.command != "plan":
            _log_peak_memory()
        return rc
    except BitallocError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
