"""Integer formats ``int{b}-g{G}`` / ``int{b}-row`` with fp16 scales (and fp16 zero-points when asymmetric).

Ids: ``int4-g128`` (asymmetric, the default), ``int4-g128-sym``, ``int3-row``, ``int3-row-sym``
(``int4-g128-zp``: an integer zero point instead of the fp16 one, :mod:`.int_zp`); an explicit
``-asym`` suffix is accepted on input (``int4-g128-asym`` -> ``int4-g128``).  Widths ``b`` in
{2, 3, 4, 5, 6, 8}; groups ``G`` in {32, 64, 128} consecutive input columns, or ``row`` (one group per row).

Values:
* asymmetric: ``w ≈ scale[r, g] * q + zero[r, g]`` with ``q`` in ``[0, 2^b - 1]``;
* symmetric:  ``w ≈ scale[r, g] * q`` with ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, stored as ``q + 2^(b-1)``
  (the scale may be negative, so the largest-magnitude weight can use the longer side ``-2^(b-1)``).

As a :class:`Grid`: ``levels = arange(0, 2^b)`` (asym) or ``arange(-2^(b-1), 2^(b-1))`` (sym), the stored
code is the index into ``levels``, ``offset`` = zero (asym) or 0, ``group_size = G`` (``cols`` for ``row``).

Exact storage layout of a ``(rows, cols)`` tensor (this defines :meth:`IntFormat.nbytes`):
* ``ngroups = ceil(cols / G)`` (1 for ``row``); each row is padded with zero codes to ``ngroups * G``
  columns (``row``: no padding);
* ``weight_packed``: the codes of the whole ``(rows, ngroups * G)`` tensor in row-major order as one
  :func:`~bitalloc.formats.packing.pack_bits` stream: ``ceil(rows * ngroups * G * b / 8)`` uint8 bytes;
* ``weight_scale``: fp16 ``(rows, ngroups)``: ``2 * rows * ngroups`` bytes;
* ``weight_zero`` (asymmetric only): fp16 ``(rows, ngroups)``: ``2 * rows * ngroups`` bytes.
Example: ``(3, 200)`` int4-g128 = 384 + 12 + 12 = 408 bytes.

Scales and zeros are fp16 values clamped to ±65504: a group whose range exceeds what an fp16 scale can
span clips its extremes rather than storing inf (see :func:`bitalloc.formats.fit.round_fp16`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import NumericsError
from .base import DECODE_CHUNK_ELEMS, REGISTRY, Format, FormatError, Grid, QTensor, Shape
from .fit import all_finite, finite_non_negative, minmax_affine, round_fp16, search_affine
from .packing import pack_bits, packed_nbytes, unpack_bits

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128, None)
_ID = re.compile(r"int(\d+)-(?:g(\d+)|(row))(?:-(sym|asym|zp))?")


@dataclass(frozen=True)
class IntFormat(Format):
    """``bits``-bit integer codes, one fp16 scale (+ fp16 zero if not ``symmetric``) per ``group`` columns.

    ``group=None`` means one group per row.  Defaults exist only so the ``bits`` field can shadow the base
    class property; always pass all three.
    """

    bits: int = 4  # type: ignore[assignment]
    group: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_bits_group(self.bits, self.group)
        if not isinstance(self.symmetric, bool):
            raise FormatError(f"symmetric must be a bool, got {self.symmetric!r}")

    # --- identity -----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        g = "row" if self.group is None else f"g{self.group}"
        return f"int{self.bits}-{g}" + ("-sym" if self.symmetric else "")

    @property
    def levels(self) -> torch.Tensor:
        n = 1 << self.bits
        lo = -(n // 2) if self.symmetric else 0
        return torch.arange(lo, lo + n, dtype=torch.float32)

    # --- geometry -----------------------------------------------------------------------------
    def check_shape(self, shape: Shape) -> None:
        shape = tuple(shape)
        self.check_2d(shape)

    def group_size(self, cols: int) -> int:
        return cols if self.group is None else self.group

    def ngroups(self, cols: int) -> int:
        return -(-cols // self.group_size(cols))

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        rows, cols = (int(d) for d in shape)
        ng = self.ngroups(cols)
        padded = ng * self.group_size(cols)
        params = rows * ng * 2 * (1 if self.symmetric else 2)
        return packed_nbytes(rows * padded, self.bits) + params

    # --- grid ---------------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, search: bool = True) -> Grid:
        """Grid with fp16 scales/zeros chosen by :func:`search_affine` (``search=False``: min-max)."""
        self.check_shape(tuple(w.shape))
        grid = fit_groups(w, importance, self.id, self.group_size(int(w.shape[1])), self.levels,
                          symmetric=self.symmetric, search=search, round_params=round_fp16)
        if self.symmetric:
            grid.offset.zero_()
        return grid

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        """Packed codes and fp16 scales/zeros, built on the CPU (codes and grid are moved there first)."""
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        rows, cols = shape
        gs, ng = self.group_size(cols), self.ngroups(cols)
        codes, grid = check_codes_grid(self.id, codes, grid, shape, gs, self.levels)
        scale16 = grid.scale.to(torch.float16)
        zero16 = grid.offset.to(torch.float16)
        exact = torch.equal(scale16.to(torch.float32), grid.scale) and torch.equal(zero16.to(torch.float32), grid.offset)
        if not exact:
            raise FormatError(f"{self.id}: grid scale/offset are not exactly fp16 values (use {self.id}.fit)")
        if self.symmetric and bool((grid.offset != 0).any()):
            raise FormatError(f"{self.id}: a symmetric grid must have zero offset")
        full = torch.zeros(rows, ng * gs, dtype=torch.int64)
        full[:, :cols] = codes
        parts = {"weight_packed": pack_bits(full, self.bits), "weight_scale": scale16.contiguous()}
        if not self.symmetric:
            parts["weight_zero"] = zero16.contiguous()
        return QTensor(format=self.id, shape=shape, dtype=dtype, parts=parts)

    learns_scales = True

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        rows, cols = self._check_parts(q)
        gs, ng = self.group_size(cols), self.ngroups(cols)
        codes = unpack_bits(q.parts["weight_packed"], self.bits, rows * ng * gs).reshape(rows, ng * gs)[:, :cols]
        scale = q.parts["weight_scale"].to(torch.float32)
        zero = torch.zeros_like(scale) if self.symmetric else q.parts["weight_zero"].to(torch.float32)
        return codes.to(torch.int64), Grid(scale, zero, self.levels.to(scale.device), gs)

    def with_scales(self, grid: Grid, scale: torch.Tensor, offset: torch.Tensor) -> Grid:
        """fp16 scales (and zeros when asymmetric; a symmetric grid keeps its zero offset), clamped to ±65504."""
        s, o = round_fp16(scale.detach().to(torch.float32), offset.detach().to(torch.float32))
        if self.symmetric:
            o = torch.zeros_like(s)
        return Grid(s, o, grid.levels, grid.group_size, grid.extra, grid.set_index, grid.exact_mask,
                    grid.exact_values)

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor: scales/zeros stack, the packed bitstreams join on byte boundaries.

        A row holds ``ngroups * G * bits`` bits: whole bytes for ``g32``-``g128``; for ``row`` groups every
        part but the last must hold a multiple of 8 rows (else FormatError)."""
        rows, cols, dtype = self._check_concat(parts)
        ng, gs = self.ngroups(cols), self.group_size(cols)
        for p in parts[:-1]:
            if int(p.shape[0]) * ng * gs * self.bits % 8:
                raise FormatError(f"{self.id}: a part of {int(p.shape[0])} rows x {cols} columns does not end on a "
                                  f"byte boundary; split at multiples of 8 rows")
        for p in parts:
            r = int(p.shape[0])
            want = {"weight_packed": (torch.uint8, (packed_nbytes(r * ng * gs, self.bits),)),
                    "weight_scale": (torch.float16, (r, ng))}
            if not self.symmetric:
                want["weight_zero"] = (torch.float16, (r, ng))
            if {k: (t.dtype, tuple(t.shape)) for k, t in p.parts.items()} != want:
                raise FormatError(f"{self.id}: a part of shape {tuple(p.shape)} does not hold this format's parts")
        out = {name: torch.cat([p.parts[name] for p in parts]) for name in parts[0].parts}
        return QTensor(format=self.id, shape=(rows, cols), dtype=dtype, parts=out)

    def _check_parts(self, q: QTensor) -> tuple[int, int]:
        """``(rows, cols)`` of ``q`` after checking that it holds exactly this format's parts."""
        if get_id(q.format) != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        shape = tuple(int(d) for d in q.shape)
        self.check_shape(shape)
        rows, cols = shape
        gs, ng = self.group_size(cols), self.ngroups(cols)
        expect = {"weight_packed": (torch.uint8, (packed_nbytes(rows * ng * gs, self.bits),)),
                  "weight_scale": (torch.float16, (rows, ng))}
        if not self.symmetric:
            expect["weight_zero"] = (torch.float16, (rows, ng))
        if set(q.parts) != set(expect):
            raise FormatError(f"{self.id}: expected parts {sorted(expect)}, got {sorted(q.parts)}")
        for name, (dt, shp) in expect.items():
            t = q.parts[name]
            if t.dtype != dt or tuple(t.shape) != shp:
                raise FormatError(f"{self.id}: part {name} should be {dt} {shp}, got {t.dtype} {tuple(t.shape)}")
        return rows, cols

    def decode(self, q: QTensor, max_elems: int = DECODE_CHUNK_ELEMS) -> torch.Tensor:
        """float32 values, computed a block of rows (at most ``max_elems`` codes, whole bytes of the stream) at a
        time into the result: the unpacked int64 codes and the expanded scales and zeros of one block are the
        only temporaries, not four full-size ones (the same values: each element's arithmetic is unchanged)."""
        rows, cols = self._check_parts(q)
        gs, ng = self.group_size(cols), self.ngroups(cols)
        packed = q.parts["weight_packed"]
        scale = q.parts["weight_scale"].to(torch.float32)
        zero = None if self.symmetric else q.parts["weight_zero"].to(torch.float32)
        levels = self.levels.to(scale.device)
        g = torch.div(torch.arange(cols, device=scale.device), gs, rounding_mode="floor")
        out = torch.empty(rows, cols, dtype=torch.float32, device=scale.device)
        row_bits = ng * gs * self.bits
        step = 8 // math.gcd(row_bits, 8)  # rows per whole byte of the stream
        per = max(step, max_elems // max(ng * gs, 1) // step * step)
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            part = packed[r0 * row_bits // 8:packed_nbytes(r1 * ng * gs, self.bits)]
            codes = unpack_bits(part, self.bits, (r1 - r0) * ng * gs).reshape(r1 - r0, ng * gs)[:, :cols]
            vals = scale[r0:r1, g] * levels[codes]
            vals += zero[r0:r1, g] if zero is not None else 0.0  # exactly Grid.values (its +0 offset included)
            out[r0:r1] = vals
        return out


def check_bits_group(bits: object, group: object) -> None:
    """FormatError (one line) unless ``bits`` is one of :data:`BITS` and ``group`` one of :data:`GROUPS`."""
    if bits not in BITS or isinstance(bits, bool):
        raise FormatError(f"integer formats support bits in {BITS}, got {bits!r}")
    if group not in GROUPS or isinstance(group, bool):
        raise FormatError(f"integer formats support groups of 32, 64, 128 or one per row, got {group!r}")


def check_codes_grid(fid: str, codes: torch.Tensor, grid: Grid, shape: tuple[int, int], gs: int,
                     levels: torch.Tensor) -> tuple[torch.Tensor, Grid]:
    """``(codes, grid)`` in CPU memory after checking they describe a ``shape`` tensor in groups of ``gs`` columns on
    the plain codebook ``levels`` (FormatError, one line, otherwise)."""
    rows, cols = shape
    ng = -(-cols // gs)
    codes, grid = codes.cpu(), grid.to("cpu")
    if tuple(codes.shape) != shape:
        raise FormatError(f"{fid}: codes of shape {tuple(codes.shape)} do not match the tensor shape {shape}")
    if grid.group_size != gs or tuple(grid.scale.shape) != (rows, ng) or tuple(grid.offset.shape) != (rows, ng):
        raise FormatError(f"{fid}: grid (group {grid.group_size}, scale {tuple(grid.scale.shape)}) does not "
                          f"match shape {shape} (group {gs}, {ng} groups per row)")
    if not grid.plain or not torch.equal(grid.levels.to(torch.float32), levels):
        raise FormatError(f"{fid}: grid levels are not this format's codebook")
    return codes, grid


def fit_groups(w: torch.Tensor, importance: torch.Tensor | None, fid: str, gs: int, levels: torch.Tensor, *,
               symmetric: bool, search: bool,
               round_params: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Grid:
    """The affine grid of groups of ``gs`` columns of ``w`` on consecutive ``levels``: per group the scale and offset
    of :func:`search_affine` (``search=False``: min-max), stored through ``round_params``.  Rows are padded to whole
    groups by repeating their last column, which weighs nothing in the search."""
    w = w.detach().to(torch.float32)
    if not all_finite(w):
        raise NumericsError(f"{fid}: weight of shape {tuple(w.shape)} holds NaN/Inf values")
    rows, cols = w.shape
    ng = -(-cols // gs)
    pad = ng * gs - cols
    levels = levels.to(w.device)
    imp = _importance(importance, rows, cols, fid)
    if pad:  # replicate the last column (min/max unchanged) and give the padding zero weight
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
        imp = torch.cat([torch.ones(rows, cols, device=w.device) if imp is None else imp,
                         torch.zeros(rows, pad, device=w.device)], dim=1)
    groups = w.reshape(rows * ng, gs)
    gimp = None if imp is None else imp.reshape(rows * ng, gs)
    if search:
        scale, offset = search_affine(groups, levels, gimp, symmetric=symmetric, round_params=round_params)
    else:
        scale, offset = minmax_affine(groups, levels, symmetric=symmetric, round_params=round_params)
    return Grid(scale=scale.reshape(rows, ng), offset=offset.reshape(rows, ng), levels=levels, group_size=gs)


def _importance(importance: torch.Tensor | None, rows: int, cols: int, fid: str) -> torch.Tensor | None:
    if importance is None:
        return None
    imp = importance.detach().to(torch.float32)
    if imp.dim() == 1 and imp.shape[0] == cols:
        imp = imp.unsqueeze(0).expand(rows, cols)
    elif tuple(imp.shape) != (rows, cols):
        raise FormatError(f"{fid}: importance must have shape ({cols},) or ({rows}, {cols}), got {tuple(imp.shape)}")

    if not finite_non_negative(imp):
        raise NumericsError(f"{fid}: importance must be finite and non-negative")
    return imp


def parse_int(format_id: str) -> Format | None:
    """``int4-g128[-sym|-asym]`` / ``int3-row[-sym|-asym]`` -> :class:`IntFormat`, ``int4-g128-zp`` /
    ``int3-row-zp`` -> :class:`~.int_zp.IntZpFormat` (integer zero point); other families -> None.

    An id of this family with an unsupported width or group raises :class:`FormatError` saying why.
    """
    m = _ID.fullmatch(format_id.strip().lower())
    if m is None:
        if format_id.strip().lower().startswith("int"):
            raise FormatError(f"malformed integer format id {format_id!r}; expected e.g. int4-g128, int4-g128-sym, "
                              f"int4-g128-zp, int3-row (bits {BITS}, groups g32/g64/g128/row)")
        return None
    bits, group, _row, kind = m.groups()
    if kind == "zp":
        from .int_zp import IntZpFormat

        return IntZpFormat(int(bits), None if group is None else int(group))
    return IntFormat(int(bits), None if group is None else int(group), kind == "sym")


def get_id(format_id: str) -> str:
    """Canonical id of an integer-format id (``int4-g128-asym`` -> ``int4-g128``); other ids unchanged."""
    try:
        fmt = parse_int(format_id)
    except FormatError:
        return format_id
    return format_id if fmt is None else fmt.id


REGISTRY.register("int", parse_int, examples=["int4-g128", "int4-g128-sym", "int4-g128-zp", "int3-row",
                                               "int8-row-sym", "int2-g32"])

__all__ = ["IntFormat", "check_bits_group", "check_codes_grid", "fit_groups", "parse_int", "BITS", "GROUPS"]
