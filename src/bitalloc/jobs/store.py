"""Resumable jobs: a directory of atomic per-item checkpoints and the stages reached.

Layout of a job directory::

    job.json                 {"version", "fingerprint", "stages_done", "seq", "stage_seq", "checkpoints"}
    job.lock                 flock held while a Job is open (a second process is refused)
    <stage>/<key>.safetensors | <stage>/<key>.json     one checkpoint per item (e.g. per block)

Every file is written with :func:`bitalloc.io.atomic.atomic_write`, so after ``kill -9`` each checkpoint
is either absent or complete; temporaries left by the kill are removed when the job is reopened.

**Digests.**  Every checkpoint is recorded in ``job.json`` when it is written (:meth:`Job.save_item`, or
:meth:`Job.record` / :meth:`Job.complete_stage` for files written directly): its SHA-256 and a sequence
number, the order of the writes (stage completions are numbered too).  Opening a job verifies every recorded
checkpoint in that order; the first one missing, unreadable or changed since it was written is discarded with
a warning, together with everything written after it (it may have been computed from it) and the stages
completed after it, so the job recomputes them.  A file without a record (a kill came between the write and
the record) is never read: only recorded checkpoints count as present.

Reopening with a different fingerprint (model, calibration data, options) raises :class:`InputError`
listing exactly the keys that differ.  Results are deterministic functions of the inputs, so a resumed
job produces byte-identical outputs.

Usage::

    with Job(out / "job", {"model": file_digest(model), "budget": "4bpw"}) as job:
        for i, block in enumerate(blocks):
            key = f"block{i:03d}"
            if not job.has_item("quantize", key):
                job.save_item("quantize", key, quantize_block(block))
        job.complete_stage("quantize")

The commands' jobs (quantize, measure, gguf, sweep) open and finish the same way, with :func:`run_job`.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch

from ..errors import BitallocError, InputError
from ..io.atomic import PathLike, atomic_write, file_digest, remove_stale_temps
from ..io.safetensors import SafetensorsFile, write_safetensors_atomic
from .state import NAME, JobState, checkpoint_name, file_problem, remove_checkpoint, remove_path

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
LOCK_FILE = "job.lock"
Item = Mapping[str, torch.Tensor] | Any
T = TypeVar("T")


def _canonical(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(fingerprint), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"job fingerprint must be JSON data: {exc}") from exc


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Lines ``key: old -> new`` for every (dotted) key whose value differs; ``<absent>`` when missing."""
    a, b = _flatten(_canonical(old)), _flatten(_canonical(new))
    lines = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            lines.append(f"{k}: {va!r:.120} (job) vs {vb!r:.120} (now)")
    return lines


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(f"invalid job {kind} {name!r}: use letters, digits, '_', '.', '-' (not leading '.')")
    return name


def _refuse_foreign_directory(directory: Path) -> None:
    """A job directory is new, empty or a bitalloc job: one holding other files is refused before anything is
    written into it (a finished job's directory is removed, which must never take a user's files with it)."""
    try:
        names = set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise InputError(f"cannot use job directory {directory}: {exc.strerror or exc}") from exc
    if names and JOB_FILE not in names and names - {LOCK_FILE}:
        raise InputError(f"job directory {directory} already holds files and is not a bitalloc job (no {JOB_FILE}); "
                         "give a new or empty directory with --job")


class Job:
    """A job directory; open it with ``with Job(dir, fingerprint) as job`` (it holds a lock)."""

    def __init__(self, directory: PathLike, fingerprint: Mapping[str, Any]) -> None:
        self.dir = Path(directory)
        self.fingerprint = _canonical(fingerprint)
        _refuse_foreign_directory(self.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd: int | None = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot use job directory {self.dir}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise InputError(f"job directory {self.dir} is in use by another bitalloc process") from None
        try:
            remove_stale_temps(self.dir)
            self._state = self._open_or_create()
            self._verify()
        except BaseException:
            self.close()
            raise

    def _open_or_create(self) -> JobState:
        path = self.dir / JOB_FILE
        if not (path.exists() or path.is_symlink()):
            state = JobState(self.fingerprint)
            self._write_state(state)
            log.info("started job %s", self.dir)
            return state
        try:
            if not path.is_file():
                raise ValueError("not a regular file")
            state = JobState.parse(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise InputError(f"{path} is unreadable or malformed ({str(exc)[:200]}); remove the job directory "
                             "to start over") from exc
        diff = fingerprint_diff(state.fingerprint, self.fingerprint)
        if diff:
            raise InputError(
                f"job directory {self.dir} was started with different inputs; use a new directory or remove it. "
                "Differences: " + "; ".join(diff)
            )
        log.info("resuming job %s (stages done: %s)", self.dir, ", ".join(state.stages) or "none")
        return state

    def _write_state(self, state: JobState) -> None:
        with atomic_write(self.dir / JOB_FILE, overwrite=True) as f:
            f.write(state.to_json().encode())

    def _verify(self) -> None:
        """Check every recorded checkpoint in write order; discard the first bad one and all that follows."""
        for rel, (n, sha) in sorted(self._state.checkpoints.items(), key=lambda kv: kv[1][0]):
            problem = file_problem(self.dir, rel, sha)
            if problem is not None:
                later = sum(m > n for m, _ in self._state.checkpoints.values())
                stages = [s for s, m in self._state.stages.items() if m > n]
                log.warning("job %s: checkpoint %s %s; discarding it%s, to recompute", self.dir, rel, problem,
                            f" and the {later} checkpoint(s) written after it (stages undone: "
                            f"{', '.join(stages) or 'none'})" if later or stages else "")
                self._discard_after(n - 1)
                return

    def _discard_after(self, seq: int) -> None:
        st = self._state
        gone = [rel for rel, (n, _) in st.checkpoints.items() if n > seq]
        st.checkpoints = {rel: rec for rel, rec in st.checkpoints.items() if rec[0] <= seq}
        st.stages = {s: n for s, n in st.stages.items() if n <= seq}
        self._write_state(st)  # first forget them, then delete: a kill in between leaves unrecorded files
        for rel in gone:
            remove_checkpoint(self.dir, rel)

    # ---------------------------------------------------------------------------------------- stages
    def stage_done(self, stage: str) -> bool:
        return _check_name("stage", stage) in self._state.stages

    def complete_stage(self, stage: str, *files: PathLike) -> None:
        """Mark ``stage`` done, after recording ``files`` (its results, written directly) as checkpoints."""
        if not self.stage_done(stage):
            for f in files:
                self._add_record(Path(f))
            self._state.seq += 1
            self._state.stages[stage] = self._state.seq
            self._write_state(self._state)

    @property
    def stages_done(self) -> tuple[str, ...]:
        return tuple(self._state.stages)

    # ------------------------------------------------------------------------------------- records
    def _rel(self, path: Path) -> str:
        try:
            rel = path.relative_to(self.dir).as_posix()
        except ValueError:
            rel = ""
        if not checkpoint_name(rel):
            raise InputError(f"{path} cannot be a checkpoint of job {self.dir}")
        return rel

    def _add_record(self, path: Path) -> None:
        rel = self._rel(path)
        self._state.seq += 1
        self._state.checkpoints[rel] = (self._state.seq, file_digest(path))

    def record(self, path: PathLike) -> None:
        """Record the file ``path`` (inside the job directory, just written) as a checkpoint, with its digest."""
        self._add_record(Path(path))
        self._write_state(self._state)

    def recorded(self, path: PathLike) -> bool:
        """True when ``path`` is a recorded checkpoint (verified when the job was opened)."""
        return self._rel(Path(path)) in self._state.checkpoints

    def discard(self, stage: str) -> None:
        """Forget and delete every checkpoint under ``<stage>/`` (e.g. per-block files once the stage is done)."""
        prefix = _check_name("stage", stage) + "/"
        st = self._state
        if any(rel.startswith(prefix) for rel in st.checkpoints):
            st.checkpoints = {rel: rec for rel, rec in st.checkpoints.items() if not rel.startswith(prefix)}
            self._write_state(st)
        remove_path(self.dir / stage)

    # ----------------------------------------------------------------------------------------- items
    def stage_dir(self, stage: str) -> Path:
        """``<job>/<stage>/``, created (whatever a careless hand left at that name is replaced)."""
        d = self.dir / _check_name("stage", stage)
        if not d.is_dir() or d.is_symlink():
            remove_path(d)
            d.mkdir()
        return d

    def _paths(self, stage: str, key: str) -> tuple[Path, Path]:
        base = self.dir / _check_name("stage", stage) / _check_name("key", key)
        return base.with_name(key + ".safetensors"), base.with_name(key + ".json")

    def has_item(self, stage: str, key: str) -> bool:
        return any(self.recorded(p) for p in self._paths(stage, key))

    def items(self, stage: str) -> list[str]:
        """Keys of the checkpoints saved for ``stage``, sorted."""
        prefix = _check_name("stage", stage) + "/"
        return sorted(rel[len(prefix):].rsplit(".", 1)[0] for rel in self._state.checkpoints
                      if rel.startswith(prefix) and rel.endswith((".safetensors", ".json")))

    def save_item(self, stage: str, key: str, value: Item) -> None:
        """Checkpoint ``value`` atomically: a ``{name: tensor}`` mapping, or JSON data (no NaN)."""
        st, js = self._paths(stage, key)
        if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            written, other = st, js
        else:
            try:
                text = json.dumps(value, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InputError(f"job item {stage}/{key} is neither tensors nor JSON data: {exc}") from exc
            written, other = js, st
        self.stage_dir(stage)
        if written is st:
            write_safetensors_atomic(st, value, overwrite=True, manifest=False)
        else:
            with atomic_write(js, overwrite=True) as f:
                f.write((text + "\n").encode())
        self._state.checkpoints.pop(self._rel(other), None)
        self.record(written)
        other.unlink(missing_ok=True)

    def load_item(self, stage: str, key: str) -> Item:
        """The value saved by :meth:`save_item` (tensors are loaded into memory, not mapped)."""
        st, js = self._paths(stage, key)
        try:
            if self.recorded(st):
                with SafetensorsFile(st) as sf:
                    return {name: sf.get(name).clone() for name in sf.keys()}
            if self.recorded(js):
                return json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise InputError(f"checkpoint {stage}/{key} of job {self.dir} is corrupt ({exc}); "
                             "remove the job directory to start over") from exc
        raise InputError(f"job {self.dir} has no checkpoint {stage}/{key}")

    # ------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- a command's job
def finish_job(job_dir: PathLike, keep_job: bool) -> None:
    """Remove a finished job's directory, unless it is to be kept (``--keep-job``)."""
    if not keep_job:
        shutil.rmtree(job_dir, ignore_errors=True)


def _entries(directory: Path) -> set[str] | None:
    """Names in ``directory`` (None when it does not exist)."""
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot use job directory {directory}: {exc.strerror or exc}") from exc


def _undo(job: Job, before: set[str] | None) -> None:
    """Remove what a failed run added to its job directory: all of it when the run created it, else only the
    entries that were not there before."""
    if before is None:
        shutil.rmtree(job.dir, ignore_errors=True)
    else:
        for name in sorted((_entries(job.dir) or set()) - before):
            remove_path(job.dir / name)
    log.info("removed the job directory %s of the failed run", job.dir)


def run_job(
    job_dir: PathLike,
    fingerprint: Mapping[str, Any],
    run: Callable[[Job], T],
    *,
    keep_job: bool = False,
    refusal: InputError | None = None,
    reuse: Callable[[Job], T | None] | None = None,
) -> T:
    """Open (or resume) the job in ``job_dir``, return ``run(job)`` (called under the job's lock), then finish
    the job (:func:`finish_job`).

    ``refusal``: the error for an output that exists and may not be overwritten.  It is raised, unless the
    job was started before and ``reuse(job)`` (under the lock) finds that output to be this job's finished
    result (a kill came after the output was written): then that result is returned, without ``run``.

    A job this call started (no ``job.json`` before) is undone when ``run`` fails with a :class:`BitallocError`
    (a user error: the corrected command must not be blocked by its fingerprint), or with any other exception
    before a stage was finished: the directory is removed if this call created it, else only what this call
    added to it.  An interruption (``KeyboardInterrupt``, a kill), or a crash after a finished stage, keeps the
    job for the rerun; so does any failure of a job that existed before.
    """
    job_dir = Path(job_dir)
    fresh = not (job_dir / JOB_FILE).exists()
    if refusal is not None:
        found = None
        if not fresh and reuse is not None:
            with Job(job_dir, fingerprint) as job:
                found = reuse(job)
        if found is None:
            raise refusal
        finish_job(job_dir, keep_job)
        return found
    before = _entries(job_dir) if fresh else set()
    with Job(job_dir, fingerprint) as job:
        try:
            result = run(job)
        except Exception as exc:
            if fresh and (isinstance(exc, BitallocError) or not job.stages_done):
                _undo(job, before)
            raise
    finish_job(job_dir, keep_job)
    return result


__all__ = ["Job", "JobState", "finish_job", "fingerprint_diff", "run_job"]
