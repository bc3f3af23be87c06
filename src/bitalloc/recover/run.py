"""``recover_model``: the recovery stages a :class:`~.config.RecoverConfig` asks for, in order (block, then e2e)."""
from __future__ import annotations

import logging
from typing import Callable, Mapping

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
                  timer: StageTimer | None = None, guard: int = 0
                  ) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """Recover ``student`` (its weights = ``qtensors``' values, as :func:`bitalloc.quantize.quantize_model` leaves
    them) toward ``teacher`` (the full-precision model) on the calibration ``windows``; the last ``guard`` of them
    are held out: never trained on, they are where each stage checks that it gained (:func:`training_windows`).

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
                                        progress=progress, on_block=on_block, start=start, guard=guard)
        out.update(done)
        values.update(vals)
    if cfg.e2e:
        with timed(timer, "recover.e2e"):
            done, vals = recover_e2e(student, teacher, windows, out, cfg, placement=placement, progress=progress,
                                     guard=guard)
        out.update(done)
        values.update(vals)
    for name, q in out.items():  # the contract of the stage: formats and bytes are those of the quantization
        if name in qtensors and (q.format != qtensors[name].format or q.nbytes() != qtensors[name].nbytes()):
            raise AssertionError(f"recovery changed {name}: {qtensors[name].format} -> {q.format}")
    return out, values


def training_windows(cfg: RecoverConfig, calibration: torch.Tensor, read: Callable[[int], torch.Tensor]
                     ) -> tuple[torch.Tensor, int]:
    """``(windows, guard)`` for :func:`recover_model`: the training windows (:meth:`RecoverConfig.train_windows`
    of the quantization's ``calibration``; its windows first), then ``cfg.guard_windows`` held-out windows read
    after them (:meth:`RecoverConfig.split` when the text runs short).  ``read(n)``: the first ``n`` windows of
    the calibration text (as many as it holds)."""
    q = int(calibration.shape[0])
    want = cfg.train_windows(q)
    need = want + cfg.guard_windows
    w = calibration[:need] if need <= q else read(need)
    train, guard = cfg.split(int(w.shape[0]), q)
    if train + guard < need:
        checks = f"checks its gains on {guard} held-out windows" if guard else "checks its gains on training windows"
        if cfg.guard_windows and not guard:
            checks += f" (holding {cfg.guard_windows} out needs {q + cfg.guard_windows})"
        (log.warning if cfg.windows is not None else log.info)(
            "the calibration text holds %d windows; recovery trains on %d (not %d) and %s", int(w.shape[0]), train,
            want, checks)
    return w[:train + guard], guard


__all__ = ["recover_model", "training_windows"]
