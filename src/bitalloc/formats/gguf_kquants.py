"""The 256-wide GGUF K-quants Q6_K, Q5_K, Q4_K, Q3_K, Q2_K, bit-exact with llama.cpp.

A super-block of 256 elements has fp16 super-scales (``d``, and ``dmin`` for the affine types) and
integer sub-scales per sub-block of 16 or 32 elements:

======  ====  ===============================================  ===================================  =====
type    sub   value                                            bytes of one block                   size
======  ====  ===============================================  ===================================  =====
q6_k    16    (d*sc) * (u - 32),  sc int8, u 0..63             ql[128] qh[64] scales[16] d          210
q5_k    32    (d*sc) * u - dmin*m, sc, m 0..63, u 0..31        d dmin scales[12] qh[32] qs[128]     176
q4_k    32    (d*sc) * u - dmin*m, sc, m 0..63, u 0..15        d dmin scales[12] qs[128]            144
q3_k    16    (d*sc) * (u - 4),   sc -32..31, u 0..7           hmask[32] qs[64] scales[12] d        110
q2_k    16    (d*sc) * u - dmin*m, sc, m 0..15, u 0..3         scales[16] qs[64] d dmin             84
======  ====  ===============================================  ===================================  =====

The Grid's group is the sub-block; its ``scale`` = fp32(d*sc) and ``offset`` = -fp32(dmin*m) are the
effective values exactly as the decoder computes them, so ``grid.values(codes)`` equals the decode.  The
integer sub-scales and super-scales are in ``grid.extra`` (``d``, ``dmin``: (rows, cols/256) float32;
``sc``, ``m``: (rows, cols/sub) int64).

Fitting: (1) a continuous importance-weighted scale/min search per sub-block
(:func:`.gguf_common.search_grid`); (2) a search over the fp16 super-scale(s) minimising the
weighted error of rounding the sub-scales to integers; (3) alternating refinement: every sub-block tries the
neighbouring integer sub-scales (and mins) against the true weighted error, then ``d`` (and ``dmin``) are
refitted by least squares given the integers and codes; a step is kept only where it lowers the error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .base import FormatError, Grid, QTensor, Shape
from .gguf_common import (GGUFFormat, bits_to_bytes, check_weights, element_weights, fp16_bytes,
                          fp16_from_bytes, fp16r, grid_error, level_values, nearest_fn,
                          search_grid)

QK_K = 256
KQUANT_TYPES = ("q6_k", "q5_k", "q4_k", "q3_k", "q2_k")


class KSpec(NamedTuple):
    sub: int  # sub-block length
    lmin: int  # level of code 0
    nlev: int  # number of levels
    sc_lo: int
    sc_hi: int
    m_hi: int  # 0 for the symmetric types (no mins)


_SPECS: dict[str, KSpec] = {
    "q6_k": KSpec(16, -32, 64, -128, 127, 0),
    "q5_k": KSpec(32, 0, 32, 0, 63, 63),
    "q4_k": KSpec(32, 0, 16, 0, 63, 63),
    "q3_k": KSpec(16, -4, 8, -32, 31, 0),
    "q2_k": KSpec(16, 0, 4, 0, 15, 15),
}


def _clamp_params(s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return s.clamp_min(0), o.clamp_max(0)


def _identity(s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return s, o


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _super_search(vals: torch.Tensor, wgt: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """fp16 super-scale d (S,) minimising Σ_j wgt·(vals - d·clamp(round(vals/d), lo, hi))² over candidates."""
    idx = vals.abs().argmax(1, keepdim=True)
    m = vals.gather(1, idx)  # (S, 1) signed largest sub-scale
    f = torch.linspace(0.7, 1.3, 31, device=vals.device)
    targets = [t for t in (lo, hi) if t != 0]
    cand = fp16r(torch.cat([_safe_div(m, t * f) for t in targets], dim=1))  # (S, K)
    ints = torch.clamp(torch.round(_safe_div(vals.unsqueeze(1), cand.unsqueeze(2))), lo, hi)
    err = (wgt.unsqueeze(1) * (vals.unsqueeze(1) - cand.unsqueeze(2) * ints) ** 2).sum(2)
    return cand.gather(1, err.argmin(1, keepdim=True)).squeeze(1)


@dataclass(frozen=True)
class GGUFKQuant(GGUFFormat):
    """A 256-wide GGUF K-quant (``q6_k q5_k q4_k q3_k q2_k``)."""

    #: llama.cpp's CPU kernels round the activations to Q8_K (one scale per 256 values)
    activation_rounding = "q8_k"

    @classmethod
    def _specs(cls) -> dict:
        return _SPECS

    @property
    def levels(self) -> torch.Tensor:
        sp = self.spec
        return torch.arange(sp.lmin, sp.lmin + sp.nlev, dtype=torch.float32)

    @property
    def affine(self) -> bool:
        return self.spec.m_hi > 0

    # --- fit ----------------------------------------------------------------------------------------------
    def _sub_errors(self, x, wt, scale, offset):
        """Weighted RTN error (S, J) of sub-blocks x (S, J, B) for effective scale/offset (S, J)."""
        return grid_error(x, wt, scale, offset, nearest_fn(self.levels.to(x.device)))

    def _effective(self, d, dmin, sc, mn):
        scale = d.unsqueeze(1) * sc.to(torch.float32)
        offset = -(dmin.unsqueeze(1) * mn.to(torch.float32)) if self.affine else torch.zeros_like(scale)
        return scale, offset

    def _choose_ints(self, x, wt, d, dmin, s_t, m_t):
        """Best integer (sc, m) per sub-block among the neighbours of round(target / super-scale)."""
        sp = self.spec
        base_sc = torch.round(_safe_div(s_t, d.unsqueeze(1)))
        base_m = torch.round(_safe_div(m_t, dmin.unsqueeze(1))) if self.affine else torch.zeros_like(s_t)
        deltas_m = (-1, 0, 1) if self.affine else (0,)
        best = None
        for ds in (-1, 0, 1):
            for dm in deltas_m:
                sc = torch.clamp(base_sc + ds, sp.sc_lo, sp.sc_hi)
                mn = torch.clamp(base_m + dm, 0, sp.m_hi)
                e = self._sub_errors(x, wt, *self._effective(d, dmin, sc, mn))
                if best is None:
                    best = [sc, mn, e]
                else:
                    better = e < best[2]
                    best = [torch.where(better, sc, best[0]), torch.where(better, mn, best[1]),
                            torch.where(better, e, best[2])]
        return best

    def _refit_super(self, x, wt, d, dmin, sc, mn):
        """Least-squares (d, dmin) given integer sub-scales and the RTN codes, rounded to fp16."""
        S, J, B = x.shape
        scale, offset = self._effective(d, dmin, sc, mn)
        q = level_values(x, scale, offset, nearest_fn(self.levels.to(x.device)))
        a = (sc.unsqueeze(2) * q).reshape(S, -1)
        xx = x.reshape(S, -1)
        w1 = torch.ones_like(xx) if wt is None else wt.reshape(S, -1)
        saa, sxa = (w1 * a * a).sum(1), (w1 * a * xx).sum(1)
        if not self.affine:
            return fp16r(torch.where(saa > 0, _safe_div(sxa, saa), d)), dmin
        b = (-mn).unsqueeze(2).expand(S, J, B).reshape(S, -1)
        sbb, sab, sxb = (w1 * b * b).sum(1), (w1 * a * b).sum(1), (w1 * b * xx).sum(1)
        det = saa * sbb - sab * sab
        ok = det > 1e-9 * (saa * sbb).clamp_min(1e-30)
        safe = torch.where(ok, det, torch.ones_like(det))
        d2 = torch.where(ok, (sxa * sbb - sxb * sab) / safe, d)
        m2 = torch.where(ok, (saa * sxb - sab * sxa) / safe, dmin)
        bad = ok & ((d2 < 0) | (m2 < 0))
        return fp16r(torch.where(bad, d, d2)), fp16r(torch.where(bad, dmin, m2))

    def _fit_chunk(self, x, wt):
        sp = self.spec
        S, J, B = x.shape
        levels = self.levels.to(x.device)
        flat = x.reshape(-1, B)
        fw = None if wt is None else wt.reshape(-1, B)
        if self.affine:
            s, o = search_grid(flat, fw, levels, symmetric=False, rnd=_clamp_params, nonpos_offset=True)
        else:
            s, o = search_grid(flat, fw, levels, symmetric=True, rnd=_identity)
        q2 = level_values(flat, s, o, nearest_fn(levels)).square_()
        s_t, m_t = s.reshape(S, J), (-o).reshape(S, J)
        wq = q2.sum(1) if fw is None else (fw * q2).sum(1)
        d = _super_search(s_t, wq.reshape(S, J), sp.sc_lo, sp.sc_hi)
        if self.affine:
            ws = torch.full((S * J,), float(B), device=x.device) if fw is None else fw.sum(1)
            dmin = _super_search(m_t, ws.reshape(S, J), 0, sp.m_hi)
        else:
            dmin = torch.zeros_like(d)
        sc, mn, e = self._choose_ints(x, wt, d, dmin, s_t, m_t)
        err = e.sum(1)
        for _ in range(3):
            d2, dmin2 = self._refit_super(x, wt, d, dmin, sc, mn)
            sc2, mn2, e2 = self._choose_ints(x, wt, d2, dmin2, s_t, m_t)
            # also keep the current integers under the new super-scales
            e_keep = self._sub_errors(x, wt, *self._effective(d2, dmin2, sc, mn))
            keep = e_keep < e2
            sc2, mn2, e2 = torch.where(keep, sc, sc2), torch.where(keep, mn, mn2), torch.where(keep, e_keep, e2)
            err2 = e2.sum(1)
            better = err2 < err
            b1 = better.unsqueeze(1)
            d, dmin = torch.where(better, d2, d), torch.where(better, dmin2, dmin)
            sc, mn, err = torch.where(b1, sc2, sc), torch.where(b1, mn2, mn), torch.where(better, err2, err)
            if not bool(better.any()):
                break
        return d, dmin, sc, mn

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        w = check_weights(w, self.id)
        self.check_shape(tuple(w.shape))
        rows, cols = w.shape
        imp = element_weights(importance, (rows, cols))
        B = self.spec.sub
        J = QK_K // B
        x = w.reshape(-1, J, B)
        wt = None if imp is None else imp.reshape(-1, J, B)
        nsup = x.shape[0]
        d = torch.empty(nsup, device=w.device)
        dmin = torch.empty(nsup, device=w.device)
        sc = torch.empty(nsup, J, device=w.device)
        mn = torch.empty(nsup, J, device=w.device)
        step = max(1, (1 << 20) // QK_K)
        for a in range(0, nsup, step):
            z = slice(a, min(nsup, a + step))
            d[z], dmin[z], sc[z], mn[z] = self._fit_chunk(x[z], None if wt is None else wt[z])
        scale, offset = self._effective(d, dmin, sc, mn)
        extra = {"d": d.reshape(rows, -1), "dmin": dmin.reshape(rows, -1),
                 "sc": sc.to(torch.int64).reshape(rows, -1), "m": mn.to(torch.int64).reshape(rows, -1)}
        return Grid(scale.reshape(rows, -1), offset.reshape(rows, -1), self.levels.to(w.device), B, extra)

    # --- bytes --------------------------------------------------------------------------------------------
    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        """The raw llama.cpp blocks, built on the CPU (codes and grid are moved there first)."""
        sp = self.spec
        codes = self.check_codes(codes.cpu(), shape, sp.nlev)
        grid = grid.to("cpu")
        rows, cols = int(shape[0]), int(shape[1])
        try:
            d = grid.extra["d"].to(torch.float32).reshape(-1)
            dmin = grid.extra["dmin"].to(torch.float32).reshape(-1)
            sc = grid.extra["sc"].to(torch.int64).reshape(d.numel(), -1)
            mn = grid.extra["m"].to(torch.int64).reshape(d.numel(), -1)
        except (KeyError, RuntimeError, AttributeError) as exc:
            raise FormatError(f"{self.id}: grid lacks this type's super-scales ({exc})") from None
        J = QK_K // sp.sub
        if grid.group_size != sp.sub or d.numel() != rows * cols // QK_K or sc.shape[1] != J:
            raise FormatError(f"{self.id}: grid does not match shape {tuple(shape)}")
        if not torch.equal(fp16r(d), d) or not torch.equal(fp16r(dmin), dmin):
            raise FormatError(f"{self.id}: super-scales are not fp16 values")
        if int(sc.min()) < sp.sc_lo or int(sc.max()) > sp.sc_hi or int(mn.min()) < 0 or int(mn.max()) > sp.m_hi:
            raise FormatError(f"{self.id}: integer sub-scales out of range")
        scale, offset = self._effective(d, dmin, sc, mn)
        if not (torch.equal(scale.reshape(rows, -1), grid.scale) and torch.equal(offset.reshape(rows, -1),
                                                                                  grid.offset)):
            raise FormatError(f"{self.id}: grid scales disagree with its super-scales and sub-scales")
        u = codes.reshape(-1, QK_K)
        return self.packed(_PACK[self.name](u, d.reshape(-1, 1), dmin.reshape(-1, 1), sc, mn), shape, dtype)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        u, d, dmin, sc, mn = _UNPACK[self.name](b)
        n = b.shape[0]
        sp = self.spec
        dl = (d * sc.to(torch.float32)).reshape(n, -1, 1)
        qv = (u.to(torch.int32) + sp.lmin).to(torch.float32).reshape(n, -1, sp.sub)
        out = dl * qv
        if self.affine:
            out = out - (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
        return out.reshape(n, self.block_size)

    # --- recovery -----------------------------------------------------------------------------------------
    learns_scales = True

    def _grid(self, rows: int, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor) -> Grid:
        """The grid :meth:`fit` builds from super-scales ``d``, ``dmin`` (S,) and integers ``sc``, ``m`` (S, J)."""
        scale, offset = self._effective(d, dmin, sc, mn)
        extra = {"d": d.reshape(rows, -1), "dmin": dmin.reshape(rows, -1),
                 "sc": sc.to(torch.int64).reshape(rows, -1), "m": mn.to(torch.int64).reshape(rows, -1)}
        return Grid(scale.reshape(rows, -1), offset.reshape(rows, -1), self.levels.to(d.device), self.spec.sub,
                    extra)

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """Codes (rows, cols) and the grid :meth:`fit` would build (effective sub-block scale/offset, the
        super-scales and integer sub-scales in ``extra``)."""
        rows, cols = int(q.shape[0]), int(q.shape[1])
        u, d, dmin, sc, mn = _UNPACK[self.name](self.exact_blocks(q))
        return u.reshape(rows, cols), self._grid(rows, d.reshape(-1), dmin.reshape(-1), sc, mn)

    def with_scales(self, grid: Grid, scale: torch.Tensor, offset: torch.Tensor) -> Grid:
        """Integer sub-scales ``clamp(round(scale / d), sc_lo, sc_hi)`` (and mins ``clamp(round(-offset / dmin),
        0, m_hi)``) under fp16 super-scales: per super-block the grid's own ``d`` (``dmin``) or, where that
        represents the learned values with a smaller squared error, the best of :func:`_super_search`'s
        candidates fitted to them (so learned scales beyond ``d · sc_hi`` are not clipped).  Where a super-scale
        is 0 and no candidate is better the old integers stay.  Identity on the grid's own scales/offsets."""
        sp = self.spec
        try:
            d0, dmin0 = grid.extra["d"], grid.extra["dmin"]
            sc0, mn0 = grid.extra["sc"], grid.extra["m"]
        except KeyError as exc:
            raise FormatError(f"{self.id}: grid lacks this type's super-scales ({exc})") from None
        rows = int(grid.scale.shape[0])
        J = QK_K // sp.sub
        dev = grid.scale.device
        s_t = scale.detach().to(device=dev, dtype=torch.float32).reshape(-1, J)
        d, sc = _requantize(s_t, d0.to(dev, torch.float32).reshape(-1), sc0.to(dev).reshape(-1, J), sp.sc_lo,
                            sp.sc_hi)
        if self.affine:
            m_t = -offset.detach().to(device=dev, dtype=torch.float32).reshape(-1, J)
            dmin, mn = _requantize(m_t, dmin0.to(dev, torch.float32).reshape(-1), mn0.to(dev).reshape(-1, J), 0,
                                   sp.m_hi)
        else:
            dmin, mn = dmin0.to(dev, torch.float32).reshape(-1), mn0.to(dev).reshape(-1, J)
        g = self._grid(rows, d, dmin, sc, mn)
        return Grid(g.scale, g.offset, grid.levels, grid.group_size, {**grid.extra, **g.extra}, grid.set_index,
                    grid.exact_mask, grid.exact_values)


def _requantize(vals: torch.Tensor, d: torch.Tensor, ints: torch.Tensor, lo: int, hi: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 super-scales (S,) and integers (S, J) in ``lo..hi`` nearest the learned values ``vals`` (S, J):
    ``clamp(round(vals / d), lo, hi)`` under the current ``d`` (old ``ints`` where ``d`` is 0), replaced per
    super-block by :func:`_super_search`'s choice when that has a strictly smaller squared error."""
    vals = torch.nan_to_num(vals, nan=0.0).clamp(-3e38, 3e38)
    ints = ints.to(torch.int64)
    keep = torch.where(d.unsqueeze(1) == 0, ints.to(torch.float32),
                       torch.clamp(torch.round(_safe_div(vals, d.unsqueeze(1))), lo, hi))
    err_keep = _sq_err(vals, d, keep)
    cand = _super_search(vals, torch.ones_like(vals), lo, hi)
    ints_c = torch.clamp(torch.round(_safe_div(vals, cand.unsqueeze(1))), lo, hi)
    take = _sq_err(vals, cand, ints_c) < err_keep
    return torch.where(take, cand, d), torch.where(take.unsqueeze(1), ints_c, keep).to(torch.int64)


def _sq_err(vals: torch.Tensor, d: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
    """``Σ_j (vals - d·ints)²`` per super-block, in float64 (learned values may be huge)."""
    return ((vals.to(torch.float64) - d.to(torch.float64).unsqueeze(1) * ints.to(torch.float64)) ** 2).sum(1)


# --- per-type block layouts: pack (codes u (n,256), d, dmin (n,1), sc, m (n,J)) -> bytes; unpack inverse ---
def _scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K 12-byte 6-bit scales and mins (llama.cpp get_scale_min_k4 layout)."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], 1).to(torch.uint8)


def _unscales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.to(torch.int64)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0xF) | ((a >> 2) & 0x30)], 1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], 1)
    return sc, mn


def _crumbs(u: torch.Tensor) -> torch.Tensor:
    """2-bit fields: element h*128 + s*32 + l -> bits 2s of byte h*32 + l (Q2_K/Q3_K qs)."""
    v = (u & 3).reshape(-1, 2, 4, 32)
    return (v << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).reshape(-1, 64).to(torch.uint8)


def _uncrumbs(b: torch.Tensor) -> torch.Tensor:
    v = b.to(torch.int64).reshape(-1, 2, 1, 32) >> (2 * torch.arange(4)).reshape(1, 1, 4, 1)
    return (v & 3).reshape(-1, QK_K)


def _bitplane(u: torch.Tensor, shift: int) -> torch.Tensor:
    """bit ``shift`` of element b*32 + l -> bit b of byte l (Q3_K hmask, Q5_K qh)."""
    return bits_to_bytes(((u >> shift) & 1).reshape(-1, 8, 32).transpose(1, 2).reshape(-1, QK_K))


def _unbitplane(b: torch.Tensor) -> torch.Tensor:
    return ((b.to(torch.int64).unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)


def _nib64(u: torch.Tensor) -> torch.Tensor:
    """4-bit fields: element c*64 + h*32 + l -> nibble h of byte c*32 + l (Q4_K/Q5_K qs)."""
    v = (u & 0xF).reshape(-1, 4, 2, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)


def _unnib64(b: torch.Tensor) -> torch.Tensor:
    v = b.to(torch.int64).reshape(-1, 4, 1, 32) >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)
    return (v & 0xF).reshape(-1, QK_K)


def _pack_q2k(u, d, dmin, sc, mn):
    return torch.cat([(sc | (mn << 4)).to(torch.uint8), _crumbs(u), fp16_bytes(d), fp16_bytes(dmin)], 1)


def _unpack_q2k(b):
    s = b[:, :16].to(torch.int64)
    return _uncrumbs(b[:, 16:80]), fp16_from_bytes(b[:, 80:82]), fp16_from_bytes(b[:, 82:84]), s & 0xF, s >> 4


def _pack_q3k(u, d, dmin, sc, mn):
    s6 = sc + 32
    lo = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
    hi = ((s6 >> 4).reshape(-1, 4, 4) << (2 * torch.arange(4)).reshape(1, 4, 1)).sum(1)
    scales = torch.cat([lo, hi], 1).to(torch.uint8)
    return torch.cat([_bitplane(u, 2), _crumbs(u), scales, fp16_bytes(d)], 1)


def _unpack_q3k(b):
    u = _uncrumbs(b[:, 32:96]) | (_unbitplane(b[:, :32]) << 2)
    s = b[:, 96:108].to(torch.int64)
    lo = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], 1)
    hi = ((s[:, 8:12].unsqueeze(1) >> (2 * torch.arange(4)).reshape(1, 4, 1)) & 3).reshape(-1, 16)
    sc = (lo | (hi << 4)) - 32
    d = fp16_from_bytes(b[:, 108:110])
    return u, d, torch.zeros_like(d), sc, torch.zeros_like(sc)


def _pack_q4k(u, d, dmin, sc, mn):
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), _scales_k4(sc, mn), _nib64(u)], 1)


def _unpack_q4k(b):
    sc, mn = _unscales_k4(b[:, 4:16])
    return _unnib64(b[:, 16:144]), fp16_from_bytes(b[:, 0:2]), fp16_from_bytes(b[:, 2:4]), sc, mn


def _pack_q5k(u, d, dmin, sc, mn):
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), _scales_k4(sc, mn), _bitplane(u, 4), _nib64(u)], 1)


def _unpack_q5k(b):
    sc, mn = _unscales_k4(b[:, 4:16])
    u = _unnib64(b[:, 48:176]) | (_unbitplane(b[:, 16:48]) << 4)
    return u, fp16_from_bytes(b[:, 0:2]), fp16_from_bytes(b[:, 2:4]), sc, mn


def _pack_q6k(u, d, dmin, sc, mn):
    v = u.reshape(-1, 2, 2, 64)
    ql = ((v[:, :, 0] & 0xF) | ((v[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    h = (u >> 4).reshape(-1, 2, 4, 32)
    qh = (h << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).reshape(-1, 64)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), scales, fp16_bytes(d)], 1)


def _unpack_q6k(b):
    ql = b[:, :128].to(torch.int64).reshape(-1, 2, 1, 64) >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].to(torch.int64).reshape(-1, 2, 1, 32) >> (2 * torch.arange(4)).reshape(1, 1, 4, 1)
    u = (ql & 0xF).reshape(-1, QK_K) | ((qh & 3).reshape(-1, QK_K) << 4)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.int64)
    d = fp16_from_bytes(b[:, 208:210])
    return u, d, torch.zeros_like(d), sc, torch.zeros_like(sc)


_PACK = {"q2_k": _pack_q2k, "q3_k": _pack_q3k, "q4_k": _pack_q4k, "q5_k": _pack_q5k, "q6_k": _pack_q6k}
_UNPACK = {"q2_k": _unpack_q2k, "q3_k": _unpack_q3k, "q4_k": _unpack_q4k, "q5_k": _unpack_q5k, "q6_k": _unpack_q6k}

__all__ = ["GGUFKQuant", "KQUANT_TYPES", "KSpec", "QK_K"]
