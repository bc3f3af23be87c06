"""Integer formats with double-quantized scales, ``int{b}-g{G}-dq[{S}]``: K-quant scales on any column count.

Like llama.cpp's Q4_K, every group of ``G`` consecutive columns has an unsigned ``S``-bit integer scale
``sc`` and min ``m``, themselves scaled by fp16 super-scales ``d`` and ``dmin``; unlike Q4_K the super-block
is one whole row (any column count, the last group padded as in :mod:`.int`), so SmolLM2's 576-wide
tensors, which no K-quant can store, take it.  An element of group ``g`` of row ``r`` decodes to

    ``(d[r] * sc[r, g]) * q - dmin[r] * m[r, g]``,   ``q`` in ``[0, 2^b - 1]``, ``sc``, ``m`` in ``[0, 2^S - 1]``

(float32 arithmetic in this order; ``d``/``dmin`` may take any finite fp16 value).  As a :class:`Grid`:
``levels = arange(2^b)``, ``scale = d * sc``, ``offset = -(dmin * m)``, ``group_size = G``; ``grid.extra``
holds ``d``, ``dmin`` (rows,) float32 and ``sc``, ``m`` (rows, ngroups) int64.

Ids: ``b`` in {2, 3, 4, 5, 6}, ``G`` in {16, 32, 64}, ``S`` in 4..8; ``-dq`` means ``S = 6`` (``-dq6`` is
accepted on input).  ``int4-g32-dq`` is the Q4_K analogue: 4 + 12/32 + 32/cols bpw (4.44 on 576 columns).

Exact storage of a ``(rows, cols)`` tensor, ``ng = ceil(cols / G)`` (this defines :meth:`IntDQFormat.nbytes`);
every part is 2-D with one row per tensor row, each row starting on a byte boundary, so row blocks stack:

* ``weight_packed``: uint8 ``(rows, ng*G*b/8)``: row ``r``'s codes, padded with zero codes to ``ng*G``
  columns, as one :func:`~.packing.pack_bits` stream (``G*b`` is a multiple of 8, so no padding bits);
* ``weight_scale``: uint8 ``(rows, ceil(ng*S/8))``: ``pack_bits(sc[r], S)``, the last byte's unused high
  bits zero;
* ``weight_zero``: uint8 ``(rows, ceil(ng*S/8))``: ``pack_bits(m[r], S)``, likewise;
* ``weight_super``: fp16 ``(rows, 2)``: ``d[r]``, ``dmin[r]``.
Example: ``(3, 40)`` int4-g32-dq = 3*32 + 3*2 + 3*2 + 3*4 = 120 bytes.

Fitting (importance-weighted, as the K-quants in :mod:`.gguf_kquants`): a continuous scale/min search per
group (:func:`.gguf_common.search_grid`, offsets <= 0, plus the range [0, max] for all-positive groups); per
row a search of ``d`` (and ``dmin``) minimising the weighted error of rounding the groups' scales (mins) to
``S``-bit integers; then alternating: each group tries the neighbouring integers against its true weighted
error, and ``d``/``dmin`` are refit by least squares to the integers and codes, a step kept only where it
lowers the row's error.  :meth:`IntDQFormat.refine` (GPTQ) refits ``d``/``dmin`` per row to fixed codes
under the full Hessian and moves the integers where the Hessian error says so, kept only where better.

Why these choices (RTN SQNR, ``/tmp`` scripts reported with the branch; SmolLM2 = the 12 rescaled tensors of
``bench/formats.py``): per-row super-scales cost 32/cols bpw (0.056 on 576 columns) where Q4_K's per-256
ones cost 0.125 and need cols % 256 == 0; on down_proj (1536 columns, the only shape Q4_K takes) one ``d``
per 48 groups loses 0.15 dB to Q4_K (24.37 vs 24.52 dB; the same fit with 256-wide super-blocks gives
24.52), on every SmolLM2 linear ``int4-g32-dq`` averages 24.50 dB at 4.42 bpw (iq4_nl 22.46 at 4.5, int4-g64
21.47 at 4.5).  Scale bits: 6 -> 7 -> 8 give 24.50 / 24.68 / 24.73 dB at 4.42 / 4.48 / 4.54 bpw; groups of
16 need fewer scale bits to stay near 4.5 bpw (``int4-g16-dq4``: 24.02 dB at 4.54).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .refit import row_errors
from .base import REGISTRY, FormatError, Grid, QTensor, Shape
from .gguf_common import fp16r, grid_error, level_values, nearest_fn, search_grid
from .packing import pack_bits
from .superscale import (DEFAULT_SCALE_BITS, RowSuperScaled, pack_row_ints, safe_div, super_search,
                         unpack_row_ints)

BITS = (2, 3, 4, 5, 6)
GROUPS = (16, 32, 64)
SCALE_BITS = (4, 5, 6, 7, 8)
#: Hessian-guided integer moves in :meth:`IntDQFormat.refine` (each followed by a d/dmin refit)
REFINE_STEPS = 2


def _nonneg(s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return s.clamp_min(0), o.clamp_max(0)


@dataclass(frozen=True)
class IntDQFormat(RowSuperScaled):
    """``bits``-bit codes per ``group`` columns; ``sbits``-bit scale and min per group; fp16 d, dmin per row."""

    bits: int = 4  # type: ignore[assignment]
    group: int = 32
    sbits: int = DEFAULT_SCALE_BITS
    PREFIX = "int"
    FAMILY = "double-quantized integer"
    ALLOWED = {"bits": BITS, "group": GROUPS, "sbits": SCALE_BITS}
    EXAMPLES = ("int4-g32-dq", "int3-g16-dq8")

    @property
    def levels(self) -> torch.Tensor:
        return torch.arange(1 << self.bits, dtype=torch.float32)

    # --- geometry -----------------------------------------------------------------------------
    def _part_shapes(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
        ng = self.ngroups(cols)
        sb = (ng * self.sbits + 7) // 8
        return {"weight_packed": (torch.uint8, (rows, ng * self.group * self.bits // 8)),
                "weight_scale": (torch.uint8, (rows, sb)), "weight_zero": (torch.uint8, (rows, sb)),
                "weight_super": (torch.float16, (rows, 2))}

    # --- fit ----------------------------------------------------------------------------------
    def _effective(self, d, dmin, sc, mn) -> tuple[torch.Tensor, torch.Tensor]:
        return d.unsqueeze(1) * sc.to(torch.float32), -(dmin.unsqueeze(1) * mn.to(torch.float32))

    def _group_errors(self, x, wt, d, dmin, sc, mn) -> torch.Tensor:
        return grid_error(x, wt, *self._effective(d, dmin, sc, mn), nearest_fn(self.levels.to(x.device)))

    def _choose_ints(self, x, wt, d, dmin, s_t, m_t):
        """Best integers (sc, m) per group among the neighbours of round(target / super-scale)."""
        hi = (1 << self.sbits) - 1
        base_sc, base_m = torch.round(safe_div(s_t, d.unsqueeze(1))), torch.round(safe_div(m_t, dmin.unsqueeze(1)))
        best = None
        for ds in (-1, 0, 1):
            for dm in (-1, 0, 1):
                sc, mn = torch.clamp(base_sc + ds, 0, hi), torch.clamp(base_m + dm, 0, hi)
                e = self._group_errors(x, wt, d, dmin, sc, mn)
                if best is None:
                    best = (sc, mn, e)
                else:
                    b = e < best[2]
                    best = (torch.where(b, sc, best[0]), torch.where(b, mn, best[1]), torch.where(b, e, best[2]))
        return best

    def _refit_super(self, x, wt, d, dmin, sc, mn):
        """Weighted least-squares (d, dmin) per row for fixed integers and the RTN codes, as fp16."""
        scale, offset = self._effective(d, dmin, sc, mn)
        q = level_values(x, scale, offset, nearest_fn(self.levels.to(x.device)))
        a = (sc.unsqueeze(2) * q).flatten(1)
        b = (-mn).unsqueeze(2).expand_as(x).flatten(1)
        xx, w1 = x.flatten(1), wt.flatten(1)
        d2, m2 = _solve2(a, b, xx, w1, d, dmin)
        return fp16r(d2), fp16r(m2)

    def _fit_rows(self, x: torch.Tensor, wt: torch.Tensor):
        R, J, G = x.shape
        hi = (1 << self.sbits) - 1
        levels = self.levels.to(x.device)
        flat, fw = x.reshape(-1, G), wt.reshape(-1, G)
        s, o = search_grid(flat, fw, levels, symmetric=False, rnd=_nonneg, nonpos_offset=True)
        # groups of positive values only: every searched range starts above 0, which the offset (<= 0) cannot;
        # the range [0, max] can, so it is a candidate too (a constant positive row, a lone padded column)
        lo = flat.amin(1).clamp_max(0)
        s0 = (flat.amax(1).clamp_min(0) - lo) / float(levels[-1])
        near = nearest_fn(levels)
        zero_better = grid_error(flat, fw, s0, lo, near) < grid_error(flat, fw, s, o, near)
        s, o = torch.where(zero_better, s0, s), torch.where(zero_better, lo, o)
        q2 = level_values(flat, s, o, near).square_()
        s_t, m_t = s.reshape(R, J), (-o).reshape(R, J)
        d = super_search(s_t, (fw * q2).sum(1).reshape(R, J), hi)
        dmin = super_search(m_t, fw.sum(1).reshape(R, J), hi)
        sc, mn, e = self._choose_ints(x, wt, d, dmin, s_t, m_t)
        err = e.sum(1)
        for _ in range(4):
            d2, dmin2 = self._refit_super(x, wt, d, dmin, sc, mn)
            sc2, mn2, e2 = self._choose_ints(x, wt, d2, dmin2, s_t, m_t)
            e_keep = self._group_errors(x, wt, d2, dmin2, sc, mn)
            keep = e_keep < e2
            sc2, mn2, e2 = torch.where(keep, sc, sc2), torch.where(keep, mn, mn2), torch.where(keep, e_keep, e2)
            err2 = e2.sum(1)
            better = err2 < err
            if not bool(better.any()):
                break
            b1 = better.unsqueeze(1)
            d, dmin, err = torch.where(better, d2, d), torch.where(better, dmin2, dmin), torch.where(better, err2, err)
            sc, mn = torch.where(b1, sc2, sc), torch.where(b1, mn2, mn)
        return d, dmin, sc, mn

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        d, dmin, sc, mn = self._fit_by_rows(w, importance)
        return self._grid(d, dmin, sc.to(torch.int64), mn.to(torch.int64))

    def _grid(self, d, dmin, sc, mn) -> Grid:
        scale, offset = self._effective(d, dmin, sc, mn)
        return Grid(scale, offset, self.levels.to(d.device), self.group, {"d": d, "dmin": dmin, "sc": sc, "m": mn})

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        return self.refine_measured(w, codes, grid, hessian)[0]

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor | None]:
        """A grid for the fixed ``codes`` under ``hessian``: least-squares fp16 ``d``/``dmin`` per row, then
        :data:`REFINE_STEPS` Hessian-guided moves of the integer scales/mins (each followed by that refit).
        Every row keeps whichever candidate has the smallest error (its old values when none is smaller, checked
        on the decoded values at the end, which give the change :meth:`Format.refine_measured` reports), so no row
        gets worse; ``grid`` itself when no row improves.

        Candidates are compared by the quadratic form of the row error in ``d``/``dmin``, whose coefficients
        the refit computes anyway: one ``rows x cols x cols`` product per candidate (``a H``, ``a`` = integer
        scale x level) where evaluating each error and the move gradients would take three more."""
        d, dmin, sc, mn = (grid.extra[k] for k in ("d", "dmin", "sc", "m"))
        f64 = torch.float64
        h = hessian.to(device=w.device, dtype=f64)
        h = (h + h.T) * 0.5
        z = grid.levels.to(device=w.device, dtype=f64)[codes]
        w64 = w.to(f64)
        cols = int(w.shape[1])
        g = torch.arange(cols, device=w.device) // self.group
        hw = w64 @ h
        whw = (w64 * hw).sum(1)
        hs = torch.zeros(self.ngroups(cols), cols, dtype=f64, device=w.device).index_add_(0, g, h)  # S H: group sums
        shs = torch.zeros(hs.shape[0], hs.shape[0], dtype=f64, device=w.device).index_add_(1, g, hs)

        def terms(c_sc: torch.Tensor, c_mn: torch.Tensor):
            """``a H``, ``b H`` and the normal-equation sums for v = d·a + dmin·b, a = sc·z, b = −m."""
            a, m64 = c_sc[:, g].to(f64) * z, c_mn.to(f64)
            ha, hb = a @ h, -(m64 @ hs)
            return ha, hb, ((a * ha).sum(1), (-m64[:, g] * ha).sum(1), ((m64 @ shs) * m64).sum(1),
                            (w64 * ha).sum(1), (w64 * hb).sum(1))

        def err(t, dd: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
            aa, ab, bb, aw, bw = t
            dd, mm = dd.to(f64), mm.to(f64)
            return whw - 2 * dd * aw - 2 * mm * bw + dd * dd * aa + 2 * dd * mm * ab + mm * mm * bb

        ha, hb, t = terms(sc, mn)
        best = [d, dmin, sc, mn, err(t, d, dmin)]
        best_ha, best_hb = ha, hb
        improved = False
        for step in range(1 + REFINE_STEPS):
            c_sc, c_mn = sc, mn
            if step:
                r = hw - best[0].to(f64).unsqueeze(1) * best_ha - best[1].to(f64).unsqueeze(1) * best_hb
                c_sc, c_mn = self._move_ints(r, z, h, *best[:4])
                ha, hb, t = terms(c_sc, c_mn)
            d2, m2 = _solve_normal(*t, best[0].to(f64), best[1].to(f64))
            d2, m2 = fp16r(d2.to(torch.float32)), fp16r(m2.to(torch.float32))
            e = err(t, d2, m2)
            take = e < best[4]
            if not bool(take.any()):
                break
            improved, t1 = True, take.unsqueeze(1)
            best = [torch.where(take, d2, best[0]), torch.where(take, m2, best[1]), torch.where(t1, c_sc, best[2]),
                    torch.where(t1, c_mn, best[3]), torch.where(take, e, best[4])]
            best_ha, best_hb = torch.where(t1, ha, best_ha), torch.where(t1, hb, best_hb)
        if not improved:
            return grid, None
        new = self._grid(*best[:4])
        change = row_errors(w, new.values(codes), hessian) - row_errors(w, grid.values(codes), hessian)
        ok = change < 0
        if not bool(ok.any()):
            return grid, None
        o1 = ok.unsqueeze(1)
        return self._grid(torch.where(ok, best[0], d), torch.where(ok, best[1], dmin),
                          torch.where(o1, best[2], sc), torch.where(o1, best[3], mn)), \
            torch.where(ok, change, torch.zeros_like(change))

    def _move_ints(self, r_full, z, h, d, dmin, sc, mn) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the step of (sc, m) in {-1, 0, 1}² that most lowers the row's Hessian error when taken
        alone (the exact change: gradient ``r_full`` = ``(w - v) H``, curvature from the group's diagonal
        block)."""
        rows, cols = (int(n) for n in r_full.shape)
        G, ng = self.group, self.ngroups(cols)
        pad = ng * G - cols
        d64, m64 = d.to(torch.float64).unsqueeze(1), dmin.to(torch.float64).unsqueeze(1)
        r = torch.nn.functional.pad(r_full, (0, pad)).reshape(rows, ng, G)
        zg = torch.nn.functional.pad(z, (0, pad)).reshape(rows, ng, G)
        idx = torch.arange(ng * G, device=h.device).reshape(ng, G)
        inside = (idx < cols).to(torch.float64)
        idx = idx.clamp_max(cols - 1)
        blocks = h[idx.unsqueeze(2), idx.unsqueeze(1)] * inside.unsqueeze(2) * inside.unsqueeze(1)  # (ng, G, G)
        zhz = torch.einsum("rgi,gij,rgj->rg", zg, blocks, zg)
        zh1 = torch.einsum("rgi,gi->rg", zg, blocks.sum(2))
        one = blocks.sum((1, 2)).unsqueeze(0)
        zr, r1 = (zg * r).sum(2), r.sum(2)
        hi = (1 << self.sbits) - 1
        best_e = torch.zeros_like(zr)
        out_sc, out_mn = sc.clone(), mn.clone()
        for ds in (-1, 0, 1):
            for dm in (-1, 0, 1):
                if ds == dm == 0:
                    continue
                a, b = ds * d64, -dm * m64
                de = -2 * (a * zr + b * r1) + a * a * zhz + 2 * a * b * zh1 + b * b * one
                ok = (sc + ds >= 0) & (sc + ds <= hi) & (mn + dm >= 0) & (mn + dm <= hi) & (de < best_e)
                best_e = torch.where(ok, de, best_e)
                out_sc, out_mn = torch.where(ok, sc + ds, out_sc), torch.where(ok, mn + dm, out_mn)
        return out_sc, out_mn

    # --- bytes --------------------------------------------------------------------------------
    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        """The four parts, built on the CPU (codes and grid are moved there first)."""
        shape = tuple(int(n) for n in shape)
        self.check_shape(shape)
        rows, cols = shape
        G, ng = self.group, self.ngroups(cols)
        full, grid = self._full_codes(codes, shape), grid.to("cpu")
        try:
            d, dmin = grid.extra["d"].to(torch.float32), grid.extra["dmin"].to(torch.float32)
            sc, mn = grid.extra["sc"].to(torch.int64), grid.extra["m"].to(torch.int64)
        except (KeyError, AttributeError) as exc:
            raise FormatError(f"{self.id}: grid lacks this format's super-scales ({exc})") from None
        if grid.group_size != G or tuple(d.shape) != (rows,) or tuple(dmin.shape) != (rows,) \
                or tuple(sc.shape) != (rows, ng) or tuple(mn.shape) != (rows, ng):
            raise FormatError(f"{self.id}: grid does not match shape {shape} ({ng} groups of {G} per row)")
        if not (torch.equal(fp16r(d), d) and torch.equal(fp16r(dmin), dmin)):
            raise FormatError(f"{self.id}: super-scales d/dmin are not finite fp16 values")
        hi = (1 << self.sbits) - 1
        if sc.numel() and (int(torch.minimum(sc, mn).min()) < 0 or int(torch.maximum(sc, mn).max()) > hi):
            raise FormatError(f"{self.id}: integer scales/mins outside 0..{hi}")
        scale, offset = self._effective(d, dmin, sc, mn)
        if not (torch.equal(scale, grid.scale) and torch.equal(offset, grid.offset)):
            raise FormatError(f"{self.id}: grid scales disagree with its super-scales and integer scales")
        spec = self._part_shapes(rows, cols)
        parts = {"weight_packed": pack_bits(full, self.bits).reshape(spec["weight_packed"][1]),
                 "weight_scale": pack_row_ints(sc, self.sbits), "weight_zero": pack_row_ints(mn, self.sbits),
                 "weight_super": torch.stack([d, dmin], 1).to(torch.float16).contiguous()}
        return QTensor(format=self.id, shape=shape, dtype=dtype, parts=parts)

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """Codes (rows, cols) and the grid :meth:`fit` would build (``d``, ``dmin``, ``sc``, ``m`` in ``extra``),
        on the CPU."""
        ng, sup = self._stored(q)
        sc = unpack_row_ints(q.parts["weight_scale"].cpu(), ng, self.sbits)
        mn = unpack_row_ints(q.parts["weight_zero"].cpu(), ng, self.sbits)
        return self._stored_codes(q), self._grid(sup[:, 0].contiguous(), sup[:, 1].contiguous(), sc, mn)

    def decode(self, q: QTensor) -> torch.Tensor:
        codes, grid = self.unpack(q)
        return grid.values(codes)

    learns_scales = True

    def with_scales(self, grid: Grid, scale: torch.Tensor, offset: torch.Tensor) -> Grid:
        """Integer scales ``clamp(round(scale / d), 0, 2^S - 1)`` and mins ``clamp(round(-offset / dmin), 0,
        2^S - 1)`` under fp16 super-scales: per row the grid's own ``d`` (``dmin``) or, where that represents
        the learned values with a smaller squared error, the best of :func:`super_search`'s candidates fitted
        to them.  Where a super-scale is 0 and no candidate is better the old integers stay.  Identity on the
        grid's own scales/offsets."""
        try:
            d0, dmin0, sc0, mn0 = (grid.extra[k] for k in ("d", "dmin", "sc", "m"))
        except KeyError as exc:
            raise FormatError(f"{self.id}: grid lacks this format's super-scales ({exc})") from None
        hi = (1 << self.sbits) - 1
        dev = grid.scale.device
        d, sc = _requantize(scale.detach().to(dev, torch.float32), d0.to(dev, torch.float32), sc0.to(dev), hi)
        dmin, mn = _requantize(-offset.detach().to(dev, torch.float32), dmin0.to(dev, torch.float32), mn0.to(dev),
                               hi)
        g = self._grid(d, dmin, sc, mn)
        return Grid(g.scale, g.offset, grid.levels, grid.group_size, {**grid.extra, **g.extra}, grid.set_index,
                    grid.exact_mask, grid.exact_values)


def _requantize(vals: torch.Tensor, d: torch.Tensor, ints: torch.Tensor, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 super-scales (R,) and integers (R, ng) in ``0..hi`` nearest the learned values ``vals`` (R, ng):
    ``clamp(round(vals / d), 0, hi)`` under the current ``d`` (old ``ints`` where ``d`` is 0), replaced per row
    by :func:`super_search`'s choice (fitted to ``max(vals, 0)``) when that has a strictly smaller squared
    error."""
    vals = torch.nan_to_num(vals, nan=0.0).clamp(-3e38, 3e38)
    keep = torch.where(d.unsqueeze(1) == 0, ints.to(torch.float32),
                       torch.clamp(torch.round(safe_div(vals, d.unsqueeze(1))), 0, hi))
    pos = vals.clamp_min(0)
    cand = super_search(pos, torch.ones_like(pos), hi)
    ints_c = torch.clamp(torch.round(safe_div(vals, cand.unsqueeze(1))), 0, hi)
    take = _sq_err(vals, cand, ints_c) < _sq_err(vals, d, keep)
    return torch.where(take, cand, d), torch.where(take.unsqueeze(1), ints_c, keep).to(torch.int64)


def _sq_err(vals: torch.Tensor, d: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
    """``Σ_g (vals - d·ints)²`` per row, in float64 (learned values may be huge)."""
    return ((vals.to(torch.float64) - d.to(torch.float64).unsqueeze(1) * ints.to(torch.float64)) ** 2).sum(1)


def _solve_normal(saa, sab, sbb, sxa, sxb, d0, m0) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, dmin) from the 2x2 normal equations; d alone (dmin kept) where singular, old values where that is too."""
    det = saa * sbb - sab * sab
    ok = det > 1e-9 * (saa * sbb).clamp_min(1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    d2 = torch.where(ok, (sxa * sbb - sxb * sab) / safe, d0)
    m2 = torch.where(ok, (saa * sxb - sab * sxa) / safe, m0)
    alone = ~ok & (saa > 0)
    d2 = torch.where(alone, (sxa - m0 * sab) / torch.where(alone, saa, torch.ones_like(saa)), d2)
    return d2, m2


def _solve2(a, b, x, w1, d0, m0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares ``x ≈ d·a + dmin·b`` per row (diagonal weights ``w1``)."""
    wa, wb = w1 * a, w1 * b
    return _solve_normal((wa * a).sum(1), (wa * b).sum(1), (wb * b).sum(1), (wa * x).sum(1), (wb * x).sum(1), d0, m0)


def parse_int_dq(format_id: str) -> IntDQFormat | None:
    """``int4-g32-dq`` / ``int3-g16-dq8`` -> :class:`IntDQFormat`; ids without ``-dq`` -> None."""
    return IntDQFormat.parse(format_id)  # type: ignore[return-value]


REGISTRY.register("int-dq", parse_int_dq, examples=["int4-g32-dq", "int3-g16-dq", "int5-g32-dq", "int4-g32-dq8"])

__all__ = ["IntDQFormat", "parse_int_dq", "BITS", "GROUPS", "SCALE_BITS"]
