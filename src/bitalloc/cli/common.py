"""Helpers shared by the commands: model and text loading, option validation, measurement, fingerprints.

Heavy imports (torch, transformers, the pipeline) happen inside the functions, so ``--help`` and option
errors stay fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import InputError, output_exists
from .paths import check_paths as _check_paths

if TYPE_CHECKING:  # pragma: no cover
    from ..jobs.config import RunConfig

# one scale per row at 2 and 3 bits: the cheapest stores, what lets a tight budget protect sensitive tensors
# (bench/pareto.py: GPTQ at 2.5 bpw, allocated/uniform KLD 0.77 without them, 0.59 with them); the -dq formats
# (6-bit scales and mins per 32, fp16 per row) for 0.97/0.73/0.62x the KLD at 2.5/3.5/4.5 bpw, at about 2.7x
# the measurement time (bench/pareto_formats.py and bench/candidates_cost.py, README "Formats")
PREVIOUS_DEFAULT_FORMATS = (
    "int2-row,int2-g32,int2-g64,int2-g128,int3-row,int3-g32,int3-g64,int3-g128,int4-g32,int4-g64,int4-g128,"
    "int5-g64,int5-g128,int6-g128,int8-g128,fp16"
)
DEFAULT_FORMATS = PREVIOUS_DEFAULT_FORMATS + ",int2-g32-dq,int3-g32-dq,int4-g32-dq,int5-g32-dq"
DEMO_FORMATS = "int2-g64,int3-g64,int3-g128,int4-g64,int4-g128,int8-g128"
DEMO_BUDGETS = "3.5bpw,4.5bpw"
MODEL_HELP = "model: a Hugging Face directory (safetensors) or a .gguf file (default: the packaged SmolLM2-135M-Instruct)"


# ------------------------------------------------------------------------------------- loading
def _load_model(source: str | None) -> tuple[Any, Any]:
    from ..models.sources import default_model_path, load_model

    # weights in a memory-mapped spill file, resident one block at a time (values identical to a whole load)
    return load_model(source if source else default_model_path(), low_memory=True)


def _texts(paths: Sequence[str] | None, default: Callable[[], list[Path]]) -> list[Path]:
    return [Path(p) for p in paths] if paths else default()


def _windows(tokenizer: Any, paths: Sequence[Path], n: int, ctx: int) -> Any:
    from ..data import text_windows

    if tokenizer is None:
        raise InputError("the model has no tokenizer, so text cannot be tokenized")
    return text_windows(tokenizer, paths, ctx, n)  # reads only the text the n windows need


# ---------------------------------------------------------------------------------- validation
def _formats(text: str, option: str = "--formats") -> list[str]:
    from ..formats import get_format

    ids = [f.strip() for f in text.split(",") if f.strip()]
    if not ids:
        raise InputError(f"{option} is empty")
    return list(dict.fromkeys(get_format(f).id for f in ids))  # once each: "int4-g32,INT4-G32" is one format


def _budgets(text: str) -> list[Any]:
    """``--budgets``, each parsed (:class:`bitalloc.budget.Budget`)."""
    from ..budget import Budget

    out = [Budget.parse(b) for b in text.split(",") if b.strip()]
    if not out:
        raise InputError("--budgets is empty")
    seen: dict[tuple[str, float], str] = {}
    for b in out:
        key = (b.kind, b.value)
        if key in seen:  # it would be quantized and evaluated twice, and plotted as two points
            raise InputError(f"--budgets lists the same budget twice: {seen[key]!r} and {b.text!r}")
        seen[key] = b.text
    return out


def _check_out(path: str, overwrite: bool) -> Path:
    p = Path(path)
    if p.exists() and not overwrite:
        raise output_exists(p)
    return p


def _job_dir(args: argparse.Namespace, out: Path, existing: Sequence[str] | None = None) -> Path:
    """The job directory of a resumable command (``--job``, default ``OUT.job``).

    Refuses an existing output unless ``--overwrite`` is given or a job directory is there to resume;
    ``existing`` names the outputs already in a results directory (default: ``out`` itself, if it exists).
    """
    from ..jobs.config import default_job_dir

    job_dir = Path(args.job) if args.job else default_job_dir(out)
    if args.overwrite or job_dir.exists():
        return job_dir
    if existing is None and out.exists():
        raise output_exists(out)
    if existing:
        raise InputError(f"output {out} already holds {', '.join(existing)} (use --overwrite to replace it)")
    return job_dir


def _precheck(args: argparse.Namespace) -> None:
    """Fail on malformed options, missing, unreadable or overlapping paths before the (slow) model load."""
    from ..budget import Budget
    from ..data import expand_paths
    from ..formats import get_format

    if getattr(args, "budget", None):
        Budget.parse(args.budget)
    if getattr(args, "budgets", None):
        _budgets(args.budgets)
    if getattr(args, "format", None):
        get_format(args.format)
    if getattr(args, "formats", None):
        _formats(args.formats)
    if getattr(args, "uniform", None):  # a baseline is allocated from the measured rows of its format
        missing = [f for f in _formats(args.uniform, "--uniform") if f not in _formats(args.formats)]
        if missing:
            raise InputError(f"--uniform {', '.join(missing)} not among --formats ({args.formats}): a uniform "
                             "baseline needs its format measured; add it to --formats")
    for attr in ("windows", "eval_windows", "fisher_windows"):
        v = getattr(args, attr, None)
        if v is not None and v < 1:
            raise InputError(f"--{attr.replace('_', '-')} must be at least 1, got {v}")
    if getattr(args, "ctx", 512) < 4:
        raise InputError(f"--ctx must be at least 4, got {args.ctx}")
    _check_paths(args)  # before anything opens an input (a FIFO blocks) or runs for an output refused later
    for attr in ("calib", "eval", "text"):
        if getattr(args, attr, None):
            expand_paths(getattr(args, attr))
    source = _model_source(args)
    meta = _meta_once(source)
    _precheck_budgets(args, source, meta)
    _precheck_rotation(args, source, meta)
    _check_tokenizers(args)


def _meta_once(source: str | None) -> Callable[[], Any]:
    """The meta model of ``source`` (:func:`~bitalloc.models.sources.meta_model`), built on the first call only:
    the prechecks share one read of the config and headers."""
    built: list[Any] = []

    def get() -> Any:
        if not built:
            from ..models.sources import meta_model

            built.append(meta_model(source))  # type: ignore[arg-type]
        return built[0]

    return get


def _precheck_rotation(args: argparse.Namespace, source: str | None, meta: Callable[[], Any]) -> None:
    """``--rotate`` / ``--untie-head`` that the model cannot take, refused from its config and tensor headers
    (:func:`bitalloc.models.rotate.check_rotation`; ``bitalloc gguf`` checks its input after its own preflight)."""
    text = getattr(args, "rotate", None)
    if text is None and not getattr(args, "untie", False):
        return
    from .options import rotate_of

    fields = rotate_of(args)
    if source is not None:
        check_rotation_of(meta, fields["rotate"], fields["untie"])


def check_rotation_of(meta: Callable[[], Any], modes: tuple[str, ...], untie: bool) -> None:
    """InputError when the model ``meta()`` returns (a meta model: no weight read) cannot take the rotations
    ``modes``; ``--untie-head`` without ``residual`` is refused before ``meta`` is called."""
    from ..models.rotate import check_rotation, check_untie

    check_untie(modes, untie)
    if modes:
        check_rotation(meta(), modes, untie)


def _check_tokenizers(args: argparse.Namespace) -> None:
    """Commands that tokenize text refuse a model folder without tokenizer files before loading its weights
    (a GGUF carries its tokenizer; a broken one is refused by the loader, also before the weights)."""
    from ..models.sources import has_tokenizer_files

    if args.command not in ("measure", "quantize", "sweep", "demo", "eval"):
        return
    for attr in ("model", "reference"):
        source = getattr(args, attr, None)
        if source and Path(source).is_dir() and not has_tokenizer_files(Path(source)):
            raise InputError(f"model folder {source} has no tokenizer files (tokenizer.json, tokenizer.model, ...), "
                             "so the text cannot be tokenized; add the model's tokenizer")


def _model_source(args: argparse.Namespace) -> str | None:
    """The model a command reads its shapes and context length from (None: it names none)."""
    from ..models.sources import default_model_path

    if args.command == "gguf":
        return None  # `bitalloc gguf` checks its input (options first, then the file) in its own preflight
    if args.command == "eval":
        return args.reference or str(default_model_path())
    if hasattr(args, "model"):
        return args.model or str(default_model_path())
    return None


def _precheck_budgets(args: argparse.Namespace, source: str | None, meta: Callable[[], Any]) -> None:
    """From the model's config and shapes (no weight read): ``--ctx`` beyond the model's context length, and
    budgets the candidate formats cannot reach (not for ``bitalloc gguf``, whose own preflight counts the file,
    or a given plan or measurement)."""
    from ..pipeline import check_reachable

    if source is None:
        return
    budgets = [args.budget] if getattr(args, "budget", None) else _budgets(args.budgets) if getattr(
        args, "budgets", None) else []
    reach = (budgets and getattr(args, "formats", None) and args.command != "gguf"
             and not getattr(args, "plan", None) and not getattr(args, "measurement", None))
    if not reach and getattr(args, "ctx", None) is None:
        return
    model = meta()
    limit = getattr(model.config, "max_position_embeddings", None)
    if getattr(args, "ctx", None) is not None and isinstance(limit, int) and args.ctx > limit:
        raise InputError(f"--ctx {args.ctx} is longer than the model's context of {limit} tokens "
                         f"(max_position_embeddings of {source}); give --ctx {limit} or less")
    if reach:
        check_reachable(model, _formats(args.formats), budgets)


# ------------------------------------------------------------------------------- the run config
def run_config(args: argparse.Namespace, out: Path, job_dir: Path, **fields: Any) -> RunConfig:
    """The :class:`~bitalloc.jobs.config.RunConfig` of a resumable command (``fields``: its own settings)."""
    from ..data import default_calibration_files
    from ..jobs.config import RunConfig
    from ..models.sources import default_model_path
    from .options import recover_of, rotate_of

    model = getattr(args, "model", None)
    return RunConfig(
        device=str(getattr(args, "device", "cpu")),
        model=Path(model) if model else default_model_path(),
        calib_texts=tuple(_texts(args.calib, default_calibration_files)), windows=args.windows, ctx=args.ctx,
        job_dir=job_dir, formats=tuple(_formats(args.formats)), method=args.method, fisher=bool(args.fisher),
        fisher_windows=args.fisher_windows, overwrite=args.overwrite, keep_job=args.keep_job,
        progress=not args.quiet, screen=bool(getattr(args, "screen", False)), recover=recover_of(args),
        reuse_rounding=bool(getattr(args, "reuse_rounding", False)), **rotate_of(args), **fields,
    )


def print_timings(timings: dict[str, dict[str, float | int]]) -> None:
    """One line: wall seconds of the run's stages (:mod:`bitalloc.timing`; nested stages count inside their parents)."""
    if timings:
        print("time: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in timings.items()))
