"""Mixtures of value sets per group with double-quantized scales, ``mix{3,4}-g{16,32}-dq[S]``.

Each group of ``G`` consecutive input columns of a row picks one of four ``2^b``-level value sets (a 2-bit index) and
an unsigned ``S``-bit integer scale ``k`` under one fp16 super-scale ``d`` per row.  An element decodes to

    ``(d[r] * k[r, g]) * sets[set[r, g]][code]``   (float32, in this order; ``k`` in ``0..2^S - 1``)

As a :class:`Grid`: ``levels`` = the ``(4, 2^b)`` sets, ``scale = d * k``, ``offset = 0``, ``set_index`` = the set of
each group, ``extra`` = ``{"d": (rows,), "sc": (rows, ng) int64}``.  Ids: ``G`` in {16, 32}, ``S`` in 4..8,
``-dq`` meaning ``S = 6`` (as :mod:`.int_dq`); ``mix4-g16-dq5`` costs 4 + 7/16 + 16/cols bpw (4.47 on 576 columns),
``mix3-g16-dq5`` 3 + 7/16 + 16/cols.

Why: at 3 and 4 bits, small groups are what lowers the error (the scale follows the data), but an fp16 scale per 16
columns costs a whole bit.  Storing the scale as 5 bits under a per-row fp16 (the K-quant trick, here for any
column count) pays for groups of 16 *and* a choice of value set per group, which fits each group's shape (a flat
or a peaked group, skewed left or right) where one codebook fits the average.

The sets (:data:`SETS_DQ`, in 128ths, largest magnitude 1) were designed for this layout, not for any model:
Lloyd's algorithm for a classified quantizer (each group takes its best set and scale, each level moves to the
weighted mean of what it holds) on groups of 16 drawn from N(0, 1), Laplace and Student-t(5) data, started from
the uniform grid, IQ4_NL's codebook, its mirror image and FP4-like levels (3 bits: the uniform grid, its mirror image,
the 8-level Lloyd-Max quantizer and FP3-like levels; on held-out draws of the same three
distributions they gain 0.1-0.4 dB over those starting sets; a scratch script, not kept).  ``bench/formats.py``
scores this implementation against every other format (``bench/results/formats.json``).

Exact storage of a ``(rows, cols)`` tensor, ``ng = ceil(cols / G)``, every part 2-D with one row per tensor row
(each row starting on a byte boundary, so row blocks stack):

* ``weight_packed``: uint8 ``(rows, ng*G*b/8)``: row ``r``'s ``b``-bit codes (one :func:`~.packing.pack_bits`
  stream), padded with zero codes to ``ng*G``;
* ``weight_scale``: uint8 ``(rows, ceil(ng*S/8))``: :func:`~.int_dq.pack_row_ints` of ``k[r]``;
* ``weight_set``: uint8 ``(rows, ceil(ng/4))``: the 2-bit set indices, likewise;
* ``weight_super``: fp16 ``(rows, 1)``: ``d[r]``.
Example: ``(3, 40)`` mix4-g16-dq5 = 3*24 + 3*2 + 3*1 + 3*2 = 87 bytes.

Fitting (importance-weighted): per set, each group's continuous best scale (:func:`.gguf_common.search_grid`); per
row ``d`` from :func:`~.int_dq.super_search` on the best set's scales; then every group tries, for every set, the
integers next to its scale / ``d`` against its true weighted error, and ``d`` is refit by least squares to the
chosen integers and codes, a step kept only where it lowers the row's error.  :meth:`MixtureDQFormat.refine`
(GPTQ) refits ``d`` per row to the fixed codes under the full Hessian, kept where better.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .refit import row_errors
from .base import REGISTRY, FormatError, Grid, QTensor, Shape
from .gguf_common import fp16r, grid_error, level_values, nearest_fn, search_grid
from .mixture import search_multiplier
from .packing import pack_bits
from .superscale import (DEFAULT_SCALE_BITS, RowSuperScaled, pack_row_ints, safe_div, super_search,
                         unpack_row_ints)

#: bits -> the four value sets of ``mix{bits}-…-dq``, in 128ths (see the module docstring for how they were designed)
SETS_DQ: dict[int, tuple[tuple[int, ...], ...]] = {
    3: ((-126, -79, -46, -20, 0, 21, 48, 86),
        (-83, -48, -21, 0, 20, 46, 78, 128),
        (-122, -65, -33, -10, 10, 32, 61, 122),
        (-111, -56, -26, -1, 22, 47, 80, 118)),
    4: ((-128, -108, -88, -72, -57, -43, -28, -14, 0, 14, 28, 43, 59, 75, 91, 110),
        (-122, -100, -79, -61, -45, -32, -19, -8, 2, 12, 23, 36, 49, 63, 80, 113),
        (-113, -83, -64, -48, -35, -23, -12, -3, 7, 19, 31, 45, 61, 78, 102, 123),
        (-127, -76, -57, -41, -29, -18, -8, 0, 8, 18, 28, 41, 55, 77, 101, 127)),
}
BITS = tuple(SETS_DQ)
GROUPS = (16, 32)
SCALE_BITS = (4, 5, 6, 7, 8)
INDEX_BITS = 2
#: least-squares refits of ``d`` (each followed by a new choice of integers and sets) in :meth:`fit`
_REFITS = 2
#: integer scales tried per set, as multiples of (the group's largest magnitude / d)
_RATIOS = tuple(0.45 + 0.8 * i / (13 - 1) for i in range(13))


def _nonneg(s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return s.clamp_min(0), o


@dataclass(frozen=True)
class MixtureDQFormat(RowSuperScaled):
    """``bits``-bit codes into one of four value sets per ``group`` columns; ``sbits``-bit scale per group; fp16
    per row."""

    bits: int = 4  # type: ignore[assignment]
    group: int = 16
    sbits: int = DEFAULT_SCALE_BITS
    PREFIX = "mix"
    FAMILY = "double-quantized mixture"
    ALLOWED = {"bits": BITS, "group": GROUPS, "sbits": SCALE_BITS}
    EXAMPLES = ("mix4-g16-dq5", "mix4-g32-dq")

    @property
    def levels(self) -> torch.Tensor:
        """The value sets, ``(4, 2^bits)`` float32, row ``k`` = set index ``k``."""
        return torch.tensor(SETS_DQ[self.bits], dtype=torch.float32) / 128.0

    # --- geometry -----------------------------------------------------------------------------
    def _part_shapes(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
        ng = self.ngroups(cols)
        return {"weight_packed": (torch.uint8, (rows, ng * self.group * self.bits // 8)),
                "weight_scale": (torch.uint8, (rows, (ng * self.sbits + 7) // 8)),
                "weight_set": (torch.uint8, (rows, (ng * INDEX_BITS + 7) // 8)),
                "weight_super": (torch.float16, (rows, 1))}

    # --- fit ----------------------------------------------------------------------------------
    def _grid(self, d: torch.Tensor, sc: torch.Tensor, sets: torch.Tensor) -> Grid:
        scale = d.unsqueeze(1) * sc.to(torch.float32)
        return Grid(scale, torch.zeros_like(scale), self.levels.to(d.device), self.group, {"d": d, "sc": sc},
                    set_index=sets)

    def _choose(self, x, wt, d, nears):
        """Per group the (set, integer scale) of least weighted error: for every set, the integers
        ``round(r · amax / d)`` for the 13 ratios ``r`` of :data:`_RATIOS`, then the best one's two neighbours (at
        ``S <= 5`` that covers every integer of the window).  Returns ``(sc, set, error)``, each (R, J)."""
        hi = (1 << self.sbits) - 1
        dd = d.unsqueeze(1)
        base = safe_div(x.abs().amax(-1), dd)
        best = None
        for j, (near, m) in enumerate(nears):
            cand = [torch.clamp(torch.round(base * r), 0, hi) for r in _RATIOS]
            e_j = None
            for sc in cand:
                e = grid_error(x, wt, dd * sc / m, torch.zeros_like(sc), near)
                if e_j is None:
                    sc_j, e_j = sc, e
                else:
                    b = e < e_j
                    sc_j, e_j = torch.where(b, sc, sc_j), torch.where(b, e, e_j)
            for step in (-1, 1):
                sc = torch.clamp(sc_j + step, 0, hi)
                e = grid_error(x, wt, dd * sc / m, torch.zeros_like(sc), near)
                b = e < e_j
                sc_j, e_j = torch.where(b, sc, sc_j), torch.where(b, e, e_j)
            if best is None:
                best = (sc_j, torch.full_like(sc_j, j, dtype=torch.int64), e_j)
            else:
                b = e_j < best[2]
                best = (torch.where(b, sc_j, best[0]), torch.where(b, j, best[1]), torch.where(b, e_j, best[2]))
        return best

    def _errors(self, x, wt, d, sc, sets, nears) -> torch.Tensor:
        """Weighted error (R, J) of every group at its own set and integer scale under ``d``."""
        out = torch.zeros_like(sc)
        dd = d.unsqueeze(1)
        for j, (near, m) in enumerate(nears):
            out = torch.where(sets == j, grid_error(x, wt, dd * sc / m, torch.zeros_like(sc), near), out)
        return out

    def _refit_d(self, x, wt, d, sc, sets, nears) -> torch.Tensor:
        """Weighted least-squares ``d`` per row for fixed integers, sets and RTN codes, as fp16 (old ``d`` where
        the codes decode to nothing)."""
        dd = d.unsqueeze(1)
        lv = torch.zeros_like(x)
        for j, (near, m) in enumerate(nears):
            v = level_values(x, dd * sc / m, torch.zeros_like(sc), near) / m
            lv = torch.where((sets == j).unsqueeze(-1), v, lv)
        a = (sc.unsqueeze(-1) * lv).flatten(1)
        xx, w1 = x.flatten(1), wt.flatten(1)
        den = (w1 * a * a).sum(1)
        num = (w1 * a * xx).sum(1)
        return torch.where(den > 0, fp16r(num / torch.where(den > 0, den, 1.0)), d)

    def _fit_rows(self, x: torch.Tensor, wt: torch.Tensor):
        R, J, G = x.shape
        hi = (1 << self.sbits) - 1
        levels = self.levels.to(x.device)
        flat, fw = x.reshape(-1, G), wt.reshape(-1, G)
        conts, nears, errs, wq = [], [], [], []
        for j in range(int(levels.shape[0])):
            m = search_multiplier(levels[j])  # levels·m have half-integer midpoints: the fast exact nearest
            near = nearest_fn(levels[j] * m)  # used with scale / m throughout
            s, _ = search_grid(flat, fw, levels[j] * m, symmetric=True, rnd=_nonneg)
            q = level_values(flat, s, torch.zeros_like(s), near) / m
            conts.append((s * m).reshape(R, J))
            nears.append((near, m))
            errs.append(grid_error(flat, fw, s, torch.zeros_like(s), near).reshape(R, J))
            wq.append((fw * q * q).sum(1).reshape(R, J))
        k = torch.stack(errs).argmin(0, keepdim=True)
        s_t = torch.stack(conts).gather(0, k).squeeze(0)
        d = super_search(s_t, torch.stack(wq).gather(0, k).squeeze(0), hi)
        sc, sets, e = self._choose(x, wt, d, nears)
        err = e.sum(1)
        for _ in range(_REFITS):
            d2 = self._refit_d(x, wt, d, sc, sets, nears)
            sc2, sets2, e2 = self._choose(x, wt, d2, nears)
            e_keep = self._errors(x, wt, d2, sc, sets, nears)
            keep = e_keep < e2
            sc2, sets2, e2 = torch.where(keep, sc, sc2), torch.where(keep, sets, sets2), torch.where(keep, e_keep, e2)
            err2 = e2.sum(1)
            better = err2 < err
            if not bool(better.any()):
                break
            b1 = better.unsqueeze(1)
            d, err = torch.where(better, d2, d), torch.where(better, err2, err)
            sc, sets = torch.where(b1, sc2, sc), torch.where(b1, sets2, sets)
        return d, sc, sets

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        d, sc, sets = self._fit_by_rows(w, importance)
        return self._grid(d, sc.to(torch.int64), sets)

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        return self.refine_measured(w, codes, grid, hessian)[0]

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor | None]:
        """Least-squares fp16 ``d`` per row for the fixed codes, sets and integer scales under ``hessian``;
        a row keeps its old ``d`` unless the new one lowers its error; ``grid`` itself when none does.  The
        change is that of the two errors compared."""
        d, sc = grid.extra["d"], grid.extra["sc"]
        f64 = torch.float64
        h = hessian.to(device=w.device, dtype=f64)
        g = torch.arange(int(w.shape[1]), device=w.device) // self.group
        a = sc[:, g].to(f64) * grid.level_values(codes).to(f64)  # v = d·a
        ha = a @ ((h + h.T) * 0.5)
        den, num = (a * ha).sum(1), (w.to(f64) * ha).sum(1)
        d2 = torch.where(den > 0, fp16r((num / torch.where(den > 0, den, 1.0)).to(torch.float32)), d)
        new = self._grid(d2, sc, grid.set_index)
        change = row_errors(w, new.values(codes), hessian) - row_errors(w, grid.values(codes), hessian)
        ok = change < 0
        if not bool(ok.any()):
            return grid, None
        return self._grid(torch.where(ok, d2, d), sc, grid.set_index), torch.where(ok, change, torch.zeros_like(change))

    # --- bytes --------------------------------------------------------------------------------
    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        """The four parts, built on the CPU (codes and grid are moved there first)."""
        shape = tuple(int(n) for n in shape)
        self.check_shape(shape)
        rows, cols = shape
        G, ng = self.group, self.ngroups(cols)
        full, grid = self._full_codes(codes, shape), grid.to("cpu")
        try:
            d, sc = grid.extra["d"].to(torch.float32), grid.extra["sc"].to(torch.int64)
        except (KeyError, AttributeError) as exc:
            raise FormatError(f"{self.id}: grid lacks this format's super-scales ({exc})") from None
        sets = grid.set_index
        if grid.group_size != G or tuple(d.shape) != (rows,) or tuple(sc.shape) != (rows, ng) or sets is None \
                or tuple(sets.shape) != (rows, ng):
            raise FormatError(f"{self.id}: grid does not match shape {shape} ({ng} groups of {G} per row)")
        if grid.levels.shape != self.levels.shape or not torch.equal(grid.levels.float(), self.levels):
            raise FormatError(f"{self.id}: grid levels are not this format's value sets")
        if not torch.equal(fp16r(d), d):
            raise FormatError(f"{self.id}: super-scales are not finite fp16 values")
        hi = (1 << self.sbits) - 1
        if sc.numel() and (int(sc.min()) < 0 or int(sc.max()) > hi or int(sets.min()) < 0 or int(sets.max()) > 3):
            raise FormatError(f"{self.id}: integer scales outside 0..{hi} or set indices outside 0..3")
        if not (torch.equal(d.unsqueeze(1) * sc.to(torch.float32), grid.scale) and not bool((grid.offset != 0).any())):
            raise FormatError(f"{self.id}: grid scales disagree with its super-scales and integer scales")
        spec = self._part_shapes(rows, cols)
        parts = {"weight_packed": pack_bits(full, self.bits).reshape(spec["weight_packed"][1]),
                 "weight_scale": pack_row_ints(sc, self.sbits),
                 "weight_set": pack_row_ints(sets.to(torch.int64), INDEX_BITS),
                 "weight_super": d.unsqueeze(1).to(torch.float16).contiguous()}
        return QTensor(format=self.id, shape=shape, dtype=dtype, parts=parts)

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """Codes (rows, cols) and the grid :meth:`fit` would build, on the CPU."""
        ng, sup = self._stored(q)
        d = sup[:, 0].contiguous()
        sc = unpack_row_ints(q.parts["weight_scale"].cpu(), ng, self.sbits)
        sets = unpack_row_ints(q.parts["weight_set"].cpu(), ng, INDEX_BITS)
        return self._stored_codes(q), self._grid(d, sc, sets)

    def decode(self, q: QTensor) -> torch.Tensor:
        codes, grid = self.unpack(q)
        return grid.values(codes)


def parse_mixture_dq(format_id: str) -> MixtureDQFormat | None:
    """``mix4-g16-dq5`` / ``mix3-g32-dq`` -> :class:`MixtureDQFormat`; ids without ``-dq`` -> None."""
    return MixtureDQFormat.parse(format_id)  # type: ignore[return-value]


REGISTRY.register("mixture-dq", parse_mixture_dq, examples=["mix4-g16-dq5", "mix3-g16-dq5", "mix4-g32-dq"])

__all__ = ["MixtureDQFormat", "parse_mixture_dq", "SETS_DQ", "BITS", "GROUPS", "SCALE_BITS"]
