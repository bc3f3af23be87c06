"""What a run is: a frozen :class:`RunConfig` the CLI builds once (options parsed, budgets parsed), and the job
fingerprint derived from it.

The job (:mod:`bitalloc.jobs.run`) reads nothing else: no closures and no argparse namespace cross into it.
The fingerprint holds the model file digests, the calibration (and evaluation) text digests and every option
that changes a result; reopening a job directory with another fingerprint is refused, naming the keys that
differ (:mod:`bitalloc.jobs.store`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..budget import Budget
from ..errors import InputError
from ..recover.config import RecoverConfig
from ..rounding.methods import get_rounder
from ..io.atomic import file_digest

FINGERPRINT_VERSION = 2


def default_job_dir(out: str | Path) -> Path:
    """``<out>.job`` beside the output."""
    p = Path(out)
    return p.with_name(p.name + ".job")


def model_digests(source: str | Path) -> dict[str, str]:
    """SHA-256 of a model: the .gguf file, or every regular top-level file of an HF directory."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        return {f.name: file_digest(f) for f in files}
    if p.is_file():
        return {p.name: file_digest(p)}
    raise InputError(f"model not found: {p}")


def text_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over the text files' names and contents, in the order they are read."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep adds: held-out text, the uniform baselines and the results' title and extra fields."""

    eval_texts: tuple[Path, ...]
    eval_windows: int
    title: str
    uniform: tuple[str, ...] | None = None  # fixed baselines; None: the best fitting uniform formats
    uniform_candidates: int = 2
    extra: tuple[tuple[str, Any], ...] = ()  # written at the top of sweep.json, after the measurement fields


@dataclass(frozen=True)
class RunConfig:
    """One run of a job, built by the CLI.  ``budgets`` are parsed once here and resolved to bytes once, by the
    output target; ``formats`` are canonical ids."""

    model: Path  # an HF folder or a .gguf file
    calib_texts: tuple[Path, ...]
    windows: int
    ctx: int
    job_dir: Path
    formats: tuple[str, ...] = ()
    method: str = "gptq"  # rounding of the quantization
    measure_method: str | None = None  # rounding of the measurement (None: ``method``)
    fisher: bool = True
    fisher_windows: int = 8
    activation_noise: bool = True  # measure the runtime's activation rounding (GGUF types on llama.cpp's CPU)
    budgets: tuple[Budget, ...] = ()
    objective: str | None = None  # None: Fisher when measured, else output error
    constraints: str = "none"  # "none" | "fused" (runtime-fused linears share a format)
    uniform_format: str | None = None  # quantize --format: every allocated tensor in one format, no measurement
    measurement: Path | None = None  # a measurement table to reuse instead of measuring
    plan: Path | None = None  # a (possibly edited) plan to use instead of allocating
    overwrite: bool = False
    keep_job: bool = False
    progress: bool = True
    sweep: SweepSpec | None = None
    # where blocks run: in the fingerprint, since a GPU's rounding differs from the CPU's and a resumed job must
    # compute exactly what an uninterrupted one would (placeholder: not wired to the stages yet)
    device: str = "cpu"  # resolved by the CLI (``cpu``, ``cuda:0``): where every stage runs
    screen: bool = False  # measure exactly only the formats that can matter at ``budgets`` (bitalloc.screen)
    output: str = "packed"  # "packed" | "gguf" | "compressed-tensors" | "vllm" (the last two restrict ``formats``)
    recover: RecoverConfig = RecoverConfig()  # training after quantization (mode "none": no recovery stage)
    # rotations folded into the model once it is loaded (bitalloc.models.rotate.parse_rotation): every stage, the
    # recovery teacher and the output see the rotated model; ``untie`` gives a tied lm_head its own rotated copy
    rotate: tuple[str, ...] = ()
    untie: bool = False
    # quantize with the measurement's own roundings (kept in the job) instead of rounding again block by block
    reuse_rounding: bool = False

    def __post_init__(self) -> None:
        for m in (self.method, self.measure_method or self.method):
            get_rounder(m)  # one line naming the registered methods
        if self.sweep is not None and not self.budgets:
            raise InputError("a sweep needs at least one budget")
        if self.screen and (self.sweep is not None or len(self.budgets) != 1 or self.plan is not None
                            or self.measurement is not None or self.uniform_format is not None):
            raise InputError("--screen needs one budget to screen for, and measures the table itself (quantize "
                             "--budget or gguf; not with --plan, --measurement, --format or a sweep)")
        if self.reuse_rounding and (self.measurement is not None or self.uniform_format is not None or self.screen
                                    or self.measuring_method != self.method):
            raise InputError("--reuse-rounding quantizes with the roundings this job's measurement makes: not with "
                             "--measurement, --format, --screen, or a --measure-method other than --method")
        if self.recover.aware and (self.plan is not None or self.uniform_format is not None):
            raise InputError("--recover-aware changes how a budget is allocated: it needs --budget (not --format or "
                             "--plan, which allocate nothing)")

        if self.untie:
            from ..models.rotate import check_untie

            check_untie(self.rotate, self.untie)
        if self.untie and self.output == "gguf":
            raise InputError("--untie-head cannot go into a GGUF: the output keeps the input's tensor list, which "
                             "has no separate output.weight for a tied model (use --rotate vo, or a packed output)")
        if self.output in ("compressed-tensors", "vllm"):
            _check_compressed_tensors(self)
        if self.output == "vllm":  # a compressed-tensors checkpoint of formats vLLM has kernels for
            from ..targets.vllm import check_runs

            check_runs(self.formats)
            if self.constraints != "fused":
                raise InputError("--to vllm needs --constraints fused: vLLM runs q/k/v and gate/up as one fused "
                                 "layer each, which takes one format")

    @property
    def measuring_method(self) -> str:
        return self.measure_method or self.method

    @property
    def budget(self) -> Budget | None:
        """The one budget of a quantize or gguf run (None for ``--format`` / ``--plan`` runs)."""
        return self.budgets[0] if self.budgets else None

    def measure_options(self) -> dict[str, Any]:
        """Every option that changes the measurement table."""
        return {"formats": ",".join(self.formats), "method": self.method, "measure_method": self.measuring_method,
                "fisher": self.fisher, "fisher_windows": self.fisher_windows, "windows": self.windows,
                "ctx": self.ctx, "activations": "cpu" if self.activation_noise else "none", "device": self.device,
                "screen": self.screen, **self.rotate_options(),
                **({"reuse_rounding": True} if self.reuse_rounding else {})}

    def rotate_options(self) -> dict[str, Any]:
        """The rotation's options (none without ``--rotate``: the fingerprints of unrotated jobs are unchanged)."""
        return {"rotate": "+".join(self.rotate), "untie": self.untie} if self.rotate else {}

    def fingerprint(self, target: dict[str, Any] | None = None) -> dict[str, Any]:
        """The job fingerprint: model and text digests, the options, and what the output ``target`` adds."""
        from ..data import expand_paths

        options: dict[str, Any] = self.measure_options()
        if self.sweep is not None:
            options.update(budgets=",".join(b.text for b in self.budgets), eval_windows=self.sweep.eval_windows,
                           uniform=",".join(self.sweep.uniform) if self.sweep.uniform else None,
                           uniform_candidates=self.sweep.uniform_candidates, title=self.sweep.title)
        elif self.budgets or self.uniform_format or self.plan:
            options.update(budget=self.budget.text if self.budget else None, format=self.uniform_format,
                           measurement=_digest_or_none(self.measurement), plan=_digest_or_none(self.plan))
        if self.sweep is not None or self.budgets:
            options.update(constraints=self.constraints, objective=self.objective)
        if self.recover.active:
            options.update(recover=self.recover.fingerprint())
        options.update(target or {})
        fp: dict[str, Any] = {"version": FINGERPRINT_VERSION, "model": model_digests(self.model),
                              "calibration": text_digest(expand_paths(list(self.calib_texts))), "options": options}
        if self.sweep is not None:
            fp["evaluation"] = text_digest(expand_paths(list(self.sweep.eval_texts)))
        return fp


def _check_compressed_tensors(config: RunConfig) -> None:
    """A compressed-tensors output: every candidate format expressible there (one line naming the first that is
    not), one pass-through format among them (embeddings stay unquantized), a budget to allocate."""
    from ..export.ct_schemes import PASS_THROUGH, check_expressible

    check_expressible(config.formats)
    if config.formats and not any(f in PASS_THROUGH for f in config.formats):
        raise InputError("compressed-tensors output needs fp16, bf16 or fp32 among the formats (transformers "
                         "quantizes linear modules only: the embedding is stored unquantized)")
    if config.uniform_format is not None or config.plan is not None:
        raise InputError("compressed-tensors output is allocated under a --budget (not with --format or --plan)")


def _digest_or_none(path: Path | None) -> str | None:
    return file_digest(path) if path is not None else None


__all__ = ["FINGERPRINT_VERSION", "RunConfig", "SweepSpec", "default_job_dir", "model_digests", "text_digest"]
