"""The scale/clipping search shared by every affine grid format (each format's ``fit`` calls it).

A group of ``g`` weights ``w`` is represented as ``scale * levels[code] + offset``.  The functions here work
on a batch of ``n`` independent groups at once, ``w`` of shape ``(n, g)``, and return ``scale`` and
``offset`` of shape ``(n,)``.  ``levels`` is any sorted codebook (uniform integers for int/Q4_0-like
formats, non-uniform for IQ4_NL-like ones).

* :func:`minmax_affine` — the baseline: the smallest range covering every element (no clipping).
  Symmetric (``offset = 0``) picks the sign of the scale that maps the largest-magnitude element onto the
  longer side of the codebook (so ``[-8, 7]`` covers ``max|w|`` exactly, like GGUF Q4_0); scales may
  therefore be negative.
* :func:`search_affine` — minimises ``Σ importance · (w - ŵ)²`` per group over clipped ranges
  ``ratio · minmax`` for ``ratio`` in ``[min_ratio, 1]`` and the min-max range itself, each followed by
  weighted least-squares refits of scale/offset given its codes.  Errors are always compared after
  ``round_params`` (what is stored, fp16 by default).  For consecutive-integer codebooks the candidates are
  scored with a fast ``round + clamp`` path and the winner is re-checked against min-max with exactly the
  arithmetic of :meth:`Grid.snap` (other codebooks always use that arithmetic), so the result is never
  worse than min-max RTN for any group, hence any row.

Rows are processed in chunks so temporaries stay bounded (a 49152 x 576 embedding included).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import NumericsError

RoundParams = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

FP16_MAX = 65504.0
#: Elements per chunk of groups in the search (cache-sized: faster than big chunks, bounded memory).
_CHUNK_ELEMS = 1 << 19
#: Elements per piece of a chunk in the integer search: with the buffers reused, the per-candidate (n,) vector
#: ops (fp16 rounding, where) dominate small pieces, so whole chunks measured fastest on 2 cores (1<<16: 1.6x,
#: 1<<17: 1.3x, 1<<18: 1.1x slower); smaller pieces give the same bytes (the alignment below).
_CACHE_ELEMS = 1 << 19
#: Pieces start at multiples of this many rows within a chunk (see search_affine).
_ALIGN = 64


def round_fp16(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round scale and offset to the nearest fp16 values (as float32), clamped to ±65504 so never infinite.

    A scale that would overflow fp16 is clamped: the group then clips its extreme values instead of
    producing inf/NaN.  Scales below the fp16 subnormal range round to 0 (the group decodes to its offset).
    """
    s = scale.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    o = offset.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    return s, o


def _identity(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale, offset


def snap_affine(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest level per element of ``w`` (n, g) for per-group ``scale``/``offset`` (n,): (codes, values).

    Bit-for-bit the arithmetic of :meth:`Grid.snap` (zero scale -> the level nearest 0).
    """
    s = scale.unsqueeze(1)
    o = offset.unsqueeze(1)
    zero = s == 0
    u = torch.where(zero, torch.zeros_like(w), (w - o) / torch.where(zero, torch.ones_like(s), s))
    mids = (levels[1:] + levels[:-1]) * 0.5
    codes = torch.searchsorted(mids, u.contiguous())
    return codes, s * levels[codes] + o


def affine_error(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group ``Σ importance · (w - ŵ)²`` (n,) of RTN onto the given grid."""
    _, v = snap_affine(w, scale, offset, levels)
    d = (w - v) ** 2
    return (d if importance is None else d * importance).sum(dim=1)


def _minmax_raw(w: torch.Tensor, levels: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lmin, lmax = float(levels[0]), float(levels[-1])
    wmin = w.amin(dim=1)
    wmax = w.amax(dim=1)
    if not symmetric:
        scale = wmax / (lmax - lmin) - wmin / (lmax - lmin)  # divided first: no overflow near float32 max
        return scale, wmin - scale * lmin
    zero = torch.zeros_like(wmax)
    pos_hi, neg_lo = wmax.clamp_min(0), (-wmin).clamp_min(0)  # magnitudes above / below zero
    # smallest |scale| covering [wmin, wmax] with a positive scale, and with a negative one
    s_pos = torch.maximum(pos_hi / lmax if lmax > 0 else torch.where(pos_hi > 0, torch.inf, zero),
                          neg_lo / -lmin if lmin < 0 else torch.where(neg_lo > 0, torch.inf, zero))
    s_neg = torch.maximum(pos_hi / -lmin if lmin < 0 else torch.where(pos_hi > 0, torch.inf, zero),
                          neg_lo / lmax if lmax > 0 else torch.where(neg_lo > 0, torch.inf, zero))
    scale = torch.where(s_pos <= s_neg, s_pos, -s_neg)
    return scale, zero


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())`` in one pass without temporaries: min and max propagate NaN.

    (``torch.isfinite`` is composite on CPU: ``(t == t) * (t.abs() != inf)``, three full-size temporaries.)"""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def finite_non_negative(t: torch.Tensor) -> bool:
    """``isfinite(t).all() and not (t < 0).any()`` in one pass (a NaN minimum fails ``>= 0``)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo >= 0) and bool(torch.isfinite(hi))


def _check(w: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None):
    if w.dim() != 2:
        raise ValueError(f"expected groups as a 2-D tensor (n, g), got shape {tuple(w.shape)}")
    w = w.to(torch.float32)
    if not all_finite(w):
        raise NumericsError(f"weights of shape {tuple(w.shape)} hold NaN/Inf values")
    levels = levels.to(device=w.device, dtype=torch.float32).reshape(-1)
    if levels.numel() < 2 or not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError("levels must be a strictly increasing codebook of at least 2 values")
    if importance is not None:
        importance = torch.broadcast_to(importance.to(torch.float32), w.shape)
        if not finite_non_negative(importance):
            raise NumericsError("importance must be finite and non-negative")
    return w, levels, importance


def minmax_affine(
    w: torch.Tensor, levels: torch.Tensor, *, symmetric: bool, round_params: RoundParams | None = round_fp16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (no clipping) scale and offset per group of ``w`` (n, g), rounded by ``round_params``."""
    w, levels, _ = _check(w, levels, None)
    rp = round_params or _identity
    return rp(*_minmax_raw(w, levels, symmetric))


def _refit(w, x, imp, scale, offset, symmetric):
    """Weighted least-squares scale (and offset) for fixed level values ``x``; keeps the old value where singular."""
    ix = x if imp is None else imp * x
    sxx, sxy = (ix * x).sum(1), (ix * w).sum(1)
    if symmetric:
        return _solve_scale(sxx, sxy, scale), offset
    if imp is None:
        sw = torch.full_like(sxx, w.shape[1])
        sy = w.sum(1)
    else:
        sw, sy = imp.sum(1), (imp * w).sum(1)
    return _solve_affine(sw, sy, ix.sum(1), sxx, sxy, scale, offset)


def _solve_scale(sxx: torch.Tensor, sxy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The least-squares scale ``Σimp·x·w / Σimp·x²`` of a symmetric grid; the old one where ``Σimp·x² = 0``."""
    ok = sxx > 0
    return torch.where(ok, sxy / torch.where(ok, sxx, torch.ones_like(sxx)), scale)


def _solve_affine(sw: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor, sxx: torch.Tensor, sxy: torch.Tensor,
                  scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted least-squares scale and offset from the sums ``Σimp``, ``Σimp·w``, ``Σimp·x``, ``Σimp·x²``,
    ``Σimp·x·w``; the old ones where the system is singular."""
    det = sw * sxx - sx * sx
    ok = (det > 1e-9 * sw * sxx) & (sw > 0)
    s = (sw * sxy - sx * sy) / torch.where(ok, det, torch.ones_like(det))
    o = (sy - s * sx) / torch.where(sw > 0, sw, torch.ones_like(sw))
    return torch.where(ok, s, scale), torch.where(ok, o, offset)


def _consecutive(levels: torch.Tensor) -> bool:
    """True when ``levels`` are consecutive integers (int/Q-formats): nearest level is round + clamp."""
    return bool(torch.equal(levels, torch.arange(levels.numel(), dtype=torch.float32, device=levels.device)
                            + levels[0])) and float(
        levels[0]) == round(float(levels[0]))


def _candidate(w, s, o, levels, imp, consecutive):
    """(error (n,), level values (n, g)) of RTN onto ``s * levels + o``.

    The consecutive-integer path uses ``err = s² Σ imp (u - q)²`` with ``u = (w - o) / s`` (equal to the
    grid error up to float rounding; the final choice is re-checked with the exact grid arithmetic).
    """
    if not consecutive:
        codes, v = snap_affine(w, s, o, levels)
        d = (w - v).square_()
        return (d if imp is None else d.mul_(imp)).sum(1), levels[codes]
    nz = s != 0
    inv = torch.where(nz, 1.0 / torch.where(nz, s, torch.ones_like(s)), torch.zeros_like(s))
    u = (w - o.unsqueeze(1)).mul_(inv.unsqueeze(1))
    q = torch.round(u).clamp_(float(levels[0]), float(levels[-1]))
    d = u.sub_(q).square_()
    e = (d if imp is None else d.mul_(imp)).sum(1).mul_(s * s)
    return _zero_scale_errors(e, w, o, imp, nz), q


def _zero_scale_errors(e: torch.Tensor, w: torch.Tensor, o: torch.Tensor, imp: torch.Tensor | None,
                       nz: torch.Tensor) -> torch.Tensor:
    """``e`` with the groups of zero scale (``~nz``) given their true error: every element decodes to the offset."""
    if not bool(nz.all()):
        z = ~nz
        dz = (w[z] - o[z].unsqueeze(1)).square_()
        e[z] = (dz if imp is None else dz.mul_(imp[z])).sum(1)
    return e


def _search_chunk(w, levels, imp, symmetric, rp, ratios, refine, consecutive):
    """The generic search (any sorted codebook): every candidate through :func:`_candidate`."""
    s0, o0 = _minmax_raw(w, levels, symmetric)
    mm_s, mm_o = rp(s0, o0)
    best_s, best_o = mm_s, mm_o
    best_e, q = _candidate(w, best_s, best_o, levels, imp, consecutive)
    mid = w.amax(1) * 0.5 + w.amin(1) * 0.5
    lmid = float(levels[0] + levels[-1]) * 0.5

    def consider(s, o):
        nonlocal best_s, best_o, best_e
        s, o = rp(s, o)
        e, q = _candidate(w, s, o, levels, imp, consecutive)
        better = e < best_e
        best_s, best_o = torch.where(better, s, best_s), torch.where(better, o, best_o)
        best_e = torch.where(better, e, best_e)
        return s, o, q

    for i in range(len(ratios) + 1):
        if i == 0:  # min-max itself, then its refits
            s, o = mm_s, mm_o
        else:  # clip the min-max range (around the group's midpoint when asymmetric)
            s = s0 * ratios[i - 1]
            s, o, q = consider(s, o0 if symmetric else mid - s * lmid)
        for _ in range(refine):  # weighted least-squares refit of scale/offset given these codes
            s, o, q = consider(*_refit(w, q, imp, s, o, symmetric))
    if consecutive:  # re-check against min-max with exactly the Grid.snap arithmetic
        worse = affine_error(w, best_s, best_o, levels, imp) > affine_error(w, mm_s, mm_o, levels, imp)
        best_s, best_o = torch.where(worse, mm_s, best_s), torch.where(worse, mm_o, best_o)
    return best_s, best_o


class _IntSearch:
    """:func:`_search_chunk` for consecutive-integer codebooks, bit for bit, with less work per candidate.

    The same candidates in the same order, each scored by the same float operations as :func:`_candidate`
    and :func:`_refit` (so the same winner, byte for byte), but: written into three preallocated
    (rows, g) buffers (no temporaries: under :func:`bitalloc.memory.return_large_frees` each one was a fresh
    ``mmap`` and its page faults), the refit's per-group constants ``Σimp`` and ``Σimp·w`` computed once per
    chunk instead of once per refit, ``w - 0`` skipped for symmetric grids, and the final re-check against
    min-max done with ``ceil(u - 0.5)`` instead of ``searchsorted`` + a gather (the same level for every
    ``u``, ties included; see :meth:`_grid_error`).
    """

    def __init__(self, rows: int, g: int, lo: float, hi: float, imp: bool,
                 device: torch.device | str = "cpu") -> None:
        self.lo, self.hi = lo, hi
        self.u = torch.empty(rows, g, dtype=torch.float32, device=device)
        self.q = torch.empty(rows, g, dtype=torch.float32, device=device)
        self.t = torch.empty(rows, g, dtype=torch.float32, device=device) if imp else None

    def candidate(self, w, s, o, imp, sym_zero):
        """Error (n,) of RTN onto ``s * levels + o``: exactly ``_candidate``'s (the codes stay in ``self.q``)."""
        n = w.shape[0]
        u, q = self.u[:n], self.q[:n]
        nz = s != 0
        inv = torch.where(nz, 1.0 / torch.where(nz, s, torch.ones_like(s)), torch.zeros_like(s))
        if sym_zero:  # w - (+0) == w exactly
            torch.mul(w, inv.unsqueeze(1), out=u)
        else:
            torch.sub(w, o.unsqueeze(1), out=u).mul_(inv.unsqueeze(1))
        torch.round(u, out=q).clamp_(self.lo, self.hi)
        d = u.sub_(q).square_()
        e = (d if imp is None else d.mul_(imp)).sum(1).mul_(s * s)
        return _zero_scale_errors(e, w, o, imp, nz)

    def refit(self, w, imp, sw, sy, scale, offset, symmetric):
        """Exactly ``_refit(w, self.q, imp, scale, offset, symmetric)`` with ``Σimp``, ``Σimp·w`` given."""
        n = w.shape[0]
        x, u = self.q[:n], self.u[:n]
        ix = x if imp is None else torch.mul(imp, x, out=self.t[:n])
        sxx = torch.mul(ix, x, out=u).sum(1)
        sxy = torch.mul(ix, w, out=u).sum(1)
        if symmetric:
            return _solve_scale(sxx, sxy, scale), offset
        return _solve_affine(sw, sy, ix.sum(1), sxx, sxy, scale, offset)

    def grid_error(self, w, s, o, levels, imp):
        """Exactly ``affine_error(w, s, o, levels, imp)`` (the :meth:`Grid.snap` arithmetic).

        ``searchsorted(mids, u)`` with ``mids = k + 0.5`` picks the level ``ceil(u - 0.5)`` (clamped): a tie
        ``u = k + 0.5`` goes to ``k`` as there, and ``u - 0.5`` is exact for ``0.25 <= |u| < 2^23`` (below
        0.25 its rounding cannot cross an integer; above, the clamp decides).  The level values are then the
        codebook's (``levels[code] = lo + code``); only the sign of a zero level may differ, which the
        square removes."""
        if not (all_finite(s) and all_finite(o)):
            return affine_error(w, s, o, levels, imp)
        n = w.shape[0]
        u = self.u[:n]
        zero = s == 0
        torch.sub(w, o.unsqueeze(1), out=u).div_(torch.where(zero, torch.ones_like(s), s).unsqueeze(1))
        if bool(zero.any()):
            u.masked_fill_(zero.unsqueeze(1), 0.0)
        v = u.sub_(0.5).ceil_().clamp_(self.lo, self.hi).mul_(s.unsqueeze(1)).add_(o.unsqueeze(1))
        d = torch.sub(w, v, out=u).square_()
        return (d if imp is None else d.mul_(imp)).sum(1)

    def search(self, w, levels, imp, symmetric, rp, ratios, refine):
        s0, o0 = _minmax_raw(w, levels, symmetric)
        mm_s, mm_o = rp(s0, o0)
        if symmetric:
            sw = sy = None
        elif imp is None:
            sw, sy = torch.full_like(s0, w.shape[1]), w.sum(1)
        else:
            sw, sy = imp.sum(1), torch.mul(imp, w, out=self.t[: w.shape[0]]).sum(1)
        best_s, best_o = mm_s, mm_o
        best_e = self.candidate(w, best_s, best_o, imp, symmetric and bool((best_o == 0).all()))
        mid = w.amax(1) * 0.5 + w.amin(1) * 0.5
        lmid = float(levels[0] + levels[-1]) * 0.5

        def consider(s, o):
            nonlocal best_s, best_o, best_e
            s, o = rp(s, o)
            e = self.candidate(w, s, o, imp, symmetric and bool((o == 0).all()))
            better = e < best_e
            best_s, best_o = torch.where(better, s, best_s), torch.where(better, o, best_o)
            best_e = torch.where(better, e, best_e)
            return s, o

        for i in range(len(ratios) + 1):
            if i == 0:
                s, o = mm_s, mm_o
            else:
                s = s0 * ratios[i - 1]
                s, o = consider(s, o0 if symmetric else mid - s * lmid)
            for _ in range(refine):
                s, o = consider(*self.refit(w, imp, sw, sy, s, o, symmetric))
        worse = self.grid_error(w, best_s, best_o, levels, imp) > self.grid_error(w, mm_s, mm_o, levels, imp)
        return torch.where(worse, mm_s, best_s), torch.where(worse, mm_o, best_o)


def search_affine(
    w: torch.Tensor,
    levels: torch.Tensor,
    importance: torch.Tensor | None = None,
    *,
    symmetric: bool,
    round_params: RoundParams | None = round_fp16,
    steps: int = 12,
    min_ratio: float = 0.3,
    refine: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (n,) per group of ``w`` (n, g) minimising ``Σ importance·(w - ŵ)²`` after rounding.

    ``importance`` is ``(n, g)`` or broadcastable to it (e.g. ``(g,)``); None weighs every element 1.
    Candidates: min-max, then ``steps`` clip ratios evenly spaced in ``[min_ratio, 1)`` applied to the
    min-max range (around the group midpoint for asymmetric grids); each is followed by ``refine`` rounds
    of weighted least-squares refit of scale/offset given its codes.  ``round_params(scale, offset)`` maps
    raw parameters to stored ones (default fp16, clamped to ±65504; None keeps float32); candidates are
    compared after it.  Never worse than :func:`minmax_affine` (same ``round_params``) for any group.
    Cost: about ``(steps + 1) * (refine + 1)`` RTN passes over ``w``.
    """
    w, levels, imp = _check(w, levels, importance)
    if steps < 0 or refine < 0 or not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"need steps >= 0, refine >= 0 and 0 < min_ratio <= 1, got {steps}, {refine}, {min_ratio}")
    rp = round_params or _identity
    n, g = w.shape
    ratios = [1.0 - (1.0 - min_ratio) * (i + 1) / steps for i in range(steps)] if steps else []
    ratios = [r for r in ratios if r < 1.0]
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    offset = torch.empty(n, dtype=torch.float32, device=w.device)
    consecutive = _consecutive(levels)
    rows = max(1, _CHUNK_ELEMS // max(g, 1))
    if not consecutive:
        for a in range(0, n, rows):
            b = min(n, a + rows)
            scale[a:b], offset[a:b] = _search_chunk(
                w[a:b], levels, None if imp is None else imp[a:b], symmetric, rp, ratios, refine, consecutive
            )
        return scale, offset
    # cache-sized pieces of each chunk, starting at multiples of _ALIGN rows within it: the (n,) vector ops
    # then put every group in the same SIMD lane or scalar tail as the whole chunk did, so even the sign of
    # a zero scale (max/min/clamp of ±0) is the same as with one piece per chunk
    sub = max(_ALIGN, _CACHE_ELEMS // max(g, 1) // _ALIGN * _ALIGN)
    sub = min(sub, rows, n)
    search = _IntSearch(sub, g, float(levels[0]), float(levels[-1]), imp is not None, w.device)
    for a0 in range(0, n, rows):
        b0 = min(n, a0 + rows)
        for a in range(a0, b0, sub):
            b = min(b0, a + sub)
            scale[a:b], offset[a:b] = search.search(
                w[a:b], levels, None if imp is None else imp[a:b], symmetric, rp, ratios, refine
            )
    return scale, offset


__all__ = [
    "search_affine", "minmax_affine", "snap_affine", "affine_error", "round_fp16", "RoundParams",
    "FP16_MAX", "all_finite", "finite_non_negative",
]
