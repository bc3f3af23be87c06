"""``bitalloc sweep`` / ``bitalloc demo`` as a resumable job: measure once, then plan, quantize and evaluate per
budget.

A job directory (:class:`bitalloc.jobs.store.Job`, default ``<out>.job`` beside the output directory) is fingerprinted
by the model digests, the calibration and evaluation text digests and every option that changes the results;
reopening it with other inputs is refused with a one-line message naming what differs.  Layout::

    job.json, job.lock              state and lock
    measure_blocks/...              per-block measurement checkpoints (shared with the measure job)
    measurement.json                stage "measure" (the Measurement table, always read back from here)
    sweep/measure.json              wall time of the measurement, saved before the stage is marked done
    points/p0003_rtn_uniform_int4-g64_3.5bpw.json   one finished point each (saved atomically)
    sweep/result.json               stage "points": title, extra fields and every point, in order
                                    then stage "output" once <out>/ is written

Outputs ``<out>/measurement.json``, ``<out>/sweep.json`` and ``<out>/sweep.png`` are written atomically at the
end, from the job's files only, so an interrupted and resumed run writes the same bytes as an uninterrupted
one *with the same saved timings*.  The only fields that differ between two separate runs are wall times:
``measure_seconds`` (the run that finished the measurement; an interrupted measurement counts only its last
run) and each point's ``seconds`` (the run that computed that point).  An existing output is refused without
``overwrite``, except when its files are exactly the ones this job writes (a kill came after the writes).
Every checkpoint is recorded with its SHA-256 (:mod:`bitalloc.jobs.store`): a changed point, measurement or result is
discarded, with everything saved after it, and recomputed.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import InputError
from ..io.atomic import TEMP_SUFFIX, atomic_write
from ..sweep import Point, plot_png, results_json, sweep
from ..targets.packed import weights_capacity
from .config import RunConfig
from .checkpoints import load_rounded
from .stages import MEASUREMENT_FILE, Stages
from .store import Job, run_job

log = logging.getLogger("bitalloc.resume")

OUTPUTS = ("measurement.json", "sweep.json", "sweep.png")
POINTS_STAGE = "points"


@dataclass(frozen=True)
class SweepResult:
    points: tuple[Point, ...]
    measure_seconds: float
    paths: tuple[Path, ...]  # measurement.json, sweep.json, sweep.png


# ------------------------------------------------------------------------------------ saved results
def _result(job: Job) -> tuple[str, list[tuple[str, Any]], list[Point]]:
    """Title, extra fields (in order) and points saved by stage "points"."""
    saved = job.load_item("sweep", "result")
    try:
        doc = json.loads(saved["json"])
        return str(doc["title"]), [(str(k), v) for k, v in doc["extra"]], [Point.from_dict(p) for p in doc["points"]]
    except (TypeError, KeyError, ValueError) as e:
        raise InputError(f"job {job.dir}: the saved sweep result is corrupt ({e}); remove the job directory") from e


def _expected(job: Job) -> dict[str, bytes]:
    """The bytes of every output, from the job's files only."""
    title, extra, points = _result(job)
    return {"measurement.json": (job.dir / MEASUREMENT_FILE).read_bytes(),
            "sweep.json": results_json(points, dict(extra)).encode(), "sweep.png": plot_png(points, title)}


def _ours(out: Path, expected: Mapping[str, bytes]) -> bool:
    """True when every output file present in ``out`` has exactly the bytes this job writes."""
    return all(not (out / n).exists() or (out / n).read_bytes() == data for n, data in expected.items())


def _existing(out: Path) -> list[str]:
    return [n for n in OUTPUTS if (out / n).exists() or (out / n).is_symlink()]


def _refuse(out: Path, names: Sequence[str]) -> InputError:
    return InputError(f"output {out} already holds {', '.join(names)} (use --overwrite to replace it)")


# ---------------------------------------------------------------------------------------------- run
def run_sweep(config: RunConfig, out: str | Path,
              on_point: Callable[[str, Point], None] | None = None) -> SweepResult:
    """Run (or continue) the sweep of ``config`` and write ``out/{measurement.json, sweep.json, sweep.png}``;
    ``on_point(key, point)`` follows each saved point (a library hook: the CLI passes none)."""
    out = Path(out)
    if config.sweep is None:
        raise InputError("a sweep job needs the sweep's settings (RunConfig.sweep)")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; the sweep writes a directory")
    existing = _existing(out)

    def run(job: Job) -> SweepResult:
        return _run(job, out, config, on_point)

    def finish(job: Job) -> SweepResult | None:  # outputs written (maybe not all) before a kill: write the rest
        return run(job) if job.stage_done(POINTS_STAGE) and _ours(out, _expected(job)) else None

    return run_job(config.job_dir, config.fingerprint(), run, keep_job=config.keep_job,
                   refusal=_refuse(out, existing) if existing and not config.overwrite else None, reuse=finish)


def _run(job: Job, out: Path, config: RunConfig, on_point: Callable[[str, Point], None] | None) -> SweepResult:
    if not job.stage_done(POINTS_STAGE):
        _compute(job, config, on_point)
    expected = _expected(job)
    if out.is_dir():
        for stale in sorted(out.glob(f".*{TEMP_SUFFIX}")):  # temporaries a kill left during the writes
            if any(stale.name.startswith(f".{n}.") for n in OUTPUTS):
                stale.unlink(missing_ok=True)
    if not config.overwrite and not _ours(out, expected):  # something appeared in ``out`` while the sweep ran
        raise _refuse(out, _existing(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out}: {e.strerror or e}") from e
    paths = []
    for name in OUTPUTS:
        with atomic_write(out / name, overwrite=True) as f:
            f.write(expected[name])
        paths.append(out / name)
    job.complete_stage("output")
    _, _, points = _result(job)
    seconds = float(job.load_item("sweep", "measure")["seconds"])
    return SweepResult(tuple(points), seconds, tuple(paths))


def _compute(job: Job, config: RunConfig, on_point: Callable[[str, Point], None] | None) -> None:
    """Stages "measure" and "points": load, measure (resumable per block), then every unfinished point."""
    spec = config.sweep
    assert spec is not None
    stages = Stages(job, config)
    t0 = time.perf_counter()

    def timed() -> None:  # saved before the stage is marked done
        job.save_item("sweep", "measure", {"seconds": time.perf_counter() - t0})

    m = stages.measurement(before_done=timed)
    assert m is not None, "a sweep measures"
    if not job.has_item("sweep", "measure"):
        raise InputError(f"job {job.dir} lacks the measurement time; remove the job directory to start over")
    measure_seconds = job.load_item("sweep", "measure")["seconds"]

    done = saved_points(job)
    if done:
        log.info("resuming sweep: %d point(s) already done", len(done))

    def save(key: str, pt: Point) -> None:
        save_point(job, key, pt)
        if on_point is not None:
            on_point(key, pt)

    lo = stages.loaded
    calib, evals = stages.calibration, stages.windows(spec.eval_texts, spec.eval_windows)
    ref = _reference(stages)
    budgets = [weights_capacity(b, m).plan_budget(m.fixed_bytes) for b in config.budgets]  # resolved once
    table = stages.recovery_aware(m)  # --recover-aware: errors scaled by each format's recovery gain (saved)
    points = sweep(lo.model, lo.view, table, budgets, [config.method], calib, evals, ref,
                   constraints=stages.constraints(None), uniform=spec.uniform, progress=config.progress,
                   uniform_candidates=spec.uniform_candidates, done=done, on_point=save,
                   placement=stages.placement, timer=stages.timer, recover=config.recover,
                   recover_windows=stages.recovery_windows if config.recover.active else None,
                   rounded=(lambda assign: load_rounded(job, assign)) if config.reuse_rounding else None)
    extra = [("measure_seconds", measure_seconds), ("measure_method", config.method),
             ("calib_windows", int(calib.shape[0])), ("eval_windows", int(evals.shape[0])), *spec.extra]
    doc = {"title": spec.title, "extra": [list(kv) for kv in extra], "points": [asdict(p) for p in points]}
    job.save_item("sweep", "result", {"json": json.dumps(doc)})
    job.complete_stage(POINTS_STAGE)


def _reference(stages: Stages) -> Any:
    """The fp reference (and recovery's teacher): a second copy of the model as the stages see it (rotated by
    ``--rotate``: the same function, matching block by block), loaded only when points remain."""
    return stages.load_source(tokenizer=False)[0]


def saved_points(job: Job) -> dict[str, Point]:
    """The sweep points checkpointed in ``job`` by :func:`save_point`, by point key."""
    return {k: Point.from_dict(json.loads(job.load_item(POINTS_STAGE, k)["json"])) for k in job.items(POINTS_STAGE)}


def save_point(job: Job, key: str, pt: Point) -> None:
    """Checkpoint a finished sweep point in ``job`` (stage :data:`POINTS_STAGE`)."""
    # the point as JSON text: non-finite values (an exploded int2 model's ppl) survive the round trip
    job.save_item(POINTS_STAGE, key, {"json": json.dumps(asdict(pt))})


__all__ = ["OUTPUTS", "POINTS_STAGE", "SweepResult", "run_sweep", "save_point", "saved_points"]
