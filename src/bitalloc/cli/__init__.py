"""The ``bitalloc`` command: measure, plan, quantize, eval, sweep, demo (and gguf when installed).

Thin: parses options, calls the library, prints.  Every user mistake (a :class:`BitallocError`) is one line
``error: <message>`` on stderr and exit status 2; Ctrl-C exits with 130; anything else is a bug, reported as
one ``error: internal error ...`` line with exit status 1 (``-v`` adds the traceback).

Layout: :mod:`.common` (loading, validation, fingerprints), :mod:`.paths` (every input against every output,
before any work), :mod:`.options` (the shared option blocks),
one module per command group (:mod:`.measure_plan`, :mod:`.quantize_eval`, :mod:`.sweep_demo`; ``gguf`` lives
in :mod:`bitalloc.gguf_cmd`), and here the parser, the error-to-exit-status handling and ``main``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Sequence

from ..errors import BitallocError
from . import measure_plan, quantize_eval, sweep_demo
from .common import DEFAULT_FORMATS, DEMO_BUDGETS, DEMO_FORMATS, MODEL_HELP, _precheck

__all__ = ["DEFAULT_FORMATS", "DEMO_BUDGETS", "DEMO_FORMATS", "MODEL_HELP", "build_parser", "main", "peak_memory_mib"]

DESCRIPTION = (
    "Fit a language model into a byte budget with the least quality loss: measure each tensor's "
    "sensitivity to candidate formats, allocate formats exactly under the budget, quantize (RTN/GPTQ), "
    "evaluate and export.  Budgets: '3.5bpw' (bits per weight over ALL weights), '120MB', '1.2GiB', '88201792B'."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitalloc", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    measure_plan.add_parsers(sub)
    quantize_eval.add_parsers(sub)
    sweep_demo.add_parsers(sub)
    try:  # the GGUF export adds its own subcommand when present
        from .. import gguf_cmd
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
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (try fewer --windows, a smaller --ctx, or a machine with more memory)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not an input error: one line (exit 1), the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {_first_line(e)}); please report it with the "
              f"command line{'' if args.verbose else ' (-v shows the traceback)'}", file=sys.stderr)
        return 1


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__
