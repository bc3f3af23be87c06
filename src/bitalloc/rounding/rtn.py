"""Round-to-nearest and the scale/clipping search shared by every affine grid format.

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
from ..formats.base import Grid

RoundParams = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

FP16_MAX = 65504.0
#: Elements per chunk of groups in the search (cache-sized: faster than big chunks, bounded memory).
_CHUNK_ELEMS = 1 << 19


def rtn_round(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid point for every element: (codes, values)."""
    return grid.snap(w)


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


def _check(w: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None):
    if w.dim() != 2:
        raise ValueError(f"expected groups as a 2-D tensor (n, g), got shape {tuple(w.shape)}")
    w = w.to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise NumericsError(f"weights of shape {tuple(w.shape)} hold NaN/Inf values")
    levels = levels.to(device=w.device, dtype=torch.float32).reshape(-1)
    if levels.numel() < 2 or not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError("levels must be a strictly increasing codebook of at least 2 values")
    if importance is not None:
        importance = torch.broadcast_to(importance.to(torch.float32), w.shape)
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
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
        ok = sxx > 0
        return torch.where(ok, sxy / torch.where(ok, sxx, torch.ones_like(sxx)), scale), offset
    if imp is None:
        sw = torch.full_like(sxx, w.shape[1])
        sy = w.sum(1)
    else:
        sw, sy = imp.sum(1), (imp * w).sum(1)
    sx = ix.sum(1)
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
    if not bool(nz.all()):  # zero scale: every element decodes to the offset
        z = ~nz
        dz = (w[z] - o[z].unsqueeze(1)).square_()
        e[z] = (dz if imp is None else dz.mul_(imp[z])).sum(1)
    return e, q


def _search_chunk(w, levels, imp, symmetric, rp, ratios, refine, consecutive):
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
    for a in range(0, n, rows):
        b = min(n, a + rows)
        scale[a:b], offset[a:b] = _search_chunk(
            w[a:b], levels, None if imp is None else imp[a:b], symmetric, rp, ratios, refine, consecutive
        )
    return scale, offset


__all__ = [
    "rtn_round", "search_affine", "minmax_affine", "snap_affine", "affine_error", "round_fp16", "RoundParams",
    "FP16_MAX",
]
