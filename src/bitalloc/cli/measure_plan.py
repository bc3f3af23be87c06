"""``bitalloc measure`` (the measurement table) and ``bitalloc plan`` (one budget's allocation)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import DEFAULT_FORMATS, _check_out, _job_dir, run_config
from .options import (
    add_calib, add_common, add_constraints, add_job, add_measure_opts, add_model, add_out, add_rotate,
)


def cmd_measure(args: argparse.Namespace) -> int:
    from ..jobs.run import run_measure

    out = Path(args.out)
    config = run_config(args, out, _job_dir(args, out))  # a bad format id fails before anything is loaded
    t0 = time.perf_counter()
    m = run_measure(config, out)
    print(f"measured {len(m.tensors)} tensors x {len(config.formats)} formats in {time.perf_counter() - t0:.0f} s "
          f"-> {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..budget import Constraints
    from ..measure import Measurement
    from ..pipeline import make_plan

    out = _check_out(args.out, args.overwrite)
    m = Measurement.load(args.table)
    cons = Constraints()
    if args.constraints == "fused":
        from ..models.archs import fused_groups

        groups = fused_groups([t.name for t in m.tensors])
        cons = Constraints(tie_groups=groups)
    p = make_plan(m, args.budget, cons, args.objective)
    p.save(out, overwrite=args.overwrite)
    print(p.summary())
    print(f"-> {out}")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``measure`` and ``plan`` on the subcommand set ``sub``."""
    p = sub.add_parser("measure", help="measure every tensor x candidate format (bytes, predicted error)",
                       description="Calibrate on text and write the measurement table (JSON) used by every budget.")
    add_model(p)
    add_calib(p, 32)
    add_measure_opts(p, DEFAULT_FORMATS, "gptq", 8)
    add_rotate(p)
    add_out(p, "output table (JSON)", "replace an existing output")
    add_job(p)
    add_common(p)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("plan", help="allocate formats under a budget from a measurement table",
                       description="Solve the exact allocation (ILP) for one budget and write an editable plan.")
    p.add_argument("table", metavar="TABLE", help="measurement table from `bitalloc measure`")
    p.add_argument("--budget", required=True, help="e.g. 3.5bpw, 120MB, 1.2GiB, 88201792B")
    add_constraints(p)
    p.add_argument("--objective", choices=("fisher", "output"), default=None,
                   help="error to minimise (default: fisher when the table has it)")
    add_out(p, "output plan (JSON)", "replace an existing output")
    add_common(p)
    p.set_defaults(func=cmd_plan)
