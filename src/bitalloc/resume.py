"""The resumable quantize job: measure -> plan -> quantize block by block -> export, each step checkpointed.

A job directory (:class:`bitalloc.job.Job`, default ``<out>.job`` beside the output) is fingerprinted by the
model file digests, the calibration text digest and every option that changes the result; reopening it with
other inputs is refused with a one-line message naming what differs.  Layout::

    job.json, job.lock                      state and lock (bitalloc.job)
    measurement.json                        stage "measure" (the Measurement table)
    plan.json                               stage "plan"
    quantize/block0003.safetensors          QTensor parts of block 3 (metadata: formats, shapes, dtypes)
    quantize/hidden.safetensors             inputs of block k (metadata "block": k), replaced after each block
    export/digests.json                     SHA-256 of every tensor about to be exported

After ``kill -9`` at any moment the same command continues from the last checkpoint.  Every stage's result is
reloaded from its file even in an uninterrupted run (the plan is always the one read back), and the hidden
states are saved bit-exactly, so the output directory is byte-identical whatever the kill points were.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import BitallocError, InputError
from .formats import QTensor
from .io.atomic import TEMP_SUFFIX, file_digest
from .io.safetensors import SafetensorsFile, write_safetensors_atomic
from .job import Job

log = logging.getLogger(__name__)

QUANT_STAGE = "quantize"
HIDDEN_FILE = "hidden.safetensors"


def default_job_dir(out: str | Path) -> Path:
    """``<out>.job`` beside the output directory."""
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
    """SHA-256 over the calibration files' names and contents, in the order they are read."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class QuantizeSteps:
    """What the job runs, supplied by the caller (the CLI).

    ``load() -> (model, tokenizer)``; ``calibration(tokenizer) -> windows``; ``measure(model, view, windows)``
    or None when the plan needs no measurement; ``plan(measurement | None, model, view) -> Plan``.
    """

    load: Callable[[], tuple[Any, Any]]
    calibration: Callable[[Any], torch.Tensor]
    measure: Callable[[Any, Any, torch.Tensor], Any] | None
    plan: Callable[[Any, Any, Any], Any]
    method: str = "gptq"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise InputError(f"unknown rounding method {self.method!r}; use 'gptq' or 'rtn'")


# ------------------------------------------------------------------------------------------ checkpoints
def _save_block(job: Job, b: int, qtensors: Mapping[str, QTensor]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, q in sorted(qtensors.items()):
        meta[name] = {"format": q.format, "shape": list(q.shape), "dtype": q.dtype, "parts": sorted(q.parts)}
        for part, t in q.parts.items():
            tensors[f"{name}/{part}"] = t.detach().contiguous().cpu()
    d = job.dir / QUANT_STAGE
    d.mkdir(exist_ok=True)
    write_safetensors_atomic(d / f"block{b:04d}.safetensors", tensors, {"qtensors": json.dumps(meta, sort_keys=True)},
                             overwrite=True, manifest=False)


def _load_block(path: Path) -> dict[str, QTensor]:
    with SafetensorsFile(path) as sf:
        try:
            meta = json.loads(sf.metadata()["qtensors"])
            return {
                name: QTensor(format=m["format"], shape=tuple(m["shape"]), dtype=m["dtype"],
                              parts={part: sf.get(f"{name}/{part}").clone() for part in m["parts"]})
                for name, m in meta.items()
            }
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"checkpoint {path} is corrupt ({e}); remove the job directory to start over") from e


def _save_hidden(job: Job, block: int, hidden: torch.Tensor) -> None:
    write_safetensors_atomic(job.dir / QUANT_STAGE / HIDDEN_FILE, {"hidden": hidden.detach().contiguous()},
                             {"block": str(block)}, overwrite=True, manifest=False)


def load_state(job: Job) -> Any:
    """The :class:`~bitalloc.quantize.ResumeState` saved in ``job`` (None when no block is done)."""
    from .quantize import ResumeState

    path = job.dir / QUANT_STAGE / HIDDEN_FILE
    if not path.exists():
        return None
    with SafetensorsFile(path) as sf:
        try:
            block = int(sf.metadata()["block"])
        except (KeyError, ValueError) as e:
            raise InputError(f"checkpoint {path} is corrupt ({e}); remove the job directory to start over") from e
        hidden = sf.get("hidden").clone()
    qtensors: dict[str, QTensor] = {}
    for b in range(block):
        p = job.dir / QUANT_STAGE / f"block{b:04d}.safetensors"
        if not p.exists():
            raise InputError(f"job {job.dir} lacks the checkpoint of block {b}; remove the job directory to start over")
        qtensors.update(_load_block(p))
    log.info("resuming quantization at block %d", block)
    return ResumeState(block, qtensors, hidden)


def _remove_stale_outputs(out: Path) -> None:
    """Temporary directories a killed export left beside ``out`` (only ever called under the job lock)."""
    for p in sorted(out.parent.glob(f".{out.name}.*{TEMP_SUFFIX}")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _finish(job_dir: Path, keep_job: bool) -> None:
    if not keep_job:
        shutil.rmtree(job_dir, ignore_errors=True)


def _already_exported(job_dir: Path, fingerprint: Mapping[str, Any], out: Path) -> bool:
    """True when ``out`` is this job's verified output (a kill came between the rename and the cleanup)."""
    from .export.packed import verify_packed

    if not (job_dir / "job.json").exists():
        return False
    with Job(job_dir, fingerprint) as job:
        if not job.has_item("export", "digests"):
            return False
        with contextlib.suppress(InputError):
            verify_packed(out, job.load_item("export", "digests"))
            return True
    return False


# ------------------------------------------------------------------------------------------------- run
def run_quantize_job(
    out: str | Path,
    job_dir: str | Path,
    fingerprint: Mapping[str, Any],
    steps: QuantizeSteps,
    *,
    keep_job: bool = False,
    overwrite: bool = False,
    after_block: Callable[[int], None] | None = None,
    report: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the job and write the packed directory ``out``; returns its ``bitalloc.json``.

    ``report(plan)`` is called once the plan is known; ``after_block(b)`` after block ``b`` is checkpointed.
    """
    from .export.packed import read_packed

    out, job_dir = Path(out), Path(job_dir)
    if out.exists() and not overwrite:
        if _already_exported(job_dir, fingerprint, out):
            log.info("%s was already written and verified by this job", out)
            _finish(job_dir, keep_job)
            return read_packed(out)[0]
        raise InputError(f"output {out} already exists (use --overwrite to replace it)")
    fresh = not (job_dir / "job.json").exists()
    with Job(job_dir, fingerprint) as job:
        try:
            return _run(job, out, steps, overwrite, after_block, report, keep_job)
        except BitallocError:
            # a user error in a job this run started: the same command fails again, so leave no debris
            # (an interruption or a crash keeps the job for the rerun)
            if fresh:
                job.close()
                shutil.rmtree(job.dir, ignore_errors=True)
            raise


def _run(
    job: Job,
    out: Path,
    steps: QuantizeSteps,
    overwrite: bool,
    after_block: Callable[[int], None] | None,
    report: Callable[[Any], None] | None,
    keep_job: bool,
) -> dict[str, Any]:
    from .export.packed import flat_digests, save_packed
    from .models.view import ModelView
    from .quantize import quantize_model

    _remove_stale_outputs(out)
    model, tok = steps.load()
    view = ModelView(model)
    windows = steps.calibration(tok)
    measurement = None
    if steps.measure is not None:
        from .measure import Measurement

        mpath = job.dir / "measurement.json"
        if not job.stage_done("measure"):
            steps.measure(model, view, windows).save(mpath)
            job.complete_stage("measure")
        measurement = Measurement.load(mpath)
    if measurement is not None:
        from .plan import Plan

        ppath = job.dir / "plan.json"
        if not job.stage_done("plan"):
            steps.plan(measurement, model, view).save(ppath)
            job.complete_stage("plan")
        plan = Plan.load(ppath, measurement)
    else:
        plan = steps.plan(None, model, view)  # no measurement: a cheap pure function of the model
    if report is not None:
        report(plan)

    def on_block(b: int, qt: dict[str, QTensor], hidden: torch.Tensor) -> None:
        _save_block(job, b, qt)
        _save_hidden(job, b + 1, hidden)
        if after_block is not None:
            after_block(b)

    q = quantize_model(model, view, plan, windows, method=steps.method, progress=steps.progress,
                       on_block=on_block, start=load_state(job))
    job.complete_stage(QUANT_STAGE)
    job.save_item("export", "digests", flat_digests(q))
    info = save_packed(out, model, view, q, plan, tok, overwrite=overwrite)
    job.complete_stage("export")
    job.close()
    _finish(job.dir, keep_job)
    return info


__all__ = ["QuantizeSteps", "default_job_dir", "load_state", "model_digests", "run_quantize_job", "text_digest"]
