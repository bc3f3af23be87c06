"""The commands' jobs, all on :class:`~bitalloc.jobs.stages.Stages` and :func:`~bitalloc.jobs.store.run_job`:

* :func:`run_measure` (``bitalloc measure``): stage "measure", then the table copied to ``out``;
* :func:`run_export` (``bitalloc quantize``, ``bitalloc gguf``): measure -> plan -> quantize -> export to a
  :class:`~bitalloc.targets.base.Target` (the packed directory, a GGUF);
* :func:`run_sweep` (``bitalloc sweep`` / ``demo``, :mod:`bitalloc.jobs.sweep`): measure once, then plan,
  quantize and evaluate per budget.

After ``kill -9`` at any moment the same command continues from the last checkpoint and writes byte-identical
outputs.  An existing output is refused without ``overwrite``, except when it is this job's finished output (a
kill came after the write): the target recognises it from the digests the job saved before writing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from ..errors import output_exists
from ..measure import Measurement
from ..plan import Plan
from ..targets.base import Capacity, Target, Written, remove_temps_beside
from .config import RunConfig
from .stages import MEASUREMENT_FILE, PLAN_FILE, Stages, saved_capacity
from .store import Job, run_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    written: Written
    plan: Plan | None  # None when a finished ``--format`` output was found (its plan is not checkpointed)
    capacity: Capacity | None
    #: wall seconds and calls per stage of this run (:meth:`bitalloc.timing.StageTimer.as_dict`; empty when the
    #: finished output was found)
    timings: dict[str, dict[str, float | int]] = field(default_factory=dict)


def run_export(config: RunConfig, target: Target) -> ExportResult:
    """Run (or continue) the job of ``config`` and write ``target``."""
    out = target.out
    refusal = output_exists(out) if (out.exists() or out.is_symlink()) and not config.overwrite else None
    return run_job(config.job_dir, config.fingerprint(target.fingerprint()), lambda job: _export(job, config, target),
                   keep_job=config.keep_job, refusal=refusal, reuse=lambda job: _finished(job, target))


def _export(job: Job, config: RunConfig, target: Target) -> ExportResult:
    target.remove_stale()
    stages = Stages(job, config, target)
    measurement = stages.measurement()
    plan, capacity = stages.plan(measurement, target, config.budget)
    qtensors, originals = stages.quantize(plan)
    qtensors, originals = stages.recover(qtensors, originals)
    written = stages.export(target, plan, capacity, qtensors, originals)
    return ExportResult(written, plan, capacity, stages.timer.as_dict())


def _finished(job: Job, target: Target) -> ExportResult | None:
    """The result when the target's output is this job's finished one (a kill came after the write)."""
    if not job.has_item("export", "expected"):
        return None
    written = target.is_ours(job.load_item("export", "expected"))
    if written is None:
        return None
    plan = capacity = None
    if job.stage_done("plan"):
        plan = Plan.load(job.dir / PLAN_FILE, Measurement.load(job.dir / MEASUREMENT_FILE))
        capacity = saved_capacity(job) if job.has_item("plan", "capacity") else None
    return ExportResult(written, plan, capacity)


def run_measure(config: RunConfig, out: str | Path) -> Measurement:
    """Run (or continue) ``bitalloc measure``: the table is copied to ``out`` atomically; its bytes are those of
    the job's ``measurement.json``, whatever the interruptions were."""
    from ..measure import write_text_atomic

    out = Path(out)

    def finished(job: Job) -> Measurement | None:  # a kill came between writing ``out`` and removing the job
        mpath = job.dir / MEASUREMENT_FILE
        if not (job.stage_done("measure") and out.read_bytes() == mpath.read_bytes()):
            return None
        log.info("%s was already written by this job", out)
        return Measurement.load(out)

    def run(job: Job) -> Measurement:
        remove_temps_beside(out)
        m = Stages(job, config).measurement()
        assert m is not None, "a measure job measures"
        # ``out`` is checked again: another run may have written it meanwhile
        write_text_atomic(out, (job.dir / MEASUREMENT_FILE).read_text(), config.overwrite)
        return m

    refusal = output_exists(out) if out.exists() and not config.overwrite else None
    return run_job(config.job_dir, config.fingerprint(), run, keep_job=config.keep_job, refusal=refusal,
                   reuse=finished)


__all__ = ["ExportResult", "run_export", "run_measure"]
