"""Checkpoints inside a job directory (:class:`bitalloc.jobs.store.Job`), shared by the quantize, measure and GGUF jobs.

* Blocks of a sequential quantization: ``<stage>/block0003.safetensors`` (the QTensor parts of block 3, with
  formats, shapes and dtypes in the metadata), then ``<stage>/hidden.safetensors`` (the inputs of the next
  block, metadata ``"block"``), replaced after each block.  :func:`block_hook` writes them,
  :func:`load_state` reads them back as a :class:`bitalloc.quantize.ResumeState`.
* Blocks of a measurement (:class:`MeasureCheckpoints`): ``measure_blocks/fisher.safetensors`` once, then per
  block ``rows0003.json`` followed by the fp model's hidden states at the next block's input.

Each file is written atomically and in that order, so after ``kill -9`` the hidden-state file names the
first block whose checkpoint may be missing; the hidden states are saved bit-exactly, so a resumed run
computes exactly what an uninterrupted one would.  Every file is recorded with its SHA-256 in the job
(:meth:`bitalloc.jobs.store.Job.record`); the job discards a checkpoint that changed, and all written after it, when
it is opened, so a resumed stage only ever starts from verified files -- or from its first block, with a
warning, when the files it needs are not all there.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import InputError
from ..formats import QTensor
from ..io.safetensors import SafetensorsFile, write_safetensors_atomic
from .store import Job

log = logging.getLogger("bitalloc.resume")  # one logger for everything about resuming

QUANT_STAGE = "quantize"
MEASURE_STAGE = "measure_blocks"
#: the measurement's roundings of every tensor into every format, kept for the quantization (``--reuse-rounding``)
ROUNDED_STAGE = "rounded"
_AT = "@"  # between a tensor's name and a format id in a rounded block's keys
HIDDEN_FILE = "hidden.safetensors"


def _save_block(job: Job, b: int, qtensors: Mapping[str, QTensor], stage: str = QUANT_STAGE) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, q in sorted(qtensors.items()):
        meta[name] = {"format": q.format, "shape": list(q.shape), "dtype": q.dtype, "parts": sorted(q.parts)}
        for part, t in q.parts.items():
            tensors[f"{name}/{part}"] = t.detach().contiguous().cpu()
    path = job.stage_dir(stage) / f"block{b:04d}.safetensors"
    write_safetensors_atomic(path, tensors, {"qtensors": json.dumps(meta, sort_keys=True)},
                             overwrite=True, manifest=False)
    job.record(path)


def _load_block(path: Path, wanted: Callable[[str], bool] | None = None) -> dict[str, QTensor]:
    """The QTensors :func:`_save_block` wrote (``wanted``: only those whose key it accepts are read)."""
    with SafetensorsFile(path) as sf:
        try:
            meta = json.loads(sf.metadata()["qtensors"])
            return {
                name: QTensor(format=m["format"], shape=tuple(m["shape"]), dtype=m["dtype"],
                              parts={part: sf.get(f"{name}/{part}").clone() for part in m["parts"]})
                for name, m in meta.items() if wanted is None or wanted(name)
            }
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"checkpoint {path} is corrupt ({e}); remove the job directory to start over") from e


def _save_states(job: Job, block: int, states: Mapping[str, torch.Tensor], stage: str) -> None:
    """The inputs of ``block`` (named states, saved bit-exactly); written after the checkpoint of the block before
    it."""
    path = job.stage_dir(stage) / HIDDEN_FILE
    write_safetensors_atomic(path, {k: v.detach().contiguous() for k, v in states.items()},
                             {"block": str(block)}, overwrite=True, manifest=False)
    job.record(path)


def _load_states(job: Job, stage: str, names: Sequence[str]) -> tuple[int, dict[str, torch.Tensor]] | None:
    """``(block, states)`` saved by :func:`_save_states` (None when nothing is recorded)."""
    path = job.dir / stage / HIDDEN_FILE
    if not job.recorded(path):
        return None
    with SafetensorsFile(path) as sf:
        try:
            block = int(sf.metadata()["block"])
            if block < 1:
                raise ValueError(f"block {block} is not a resume point")
            return block, {k: sf.get(k).clone() for k in names}
        except (KeyError, ValueError) as e:
            raise InputError(f"checkpoint {path} is corrupt ({e}); remove the job directory to start over") from e


def _save_hidden(job: Job, block: int, hidden: torch.Tensor, stage: str = QUANT_STAGE) -> None:
    _save_states(job, block, {"hidden": hidden}, stage)


def _load_hidden(job: Job, stage: str) -> tuple[int, torch.Tensor] | None:
    saved = _load_states(job, stage, ("hidden",))
    return None if saved is None else (saved[0], saved[1]["hidden"])


def _restart(job: Job, stage: str, what: str) -> None:
    """The checkpoint of ``what`` is not recorded although later ones are: start ``stage`` over."""
    log.warning("job %s lacks the checkpoint of %s; discarding stage %s and recomputing it", job.dir, what, stage)
    job.discard(stage)


def load_state(job: Job, stage: str = QUANT_STAGE) -> Any:
    """The :class:`~bitalloc.quantize.ResumeState` saved in ``job`` (None when no block is done)."""
    from ..quantize import ResumeState

    saved = _load_hidden(job, stage)
    if saved is None:
        return None
    block, hidden = saved
    qtensors: dict[str, QTensor] = {}
    for b in range(block):
        p = job.dir / stage / f"block{b:04d}.safetensors"
        if not job.recorded(p):
            _restart(job, stage, f"block {b}")
            return None
        qtensors.update(_load_block(p))
    log.info("resuming quantization at block %d", block)
    return ResumeState(block, qtensors, hidden)


BlockHook = Callable[[int, dict[str, QTensor], torch.Tensor], None]


def block_hook(job: Job, stage: str = QUANT_STAGE) -> BlockHook:
    """``on_block`` for :func:`bitalloc.quantize.quantize_model`: checkpoint block ``b``, then its output."""

    def on_block(b: int, qt: dict[str, QTensor], hidden: torch.Tensor) -> None:
        _save_block(job, b, qt, stage)
        _save_hidden(job, b + 1, hidden, stage)

    return on_block


# ------------------------------------------------------------------------------------ measurement
def rows_to_json(rows: Sequence[Any]) -> list[list[Any]]:
    """Measurement rows as JSON data (floats round-trip exactly)."""
    return [[r.tensor, r.format, r.bytes, r.output_error, r.fisher_error] for r in rows]


def rows_from_json(job: Job, key: str, data: Any) -> list[Any]:
    """The rows :func:`rows_to_json` saved as checkpoint ``key`` (InputError naming it when corrupt)."""
    from ..measure import MeasureRow

    try:
        return [MeasureRow(str(t), str(f), int(n), float(o), None if fi is None else float(fi))
                for t, f, n, o, fi in data]
    except (TypeError, ValueError) as e:
        raise InputError(f"job {job.dir}: checkpoint {key} is corrupt ({e}); remove the job directory") from e


class MeasureCheckpoints:
    """Checkpoints of :func:`bitalloc.pipeline.measure_model` in ``job``: the Fisher statistics once, then
    each block's rows followed by the fp hidden states at the next block's input."""

    #: the job stage the checkpoints live in (:class:`bitalloc.jobs.nest.NestCheckpoints` has its own)
    stage = MEASURE_STAGE

    def __init__(self, job: Job) -> None:
        self.job = job

    def fisher_stats(self) -> dict[tuple[str, str], torch.Tensor] | None:
        if not self.job.has_item(self.stage, "fisher"):
            return None
        saved = self.job.load_item(self.stage, "fisher")
        if not isinstance(saved, dict) or not all(":" in k for k in saved):
            raise InputError(f"job {self.job.dir}: the Fisher checkpoint is corrupt; remove the job directory")
        return {(k.split(":", 1)[1], k.split(":", 1)[0]): v for k, v in saved.items()}

    def save_fisher(self, stats: Mapping[tuple[str, str], torch.Tensor]) -> None:
        self.job.save_item(self.stage, "fisher", {f"{role}:{name}": t for (name, role), t in stats.items()})

    def start(self) -> Any:
        """The :class:`~bitalloc.pipeline.MeasureStart` saved (None when no block is done)."""
        from ..pipeline import MeasureStart

        saved = _load_hidden(self.job, self.stage)
        if saved is None:
            return None
        block, hidden = saved
        rows: list[Any] = []
        for b in range(block):
            key = f"rows{b:04d}"
            if not self.job.has_item(self.stage, key):
                _restart(self.job, self.stage, f"the measurement of block {b}")
                return None
            rows += rows_from_json(self.job, key, self.job.load_item(self.stage, key))
        log.info("resuming measurement at block %d", block)
        return MeasureStart(block, hidden, tuple(rows))

    def on_block(self, b: int, rows: Sequence[Any], hidden: torch.Tensor) -> None:
        self.job.save_item(self.stage, f"rows{b:04d}", rows_to_json(rows))
        _save_hidden(self.job, b + 1, hidden, self.stage)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`bitalloc.pipeline.measure_model` that resume and checkpoint it."""
        start = self.start()  # first: it may discard the stage's checkpoints
        return {"fisher_stats": self.fisher_stats(), "on_fisher": self.save_fisher, "start": start,
                "on_block": self.on_block}


def save_rounded(job: Job, b: int, rounded: Mapping[tuple[str, str], QTensor]) -> None:
    """``on_rounded`` of :func:`bitalloc.pipeline.measure_model`: block ``b``'s roundings, one file
    (``rounded/block0003.safetensors``), written before the block's measurement checkpoint."""
    _save_block(job, b, {f"{name}{_AT}{fmt}": q for (name, fmt), q in rounded.items()}, ROUNDED_STAGE)


def load_rounded(job: Job, assignments: Mapping[str, str]) -> dict[str, QTensor]:
    """The QTensors of ``assignments`` (``{tensor: format id}``) among the roundings :func:`save_rounded` kept, block
    file by block file, reading only those.  A tensor with no kept rounding in its format is
    absent (:func:`bitalloc.quantize.assemble_rounded` names it)."""
    def planned(key: str) -> bool:
        name, _, fmt = key.rpartition(_AT)
        return assignments.get(name) == fmt

    out: dict[str, QTensor] = {}
    for p in sorted((job.dir / ROUNDED_STAGE).glob("block*.safetensors")):
        if not job.recorded(p):  # not one the measurement finished writing (verified when the job was opened)
            continue
        out.update((key.rpartition(_AT)[0], q) for key, q in _load_block(p, planned).items())
    return out



# --------------------------------------------------------------------------------------------- recovery
RECOVER_STAGE = "recover_blocks"
_VALUE = "value:"  # prefix of a fixed tensor's trained float32 value among a block's saved tensors


def save_recovered(job: Job, block: int, qtensors: Mapping[str, QTensor], values: Mapping[str, torch.Tensor],
                   stage: str) -> None:
    """QTensors and trained fixed values in one checkpoint file ``<stage>/block<block>.safetensors``."""
    from ..formats import get_format

    both = dict(qtensors) | {_VALUE + n: get_format("fp32").store(v) for n, v in values.items()}
    _save_block(job, block, both, stage)


def load_recovered(path: Path) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """What :func:`save_recovered` wrote: ``(qtensors, values)``."""
    from ..rounding import dequantize

    both = _load_block(path)
    values = {n[len(_VALUE):]: dequantize(q) for n, q in both.items() if n.startswith(_VALUE)}
    return {n: q for n, q in both.items() if not n.startswith(_VALUE)}, values


class RecoverCheckpoints:
    """Per-block checkpoints of the block-wise recovery (:func:`bitalloc.recover.train.recover_blocks`): the
    recovered QTensors and trained fixed values of block ``b``, then both models' states at block ``b + 1``."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def on_block(self, b: int, qt: dict[str, QTensor], vals: dict[str, torch.Tensor], hs: torch.Tensor,
                 ht: torch.Tensor) -> None:
        save_recovered(self.job, b, qt, vals, RECOVER_STAGE)
        _save_states(self.job, b + 1, {"student": hs, "teacher": ht}, RECOVER_STAGE)

    def start(self) -> tuple[tuple[int, torch.Tensor, torch.Tensor], dict[str, QTensor], dict[str, torch.Tensor]] | None:
        """``((block, student states, teacher states), qtensors, values)`` of the recovered blocks (None: none)."""
        saved = _load_states(self.job, RECOVER_STAGE, ("student", "teacher"))
        if saved is None:
            return None
        block, states = saved
        hs, ht = states["student"], states["teacher"]
        qtensors: dict[str, QTensor] = {}
        values: dict[str, torch.Tensor] = {}
        for b in range(block):
            p = self.job.dir / RECOVER_STAGE / f"block{b:04d}.safetensors"
            if not self.job.recorded(p):
                _restart(self.job, RECOVER_STAGE, f"recovered block {b}")
                return None
            q, v = load_recovered(p)
            qtensors.update(q)
            values.update(v)
        log.info("resuming recovery at block %d", block)
        return (block, hs, ht), qtensors, values


__all__ = ["HIDDEN_FILE", "MEASURE_STAGE", "MeasureCheckpoints", "QUANT_STAGE", "RECOVER_STAGE",
           "RecoverCheckpoints", "block_hook", "load_recovered", "load_state", "rows_from_json", "rows_to_json",
           "save_recovered"]
