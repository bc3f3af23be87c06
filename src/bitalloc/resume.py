"""Resumable jobs: ``quantize`` (measure -> plan -> quantize block by block -> export) and ``measure``, each
step checkpointed.  The per-block checkpoint code lives in :mod:`bitalloc.checkpoints` and is shared with the
GGUF job (:mod:`bitalloc.gguf_job`); :func:`measure_stage` is the resumable measurement of all three jobs.

A job directory (:class:`bitalloc.job.Job`, default ``<out>.job`` beside the output) is fingerprinted by the
model file digests, the calibration text digest and every option that changes the result; reopening it with
other inputs is refused with a one-line message naming what differs.  Layout::

    job.json, job.lock                      state and lock (bitalloc.job)
    measure_blocks/fisher.safetensors       Fisher statistics (the gradient pass), once
    measure_blocks/rows0003.json            measurement rows of block 3
    measure_blocks/hidden.safetensors       inputs of block k of the fp model (metadata "block": k)
    measurement.json                        stage "measure" (the Measurement table)
    plan.json                               stage "plan"
    quantize/block0003.safetensors          QTensor parts of block 3 (metadata: formats, shapes, dtypes)
    quantize/hidden.safetensors             inputs of block k (metadata "block": k), replaced after each block
    export/digests.json                     SHA-256 of every tensor about to be exported

After ``kill -9`` at any moment the same command continues from the last checkpoint.  Every checkpoint is
recorded with its SHA-256 when written (:mod:`bitalloc.job`); one that changed is discarded with everything
computed after it, and recomputed.  Every stage's result is
reloaded from its file even in an uninterrupted run (the plan is always the one read back), and the hidden
states are saved bit-exactly, so the output directory is byte-identical whatever the kill points were.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .checkpoints import HIDDEN_FILE, MEASURE_STAGE, QUANT_STAGE, MeasureCheckpoints, block_hook, load_state
from .errors import InputError, output_exists
from .io.atomic import TEMP_SUFFIX, file_digest
from .job import Job, finish_job, run_job

log = logging.getLogger(__name__)


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

    ``load() -> (model, tokenizer)``; ``calibration(tokenizer) -> windows``; ``measure(model, view, windows,
    checkpoints)`` (pass ``checkpoints.kwargs()`` on to :func:`bitalloc.pipeline.measure_model` to resume
    inside the measurement) or None when the plan needs no measurement; ``plan(measurement | None, model,
    view) -> Plan``.
    """

    load: Callable[[], tuple[Any, Any]]
    calibration: Callable[[Any], torch.Tensor]
    measure: Callable[[Any, Any, torch.Tensor, "MeasureCheckpoints"], Any] | None
    plan: Callable[[Any, Any, Any], Any]
    method: str = "gptq"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise InputError(f"unknown rounding method {self.method!r}; use 'gptq' or 'rtn'")


def measure_stage(job: Job, measure: Callable[[MeasureCheckpoints], Any],
                  after_block: Callable[[int], None] | None = None) -> Any:
    """Stage "measure" of a job: ``measure(checkpoints)`` once (resumable per block), saved as
    ``measurement.json`` and always read back from it (so every run continues with the same bytes)."""
    from .measure import Measurement

    mpath = job.dir / "measurement.json"
    if not job.stage_done("measure"):
        measure(MeasureCheckpoints(job, after_block)).save(mpath)
        job.complete_stage("measure", mpath)
        job.discard(MEASURE_STAGE)
    return Measurement.load(mpath)


def remove_stale_outputs(out: Path) -> None:
    """Temporary directories a killed export left beside ``out`` (only ever called under the job lock)."""
    for p in sorted(out.parent.glob(f".{out.name}.*{TEMP_SUFFIX}")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def output_refusal(out: Path, overwrite: bool) -> InputError | None:
    """The error refusing to replace an existing output file or directory (None: it may be written)."""
    if out.exists() and not overwrite:
        return output_exists(out)
    return None


def _already_exported(job: Job, out: Path) -> dict[str, Any] | None:
    """``bitalloc.json`` of ``out`` when it is this job's verified output (a kill came between the rename and
    the cleanup)."""
    from .export.packed import read_packed, verify_packed

    if not job.has_item("export", "digests"):
        return None
    try:
        verify_packed(out, job.load_item("export", "digests"))
    except InputError:
        return None
    log.info("%s was already written and verified by this job", out)
    return read_packed(out, verify=False)[0]  # verified just above


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
    out = Path(out)
    return run_job(job_dir, fingerprint, lambda job: _run(job, out, steps, overwrite, after_block, report),
                   keep_job=keep_job, refusal=output_refusal(out, overwrite),
                   reuse=lambda job: _already_exported(job, out))


def _run(
    job: Job,
    out: Path,
    steps: QuantizeSteps,
    overwrite: bool,
    after_block: Callable[[int], None] | None,
    report: Callable[[Any], None] | None,
) -> dict[str, Any]:
    from .export.packed import flat_digests, save_packed
    from .models.view import ModelView
    from .quantize import quantize_model

    remove_stale_outputs(out)
    model, tok = steps.load()
    view = ModelView(model)
    windows = steps.calibration(tok)
    measurement = None
    if steps.measure is not None:
        measure = steps.measure
        measurement = measure_stage(job, lambda ckpt: measure(model, view, windows, ckpt))
    if measurement is not None:
        from .plan import Plan

        ppath = job.dir / "plan.json"
        if not job.stage_done("plan"):
            steps.plan(measurement, model, view).save(ppath)
            job.complete_stage("plan", ppath)
        plan = Plan.load(ppath, measurement)
    else:
        plan = steps.plan(None, model, view)  # no measurement: a cheap pure function of the model
    if report is not None:
        report(plan)

    q = quantize_model(model, view, plan, windows, method=steps.method, progress=steps.progress,
                       on_block=block_hook(job, QUANT_STAGE, after_block), start=load_state(job))
    job.complete_stage(QUANT_STAGE)
    job.save_item("export", "digests", flat_digests(q))
    info = save_packed(out, model, view, q, plan, tok, overwrite=overwrite)
    job.complete_stage("export")
    return info


def run_measure_job(
    out: str | Path,
    job_dir: str | Path,
    fingerprint: Mapping[str, Any],
    load: Callable[[], tuple[Any, Any]],
    measure: Callable[[Any, Any, MeasureCheckpoints], Any],
    *,
    keep_job: bool = False,
    overwrite: bool = False,
    after_block: Callable[[int], None] | None = None,
) -> Any:
    """Run (or continue) ``bitalloc measure``: ``measure(model, tokenizer, checkpoints)`` in a job, then copy
    the table to ``out`` atomically; returns the Measurement.  The bytes of ``out`` are those of the job's
    ``measurement.json``, whatever the interruptions were."""
    from .measure import Measurement, write_text_atomic

    out = Path(out)

    def already_written(job: Job) -> Any:  # a kill came between writing ``out`` and removing the job
        if not (job.stage_done("measure") and out.read_bytes() == (job.dir / "measurement.json").read_bytes()):
            return None
        log.info("%s was already written by this job", out)
        return Measurement.load(out)

    def run(job: Job) -> Any:
        mpath = job.dir / "measurement.json"
        remove_stale_outputs(out)
        if not job.stage_done("measure"):
            model, tok = load()
            m = measure_stage(job, lambda ckpt: measure(model, tok, ckpt), after_block)
        else:
            m = Measurement.load(mpath)
        write_text_atomic(out, mpath.read_text(), overwrite)  # another run may have written ``out`` meanwhile
        return m

    return run_job(job_dir, fingerprint, run, keep_job=keep_job, refusal=output_refusal(out, overwrite),
                   reuse=already_written)


__all__ = [
    "HIDDEN_FILE", "MEASURE_STAGE", "MeasureCheckpoints", "QUANT_STAGE", "QuantizeSteps", "block_hook",
    "default_job_dir", "finish_job", "load_state", "measure_stage", "model_digests", "output_refusal",
    "remove_stale_outputs", "run_measure_job", "run_quantize_job", "text_digest",
]
