"""Shared pieces of the float-element formats (:mod:`.fp`) and NF4 (:mod:`.nf4`).

* :class:`MiniFloat` — a sign + ``E`` exponent + ``M`` mantissa element type with OCP MX semantics: bias
  ``2^(E-1) - 1``, subnormals when the exponent field is 0 (``2^(1-bias) · m/2^M``), no inf/NaN (every
  code is a number), except that ``nan_top`` drops the all-ones magnitude (E4M3FN: ``S.1111.111`` is NaN).
  Its :class:`~.base.Grid` ``levels`` are the sorted unique values (``+0`` and ``-0`` are one level); the
  stored code of a level is ``sign << (E + M) | magnitude`` (level 0 is stored as ``+0``), and every stored
  code maps back to a level (``-0`` to the level 0).
* :func:`search_scale` — the importance-weighted search of one non-negative scale per group of a
  symmetric codebook: the plain rule (``amax / max level``) rounded to storage, clipped ratios of it, and
  least-squares refits of the best, all compared after the format's own rounding of the scale; never worse
  than the plain rule on the weighted error (re-checked with :meth:`Grid.snap`'s arithmetic).
* :func:`best_of` — the same comparison over explicit candidate scales (power-of-two MX exponents).
* :class:`FloatFormat` — the base of :mod:`.fp`'s formats: geometry, exact bytes, packing, encode/decode,
  row concatenation, GPTQ refit; subclasses say how their scales are stored.
* :func:`pack_codes` / :func:`unpack_codes` — ``b``-bit codes of a ``(rows, cols)`` tensor as one
  little-endian bitstream per tensor (:mod:`.packing`), i.e. for 4 bits element ``2k`` in the low nibble of
  byte ``k`` and ``2k + 1`` in the high nibble (compressed-tensors' ``pack_fp4_to_uint8`` order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import torch

from .refit import refit_grid
from .fit import affine_error
from .base import Format, FormatError, Grid, QTensor, Shape
from .gguf_common import check_weights, element_weights, fp16r, grid_error, nearest_fn
from .packing import pack_bits, unpack_bits

ScaleRound = Callable[[torch.Tensor], torch.Tensor]

#: elements of one (groups, candidates, group) work tensor in the searches
_CHUNK = 1 << 20
#: clip ratios tried below the plain rule (the plain rule itself is always a candidate)
RATIOS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


@dataclass(frozen=True)
class MiniFloat:
    """A sign/exponent/mantissa element type (OCP MX rules; ``nan_top`` for E4M3FN's NaN)."""

    ebits: int
    mbits: int
    nan_top: bool = False

    def __post_init__(self) -> None:
        if self.ebits < 1 or self.mbits < 0 or self.bits > 8:
            raise FormatError(f"no float element type e{self.ebits}m{self.mbits}: need E >= 1, M >= 0, 1+E+M <= 8")

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def name(self) -> str:
        return f"e{self.ebits}m{self.mbits}" + ("fn" if self.nan_top else "")

    @cached_property
    def magnitudes(self) -> tuple[float, ...]:
        """Value of each magnitude code ``0 .. 2^(E+M) - 1`` (without the NaN code for ``nan_top``)."""
        bias = (1 << (self.ebits - 1)) - 1
        out = []
        for c in range(1 << (self.ebits + self.mbits)):
            e, m = c >> self.mbits, c & ((1 << self.mbits) - 1)
            frac = m / (1 << self.mbits)
            out.append(math.ldexp(frac, 1 - bias) if e == 0 else math.ldexp(1.0 + frac, e - bias))
        return tuple(out[:-1] if self.nan_top else out)

    @property
    def max(self) -> float:
        return self.magnitudes[-1]

    @cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mags = self.magnitudes
        n = len(mags)
        levels = torch.tensor([-v for v in reversed(mags[1:])] + list(mags), dtype=torch.float32)
        sign = 1 << (self.ebits + self.mbits)
        # level index i: negatives n-2 .. 0 are magnitudes 1 .. n-1, index n-1 is zero, then positives
        to_code = torch.tensor([sign | (n - 1 - i) for i in range(n - 1)] + list(range(n)), dtype=torch.int64)
        to_level = torch.full((1 << self.bits,), -1, dtype=torch.int64)
        to_level[to_code] = torch.arange(2 * n - 1)
        to_level[sign] = n - 1  # -0 decodes to the zero level
        return levels, to_code, to_level

    @property
    def levels(self) -> torch.Tensor:
        """Sorted unique float32 values (``2 · magnitudes - 1`` of them)."""
        return self._tables[0].clone()

    @property
    def level_to_code(self) -> torch.Tensor:
        return self._tables[1]

    @property
    def code_to_level(self) -> torch.Tensor:
        """Level index of every stored code; -1 for codes that are not numbers (E4M3FN's NaN)."""
        return self._tables[2]


E2M1 = MiniFloat(2, 1)
E4M3FN = MiniFloat(4, 3, nan_top=True)


# ---------------------------------------------------------------------------------------------- packing
def pack_codes(level_idx: torch.Tensor, elem: MiniFloat) -> torch.Tensor:
    """Level indices ``(rows, cols)`` -> stored codes as uint8 ``(rows, cols · bits / 8)`` (one bitstream)."""
    rows, cols = (int(d) for d in level_idx.shape)
    codes = elem.level_to_code[level_idx.reshape(-1).cpu()]
    if elem.bits == 8:
        return codes.to(torch.uint8).reshape(rows, cols)
    if elem.bits == 4:
        c = codes.reshape(-1, 2)
        return (c[:, 0] | (c[:, 1] << 4)).to(torch.uint8).reshape(rows, cols // 2)
    return pack_bits(codes, elem.bits).reshape(rows, cols * elem.bits // 8)


def unpack_codes(packed: torch.Tensor, elem: MiniFloat, rows: int, cols: int) -> torch.Tensor:
    """Stored codes -> level indices ``(rows, cols)``; FormatError on codes that are not numbers."""
    flat = packed.reshape(-1)
    if elem.bits == 8:
        codes = flat.to(torch.int64)
    elif elem.bits == 4:
        b = flat.to(torch.int64)
        codes = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)
    else:
        codes = unpack_bits(flat.contiguous(), elem.bits, rows * cols)
    idx = elem.code_to_level.to(codes.device)[codes]
    if codes.numel() and int(idx.min()) < 0:
        raise FormatError(f"{elem.name}: stored codes hold NaN patterns")
    return idx.reshape(rows, cols)


# ---------------------------------------------------------------------------------------------- search
def _errors(x: torch.Tensor, wt: torch.Tensor | None, s: torch.Tensor, near) -> torch.Tensor:
    """Weighted RTN error (n, K) of groups ``x`` (n, g) for candidate scales ``s`` (n, K), offset 0."""
    w3 = None if wt is None else wt.unsqueeze(1)
    return grid_error(x.unsqueeze(1), w3, s, torch.zeros_like(s), near)


def best_of(x: torch.Tensor, wt: torch.Tensor | None, levels: torch.Tensor, cands: torch.Tensor,
            *, check: bool = True) -> torch.Tensor:
    """The candidate scale (n,) of ``cands`` (n, K) with the smallest weighted RTN error per group of ``x``.

    Ties go to the earlier candidate; with ``check`` the winner is re-checked against ``cands[:, 0]`` with
    :meth:`Grid.snap`'s arithmetic, so it is never worse than the first candidate."""
    n, g = x.shape
    near = nearest_fn(levels.to(x.device))
    out = torch.empty(n, device=x.device)
    per = max(1, _CHUNK // max(1, g * cands.shape[1]))
    for a in range(0, n, per):
        sl = slice(a, a + per)
        e = _errors(x[sl], None if wt is None else wt[sl], cands[sl], near)
        out[sl] = cands[sl].gather(1, e.argmin(1, keepdim=True)).squeeze(1)
    return _never_worse(x, wt, levels, out, cands[:, 0]) if check else out


def _never_worse(x, wt, levels, s, plain):
    z = torch.zeros_like(s)
    lv = levels.to(x.device)
    worse = affine_error(x, s, z, lv, wt) > affine_error(x, plain, z, lv, wt)
    return torch.where(worse, plain, s)


def search_scale(x: torch.Tensor, wt: torch.Tensor | None, levels: torch.Tensor, rnd: ScaleRound,
                 *, refine: int = 2, ratios: tuple[float, ...] = RATIOS) -> torch.Tensor:
    """Non-negative scale (n,) per group of ``x`` (n, g) for the symmetric codebook ``levels``.

    Candidates (each rounded by ``rnd`` to what is stored): the plain rule ``amax / levels[-1]``, ``ratios``
    of it; then ``refine`` weighted least-squares refits of the best one given its codes.  Every candidate is
    scored by its importance-weighted RTN error; the result is never worse than the plain rule.
    """
    lv = levels.to(x.device)
    top = float(lv[-1])
    amax = x.abs().amax(1)
    base = amax / top
    r = torch.tensor((1.0,) + tuple(ratios), device=x.device)
    cands = rnd((base.unsqueeze(1) * r).reshape(-1)).reshape(base.shape[0], -1)
    s = best_of(x, wt, lv, cands, check=False)
    near = nearest_fn(lv)
    for _ in range(refine):
        inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        q = near(x * inv.unsqueeze(1))
        wq = q if wt is None else wt * q
        sxx, sxy = (wq * q).sum(1), (wq * x).sum(1)
        ls = torch.where(sxx > 0, sxy / torch.where(sxx > 0, sxx, torch.ones_like(sxx)), s)
        ls = rnd(ls.clamp_min(0))
        s = best_of(x, wt, lv, torch.stack([s, ls], 1), check=False)
    return _never_worse(x, wt, lv, s, cands[:, 0])


def group_view(w: torch.Tensor, imp: torch.Tensor | None, gs: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rows, cols)`` weights/importance as ``(rows · cols / gs, gs)`` groups."""
    x = w.reshape(-1, gs)
    return x, None if imp is None else imp.reshape(-1, gs)


# ---------------------------------------------------------------------------------------------- base format
@dataclass(frozen=True)
class FloatFormat(Format):
    """Common geometry, packing, encode/decode and concatenation; subclasses own the scale storage."""

    ebits: int = 2
    mbits: int = 1
    group: int = 32

    @property
    def elem(self) -> MiniFloat:
        return MiniFloat(self.ebits, self.mbits)

    @property
    def bits(self) -> float:  # type: ignore[override]
        return float(self.elem.bits)

    def group_size(self, cols: int) -> int:
        return self.group

    def check_shape(self, shape: Shape) -> None:
        shape = tuple(shape)
        self.check_2d(shape)
        if int(shape[1]) % self.group_size(int(shape[1])) or int(shape[1]) * self.elem.bits % 8:
            raise FormatError(f"{self.id}: row length {shape[1]} is not a multiple of the group size {self.group}")

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        rows, cols = (int(d) for d in shape)
        return rows * cols * self.elem.bits // 8 + self._scale_nbytes(rows, cols // self.group_size(cols))

    # --- subclass hooks -----------------------------------------------------------------------
    def _scale_nbytes(self, rows: int, ng: int) -> int:
        return 2 * rows * ng

    def _scale_parts_spec(self, rows: int, ng: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight_scale": (torch.float16, (rows, ng))}

    def _fit_scales(self, x: torch.Tensor, wt: torch.Tensor | None, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return search_scale(x, wt, self.elem.levels.to(x.device), fp16r), {}

    def _scale_parts(self, grid: Grid) -> dict[str, torch.Tensor]:
        s16 = grid.scale.to(torch.float16)
        if not torch.equal(s16.to(torch.float32), grid.scale):
            raise FormatError(f"{self.id}: grid scales are not fp16 values (use {self.id}.fit)")
        return {"weight_scale": s16.contiguous()}

    def _scales(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["weight_scale"].to(torch.float32)

    def _round_scale(self, grid: Grid):
        return fp16r

    # --- grid ---------------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        w = check_weights(w, self.id)
        self.check_shape(tuple(w.shape))
        rows, cols = (int(d) for d in w.shape)
        gs = self.group_size(cols)
        x, wt = group_view(w, element_weights(importance, (rows, cols)), gs)
        scale, extra = self._fit_scales(x, wt, w)
        zero = torch.zeros(rows, cols // gs, device=w.device)
        return Grid(scale.reshape(rows, cols // gs), zero, self.elem.levels.to(w.device), gs, extra)

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        """Least-squares scales for GPTQ's codes under the Hessian, rounded to storage (never worse)."""
        return self.refine_measured(w, codes, grid, hessian)[0]

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor | None]:
        return refit_grid(w, codes, grid, hessian, offset=False, rnd=self._round_scale(grid))

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        rows, cols = shape
        gs = self.group_size(cols)
        codes, grid = codes.cpu().to(torch.int64), grid.to("cpu")
        nl = self.elem.levels.numel()
        if tuple(codes.shape) != shape:
            raise FormatError(f"{self.id}: codes of shape {tuple(codes.shape)} do not match the tensor shape {shape}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= nl):
            raise FormatError(f"{self.id}: codes outside 0..{nl - 1}")
        if grid.group_size != gs or tuple(grid.scale.shape) != (rows, cols // gs):
            raise FormatError(f"{self.id}: grid (group {grid.group_size}, scale {tuple(grid.scale.shape)}) does not "
                              f"match shape {shape}")
        if not torch.equal(grid.levels.to(torch.float32), self.elem.levels) or bool((grid.offset != 0).any()):
            raise FormatError(f"{self.id}: grid levels/offsets are not this format's")
        parts = {"weight_packed": self._pack(codes)}
        parts.update(self._scale_parts(grid))
        return QTensor(self.id, shape, dtype, parts)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.elem)

    def _unpack(self, packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return unpack_codes(packed, self.elem, rows, cols)

    def _expect(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        spec = {"weight_packed": (torch.uint8, (rows, cols * self.elem.bits // 8))}
        spec.update(self._scale_parts_spec(rows, cols // self.group_size(cols)))
        return spec

    def _checked(self, q: QTensor) -> tuple[int, int]:
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        shape = tuple(int(d) for d in q.shape)
        self.check_shape(shape)
        self.check_parts(q, self._expect(*shape))
        return shape

    def decode(self, q: QTensor) -> torch.Tensor:
        rows, cols = self._checked(q)
        gs = self.group_size(cols)
        idx = self._unpack(q.parts["weight_packed"], rows, cols)
        lv = self.elem.levels.to(idx.device).take(idx)
        s = self._scales(q.parts).to(lv.device).unsqueeze(-1)
        return (s * lv.reshape(rows, -1, gs)).reshape(rows, cols)  # exactly Grid.values (offset 0)

    def _extra(self, parts: dict[str, torch.Tensor]) -> dict:
        """The ``extra`` of the grid of stored ``parts`` (what :meth:`fit` puts there); none by default."""
        return {}

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """Level indices (rows, cols) and the grid :meth:`fit` would build (the decoded scales, offset 0).

        A stored ``-0`` element (which :meth:`encode` never writes) unpacks to the zero level and re-encodes
        as ``+0``: the same value, a different byte."""
        rows, cols = self._checked(q)
        gs = self.group_size(cols)
        idx = self._unpack(q.parts["weight_packed"], rows, cols)
        scale = self._scales(q.parts).reshape(rows, cols // gs)
        extra = self._extra(q.parts)
        return idx, Grid(scale, torch.zeros_like(scale), self.elem.levels.to(scale.device), gs, extra)

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor: every part's per-row arrays stack (rows are whole bytes)."""
        rows, cols, dtype = self._check_concat(parts)
        for p in parts:
            self._checked(p)
        out = {k: torch.cat([p.parts[k] for p in parts]) for k in parts[0].parts}
        return QTensor(self.id, (rows, cols), dtype, out)


__all__ = ["FloatFormat", "MiniFloat", "E2M1", "E4M3FN", "pack_codes", "unpack_codes", "search_scale", "best_of", "group_view",
           "RATIOS", "ScaleRound"]
