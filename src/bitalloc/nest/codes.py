"""Nested integer codes: one weight rounded at every depth ``k`` (bits), each depth's codes the top bits of the next.

Why this representation (the issue's choice between nested codes, residual stages and sign·low-rank blocks):
a residual stage needs its own scales, so a depth-``k`` prefix of ``s`` stages pays ``s`` sets of group scales;
sign·low-rank blocks (BitStack) cost a full bit per weight per block and approximate ``|W|`` only to rank ``r``.
Nested codes sharing one ``(step, low)`` pair per group pay the scales once, every prefix is *exactly* an
existing asymmetric integer format (``int{k}-g{G}``: runtimes and bitalloc's own writers load it unchanged), and a
prefix is ``k`` bit-planes: reading a small model reads ``k`` planes and nothing else.  ``bench/anysize.py``
compares the result with direct quantization and a BitStack baseline.

The grid of a group at depth ``k`` (of ``D``, the deepest): ``2^k`` bins of width ``d_k = step·2^(D−k)`` over
``[low, low + 2^D·step)``, each decoded at its midpoint, i.e. ``value = d_k·c + m_k`` with ``m_k = low + d_k/2``
and ``c ∈ [0, 2^k)``: bin ``c`` at depth ``k`` is bins ``2c`` and ``2c+1`` at depth ``k+1``, so a depth's codes
are the next depth's codes shifted right by one.  ``step`` and ``low`` are fp16 values, so every ``d_k`` is one
too and the prefix's scales and zeros are those of an ``int{k}`` tensor, stored without rounding.

Codes (:func:`nested_codes`): a GPTQ column loop with one error-feedback state per depth choosing one code path
per element for all depths at once, then coordinate descent on every depth's output error
(:mod:`bitalloc.nest.descent`); without a Hessian (a lookup-only embedding) every depth is the nearest bin, which
nests by construction.  The shallowest depths may decode their codes off the lattice, with their own scale and
zero per group (:mod:`bitalloc.nest.refit`); the lattice's range then scores them with their own best scale and
zero (:func:`nested_grid`'s ``free``) and, once the codes are known, the lattice is refit to the other depths'
(:func:`bitalloc.nest.refit.fit_lattice`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError, NumericsError
from ..formats.base import Grid
from ..formats.packing import pack_bits, unpack_bits
from ..rounding.gptq import GPTQFactor, gptq_factor
from .descent import DEPTH_EMPHASIS, descend_codes, relative_weights

#: Shallowest depth a nest offers (int2).
MIN_DEPTH = 2
#: Deepest depth a nest may store.
MAX_DEPTH = 8
FP16_MAX = 65504.0


def _fp16_step(h: torch.Tensor, up: bool) -> torch.Tensor:
    """The fp16 neighbour of the fp16 values ``h`` (float64 in, float64 out), above (``up``) or below."""
    h16 = h.to(torch.float16)
    return torch.nextafter(h16, torch.full_like(h16, float("inf") if up else float("-inf"))).to(torch.float64)


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value ≥ ``x`` (finite, within fp16's range), as float64."""
    h = x.to(torch.float16).to(torch.float64)
    return torch.where(h < x, _fp16_step(h, True), h)


def _fp16_floor(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value ≤ ``x`` (finite, within fp16's range), as float64."""
    h = x.to(torch.float16).to(torch.float64)
    return torch.where(h > x, _fp16_step(h, False), h)


def lattice(lo: torch.Tensor, hi: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, low)`` per group (fp16 values, as float32) for the range ``[lo, hi]`` at deepest depth ``depth``:
    ``low ≤ lo`` and ``low + 2^depth·step ≥ hi``."""
    lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
    if bool((lo64.abs() > FP16_MAX).any() | (hi64.abs() > FP16_MAX).any()):
        raise NumericsError("a weight lies beyond the fp16 range: nested codes store fp16 scales")
    low = _fp16_floor(lo64)
    step = _fp16_ceil(((hi64 - low) / 2 ** depth).clamp_min(2.0 ** -24))
    if float(step.max()) * 2 ** (depth - MIN_DEPTH) > FP16_MAX:
        raise NumericsError(f"a weight group spans {float((hi64 - lo64).max()):.3g}: beyond what fp16 scales hold")
    return step.to(torch.float32), low.to(torch.float32)


def depth_grid(step: torch.Tensor, low: torch.Tensor, depth: int, k: int, group: int) -> Grid:
    """The ``int{k}-g{group}`` grid of depth ``k``: scale ``d_k = step·2^(depth−k)`` (exact), zero ``m_k`` = fp16 of
    ``low + d_k/2`` (the bins' midpoints to fp16 precision), levels ``0..2^k−1``."""
    d = step * float(2 ** (depth - k))
    zero = (low + d / 2).to(torch.float16).to(torch.float32)
    return Grid(scale=d, offset=zero, levels=torch.arange(1 << k, dtype=torch.float32, device=step.device),
                group_size=group)


def _padded_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = w.shape
    ng = -(-cols // group)
    pad = ng * group - cols
    if pad:  # replicate the last column (min and max unchanged), as IntFormat.fit does
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, ng, group)


def nested_grid(w: torch.Tensor, group: int, depth: int, importance: torch.Tensor | None = None,
                free: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, low)`` (rows, groups) of ``w`` (``importance`` per column or per element): per group, the range of
    the importance-weighted scale search of one depth ``m`` (:func:`bitalloc.formats.fit.search_affine` on ``2^m``
    levels: its grid is the nested grid's depth ``m`` up to fp16 rounding) -- the ``m`` whose nested grid has the
    least sum over depths of the nearest-bin error, each depth's relative to that of its own search.  The depths
    ``free`` (refit depths: their own scale and zero per group) count with the scale and zero that fit their bins
    best, so the lattice need not clip for them, only place their bins' boundaries."""
    from ..formats.fit import search_affine

    rows, cols = w.shape
    g = _padded_groups(w.to(torch.float32), group)
    ng = g.shape[1]
    imp = torch.ones(cols, device=w.device) if importance is None else importance.to(w.device, torch.float32)
    if imp.dim() == 1 and imp.numel() == cols:
        imp = imp.reshape(1, cols).expand(rows, cols)
    if tuple(imp.shape) != (rows, cols):
        raise InputError(f"nested grid: importance must have shape ({cols},) or ({rows}, {cols}), got "
                         f"{tuple(imp.shape)}")
    gi = _padded_groups(imp, group).clone()
    if ng * group > cols:  # the padding columns weigh nothing
        gi.reshape(rows, -1)[:, cols:] = 0
    flat, fimp = g.reshape(rows * ng, group), gi.reshape(rows * ng, group)
    depths = list(range(MIN_DEPTH, depth + 1))
    cands = []
    for m in depths:
        scale, offset = search_affine(flat, torch.arange(1 << m, dtype=torch.float32, device=w.device), fimp,
                                      symmetric=False)
        lo = (offset - scale / 2).reshape(rows, ng)
        cands.append(lattice(lo, lo + scale.reshape(rows, ng) * 2 ** m, depth))
    if not set(free) <= set(depths):
        raise InputError(f"nested grid: the free depths must be some of {depths[0]}..{depths[-1]}, got {list(free)}")
    errs = torch.stack([torch.stack([_rtn_error(g, gi, st, lw, depth, k, k in free) for k in depths])
                        for st, lw in cands])
    own = errs.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (depth, rows, ng): each depth under its own search
    rel = errs / own.unsqueeze(0).clamp_min(1e-30)  # (cand, depth, rows, ng)
    best = rel.sum(1).argmin(0)  # (rows, ng)
    step = torch.stack([c[0] for c in cands]).gather(0, best.unsqueeze(0))[0]
    low = torch.stack([c[1] for c in cands]).gather(0, best.unsqueeze(0))[0]
    return step, low


def _rtn_error(g: torch.Tensor, gi: torch.Tensor, step: torch.Tensor, low: torch.Tensor, depth: int, k: int,
               free: bool = False) -> torch.Tensor:
    """Importance-weighted squared error per group of the nearest bins at depth ``k``; ``free``: decoded with the
    scale and zero that fit those bins' codes best (weighted least squares per group), not the lattice's."""
    grid = depth_grid(step, low, depth, k, g.shape[2])
    d, z = grid.scale.unsqueeze(2), grid.offset.unsqueeze(2)
    c = torch.floor((g - low.unsqueeze(2)) / d).clamp_(0, (1 << k) - 1)
    if free:
        g64, c64, i64 = g.to(torch.float64), c.to(torch.float64), gi.to(torch.float64)
        sw, sc, scc = i64.sum(2), (i64 * c64).sum(2), (i64 * c64 * c64).sum(2)
        sg, scg = (i64 * g64).sum(2), (i64 * c64 * g64).sum(2)
        det = sw * scc - sc * sc
        ok = det > 1e-12 * (sw * scc).clamp_min(1e-300)
        s = torch.where(ok, (sw * scg - sc * sg) / torch.where(ok, det, torch.ones_like(det)), d[..., 0].double())
        zz = torch.where(ok, (sg - s * sc) / sw.clamp_min(1e-300), z[..., 0].double())
        d, z = s.to(torch.float32).unsqueeze(2), zz.to(torch.float32).unsqueeze(2)
    return ((d * c + z - g).square() * gi).sum(2)


#: Sweeps of coordinate descent after the joint rounding (:mod:`bitalloc.nest.descent`); 0 = none.
DESCENT_PASSES = 2
#: Growth per depth of a depth's weight in the joint rounding (see :func:`depth_weights`).
DEPTH_RATIO = 2.5


def pick_outliers(w: torch.Tensor, k: int, importance: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, values)`` of the ``k`` elements per row stored exactly (fp16 of the weight) by every depth: those with
    the largest importance-weighted squared distance from their row's mean.  One such element sets a group's range
    for every depth, so no shared grid serves both it and the rest; stored apart, it costs every depth nothing."""
    w32 = w.detach().to(torch.float32)
    rows, cols = w32.shape
    score = (w32 - w32.mean(1, keepdim=True)).square()
    if importance is not None:
        score = score * importance.to(w32.device, torch.float32).reshape(1, cols)
    idx = score.topk(k, dim=1).indices
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w32.device).scatter_(1, idx, True)
    values = torch.where(mask, w32.to(torch.float16).to(torch.float32), torch.zeros_like(w32))
    return mask, values


def with_exact(values: torch.Tensor, exact: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``values`` with the exactly stored elements (``(mask, values)`` of :func:`pick_outliers`) put in."""
    if exact is None:
        return values
    return torch.where(exact[0].to(values.device), exact[1].to(values.device), values)


def without_outliers(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w`` with the exactly stored elements replaced by their row's mean of the others (for fitting the grid)."""
    keep = (~mask).to(torch.float32)
    mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    return torch.where(mask, mean.expand_as(w), w)


def depth_weights(depth: int, ratio: float = DEPTH_RATIO) -> dict[int, float]:
    """The weight of each depth's error in the joint rounding: ``ratio^(k−2)``.  ``4`` would count every depth's
    error relative to its own size (a bin of width ``∝ 2^-k`` leaves an error ``∝ 4^-k``); less favours the
    shallow depths, whose errors dominate the small models.  2.5 is a compromise picked on a few layers of one model
    (output error against direct GPTQ at each depth, for ratios 1.5–4); ``bench/anysize.py`` shows the end-to-end
    result."""
    return {k: float(ratio ** (k - MIN_DEPTH)) for k in range(MIN_DEPTH, depth + 1)}


def nested_codes(w: torch.Tensor, step: torch.Tensor, low: torch.Tensor, group: int, depth: int,
                 hessian: torch.Tensor | None, weights: dict[int, float] | None = None,
                 block_size: int = 128, exact: tuple[torch.Tensor, torch.Tensor] | None = None,
                 passes: int = DESCENT_PASSES, emphasis: float = DEPTH_EMPHASIS,
                 factor: GPTQFactor | None = None) -> dict[int, torch.Tensor]:
    """``{k: codes (rows, cols) int64}`` for ``k = MIN_DEPTH..depth``, nested (``codes[k] == codes[k+1] >> 1``).

    Without ``hessian`` every depth is its nearest bin (nested by construction).  With it, a GPTQ column loop
    that keeps one error-feedback state per depth (each depth's own targets, updated by its own rounding
    errors, as GPTQ would for that depth alone) and chooses the one code path per element that minimises the
    ``weights``-weighted sum over depths of the squared distance to each depth's target
    (:func:`_descend`).  ``exact``: ``(mask, values)`` of elements stored exactly (:func:`pick_outliers`): their
    codes are whatever the rounding gives, their value in the error feedback the stored one.  Rounding one depth with GPTQ and constraining the deeper ones to its children fails:
    GPTQ moves a shallow code by up to a bin, and every deeper depth inherits that whole error.

    Then ``passes`` sweeps of coordinate descent (:func:`bitalloc.nest.descent.descend_codes`) on the sum over
    the depths ``weights`` weighs (all by default) of the output errors, each relative to the one the joint
    rounding left and times ``emphasis`` per depth
    (:func:`~bitalloc.nest.descent.relative_weights`): it never raises that sum (``bench/nest_depths.py`` shows
    each depth's error on real weights).  ``factor``: ``hessian``'s :func:`~bitalloc.rounding.gptq_factor`, when
    the caller made it once for every row block of the weight."""
    w32 = w.detach().to(torch.float32)
    rows, cols = w32.shape
    gidx = torch.div(torch.arange(cols, device=w32.device), group, rounding_mode="floor")
    depths = list(range(MIN_DEPTH, depth + 1))
    if hessian is None:
        leaf = torch.floor((w32 - low[:, gidx]) / step[:, gidx]).clamp_(0, (1 << depth) - 1).to(torch.int64)
        return {k: leaf >> (depth - k) for k in depths}
    factor = factor if factor is not None else gptq_factor(hessian, device=w32.device)
    if factor.upper is None:  # no damping made the Hessian factorisable: nearest bins
        return nested_codes(w32, step, low, group, depth, None, exact=exact)
    if exact is not None:
        emask, evals = exact[0][:, factor.order.to(w32.device)], exact[1][:, factor.order.to(w32.device)]
    lam = weights if weights is not None else depth_weights(depth)
    lam_t = torch.tensor([float(lam.get(k, 0.0)) for k in depths], device=w32.device).unsqueeze(1)
    grids = [depth_grid(step, low, depth, k, group) for k in depths]
    dk = torch.stack([g.scale for g in grids])  # (K, rows, groups)
    zk = torch.stack([g.offset for g in grids])
    order = factor.order.to(w32.device)
    upper = factor.upper.to(w32.device)
    gperm = gidx[order]
    targets = w32[:, order].unsqueeze(0).repeat(len(depths), 1, 1)  # (K, rows, cols): each depth's own state
    leaf = torch.empty(rows, cols, dtype=torch.int64, device=w32.device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        tb = targets[:, :, b0:b1].clone()
        err = torch.empty_like(tb)
        ub = upper[b0:b1, b0:b1]
        for i in range(b1 - b0):
            g = int(gperm[b0 + i])
            t = tb[:, :, i]
            d, z = dk[:, :, g], zk[:, :, g]
            c = _descend(t, d, low[:, g], z, lam_t, depths, depth)
            v = d * (c.unsqueeze(0) >> torch.tensor([depth - k for k in depths], device=c.device).unsqueeze(1)) + z
            if exact is not None:
                v = torch.where(emask[:, b0 + i], evals[:, b0 + i], v)
            e = (t - v) / ub[i, i]
            tb[:, :, i + 1:] -= e.unsqueeze(2) * ub[i, i + 1:]
            err[:, :, i] = e
            leaf[:, b0 + i] = c
        if b1 < cols:
            targets[:, :, b1:] -= err @ upper[b0:b1, b1:]
    out = torch.empty_like(leaf)
    out[:, order] = leaf
    if not bool(torch.isfinite(targets).all()):
        raise NumericsError("nested GPTQ: the error feedback overflowed")
    if passes > 0:  # the depths the rounding weighs, each relative to the error it left
        values = {}
        for i, k in enumerate(depths):
            if float(lam.get(k, 0.0)) <= 0:
                continue
            values[k] = with_exact(grids[i].values(out >> (depth - k)), exact)
        lam_d = relative_weights(w32, hessian, values, emphasis)
        out = descend_codes(w32, hessian, out, dk, zk, depths, depth, lam_d, group, passes, block_size, exact)
    return {k: out >> (depth - k) for k in depths}


def _descend(t: torch.Tensor, d: torch.Tensor, low: torch.Tensor, z: torch.Tensor, lam: torch.Tensor,
             depths: list[int], depth: int) -> torch.Tensor:
    """One column's leaf codes (rows,): bit by bit from the root, the child whose subtree holds the points nearest
    each depth's target ``t[k]`` (weighted by ``lam``); ``d``/``z``: (K, rows) bin widths and zeros."""
    rows = t.shape[1]
    nearest = torch.floor((t - low.unsqueeze(0)) / d)  # (K, rows): each depth's nearest bin, unclamped
    node = torch.zeros(rows, dtype=torch.int64, device=t.device)
    two = torch.arange(2, device=t.device).unsqueeze(1)
    for m in range(1, depth + 1):  # choosing the bit of depth m
        cand = 2 * node.unsqueeze(0) + two  # (2, rows)
        cost = torch.zeros(2, rows, device=t.device)
        for i, k in enumerate(depths):
            if k < m:
                continue
            span = 1 << (k - m)
            lo_c = cand * span
            code = torch.minimum(torch.maximum(nearest[i].unsqueeze(0), lo_c), lo_c + span - 1)
            cost += lam[i] * (t[i] - (d[i] * code + z[i])).square()
        node = 2 * node + (cost[1] < cost[0]).to(torch.int64)
    return node


# --- bit planes --------------------------------------------------------------------------------------------
def to_planes(codes: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The ``depth`` bit-planes of ``codes`` (most significant first), each ``pack_bits`` of rows·cols bits."""
    flat = codes.reshape(-1).cpu()
    return [pack_bits((flat >> (depth - 1 - j)) & 1, 1) for j in range(depth)]


def from_planes(planes: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Codes of depth ``len(planes)`` from the first planes (most significant first)."""
    n = shape[0] * shape[1]
    codes = torch.zeros(n, dtype=torch.int64)
    for p in planes:
        codes = (codes << 1) | unpack_bits(p, 1, n)
    return codes.reshape(shape)


__all__ = ["DESCENT_PASSES", "MAX_DEPTH", "MIN_DEPTH", "depth_grid", "depth_weights", "from_planes", "lattice", "nested_codes", "nested_grid",
           "pick_outliers", "with_exact", "without_outliers",
           "to_planes"]
