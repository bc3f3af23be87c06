"""``recover_model``: the recovery stages a :class:`~.config.RecoverConfig` asks for, in order (block, then e2e)."""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from ..formats import QTensor
from ..placement import Placement
from ..timing import StageTimer, timed
from .config import RecoverConfig
from .train import RecoverHook, recover_blocks, recover_e2e

log = logging.getLogger(__name__)


def recover_model(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, qtensors: Mapping[str, QTensor],
                  cfg: RecoverConfig, *, placement: Placement | None = None, progress: bool = True,
                  on_block: RecoverHook | None = None,
                  start: tuple[int, torch.Tensor, torch.Tensor] | None = None,
                  timer: StageTimer | None = None) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """Recover ``student`` (its weights = ``qtensors``' values, as :func:`bitalloc.quantize.quantize_model` leaves
    them) toward ``teacher`` (the full-precision model) on the calibration ``windows``.

    Returns ``(qtensors, fixed values)``: every stored tensor (recovered where trained, as given elsewhere) and
    the trained float32 values of the fixed tensors that were trained.  ``student`` holds the stored values.
    ``on_block``/``start``: per-block checkpoints of the block stage (see :func:`.train.recover_blocks`)."""
    out = dict(qtensors)
    values: dict[str, torch.Tensor] = {}
    if not cfg.active:
        return out, values
    student.eval()
    teacher.eval()
    for p in (*student.parameters(), *teacher.parameters()):
        p.requires_grad_(False)
    if cfg.block:
        with timed(timer, "recover.block"):
            done, vals = recover_blocks(student, teacher, windows, out, cfg, placement=placement,
                                        progress=progress, on_block=on_block, start=start)
        out.update(done)
        values.update(vals)
    if cfg.e2e:
        with timed(timer, "recover.e2e"):
            done, vals = recover_e2e(student, teacher, windows, out, cfg, placement=placement, progress=progress)
        out.update(done)
        values.update(vals)
    for name, q in out.items():  # the contract of the stage: formats and bytes are those of the quantization
        if name in qtensors and (q.format != qtensors[name].format or q.nbytes() != qtensors[name].nbytes()):
            raise AssertionError(f"recovery changed {name}: {qtensors[name].format} -> {q.format}")
    return out, values


__all__ = ["recover_model"]
