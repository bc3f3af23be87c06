"""``bitalloc nest`` as a resumable job: the Fisher pass once, then every block's nested tensors, rows and entries
checkpointed as soon as the block is done, then the artifact written from them.

Layout of the job directory (beside ``job.json`` and ``job.lock``, :mod:`bitalloc.jobs.store`)::

    nest_blocks/fisher.safetensors      Fisher statistics (the gradient pass), once
    nest_blocks/block0003.safetensors   the stored parts of block 3's tensors (bit-planes, steps, lows, ...)
    nest_blocks/rows0003.json           their measurement rows and ``nest.json`` entries
    nest_blocks/hidden.safetensors      inputs of block k of the fp model (metadata "block": k)
    export/expected.json                the digest of the artifact's manifest, saved before it is renamed into place

After ``kill -9`` at any moment the same command continues from the last finished block and writes a
byte-identical artifact (every shard holds the same tensors whether nested now or read back); a changed model,
text or option is refused with a line naming what differs.  A kill after the rename leaves the finished
artifact, which the rerun recognises by its manifest instead of refusing it as an existing output.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, output_exists
from ..io.atomic import file_digest
from ..targets.base import remove_temps_beside
from .checkpoints import MeasureCheckpoints, _load_hidden, _restart, _save_hidden, rows_from_json, rows_to_json
from .config import model_digests, text_digest
from .store import Job, run_job

log = logging.getLogger("bitalloc.resume")

NEST_STAGE = "nest_blocks"
FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class NestConfig:
    """Everything one ``bitalloc nest`` run depends on (the CLI builds it; ``model`` None: the default model)."""

    model: Path | None
    out: Path
    calib_texts: tuple[Path, ...]
    windows: int
    ctx: int
    fisher: bool
    fisher_windows: int
    group: int
    max_bits: int
    outliers: int
    passes: int
    refit: int
    job_dir: Path
    keep_job: bool = False
    overwrite: bool = False
    progress: bool = True
    device: str = "cpu"

    @property
    def source(self) -> Path:
        from ..models.sources import default_model_path

        return Path(self.model) if self.model else default_model_path()

    def fingerprint(self) -> dict[str, Any]:
        """Model and text digests and every option the artifact's bytes depend on (not the device: a CPU and a
        CUDA run of one job would mix their blocks' float rounding, so it counts too)."""
        from ..data import expand_paths

        options = {"windows": self.windows, "ctx": self.ctx, "fisher": self.fisher,
                   "fisher_windows": self.fisher_windows if self.fisher else None, "group": self.group,
                   "max_bits": self.max_bits, "outliers": self.outliers, "descent_passes": self.passes,
                   "refit_depths": self.refit, "device": self.device}
        return {"version": FINGERPRINT_VERSION, "command": "nest", "model": model_digests(self.source),
                "calibration": text_digest(expand_paths(list(self.calib_texts))), "options": options}


class NestCheckpoints(MeasureCheckpoints):
    """Checkpoints of :func:`bitalloc.nest.build.nest_model` in ``job``: the Fisher statistics once (as the
    measurement's), then per block its stored tensors, its rows and entries, and the next block's inputs."""

    stage = NEST_STAGE

    def load_block(self, b: int) -> Any:
        """Block ``b``'s :class:`~bitalloc.nest.build.NestBlock` as saved."""
        from ..nest.build import NestBlock

        stored = self.job.load_item(self.stage, f"block{b:04d}")
        saved = self.job.load_item(self.stage, f"rows{b:04d}")
        if not isinstance(stored, dict) or not isinstance(saved, dict) or not isinstance(saved.get("entries"), dict):
            raise InputError(f"job {self.job.dir}: the checkpoint of nested block {b} is corrupt; remove the job "
                             "directory")
        return NestBlock(stored, tuple(rows_from_json(self.job, f"rows{b:04d}", saved.get("rows"))), saved["entries"])

    def start(self) -> Any:
        """The :class:`~bitalloc.nest.build.NestStart` saved (None when no block is done)."""
        from ..nest.build import NestStart

        saved = _load_hidden(self.job, self.stage)
        if saved is None:
            return None
        block, hidden = saved
        for b in range(block):
            if not (self.job.has_item(self.stage, f"block{b:04d}") and self.job.has_item(self.stage, f"rows{b:04d}")):
                _restart(self.job, self.stage, f"nested block {b}")
                return None
        log.info("resuming the nest at block %d", block)
        return NestStart(block, hidden, self.load_block)

    def on_block(self, b: int, nested: Any, hidden: torch.Tensor) -> None:  # type: ignore[override]
        self.job.save_item(self.stage, f"block{b:04d}", nested.stored)
        self.job.save_item(self.stage, f"rows{b:04d}", {"rows": rows_to_json(nested.rows), "entries": nested.entries})
        _save_hidden(self.job, b + 1, hidden, self.stage)


def run_nest(config: NestConfig) -> dict[str, Any]:
    """Run (or continue) the nest of ``config``; returns the artifact's ``nest.json``."""
    out = config.out
    refusal = output_exists(out) if (out.exists() or out.is_symlink()) and not config.overwrite else None
    return run_job(config.job_dir, config.fingerprint(), lambda job: _nest(job, config), keep_job=config.keep_job,
                   refusal=refusal, reuse=lambda job: _finished(job, out))


def _nest(job: Job, config: NestConfig) -> dict[str, Any]:
    from ..data import text_windows
    from ..models.sources import load_model
    from ..models.view import ModelView
    from ..nest.artifact import MANIFEST_FILE
    from ..nest.build import nest_model
    from ..placement import Placement

    remove_temps_beside(config.out)
    source = config.source
    template = None
    if source.suffix.lower() == ".gguf":  # kept, so the artifact can extract GGUFs with the source's metadata
        from ..export.gguf import read_template

        template = read_template(source)
    model, tok = load_model(source, low_memory=True)  # weights memory-mapped, resident one block at a time
    if tok is None:
        raise InputError("the model has no tokenizer, so text cannot be tokenized")
    calib = text_windows(tok, list(config.calib_texts), config.ctx, config.windows)
    checkpoints = NestCheckpoints(job)

    def publish(tmp: Path) -> None:
        job.save_item("export", "expected", {"manifest": file_digest(tmp / MANIFEST_FILE)})

    return nest_model(model, ModelView(model), calib, config.out, group=config.group, max_bits=config.max_bits,
                      outliers=config.outliers, fisher=config.fisher,
                      fisher_windows=calib[: config.fisher_windows] if config.fisher else None, tokenizer=tok,
                      template=template, progress=config.progress, passes=config.passes, refit=config.refit,
                      placement=Placement.for_device(config.device, model=model), overwrite=config.overwrite,
                      inputs=[source], before_publish=publish, **checkpoints.kwargs())


def _finished(job: Job, out: Path) -> dict[str, Any] | None:
    """``nest.json`` of ``out`` when it is this job's finished artifact (a kill came after the rename)."""
    from ..nest.artifact import MANIFEST_FILE, META_FILE, Artifact

    if not job.has_item("export", "expected"):
        return None
    expected = job.load_item("export", "expected")
    man = out / MANIFEST_FILE
    if not (isinstance(expected, dict) and man.is_file() and file_digest(man) == expected.get("manifest")):
        return None
    try:
        with Artifact(out, verify=True):  # structure, small files and table against the manifest
            pass
    except (InputError, OSError):  # changed since: not this job's output, refused as an existing one
        return None
    log.info("%s was already written by this job", out)
    return json.loads((out / META_FILE).read_text())


__all__ = ["NEST_STAGE", "NestCheckpoints", "NestConfig", "run_nest"]
