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
from ..layout import shares_storage
from ..quantize import set_weight
from ..rounding import dequantize
from ..formats.fit import FP16_MAX
from .params import Multiplier, QWeight, trainable_qtensor

log = logging.getLogger(__name__)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _holders(model: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """Every ``(module, attribute)`` holding the parameter ``name``: the owner first, then the modules tied to it
    (a tied lm_head holds the embedding's parameter, or one sharing its storage: the tie :func:`layout_of` sees),
    so a parametrization covers every use of the tensor."""
    p = model.get_parameter(name)
    own = _owner(model, name)
    return [own] + [(m, a) for m in model.modules() for a, q in m._parameters.items()
                    if q is not None and (m, a) != own and shares_storage(q, p)]


class Attached:
    """Trainable forms of ``qtensors`` (those whose format unpacks) and of the fixed tensors ``fixed`` (name ->
    stored format id), registered in ``model`` (on every module holding the tensor: a tied lm_head computes
    with the trained embedding too).  ``codes``/``scales`` choose what the QWeights train."""

    def __init__(self, model: nn.Module, qtensors: Mapping[str, QTensor], fixed: Mapping[str, str], *,
                 codes: bool, scales: bool) -> None:
        self.model = model
        self.q: dict[str, QWeight] = {}
        self._at: dict[str, list[tuple[nn.Module, str]]] = {}
        self.fixed: dict[str, tuple[Multiplier, str]] = {}
        self.skipped = sorted(n for n, q in qtensors.items() if not trainable_qtensor(q))
        try:
            for name, q in qtensors.items():
                if name in self.skipped:
                    continue
                qw = QWeight(q, codes=codes, scales=scales, device=model.get_parameter(name).device)
                if not qw.trainable:
                    continue
                self._register(name, qw)
                self.q[name] = qw
            for name, fmt in fixed.items():
                m = Multiplier(model.get_parameter(name))
                self._register(name, m)
                self.fixed[name] = (m, fmt)
        except BaseException:
            self._remove()
            raise
        if self.skipped:
            log.info("recovery leaves %d tensor(s) as stored (their formats do not unpack): %s",
                     len(self.skipped), ", ".join(self.skipped[:4]))

    def _register(self, name: str, form: nn.Module) -> None:
        self._at[name] = []
        for mod, attr in _holders(self.model, name):
            parametrize.register_parametrization(mod, attr, form, unsafe=True)
            self._at[name].append((mod, attr))

    def parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(codes, floats)``: the rounding latents and the scale/offset/norm multipliers (two learning rates)."""
        codes = [qw.u for qw in self.q.values() if qw.u.requires_grad]
        floats = [p for qw in self.q.values() for p in (qw.a, qw.b) if p.requires_grad]
        floats += [m.c for m, _ in self.fixed.values()]
        return codes, floats

    def float_groups(self, reach: float) -> list[tuple[list[nn.Parameter], float]]:
        """The floats in groups with their rate factors: each tensor's scales at ``min(1, reach / QWeight.reach)``
        (a relative change of the scale moves the outermost level of q5_0, -16..15, five times as many steps as
        int2's, 0..3); the offsets (already in steps) and the norm multipliers at 1."""
        groups = [([qw.a], min(1.0, reach / qw.reach)) for qw in self.q.values() if qw.a.requires_grad]
        groups.append(([qw.b for qw in self.q.values() if qw.b.requires_grad] + [m.c for m, _ in self.fixed.values()],
                       1.0))
        return [(ps, r) for ps, r in groups if ps]

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
        """Take every parametrization out: each holder gets its original parameter back (ties kept)."""
        for held in self._at.values():
            for mod, attr in held:
                if parametrize.is_parametrized(mod, attr):
                    parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self._at.clear()

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
