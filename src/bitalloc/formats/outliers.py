"""Sparse outliers as a modifier of any grid format: ``{base}+o{k}`` (``int3-g128+o4``, ``q4_0+o2``).

The ``k`` elements of each row with the largest importance-weighted error under the base format's RTN rounding
are stored exactly (fp16 of the original weight) with their column index; every other element is the base
format's.  ``k`` is one of :data:`KS`.  The base grid is fitted once, the outliers chosen from its rounding,
and the grid fitted again with the outliers weighted zero (kept when that lowers the weighted error of the
whole row, outliers included), so the result is never worse than the base on that error.

Exact storage of a ``(rows, cols)`` tensor: the base format's parts, plus

* ``weight_outlier_values``: fp16 ``(rows, k)``: ``2·rows·k`` bytes;
* ``weight_outlier_index``: the columns, ascending per row: uint16 ``(rows, k)`` when ``cols <= 65536``
  (``2·rows·k`` bytes), else int32 (``4·rows·k`` bytes).

With GPTQ the stored values are then refit (:meth:`OutlierFormat.refine`): the least-squares optimum of each
row's outlier values given its other, rounded, elements under the Hessian (so they compensate the error feedback
GPTQ left in the row), stored in fp16.

Decoding is the base format's decode with those positions overwritten.  The stored base code at an outlier
position is the base grid's nearest code (RTN) or GPTQ's; it never reaches a decoded value.  Formats have no
``gguf_type``: a GGUF file cannot store them.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .base import REGISTRY, Format, FormatError, Grid, QTensor, Shape, get_format
from .gguf_common import element_weights, fp16r
from .refit import row_errors

KS = (1, 2, 4, 8, 16)
VALUES = "weight_outlier_values"
INDEX = "weight_outlier_index"
_ID = re.compile(r"(.+)\+o(\d+)")


@dataclass(frozen=True)
class OutlierFormat(Format):
    """``base`` with the ``k`` worst elements of every row stored exactly (fp16 value + column index)."""

    base: Format
    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.base, Format) or not self.base.is_grid or isinstance(self.base, OutlierFormat):
            raise FormatError(f"sparse outliers modify a grid format, got {self.base!s}")
        if self.k not in KS or isinstance(self.k, bool):
            raise FormatError(f"{self.base.id}+o{self.k}: outliers per row must be one of {KS}")

    @property
    def id(self) -> str:
        return f"{self.base.id}+o{self.k}"

    @property
    def activation_rounding(self) -> str | None:  # type: ignore[override]
        return self.base.activation_rounding

    @property
    def bits(self) -> float:
        return self.base.bits

    def check_shape(self, shape: Shape) -> None:
        self.base.check_shape(shape)
        if len(shape) != 2 or int(shape[1]) < self.k:
            raise FormatError(f"{self.id}: needs 2-D rows of at least {self.k} columns, got shape {tuple(shape)}")

    def index_dtype(self, cols: int) -> torch.dtype:
        return torch.uint16 if cols <= 65536 else torch.int32

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        rows, cols = int(shape[0]), int(shape[1])
        return self.base.nbytes(shape) + rows * self.k * (2 + self.index_dtype(cols).itemsize)

    # --- grid ---------------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        self.check_shape(tuple(w.shape))
        w = w.detach().to(torch.float32)
        rows, cols = (int(d) for d in w.shape)
        grid = self.base.fit(w, importance)
        imp = element_weights(importance, (rows, cols))
        err = (w - grid.snap(w)[1]).square_()
        if imp is not None:
            err = err * imp
        idx = err.topk(self.k, dim=1).indices
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device).scatter_(1, idx, True)
        exact = torch.where(mask, fp16r(w), torch.zeros_like(w))
        first = dataclasses.replace(grid, exact_mask=mask, exact_values=exact)
        # the base grid refitted without the outliers (their weight 0), kept per row when better
        wt = torch.ones(rows, cols, device=w.device) if imp is None else imp.clone()
        wt[mask] = 0
        again = dataclasses.replace(self.base.fit(w, wt), exact_mask=mask, exact_values=exact)
        full = torch.ones(rows, cols, device=w.device) if imp is None else imp
        e1 = ((w - first.snap(w)[1]).square_() * full).sum(1)
        e2 = ((w - again.snap(w)[1]).square_() * full).sum(1)
        return _pick_rows(e2 < e1, again, first)

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        """The base format's refit (the exactly stored elements fixed), then the stored values refit to the other
        elements' rounding under the Hessian (:func:`refit_exact`), kept per row where that lowers the error."""
        return refit_exact(w, codes, self.base.refine(w, codes, grid, hessian), hessian)

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        rows, cols = shape
        grid = grid.to("cpu")
        if grid.exact_mask is None or tuple(grid.exact_mask.shape) != shape:
            raise FormatError(f"{self.id}: the grid holds no outliers for shape {shape} (use {self.id}.fit)")
        mask, exact = grid.exact_mask, grid.exact_values
        assert exact is not None
        if not bool((mask.sum(1) == self.k).all()):
            raise FormatError(f"{self.id}: every row needs exactly {self.k} outliers")
        if not torch.equal(fp16r(exact[mask]), exact[mask]):
            raise FormatError(f"{self.id}: outlier values are not fp16 values")
        idx = torch.arange(cols).expand(rows, cols)[mask].reshape(rows, self.k)  # ascending per row
        vals = exact[mask].reshape(rows, self.k)
        base_grid = dataclasses.replace(grid, exact_mask=None, exact_values=None)
        q = self.base.encode(codes, base_grid, shape, dtype)
        parts = dict(q.parts)
        parts[VALUES] = vals.to(torch.float16).contiguous()
        parts[INDEX] = idx.to(self.index_dtype(cols)).contiguous()
        return QTensor(format=self.id, shape=shape, dtype=dtype, parts=parts)

    def _split(self, q: QTensor) -> tuple[QTensor, torch.Tensor, torch.Tensor]:
        """(the base QTensor, values (rows, k) fp16, index (rows, k) int64), checked."""
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        shape = tuple(int(d) for d in q.shape)
        self.check_shape(shape)
        rows, cols = shape
        vals, idx = q.parts.get(VALUES), q.parts.get(INDEX)
        want = (rows, self.k)
        if vals is None or vals.dtype != torch.float16 or tuple(vals.shape) != want:
            raise FormatError(f"{self.id}: part {VALUES} must be float16 {want}")
        if idx is None or idx.dtype != self.index_dtype(cols) or tuple(idx.shape) != want:
            raise FormatError(f"{self.id}: part {INDEX} must be {self.index_dtype(cols)} {want}")
        idx64 = idx.to(torch.int64)
        if idx64.numel() and (int(idx64.min()) < 0 or int(idx64.max()) >= cols
                              or (self.k > 1 and not bool((idx64[:, 1:] > idx64[:, :-1]).all()))):
            raise FormatError(f"{self.id}: outlier columns must be ascending per row and within 0..{cols - 1}")
        base = QTensor(self.base.id, shape, q.dtype, {n: t for n, t in q.parts.items() if n not in (VALUES, INDEX)})
        return base, vals, idx64

    def decode(self, q: QTensor) -> torch.Tensor:
        base, vals, idx = self._split(q)
        out = self.base.decode(base)
        return out.scatter(1, idx.to(out.device), vals.to(device=out.device, dtype=torch.float32))

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """The base format's codes and grid with the stored outliers as ``exact_mask``/``exact_values`` (the
        fp16 values at their columns, 0 elsewhere, as :meth:`fit` builds them); FormatError when the base
        format cannot be unpacked."""
        base, vals, idx = self._split(q)
        codes, grid = self.base.unpack(base)
        dev = grid.scale.device
        rows, cols = (int(d) for d in q.shape)
        idx = idx.to(dev)
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=dev).scatter_(1, idx, True)
        exact = torch.zeros(rows, cols, device=dev).scatter_(1, idx, vals.to(device=dev, dtype=torch.float32))
        return codes, dataclasses.replace(grid, exact_mask=mask, exact_values=exact)

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """The base format's concatenation of its parts; the outlier parts stack."""
        rows, cols, dtype = self._check_concat(parts)
        split = [self._split(p) for p in parts]
        q = self.base.concat_rows([b for b, _, _ in split])
        out = dict(q.parts)
        out[VALUES] = torch.cat([p.parts[VALUES] for p in parts])
        out[INDEX] = torch.cat([p.parts[INDEX] for p in parts])
        return QTensor(format=self.id, shape=(rows, cols), dtype=dtype, parts=out)


def refit_exact(w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
    """``grid`` with each row's exactly stored values set to the fp16 of their least-squares optimum given the
    other elements' values: with ``δ = v − w``, ``δ_O = −H_OO⁻¹ H_OR δ_R`` over the row's stored positions ``O``.
    After GPTQ the rest of the row carries error feedback that the original weights ignore; this stores the
    values that compensate it.  Rows whose error does not drop keep their values; never worse in-sample."""
    if grid.exact_mask is None:
        return grid

    mask = grid.exact_mask.to(w.device)
    rows = int(w.shape[0])
    k = int(mask[0].sum()) if rows else 0
    if k == 0 or not bool((mask.sum(1) == k).all()):
        return grid
    w64 = w.to(torch.float64)
    old = grid.values(codes)
    d = old.to(torch.float64) - w64
    h = hessian.to(device=w.device, dtype=torch.float64)
    h = (h + h.T) * 0.5
    idx = torch.arange(int(w.shape[1]), device=w.device).expand_as(mask)[mask].reshape(rows, k)
    h_oo = h[idx.unsqueeze(2), idx.unsqueeze(1)]  # (rows, k, k)
    d_o = d.gather(1, idx)
    rhs = (d @ h).gather(1, idx) - (h_oo @ d_o.unsqueeze(2)).squeeze(2)  # H_OR δ_R
    diag = h_oo.diagonal(dim1=1, dim2=2).abs()
    ridge = 1e-9 * diag + 1e-30 * (1.0 + diag.mean(1, keepdim=True))
    sol = torch.linalg.solve(h_oo + torch.diag_embed(ridge), -rhs.unsqueeze(2)).squeeze(2)
    vals = fp16r((w64.gather(1, idx) + sol).to(torch.float32))
    exact = grid.exact_values.to(w.device).clone()
    exact[mask] = vals.reshape(-1)
    new = dataclasses.replace(grid, exact_values=exact)
    better = torch.isfinite(vals).all(1) & (row_errors(w, new.values(codes), hessian) < row_errors(w, old, hessian))
    return dataclasses.replace(grid, exact_values=torch.where(better.unsqueeze(1), exact,
                                                              grid.exact_values.to(w.device)))


def _pick_rows(take: torch.Tensor, a: Grid, b: Grid) -> Grid:
    """Row by row ``a`` where ``take`` else ``b`` (same format, same masks): scales, offsets, set indices, extra."""
    t = take.unsqueeze(1)

    def pick(x, y):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == take.shape[0] and x.shape == y.shape:
            return torch.where(t.reshape(-1, *([1] * (x.dim() - 1))), x, y)
        return x if bool(take.all()) else y
    extra = {k: pick(v, b.extra[k]) for k, v in a.extra.items()}
    sets = None if a.set_index is None else pick(a.set_index, b.set_index)
    return dataclasses.replace(b, scale=pick(a.scale, b.scale), offset=pick(a.offset, b.offset), extra=extra,
                               set_index=sets)


def parse_outliers(format_id: str) -> OutlierFormat | None:
    """``int3-g128+o4`` -> :class:`OutlierFormat` over ``int3-g128``; ids without ``+o`` -> None."""
    key = format_id.strip().lower()
    if "+" not in key or key.startswith("had-"):  # had-BASE+oK: the rotation is outermost (outliers of W·R)
        return None
    m = _ID.fullmatch(key)
    if m is None or not m.group(2).isdigit():
        raise FormatError(f"malformed outlier format id {format_id!r}; expected BASE+oK with K in {KS}, "
                          f"e.g. int3-g128+o4")
    base = get_format(m.group(1))
    if not base.is_grid:
        raise FormatError(f"{format_id}: sparse outliers modify a grid format, {base.id} stores values as they are")
    if type(base).__name__ == "IntDQFormat":  # its fit/refine rebuild the grid without the stored outliers
        raise FormatError(f"{format_id}: sparse outliers over double-scaled integer formats are not supported")
    k = int(m.group(2))
    if k not in KS:
        raise FormatError(f"{format_id}: outliers per row must be one of {KS}, got {k}")
    return OutlierFormat(base, k)


REGISTRY.register("outliers", parse_outliers, examples=["int3-g128+o4", "q4_0+o2", "mix4-g64+o1"])

__all__ = ["OutlierFormat", "parse_outliers", "KS", "VALUES", "INDEX"]
