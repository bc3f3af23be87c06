"""Option blocks shared by the subcommands: one helper per repeated block, so help texts and defaults agree."""
from __future__ import annotations

import argparse
import os
from typing import Any, Iterator

from .common import MODEL_HELP

EVAL_TEXT_HELP = "evaluation text (default: Hamlet and Macbeth)"
FUSED_HELP = "fused: q/k/v and gate/up of each block share one format"


class _Methods:
    """The registered rounding methods (:mod:`bitalloc.rounding.methods`) as argparse ``choices``, read from the
    registry only when argparse asks (a ``--method`` to check, or the help): its package imports torch, which the
    CLI loads once a command runs."""

    @staticmethod
    def _names() -> tuple[str, ...]:
        from ..rounding.methods import method_names

        return method_names()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


#: ``choices`` of every ``--method`` / ``--measure-method``
METHODS = _Methods()


def add_model(p: argparse.ArgumentParser) -> None:
    """The optional positional MODEL (default: the packaged SmolLM2)."""
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)


def add_ctx(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")


def add_calib(p: argparse.ArgumentParser, windows: int, required: bool = False) -> None:
    """``--calib``, ``--windows`` (default ``windows``) and ``--ctx``."""
    p.add_argument("--calib", nargs="+", metavar="TEXT", required=required,
                   help="calibration text files or directories of .txt (default: Shakespeare comedies)")
    p.add_argument("--windows", type=int, default=windows, metavar="N",
                   help=f"calibration windows of --ctx tokens (default {windows})")
    add_ctx(p)


def add_measure_opts(p: argparse.ArgumentParser, formats: str, method: str, fisher_windows: int) -> None:
    """``--formats``, ``--method``, ``--no-fisher`` and ``--fisher-windows``."""
    p.add_argument("--formats", default=formats, metavar="F,F,...",
                   help=f"candidate formats, comma-separated (default {formats})")
    p.add_argument("--method", choices=METHODS, default=method,
                   help=f"rounding method for measuring errors and quantizing (default {method})")
    p.add_argument("--no-fisher", dest="fisher", action="store_false",
                   help="skip the gradient pass: allocate by layer-output error instead of Fisher-weighted error")
    p.add_argument("--fisher-windows", type=int, default=fisher_windows, metavar="N",
                   help=f"windows used by the Fisher (gradient) pass (default {fisher_windows})")


def add_constraints(p: argparse.ArgumentParser, show_default: bool = True) -> None:
    """``--constraints none|fused`` (default none)."""
    p.add_argument("--constraints", choices=("none", "fused"), default="none",
                   help=FUSED_HELP + (" (default none)" if show_default else ""))


def add_out(p: argparse.ArgumentParser, help: str, overwrite_help: str, *, required: bool = True,
            default: str | None = None) -> None:
    """``--out`` and ``--overwrite``."""
    p.add_argument("--out", default=default, required=required, help=help)
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)


def add_job(p: argparse.ArgumentParser) -> None:
    """``--job`` and ``--keep-job`` of the resumable commands."""
    p.add_argument("--job", metavar="DIR", help="job directory for checkpoints (default OUT.job); rerunning the "
                   "same command after an interruption continues from the last checkpoint")
    p.add_argument("--keep-job", action="store_true", help="keep the job directory after success")


def add_common(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose``."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _positive(text: str) -> int:
    """A whole number of at least 1 (threads, steps, tokens)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_screen(p: argparse.ArgumentParser) -> None:
    """``--screen``: measure exactly (GPTQ) only the formats that can matter at this budget (:mod:`bitalloc.screen`)."""
    p.add_argument("--screen", action="store_true",
                   help="estimate every candidate by RTN (GPTQ on a few sample blocks), then measure with GPTQ only the "
                   "formats near each tensor's place at this budget (faster; the table then serves this budget only)")


def add_reuse_rounding(p: argparse.ArgumentParser, default: bool = False) -> None:
    """``--reuse-rounding`` / ``--no-reuse-rounding``: quantize with the measurement's own roundings
    (:func:`bitalloc.quantize.assemble_rounded`) or round again block by block; ``default`` is the command's choice
    (on for ``demo``)."""
    p.add_argument("--reuse-rounding", action=argparse.BooleanOptionalAction, default=default,
                   help="keep every tensor's rounding into every format as the measurement makes it (in the job "
                   "directory: at most the parameters times the formats' bits per weight summed, over 8) and "
                   "quantize with those instead of rounding again block by block on the quantized model's inputs: "
                   "no rounding after the measurement, each tensor's error exactly the measured one; GPTQ then sees "
                   "the full-precision model's inputs (see README)")


def add_rotate(p: argparse.ArgumentParser) -> None:
    """``--rotate`` and ``--untie-head``: rotations folded into the model before anything is measured
    (:mod:`bitalloc.models.rotate`)."""
    p.add_argument("--rotate", metavar="vo|residual|vo+residual", default=None,
                   help="fold randomised Hadamard rotations into the model first (the same function in fp32, weights "
                   "with fewer outlier columns): vo rotates each block's value heads, residual the whole residual "
                   "stream (RMSNorm models: llama, mistral, qwen2/3, phi3); the output holds the rotated weights")
    p.add_argument("--untie-head", dest="untie", action="store_true",
                   help="with --rotate residual on a tied model whose final norm is not uniform: give lm_head its own "
                   "rotated copy (vocab x hidden more weights inside the budget; not for GGUF)")


def rotate_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run config's ``rotate`` and ``untie`` fields from ``--rotate`` / ``--untie-head``."""
    from ..models.rotate import parse_rotation

    text = getattr(args, "rotate", None)
    return {"rotate": parse_rotation(text) if text is not None else (), "untie": bool(getattr(args, "untie", False))}


def _rate(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < x <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return x


def add_recover(p: argparse.ArgumentParser) -> None:
    """``--recover`` and its length and learning rate (:mod:`bitalloc.recover`)."""
    from ..recover.config import DEFAULT_BLOCK_STEPS, DEFAULT_E2E_STEPS, DEFAULT_GUARD_WINDOWS, MODES, RecoverConfig

    p.add_argument("--recover", choices=MODES, default="none",
                   help="train the quantized model back toward the original on the calibration text, in the same "
                   "formats and bytes: block (each block's codes, scales and norms against its full-precision "
                   "outputs), e2e (scales and norms by KL distillation over the whole model) or both (default none)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--recover-steps", type=_positive, default=None, metavar="N",
                        help=f"optimizer steps per block (block) and in all (e2e) (default {DEFAULT_BLOCK_STEPS} "
                        f"and {DEFAULT_E2E_STEPS})")
    length.add_argument("--recover-tokens", type=_positive, default=None, metavar="N",
                        help="training tokens per block (block) and in all (e2e), instead of --recover-steps")
    p.add_argument("--recover-lr", type=_rate, default=None, metavar="LR",
                   help=f"Adam step of the learned rounding in levels (scales and norms, relative: a tenth of it in the block stage, a sixteenth in e2e) "
                   f"(default {RecoverConfig.lr})")
    p.add_argument("--recover-windows", type=_positive, default=None, metavar="N",
                   help="calibration windows recovery trains on, read from the same --calib text (default: 4 times "
                   "the quantization's --windows, as many as the text holds); more text than the quantization "
                   f"needs makes the learned rounding overfit less.  The {DEFAULT_GUARD_WINDOWS} windows after them "
                   "are held out: each stage checks its gain there and keeps what it had where it found none")
    p.add_argument("--recover-aware", action="store_true",
                   help="allocate knowing recovery follows: each candidate format's error is scaled by the share "
                   "block-wise recovery leaves of it, measured on two sample blocks (needs --recover block or "
                   "block+e2e and a measured budget); measured on blocks alone, it can overstate what recovery "
                   "gains in the whole model: at a ~5 bpw GGUF mix it did worse than without it (README)")


def recover_of(args: argparse.Namespace) -> Any:
    """The :class:`~bitalloc.recover.config.RecoverConfig` the options ask for; a recovery option without
    ``--recover`` is refused (it would train nothing)."""
    from ..errors import InputError
    from ..recover.config import RecoverConfig

    mode = getattr(args, "recover", "none")
    given = [o for o in ("steps", "tokens", "lr", "windows") if getattr(args, f"recover_{o}", None) is not None]
    if mode == "none" and given:
        raise InputError(f"--recover-{given[0]} sets how recovery trains, but no recovery was asked for: add "
                         "--recover block, e2e or block+e2e")
    lr = getattr(args, "recover_lr", None)
    return RecoverConfig(mode=mode, steps=getattr(args, "recover_steps", None),
                         tokens=getattr(args, "recover_tokens", None),
                         lr=float(RecoverConfig.lr if lr is None else lr),
                         windows=getattr(args, "recover_windows", None),
                         aware=bool(getattr(args, "recover_aware", False)))


def add_runtime(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``: where the work runs and how many CPU threads torch and BLAS use (every
    command takes them; they are applied once, at the entry point)."""
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where calibration, Fisher, GPTQ, measurement and evaluation run (default auto: CUDA when "
                   "available, else the CPU); weights that do not fit move to the device one block at a time")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="CPU threads for torch and BLAS (default: every CPU this process may use)")


def placement_of(args: argparse.Namespace, model: Any = None) -> Any:
    """The :class:`bitalloc.placement.Placement` of ``--device`` (offloading decided from ``model``'s size when
    the device is an accelerator): what a command hands to the library's stages."""
    from ..placement import Placement

    return Placement.for_device(getattr(args, "device", "cpu"), model=model)
