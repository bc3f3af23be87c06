"""``bitalloc sweep`` (many budgets from one measurement) and ``bitalloc demo`` (the same, preset for SmolLM2)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import DEFAULT_FORMATS, DEMO_BUDGETS, DEMO_FORMATS, _budgets, _formats, _job_dir, _texts, run_config
from .options import (
    EVAL_TEXT_HELP, add_calib, add_common, add_constraints, add_job, add_measure_opts, add_model, add_out, add_recover,
    add_reuse_rounding, add_rotate,
)

DEMO_TITLE = "SmolLM2-135M-Instruct: allocated vs uniform (demo)"


def _run_sweep(args: argparse.Namespace, title: str) -> int:
    from ..data import check_disjoint, default_calibration_files, default_eval_files
    from ..jobs.config import SweepSpec
    from ..jobs.sweep import OUTPUTS, run_sweep
    from ..sweep import format_table

    budgets = _budgets(args.budgets)
    formats = _formats(args.formats)
    uniform = tuple(_formats(args.uniform, "--uniform")) if args.uniform else None
    out = Path(args.out)
    eval_files = _texts(args.eval, default_eval_files)
    check_disjoint(_texts(args.calib, default_calibration_files), eval_files)  # before the (slow) model load
    job_dir = _job_dir(args, out, existing=[n for n in OUTPUTS if (out / n).exists()])
    spec = SweepSpec(eval_texts=tuple(eval_files), eval_windows=args.eval_windows, title=title, uniform=uniform,
                     extra=(("ctx", args.ctx), ("formats", tuple(formats))))
    config = run_config(args, out, job_dir, budgets=tuple(budgets), constraints=args.constraints, sweep=spec)
    res = run_sweep(config, out)
    print(format_table(res.points))
    print(f"measurement {res.measure_seconds:.0f} s; results: {', '.join(str(p) for p in res.paths)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    return _run_sweep(args, f"bitalloc sweep ({args.method})")


def cmd_demo(args: argparse.Namespace) -> int:
    return _run_sweep(args, DEMO_TITLE)


def _add_sweep_rest(p: argparse.ArgumentParser, windows: int, formats: str, method: str, eval_windows: int,
                    out_default: str | None, reuse_rounding: bool = False) -> None:
    """Every sweep/demo option after MODEL and --budgets."""
    add_calib(p, windows)
    add_measure_opts(p, formats, method, 4)
    p.add_argument("--eval", nargs="+", metavar="TEXT", help=EVAL_TEXT_HELP)
    p.add_argument("--eval-windows", type=int, default=eval_windows, metavar="N", help="evaluation windows")
    p.add_argument("--uniform", metavar="F,F,...",
                   help="fixed uniform baselines (default: the best uniform format that fits each budget)")
    add_constraints(p, show_default=False)
    add_recover(p)
    add_reuse_rounding(p, reuse_rounding)
    add_rotate(p)
    add_out(p, "output directory for measurement.json, sweep.json, sweep.png",
            "replace existing results in the output directory", required=out_default is None, default=out_default)
    add_job(p)
    add_common(p)


def add_parsers(sub: Any) -> None:
    """Register ``sweep`` and ``demo`` on the subcommand set ``sub``."""
    help_ = "many budgets from one measurement: table + PNG of size vs KLD"
    p = sub.add_parser("sweep", help=help_, description=help_ + "; uniform baselines are on the same axes.")
    add_model(p)
    p.add_argument("--budgets", required=True, help="comma-separated budgets, e.g. 2.5bpw,3bpw,4bpw")
    _add_sweep_rest(p, 32, DEFAULT_FORMATS, "gptq", 16, None)
    p.set_defaults(func=cmd_sweep)

    help_ = "the packaged SmolLM2 at several budgets vs uniform (no arguments needed)"
    p = sub.add_parser("demo", help=help_, description=help_ + "; uniform baselines are on the same axes.")
    p.set_defaults(model=None)
    p.add_argument("--budgets", default=DEMO_BUDGETS, help=f"comma-separated budgets (default {DEMO_BUDGETS})")
    # the demo's points are assembled from the measurement's roundings: one measurement serves every point, and
    # each point's errors are the ones its allocation was given (README, top)
    _add_sweep_rest(p, 16, DEMO_FORMATS, "rtn", 8, "bitalloc-demo", reuse_rounding=True)
    p.set_defaults(func=cmd_demo)
