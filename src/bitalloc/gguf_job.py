"""The GGUF output's manifest, and ``bitalloc gguf`` as a resumable job.

**Manifest.**  Beside ``OUT.gguf`` lies ``OUT.gguf.manifest.json`` (the packed export's conventions)::

    {"version": 1, "kind": "bitalloc.manifest",
     "files": {"OUT.gguf": <SHA-256 of the whole file>},
     "tensors": {<GGUF tensor name>: <SHA-256 of its raw data bytes as stored, padding excluded>}}

Every digest is computed from the bytes about to be written, before anything is written.  The manifest is
written first (atomically), then the GGUF (atomically, re-read and compared tensor by tensor by
:func:`bitalloc.export.gguf.write_gguf`), then the final file is read once more and checked against the
manifest (:func:`verify_gguf_manifest`).  So whenever ``OUT.gguf`` exists its manifest is complete; a
kill between the two renames leaves a manifest without a GGUF, which the rerun replaces.

**Job.**  Stages as for ``quantize`` (:mod:`bitalloc.resume`, whose checkpoint code is shared): measure
(per block) -> plan -> quantize (per block) -> write; the job directory (default ``OUT.gguf.job``) is
fingerprinted by the input digest, the calibration text digest and every option that changes the file.  Its
checkpoints are verified against the SHA-256 recorded when each was written (:mod:`bitalloc.job`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .errors import InputError, output_exists
from .export.gguf import (
    GGUFTemplate, GGUFTensor, WrittenGGUF, choose_file_type, gguf_layout, to_gguf_tensor, write_gguf,
)
from .io.atomic import atomic_write, compare_digests, file_digest
from .io.paths import check_overlap
from .io.gguf import GGUFFile
from .job import Job, run_job
from .resume import (
    QUANT_STAGE, MeasureCheckpoints, block_hook, load_state, measure_stage, output_refusal, remove_stale_outputs,
)

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(out: str | os.PathLike[str]) -> Path:
    """``OUT.gguf.manifest.json`` beside ``OUT.gguf``."""
    p = Path(out)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def raw_digest(data: np.ndarray | memoryview | bytes) -> str:
    """SHA-256 of a tensor's raw bytes as stored in the GGUF (what ``GGUFReader`` calls its ``data``)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).hexdigest()


@dataclass(frozen=True, eq=False)
class PreparedGGUF:
    """A GGUF ready to write: tensors as raw blocks in file order, its file type, size and manifest."""

    items: dict[str, GGUFTensor]
    file_type: int
    file_size: int
    manifest: dict[str, Any]


def prepare_gguf(out_name: str, template: GGUFTemplate, tensors: Mapping[str, Any]) -> PreparedGGUF:
    """Convert ``tensors`` (GGUF name -> QTensor / tensor / GGUFTensor) and compute the manifest of the file
    :func:`~bitalloc.export.gguf.write_gguf` will write (template tensor order, then extras)."""
    known = [n for n, _, _ in template.tensors]
    missing = [n for n in known if n not in tensors]
    if missing:
        raise InputError(f"tensors missing for the GGUF export: {', '.join(missing[:8])}")
    order = known + [n for n in tensors if n not in set(known)]
    items = {n: to_gguf_tensor(n, tensors[n], template) for n in order}
    entries = [(g.name, g.shape, g.ggml_type) for g in items.values()]
    ftype = choose_file_type(entries)
    layout = gguf_layout(template, entries, ftype)
    h = hashlib.sha256(layout.header)
    align = template.alignment
    for g in items.values():
        h.update(memoryview(g.data))
        h.update(b"\0" * (-g.data.nbytes % align))
    man = {"version": 1, "kind": "bitalloc.manifest", "files": {out_name: h.hexdigest()},
           "tensors": {n: raw_digest(g.data) for n, g in sorted(items.items())}}
    return PreparedGGUF(items, ftype, layout.file_size, man)


def _manifest_text(man: Mapping[str, Any]) -> bytes:
    return (json.dumps(man, indent=1, sort_keys=True) + "\n").encode()


def read_gguf_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    path = manifest_path(out)
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(man["files"], dict) or not isinstance(man["tensors"], dict):
            raise TypeError("files and tensors must be objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is missing or malformed ({e})") from e
    return man


def verify_gguf_manifest(out: str | os.PathLike[str], expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Re-read ``out``: its SHA-256 and every tensor's raw-bytes SHA-256 must match the manifest beside it
    (and the manifest must equal ``expected`` when given); returns the manifest.  InputError names what differs."""
    p = Path(out)
    man = read_gguf_manifest(p)
    if expected is not None and dict(man) != dict(expected):
        raise InputError(f"{manifest_path(p)} is not the manifest this job meant to write")
    compare_digests(man["files"], {p.name: file_digest(p)}, str(p))
    try:
        f = GGUFFile(p)
    except InputError as e:
        raise InputError(f"{p} does not parse ({e})") from None
    with f:
        compare_digests(man["tensors"], {n: raw_digest(f.raw(n)) for n in f.tensors}, str(p))
    return man


def write_prepared(out: str | os.PathLike[str], template: GGUFTemplate, prep: PreparedGGUF, *,
                   overwrite: bool = False) -> WrittenGGUF:
    """Write the manifest, then the GGUF (verified by write_gguf), then check the final file against it."""
    out = Path(out)
    mpath = manifest_path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise output_exists(out)
    check_overlap([("output", out), ("manifest", mpath)], [("input", template.path)])  # before the manifest
    if mpath.is_dir():
        raise InputError(f"{mpath} is a directory; the manifest cannot be written")
    with atomic_write(mpath, overwrite=True, inputs=[template.path]) as f:  # describes the file written next
        f.write(_manifest_text(prep.manifest))
    try:
        written = write_gguf(out, template, prep.items, file_type=prep.file_type, overwrite=overwrite)
        verify_gguf_manifest(out, prep.manifest)
    except BaseException:
        if not out.exists():
            mpath.unlink(missing_ok=True)
        raise
    log.info("verified %s against %s", out, mpath)
    return written


def write_gguf_verified(out: str | os.PathLike[str], template: GGUFTemplate, tensors: Mapping[str, Any], *,
                        overwrite: bool = False) -> WrittenGGUF:
    """:func:`~bitalloc.export.gguf.write_gguf` plus the manifest beside it, the final file checked against it."""
    prep = prepare_gguf(Path(out).name, template, tensors)
    return write_prepared(out, template, prep, overwrite=overwrite)


# --------------------------------------------------------------------------------------------- job
@dataclass(frozen=True)
class GGUFSteps:
    """What the job runs, supplied by the CLI.

    ``load() -> (model, tokenizer)``; ``calibration(tokenizer) -> windows``; ``measure(model, view, windows,
    checkpoints) -> Measurement``; ``plan(measurement, view) -> (Plan, split dataclass)``;
    ``quantize(model, view, plan, windows, on_block, start) -> {GGUF name: tensor}`` (see
    :func:`bitalloc.gguf_cmd.quantize_for_gguf`).
    """

    load: Callable[[], tuple[Any, Any]]
    calibration: Callable[[Any], torch.Tensor]
    measure: Callable[[Any, Any, torch.Tensor, MeasureCheckpoints], Any]
    plan: Callable[[Any, Any], tuple[Any, Any]]
    quantize: Callable[..., Mapping[str, Any]]
    template: GGUFTemplate


@dataclass(frozen=True)
class GGUFResult:
    path: Path
    file_size: int
    n_tensors: int
    plan: Any
    split: dict[str, Any]


def _result(job: Job, out: Path) -> GGUFResult:
    from .measure import Measurement
    from .plan import Plan

    plan = Plan.load(job.dir / "plan.json", Measurement.load(job.dir / "measurement.json"))
    man = read_gguf_manifest(out)
    return GGUFResult(out, os.path.getsize(out), len(man["tensors"]), plan, job.load_item("plan", "split"))


def _already_written(job: Job, out: Path) -> GGUFResult | None:
    """The result when ``out`` is this job's verified output (a kill came after the rename)."""
    if not job.has_item("export", "manifest"):
        return None
    with contextlib.suppress(InputError):
        verify_gguf_manifest(out, job.load_item("export", "manifest"))
        result = _result(job, out)
        log.info("%s was already written and verified by this job", out)
        return result
    return None


def run_gguf_job(
    out: str | Path,
    job_dir: str | Path,
    fingerprint: Mapping[str, Any],
    steps: GGUFSteps,
    *,
    keep_job: bool = False,
    overwrite: bool = False,
    after_block: Callable[[int], None] | None = None,
) -> GGUFResult:
    """Run (or continue) the job and write ``out`` with its manifest; ``after_block(b)`` follows each
    checkpointed block of the measurement and of the quantization."""
    out = Path(out)
    return run_job(job_dir, fingerprint, lambda job: _run(job, out, steps, overwrite, after_block),
                   keep_job=keep_job, refusal=output_refusal(out, overwrite),
                   reuse=lambda job: _already_written(job, out))


def _run(job: Job, out: Path, steps: GGUFSteps, overwrite: bool,
         after_block: Callable[[int], None] | None) -> GGUFResult:
    from .models.view import ModelView
    from .plan import Plan

    remove_stale_outputs(out)
    model, tok = steps.load()
    view = ModelView(model)
    windows = steps.calibration(tok)
    m = measure_stage(job, lambda ckpt: steps.measure(model, view, windows, ckpt), after_block)
    ppath = job.dir / "plan.json"
    if not job.stage_done("plan"):
        plan, split = steps.plan(m, view)
        job.save_item("plan", "split", asdict(split) if is_dataclass(split) else dict(split))
        plan.save(ppath)
        job.complete_stage("plan", ppath)
    plan = Plan.load(ppath, m)  # always the plan read back: a resumed run continues with the same bytes
    tensors = steps.quantize(model, view, plan, windows, on_block=block_hook(job, QUANT_STAGE, after_block),
                             start=load_state(job, QUANT_STAGE))
    job.complete_stage(QUANT_STAGE)
    prep = prepare_gguf(out.name, steps.template, tensors)
    job.save_item("export", "manifest", prep.manifest)
    write_prepared(out, steps.template, prep, overwrite=overwrite)
    job.complete_stage("export")
    return _result(job, out)


__all__ = ["GGUFResult", "GGUFSteps", "MANIFEST_SUFFIX", "PreparedGGUF", "manifest_path", "prepare_gguf",
           "raw_digest", "read_gguf_manifest", "run_gguf_job", "verify_gguf_manifest", "write_gguf_verified",
           "write_prepared"]
