"""NF4 (bitsandbytes' NormalFloat4): 16 code-book values times one float32 absmax per block of 64 weights.

Id ``nf4``.  bitsandbytes flattens a tensor and cuts it into blocks of 64 consecutive elements; bitalloc
requires ``cols`` to be a multiple of 64 (FormatError otherwise), so a block never crosses a row and block
``r · cols/64 + j`` is columns ``64j .. 64j + 63`` of row ``r`` (a :class:`~.base.Grid` group).

Stored parts of a ``(rows, cols)`` tensor, exactly bitsandbytes' ``quantize_4bit(..., quant_type="nf4",
blocksize=64, compress_statistics=False)`` output (no double quantisation: 4.5 bpw):

* ``weight_packed`` uint8 ``(rows · cols / 2, 1)``: the 4-bit code of flat element ``2k`` in the HIGH nibble of
  byte ``k``, element ``2k + 1`` in the LOW nibble (bitsandbytes' order; the opposite of compressed-tensors');
* ``weight_scale`` float32 ``(rows · cols / 64,)``: bitsandbytes' ``absmax`` per block.

Value = ``NF4[code] · absmax`` in float32 (``dequantize_4bit``).  The code book :data:`NF4_VALUES` is sorted,
so the Grid level index is the stored code.  The stored "absmax" is the scale chosen by the importance-
weighted search (:func:`~.fp_common.search_scale`: the block's absmax, clipped ratios and least-squares
refits, never worse than the absmax), any non-negative float32; GPTQ's ``refine`` refits it under the Hessian.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .refit import refit_grid
from .base import REGISTRY, Format, FormatError, Grid, QTensor, Shape
from .fp_common import group_view, search_scale
from .gguf_common import check_weights, element_weights

#: bitsandbytes' NF4 code book (``get_4bit_type("nf4")``), ascending; index = stored code.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK = 64


def _f32(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.float32)


@dataclass(frozen=True)
class NF4Format(Format):
    """bitsandbytes NF4 with float32 absmax per 64 weights (no double quantisation)."""

    @property
    def id(self) -> str:
        return "nf4"

    @property
    def bits(self) -> float:  # type: ignore[override]
        return 4.0

    @property
    def levels(self) -> torch.Tensor:
        return torch.tensor(NF4_VALUES, dtype=torch.float32)

    def check_shape(self, shape: Shape) -> None:
        shape = tuple(shape)
        self.check_2d(shape)
        if int(shape[1]) % BLOCK:
            raise FormatError(f"{self.id}: row length {shape[1]} is not a multiple of the block size {BLOCK}")

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        n = int(shape[0]) * int(shape[1])
        return n // 2 + 4 * (n // BLOCK)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        w = check_weights(w, self.id)
        self.check_shape(tuple(w.shape))
        rows, cols = (int(d) for d in w.shape)
        x, wt = group_view(w, element_weights(importance, (rows, cols)), BLOCK)
        lv = self.levels.to(w.device)
        s = search_scale(x, wt, lv, _f32)
        nb = cols // BLOCK
        return Grid(s.reshape(rows, nb), torch.zeros(rows, nb, device=w.device), lv, BLOCK)

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        return self.refine_measured(w, codes, grid, hessian)[0]

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor]:
        return refit_grid(w, codes, grid, hessian, offset=False, rnd=_f32)

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        rows, cols = shape
        codes, grid = codes.cpu().to(torch.int64), grid.to("cpu")
        if tuple(codes.shape) != shape:
            raise FormatError(f"{self.id}: codes of shape {tuple(codes.shape)} do not match the tensor shape {shape}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
            raise FormatError(f"{self.id}: codes outside 0..15")
        if grid.group_size != BLOCK or tuple(grid.scale.shape) != (rows, cols // BLOCK):
            raise FormatError(f"{self.id}: grid (group {grid.group_size}, scale {tuple(grid.scale.shape)}) does not "
                              f"match shape {shape}")
        if not torch.equal(grid.levels.to(torch.float32), self.levels) or bool((grid.offset != 0).any()):
            raise FormatError(f"{self.id}: grid levels/offsets are not NF4's")
        if grid.scale.dtype != torch.float32 or not bool(torch.isfinite(grid.scale).all()):
            raise FormatError(f"{self.id}: grid scales must be finite float32 values")
        c = codes.reshape(-1, 2)
        packed = ((c[:, 0] << 4) | c[:, 1]).to(torch.uint8).unsqueeze(1)
        return QTensor(self.id, shape, dtype, {"weight_packed": packed, "weight_scale": grid.scale.reshape(-1).clone()})

    def _checked(self, q: QTensor) -> tuple[int, int]:
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        shape = tuple(int(d) for d in q.shape)
        self.check_shape(shape)
        n = shape[0] * shape[1]
        want = {"weight_packed": (torch.uint8, (n // 2, 1)), "weight_scale": (torch.float32, (n // BLOCK,))}
        self.check_parts(q, want)
        return shape

    def decode(self, q: QTensor) -> torch.Tensor:
        rows, cols = self._checked(q)
        b = q.parts["weight_packed"].reshape(-1).to(torch.int64)
        codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(rows, -1, BLOCK)
        lv = self.levels.to(b.device).take(codes)
        s = q.parts["weight_scale"].reshape(rows, -1, 1)
        return (s * lv).reshape(rows, cols)  # exactly Grid.values (offset 0) and bitsandbytes' dequantize_4bit

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """Codes (rows, cols) and the grid :meth:`fit` would build (the stored absmax, offset 0)."""
        rows, cols = self._checked(q)
        b = q.parts["weight_packed"].reshape(-1).to(torch.int64)
        codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(rows, cols)
        s = q.parts["weight_scale"].reshape(rows, cols // BLOCK).clone()
        return codes, Grid(s, torch.zeros_like(s), self.levels.to(s.device), BLOCK)

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor: blocks never cross rows, so both flat arrays simply join."""
        rows, cols, dtype = self._check_concat(parts)
        for p in parts:
            self._checked(p)
        out = {k: torch.cat([p.parts[k] for p in parts]) for k in ("weight_packed", "weight_scale")}
        return QTensor(self.id, (rows, cols), dtype, out)


def parse_nf4(format_id: str) -> Format | None:
    return NF4Format() if format_id.strip().lower() == "nf4" else None


REGISTRY.register("nf4", parse_nf4, examples=["nf4"])

__all__ = ["NF4Format", "NF4_VALUES", "BLOCK", "parse_nf4"]
