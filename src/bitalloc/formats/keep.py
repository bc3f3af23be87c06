"""Pass-through ("keep") formats: ``fp16``, ``bf16``, ``fp32``.

The tensor is stored as-is in the target float type, one part named ``weight`` of the original shape
(any rank, 1-D norms included).  ``nbytes = numel * itemsize`` (2 for fp16/bf16, 4 for fp32).

Storing never silently produces an infinity: NaN/Inf inputs raise :class:`~bitalloc.errors.NumericsError`
and finite values the target type cannot represent (``|x| > 65504`` for fp16) raise :class:`FormatError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import NumericsError
from .base import REGISTRY, Format, FormatError, QTensor, Shape

_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class KeepFormat(Format):
    """Store the tensor unquantized in ``name`` (``fp16`` | ``bf16`` | ``fp32``)."""

    name: str = "fp16"
    is_grid = False

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise FormatError(f"unknown pass-through format {self.name!r}; use one of {', '.join(_DTYPES)}")

    @property
    def id(self) -> str:
        return self.name

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def bits(self) -> float:
        return float(8 * self.itemsize)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        return math.prod(int(d) for d in shape) * self.itemsize

    def store(self, w: torch.Tensor) -> QTensor:
        shape = tuple(int(d) for d in w.shape)
        self.check_shape(shape)
        w = w.detach()
        if not w.dtype.is_floating_point:
            raise FormatError(f"{self.id}: expected a floating-point tensor, got dtype {w.dtype}")
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NumericsError(f"{self.id}: tensor of shape {shape} holds {bad} NaN/Inf value(s)")
        limit = torch.finfo(self.torch_dtype).max
        amax = float(w.abs().max()) if w.numel() else 0.0
        if amax > limit:
            raise FormatError(
                f"{self.id}: value of magnitude {amax:.6g} exceeds the {self.id} range (max {limit:.6g}); "
                f"rescale the tensor or keep it in a wider format (fp32/bf16)"
            )
        stored = w.to(self.torch_dtype).contiguous().cpu()
        dtype = str(w.dtype).removeprefix("torch.")
        return QTensor(format=self.id, shape=shape, dtype=dtype, parts={"weight": stored})

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor (the stored values stacked along the first dim)."""
        rows, _cols, dtype = self._check_concat(parts)
        for p in parts:
            part = p.parts.get("weight")
            if part is None or part.dtype != self.torch_dtype or tuple(part.shape) != tuple(p.shape):
                raise FormatError(f"{self.id}: a part to concatenate is not a valid {self.id} tensor")
        shape = (rows, *tuple(int(d) for d in parts[0].shape[1:]))
        return QTensor(self.id, shape, dtype, {"weight": torch.cat([p.parts["weight"] for p in parts])})

    def decode(self, q: QTensor) -> torch.Tensor:
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        part = q.parts.get("weight")
        if part is None or part.dtype != self.torch_dtype or tuple(part.shape) != tuple(q.shape):
            got = None if part is None else (part.dtype, tuple(part.shape))
            raise FormatError(f"{self.id}: expected part 'weight' {self.torch_dtype} {tuple(q.shape)}, got {got}")
        return part.to(torch.float32)


def parse_keep(format_id: str) -> Format | None:
    """``fp16`` / ``bf16`` / ``fp32`` -> :class:`KeepFormat`; anything else -> None."""
    return KeepFormat(format_id) if format_id in _DTYPES else None


REGISTRY.register("keep", parse_keep, examples=list(_DTYPES))

__all__ = ["KeepFormat", "parse_keep"]
