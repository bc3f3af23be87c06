"""The ``bitalloc`` command: measure, plan, quantize, eval, sweep, demo (and gguf when installed).

Thin: parses options, calls the library, prints.  Every user mistake (a :class:`BitallocError`) is one line
``error: <message>`` on stderr and exit status 2; Ctrl-C exits with 130; anything else is a bug, reported as
one ``error: internal error ...`` line with exit status 1 (``-v`` adds the traceback).

Layout: :mod:`.common` (loading, validation, fingerprints), :mod:`.paths` (every input against every output,
before any work), :mod:`.options` (the shared option blocks),
one module per command group (:mod:`.measure_plan`, :mod:`.quantize_eval`, :mod:`.sweep_demo`, :mod:`.gguf`,
:mod:`.export`, :mod:`.nest`),
and here the parser, the error-to-exit-status handling and ``main``.  A resumable command builds one frozen
:class:`bitalloc.jobs.config.RunConfig` (budgets parsed once) and its output target, and calls the job.

Every command takes ``--device`` and ``--threads`` (added here to each subcommand); ``main`` resolves the device
(a missing one is a one-line error) and sets torch's intra- and inter-op threads once, before any work: the
library never sets them.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from ..errors import BitallocError
from . import export, gguf, measure_plan, nest, quantize_eval, sweep_demo
from .common import DEFAULT_FORMATS, DEMO_BUDGETS, DEMO_FORMATS, MODEL_HELP, _precheck
from .options import add_runtime, available_cpus

__all__ = ["DEFAULT_FORMATS", "DEMO_BUDGETS", "DEMO_FORMATS", "MODEL_HELP", "build_parser", "main", "peak_memory_mib"]

DESCRIPTION = (
    "Fit a language model into a byte budget with the least quality loss: measure each tensor's "
    "sensitivity to candidate formats, allocate formats exactly under the budget, quantize (RTN/GPTQ), "
    "evaluate and export.  Budgets: '3.5bpw' (bits per weight over ALL weights), '120MB', '1.2GiB', '88201792B'."
)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: a bad option is one line ``error: ...`` and exit status 2
    (``bitalloc COMMAND --help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {_first_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bitalloc", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    measure_plan.add_parsers(sub)
    quantize_eval.add_parsers(sub)
    sweep_demo.add_parsers(sub)
    gguf.add_parser(sub)
    export.add_parser(sub)
    nest.add_parsers(sub)
    for p in dict.fromkeys(sub.choices.values()):  # every command: --device, --threads
        add_runtime(p)
    return parser


def _apply_runtime(args: argparse.Namespace) -> None:
    """Resolve ``--device`` (InputError when this machine lacks it; ``args.device`` becomes e.g. ``cuda:0``) and
    set torch's threads to ``--threads`` (default: every CPU this process may use), once per process."""
    import torch

    from ..placement import resolve_device

    args.device = str(resolve_device(args.device))
    n = args.threads or available_cpus()
    args.threads = n
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:  # allowed once, before any inter-op work: a second main() in one process keeps the first value
            torch.set_num_interop_threads(n)
        except RuntimeError:
            logging.getLogger(__name__).debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())


def peak_memory_mib(who: int | None = None) -> float:
    """Peak resident memory of this process so far (ru_maxrss), in MiB; ``who=resource.RUSAGE_CHILDREN``: that of
    the largest of its finished child processes (the measurement workers)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF if who is None else who).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def _log_peak_memory() -> None:
    """One line ``peak memory: N MiB`` on stderr, whatever the verbosity."""
    mem = logging.getLogger("bitalloc.memory")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    mem.addHandler(handler)
    mem.propagate = False
    mem.setLevel(logging.INFO)
    import resource

    workers = round(peak_memory_mib(resource.RUSAGE_CHILDREN))
    try:
        mem.info("peak memory: %d MiB%s", round(peak_memory_mib()),
                 f"; each measurement worker process at most {workers} MiB" if workers else "")
    finally:
        mem.removeHandler(handler)


def _watch_interrupts() -> tuple[Callable[[], bool], Callable[[], None]]:
    """``(interrupted, restore)``: whether a Ctrl-C (SIGINT) came during the command, and undo the watch.
    A library may turn the KeyboardInterrupt into another error (transformers' lazy imports make it a
    ModuleNotFoundError): the flag still reports it as an interruption, not an input error or a bug."""
    import signal
    import threading

    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return (lambda: False), (lambda: None)

    def on_sigint(signum: int, frame: object) -> None:
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    return (lambda: bool(seen)), (lambda: signal.signal(signal.SIGINT, signal.default_int_handler))


def main(argv: Sequence[str] | None = None) -> int:
    interrupted, restore = _watch_interrupts()
    try:
        return _main(argv, interrupted)
    except KeyboardInterrupt:  # while parsing or importing, or in a handler below
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


def _main(argv: Sequence[str] | None, interrupted: Callable[[], bool]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _apply_runtime(args)
        _precheck(args)
        if getattr(args, "quiet", False) and args.command != "plan":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # -q: no progress bars from transformers either
        rc = int(args.func(args) or 0)
        if args.command != "plan":
            _log_peak_memory()
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        if interrupted():  # the interrupt, whatever a library turned it into
            print("interrupted", file=sys.stderr)
            return 130
        return _report(e, args.verbose)


def _report(e: BaseException, verbose: bool) -> int:
    """Print ``e`` as the one line of the CLI's convention; its exit status (anything not an Exception is
    raised again)."""
    if isinstance(e, (BitallocError, OSError)):
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    if isinstance(e, MemoryError):
        print("error: out of memory (try fewer --windows, a smaller --ctx, or a machine with more memory)",
              file=sys.stderr)
        return 1
    if not isinstance(e, Exception):
        raise e
    if verbose:  # a bug, not an input error: one line (exit 1), the traceback with -v
        traceback.print_exception(e)
    print(f"error: internal error ({type(e).__name__}: {_first_line(e)}); please report it with the "
          f"command line{'' if verbose else ' (-v shows the traceback)'}", file=sys.stderr)
    return 1


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__
