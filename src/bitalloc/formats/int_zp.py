"""Asymmetric integer formats with an *integer* zero point: ``int{b}-g{G}-zp`` / ``int{b}-row-zp``.

The asymmetric ``int{b}-g{G}`` of :mod:`.int` stores a free fp16 minimum per group; GPTQ checkpoints, AutoGPTQ,
vLLM's kernels and compressed-tensors' ``pack-quantized`` asymmetric scheme store an integer zero point instead:
``w ≈ scale[r, g] * (q - zero[r, g])`` with ``q`` and ``zero`` in ``[0, 2^b - 1]``.  The zero point costs ``b``
bits per group instead of 16, and the format is exactly what that library (and the runtimes reading it) decode.

As a :class:`Grid`: ``levels = arange(0, 2^b)``, ``offset = -scale * zero`` (exact in float32: ``scale`` is an
fp16 value and ``zero`` an integer below 256), so ``Grid.values`` = ``scale * q - scale * zero`` =
``scale * (q - zero)`` exactly, the library's dequantisation.  The fit is :func:`search_affine`'s with the
stored-parameter rounding replaced by :func:`snap_zero` (fp16 scale, zero rounded to an integer in range), so
every candidate scale is compared as it will be stored.

Exact storage layout of a ``(rows, cols)`` tensor (this defines :meth:`IntZpFormat.nbytes`), ``ngroups`` and the
row padding as for :class:`~.int.IntFormat`:
* ``weight_packed``: the codes, one :func:`~bitalloc.formats.packing.pack_bits` stream of ``b`` bits each;
* ``weight_scale``: fp16 ``(rows, ngroups)``;
* ``weight_zero_point``: the zeros of the ``(rows, ngroups)`` tensor, row-major, one ``b``-bit stream:
  ``ceil(rows * ngroups * b / 8)`` bytes.
Example: ``(3, 200)`` int4-g128-zp = 384 + 12 + 3 = 399 bytes.

A group whose scale rounds to 0 stores zero 0 and decodes to 0 (a constant non-zero group gets its value as the
scale instead, one level from the zero point, see :func:`snap_zero`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .base import Format, FormatError, Grid, QTensor, Shape
from .fit import round_fp16
from .int import check_bits_group, check_codes_grid, fit_groups
from .packing import pack_bits, packed_nbytes, unpack_bits


def snap_zero(scale: torch.Tensor, offset: torch.Tensor, nlevels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(scale, offset)`` of a free ``(scale, offset)``: the scale rounded to fp16 (clamped to ±65504), the
    offset replaced by ``-scale * zero`` with ``zero`` the nearest integer to ``-offset / scale`` in
    ``[0, nlevels - 1]``.

    An integer zero point in range means the grid holds 0: a range ``[offset, offset + scale·(nlevels - 1)]`` that
    lies above or below 0 is first stretched to reach it (as GPTQ's quantizer does), or its values would be cut
    off.  A constant group (the scale rounds to 0 but the offset does not) gets its value as the scale, one step
    from the zero point, stored as exactly as fp16 allows."""
    top = float(nlevels - 1)
    zero_t = torch.zeros_like(offset)
    s16, o16 = round_fp16(scale, offset)
    flat = (s16 == 0) & (o16 != 0)
    hi = offset + scale * top
    stretch = (scale >= 0) & ((offset > 0) | (hi < 0)) & ~flat
    lo_x, hi_x = torch.minimum(offset, zero_t), torch.maximum(hi, zero_t)
    scale = torch.where(flat, o16.abs(), torch.where(stretch, (hi_x - lo_x) / top, scale))
    offset = torch.where(flat, torch.minimum(o16, zero_t), torch.where(stretch, lo_x, offset))
    s, o = round_fp16(scale, offset)
    live = s != 0
    zero = torch.where(live, torch.round(-o / torch.where(live, s, torch.ones_like(s))), zero_t)
    zero = zero.clamp(0.0, top)
    return s, -(s * zero) + 0.0  # + 0.0: no negative zeros


@dataclass(frozen=True)
class IntZpFormat(Format):
    """``bits``-bit unsigned codes with one fp16 scale and one ``bits``-bit integer zero point per ``group``
    columns (``group=None``: one group per row).  Always pass both fields."""

    bits: int = 4  # type: ignore[assignment]
    group: int | None = 128

    def __post_init__(self) -> None:
        check_bits_group(self.bits, self.group)

    @property
    def id(self) -> str:
        return f"int{self.bits}-{'row' if self.group is None else f'g{self.group}'}-zp"

    @property
    def levels(self) -> torch.Tensor:
        return torch.arange(0, 1 << self.bits, dtype=torch.float32)

    def check_shape(self, shape: Shape) -> None:
        self.check_2d(tuple(shape))

    def group_size(self, cols: int) -> int:
        return cols if self.group is None else self.group

    def ngroups(self, cols: int) -> int:
        return -(-cols // self.group_size(cols))

    def _layout(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        ng = self.ngroups(cols)
        return {"weight_packed": (torch.uint8, (packed_nbytes(rows * ng * self.group_size(cols), self.bits),)),
                "weight_scale": (torch.float16, (rows, ng)),
                "weight_zero_point": (torch.uint8, (packed_nbytes(rows * ng, self.bits),))}

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        rows, cols = (int(d) for d in shape)
        return sum(dt.itemsize * (int(torch.Size(s).numel())) for dt, s in self._layout(rows, cols).values())

    # --- grid ---------------------------------------------------------------------------------
    def _snap(self, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return snap_zero(scale, offset, 1 << self.bits)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, search: bool = True) -> Grid:
        """Grid of fp16 scales and integer zeros chosen by :func:`search_affine` (``search=False``: min-max),
        every candidate compared after :func:`snap_zero`."""
        self.check_shape(tuple(w.shape))
        return fit_groups(w, importance, self.id, self.group_size(int(w.shape[1])), self.levels, symmetric=False,
                          search=search, round_params=self._snap)

    def zeros_of(self, grid: Grid) -> torch.Tensor:
        """The integer zero point of every group of ``grid`` (int64), checked to be what this format stores."""
        s, o = grid.scale.to(torch.float32), grid.offset.to(torch.float32)
        if not torch.equal(s.to(torch.float16).to(torch.float32), s):
            raise FormatError(f"{self.id}: grid scales are not exactly fp16 values (use {self.id}.fit)")
        live = s != 0
        z = torch.where(live, -o / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s))
        zi = torch.round(z)
        if bool((live.logical_not() & (o != 0)).any()) or not torch.equal(zi, z) or bool(
                ((zi < 0) | (zi > (1 << self.bits) - 1)).any()) or not torch.equal(-(s * zi) + 0.0, o + 0.0):
            raise FormatError(f"{self.id}: grid offsets are not -scale * an integer zero point in "
                              f"[0, {(1 << self.bits) - 1}] (use {self.id}.fit)")
        return zi.to(torch.int64)

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        rows, cols = shape
        gs, ng = self.group_size(cols), self.ngroups(cols)
        codes, grid = check_codes_grid(self.id, codes, grid, shape, gs, self.levels)
        zeros = self.zeros_of(grid)
        full = torch.zeros(rows, ng * gs, dtype=torch.int64)
        full[:, :cols] = codes
        parts = {"weight_packed": pack_bits(full, self.bits),
                 "weight_scale": grid.scale.to(torch.float16).contiguous(),
                 "weight_zero_point": pack_bits(zeros.reshape(-1), self.bits)}
        return QTensor(format=self.id, shape=shape, dtype=dtype, parts=parts)

    learns_scales = True
    offset_follows_scale = True  # offset = -scale * zero: recovery keeps the zeros and learns the scales

    def with_scales(self, grid: Grid, scale: torch.Tensor, offset: torch.Tensor) -> Grid:
        """Learned scales and offsets as stored: fp16 scales, offsets snapped to ``-scale * integer zero``."""
        s, o = self._snap(scale.detach().to(torch.float32), offset.detach().to(torch.float32))
        return Grid(s, o, grid.levels, grid.group_size, grid.extra, grid.set_index, grid.exact_mask,
                    grid.exact_values)

    def _check_parts(self, q: QTensor) -> tuple[int, int]:
        from .int import get_id

        if get_id(q.format) != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        shape = tuple(int(d) for d in q.shape)
        self.check_shape(shape)
        self.check_parts(q, self._layout(*shape))
        return shape

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        rows, cols = self._check_parts(q)
        gs, ng = self.group_size(cols), self.ngroups(cols)
        codes = unpack_bits(q.parts["weight_packed"], self.bits, rows * ng * gs).reshape(rows, ng * gs)[:, :cols]
        scale = q.parts["weight_scale"].to(torch.float32)
        zero = unpack_bits(q.parts["weight_zero_point"], self.bits, rows * ng).reshape(rows, ng).to(scale.device)
        offset = -(scale * zero.to(torch.float32)) + 0.0
        return codes.to(torch.int64), Grid(scale, offset, self.levels.to(scale.device), gs)

    def decode(self, q: QTensor) -> torch.Tensor:
        codes, grid = self.unpack(q)
        return grid.values(codes)

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor: scales stack, the code and zero streams join on byte boundaries (every part
        but the last must end on one: multiples of 8 rows always do)."""
        rows, cols, dtype = self._check_concat(parts)
        ng, gs = self.ngroups(cols), self.group_size(cols)
        for p in parts[:-1]:
            r = int(p.shape[0])
            if r * ng * gs * self.bits % 8 or r * ng * self.bits % 8:
                raise FormatError(f"{self.id}: a part of {r} rows x {cols} columns does not end on a byte "
                                  f"boundary; split at multiples of 8 rows")
        for p in parts:
            self._check_parts(p)
        out = {name: torch.cat([p.parts[name] for p in parts]) for name in parts[0].parts}
        return QTensor(format=self.id, shape=(rows, cols), dtype=dtype, parts=out)


__all__ = ["IntZpFormat", "snap_zero"]
