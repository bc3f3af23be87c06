"""Resumable jobs: a directory of atomic per-item checkpoints and the stages reached.

Layout of a job directory::

    job.json                 {"version", "fingerprint": {...}, "stages_done": [...]}
    job.lock                 flock held while a Job is open (a second process is refused)
    <stage>/<key>.safetensors | <stage>/<key>.json     one checkpoint per item (e.g. per block)

Every file is written with :func:`bitalloc.io.atomic.atomic_write`, so after ``kill -9`` each checkpoint
is either absent or complete; temporaries left by the kill are removed when the job is reopened.
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
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch

from .errors import BitallocError, InputError
from .io.atomic import PathLike, atomic_write, remove_stale_temps
from .io.safetensors import SafetensorsFile, write_safetensors_atomic

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
LOCK_FILE = "job.lock"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
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
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"invalid job {kind} {name!r}: use letters, digits, '_', '.', '-' (not leading '.')")
    return name


class Job:
    """A job directory; open it with ``with Job(dir, fingerprint) as job`` (it holds a lock)."""

    def __init__(self, directory: PathLike, fingerprint: Mapping[str, Any]) -> None:
        self.dir = Path(directory)
        self.fingerprint = _canonical(fingerprint)
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
            self._stages = self._open_or_create()
        except BaseException:
            self.close()
            raise

    def _open_or_create(self) -> list[str]:
        path = self.dir / JOB_FILE
        if not path.exists():
            self._write_state([])
            log.info("started job %s", self.dir)
            return []
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            old, stages = state["fingerprint"], state["stages_done"]
            if not isinstance(old, dict) or not isinstance(stages, list):
                raise TypeError("fingerprint must be an object and stages_done a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is unreadable or malformed ({exc}); remove the job directory") from exc
        diff = fingerprint_diff(old, self.fingerprint)
        if diff:
            raise InputError(
                f"job directory {self.dir} was started with different inputs; use a new directory or remove it. "
                "Differences: " + "; ".join(diff)
            )
        log.info("resuming job %s (stages done: %s)", self.dir, ", ".join(stages) or "none")
        return [str(s) for s in stages]

    def _write_state(self, stages: list[str]) -> None:
        state = {"version": 1, "fingerprint": self.fingerprint, "stages_done": stages}
        with atomic_write(self.dir / JOB_FILE, overwrite=True) as f:
            f.write((json.dumps(state, indent=1, sort_keys=True) + "\n").encode())

    # ---------------------------------------------------------------------------------------- stages
    def stage_done(self, stage: str) -> bool:
        return _check_name("stage", stage) in self._stages

    def complete_stage(self, stage: str) -> None:
        if not self.stage_done(stage):
            self._stages = [*self._stages, stage]
            self._write_state(self._stages)

    @property
    def stages_done(self) -> tuple[str, ...]:
        return tuple(self._stages)

    # ----------------------------------------------------------------------------------------- items
    def _paths(self, stage: str, key: str) -> tuple[Path, Path]:
        base = self.dir / _check_name("stage", stage) / _check_name("key", key)
        return base.with_name(key + ".safetensors"), base.with_name(key + ".json")

    def has_item(self, stage: str, key: str) -> bool:
        return any(p.exists() for p in self._paths(stage, key))

    def items(self, stage: str) -> list[str]:
        """Keys of the checkpoints saved for ``stage``, sorted."""
        d = self.dir / _check_name("stage", stage)
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.iterdir() if p.suffix in (".safetensors", ".json") and not p.name.startswith("."))

    def save_item(self, stage: str, key: str, value: Item) -> None:
        """Checkpoint ``value`` atomically: a ``{name: tensor}`` mapping, or JSON data (no NaN)."""
        st, js = self._paths(stage, key)
        st.parent.mkdir(exist_ok=True)
        if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            write_safetensors_atomic(st, value, overwrite=True, manifest=False)
            js.unlink(missing_ok=True)
            return
        try:
            text = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(f"job item {stage}/{key} is neither tensors nor JSON data: {exc}") from exc
        with atomic_write(js, overwrite=True) as f:
            f.write((text + "\n").encode())
        st.unlink(missing_ok=True)

    def load_item(self, stage: str, key: str) -> Item:
        """The value saved by :meth:`save_item` (tensors are loaded into memory, not mapped)."""
        st, js = self._paths(stage, key)
        if st.exists():
            with SafetensorsFile(st) as sf:
                return {name: sf.get(name).clone() for name in sf.keys()}
        if js.exists():
            try:
                return json.loads(js.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise InputError(f"checkpoint {js} is corrupt ({exc}); delete it to recompute") from exc
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
    A :class:`BitallocError` from ``run`` in a job this call started removes the job directory (a user error:
    the same command fails again, so it leaves no debris); an interruption or a crash keeps it for the rerun.
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
    with Job(job_dir, fingerprint) as job:
        try:
            result = run(job)
        except BitallocError:
            if fresh:
                job.close()
                shutil.rmtree(job.dir, ignore_errors=True)
            raise
    finish_job(job_dir, keep_job)
    return result


__all__ = ["Job", "finish_job", "fingerprint_diff", "run_job"]
