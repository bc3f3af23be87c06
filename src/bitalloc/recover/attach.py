"""Putting the trainable forms of :mod:`.params` into a model and taking them out again.

:class:`Attached` registers a :class:`~.params.QWeight` (or a :class:`~.params.Multiplier` for a fixed tensor) as
the parametrization of each chosen weight, so the model's own modules compute with the trained values (gradient
checkpointing recomputes them too); :meth:`Attached.finish` rounds everything to what the file stores, removes the
parametrizations and writes the *stored* values -- exactly what the file decodes to -- into the plain weights.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..formats import QTensor, get_format
from ..quantize import set_weight
from ..rounding import dequantize
from ..rounding.rtn import FP16_MAX
from .params import Multiplier, QWeight, trainable_qtensor

log = logging.getLogger(__name__)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class Attached:
    """Trainable forms of ``qtensors`` (those whose format unpacks) and of the fixed tensors ``fixed`` (name ->
    stored format id), registered in ``model``.  ``codes``/``scales`` choose what the QWeights train."""

    def __init__(self, model: nn.Module, qtensors: Mapping[str, QTensor], fixed: Mapping[str, str], *,
                 codes: bool, scales: bool) -> None:
        self.model = model
        self.q: dict[str, QWeight] = {}
        self.fixed: dict[str, tuple[Multiplier, str]] = {}
        self.skipped = sorted(n for n, q in qtensors.items() if not trainable_qtensor(q))
        try:
            for name, q in qtensors.items():
                if name in self.skipped:
                    continue
                qw = QWeight(q, codes=codes, scales=scales, device=model.get_parameter(name).device)
                if not qw.trainable:
                    continue
                mod, attr = _owner(model, name)
                parametrize.register_parametrization(mod, attr, qw, unsafe=True)
                self.q[name] = qw
            for name, fmt in fixed.items():
                mod, attr = _owner(model, name)
                m = Multiplier(model.get_parameter(name))
                parametrize.register_parametrization(mod, attr, m, unsafe=True)
                self.fixed[name] = (m, fmt)
        except BaseException:
            self._remove()
            raise
        if self.skipped:
            log.info("recovery leaves %d tensor(s) as stored (their formats do not unpack): %s",
                     len(self.skipped), ", ".join(self.skipped[:4]))

    def parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(codes, floats)``: the rounding latents and the scale/offset/norm multipliers (two learning rates)."""
        codes = [qw.u for qw in self.q.values() if qw.u.requires_grad]
        floats = [p for qw in self.q.values() for p in (qw.a, qw.b) if p.requires_grad]
        floats += [m.c for m, _ in self.fixed.values()]
        return codes, floats

    def clamp_(self) -> None:
        for qw in self.q.values():
            qw.clamp_()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {f"{n}/{k}": v.detach().clone() for n, qw in self.q.items() for k, v in qw.state_dict().items()} | \
               {f"{n}/c": m.c.detach().clone() for n, (m, _) in self.fixed.items()}

    def restore(self, saved: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, qw in self.q.items():
                for k, v in qw.state_dict().items():
                    v.copy_(saved[f"{n}/{k}"])
            for n, (m, _) in self.fixed.items():
                m.c.copy_(saved[f"{n}/c"])

    def _remove(self) -> None:
        for name in list(self.q) + list(self.fixed):
            mod, attr = _owner(self.model, name)
            if parametrize.is_parametrized(mod, attr):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)

    def finish(self) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
        """Round to storage, take the parametrizations out and put the stored values in the weights.

        Returns ``(qtensors, fixed values)``: the recovered QTensors (same formats, same bytes) of the trained
        quantized tensors and of the fixed tensors, and the fixed tensors' trained float32 values (a target that
        stores them at full precision, GGUF's F32 norms, writes these)."""
        out: dict[str, QTensor] = {}
        values: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            stored = {n: qw.stored() for n, qw in self.q.items()}
            trained = {n: m().detach().float().cpu() for n, (m, _) in self.fixed.items()}
        self._remove()
        for name, q in stored.items():
            set_weight(self.model, name, dequantize(q).reshape(self.model.get_parameter(name).shape))
            out[name] = q
        for name, v in trained.items():
            fmt = self.fixed[name][1]
            v = v.clamp(-FP16_MAX, FP16_MAX) if fmt == "fp16" else v
            q = get_format(fmt).store(v)
            set_weight(self.model, name, dequantize(q).reshape(self.model.get_parameter(name).shape))
            out[name], values[name] = q, v
        return out, values


__all__ = ["Attached"]
