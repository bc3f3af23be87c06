"""Refit depths: a shallow depth's own scale and offset per group, stored as two bytes relative to the lattice.

Every depth of a nest decodes its codes on the shared lattice (:func:`bitalloc.nest.codes.depth_grid`): bin
midpoints over one range per group.  That range must serve the deepest depth, so a shallow depth gets neither the
clipping nor the offsets its own GPTQ would choose, and its error is many times the direct format's.  Nothing in
the nesting requires the midpoints, though: depth ``k``'s codes are the top bits of the leaf codes whatever values
they decode to.  A *refit depth* decodes code ``c`` of group ``g`` at

    scale_k · c + zero_k,   scale_k = fp16(d_k · μ),   zero_k = fp16(low + d_k · (½ + τ)),

with ``d_k`` the lattice's bin width at depth ``k`` and ``(μ, τ)`` stored per group as one byte each:
``μ = mu / 128`` (``mu`` in 1..255) and ``τ = (tau − 128) / 64`` (``tau`` in 0..255); ``mu = tau = 128`` is the
lattice itself.  The prefix is still exactly an ``int{k}-g{G}`` tensor (fp16 scale and zero per group), two bytes
per group of the artifact (0.25 bits per weight at ``G = 64``) buy it.

:func:`fit_refit` chooses ``(mu, tau)`` by least squares of the depth's output error to its codes
(:func:`bitalloc.formats.refit.group_lstsq`), then keeps, row by row, the lattice where the rounded refit is not
better.  :func:`refit_codes` alternates that with coordinate descent of the codes
(:func:`bitalloc.nest.descent.descend_codes`) on the decoded values.

The depths that decode on the lattice get the same treatment without stored bytes: :func:`fit_lattice` refits
``(step, low)`` itself to their codes, by least squares of the sum of their output errors (each relative to its own),
before each refit of the bytes (which are relative to the lattice).  The lattice's range is chosen knowing which
depths will be refit (:func:`bitalloc.nest.codes.nested_grid`'s ``free``): they clip for themselves, and only
their bins' boundaries come from the lattice.
"""
from __future__ import annotations

import torch

from ..formats.base import Grid
from ..formats.refit import group_lstsq
from .codes import FP16_MAX, MIN_DEPTH, depth_grid, with_exact
from .descent import DEPTH_EMPHASIS, descend_codes, relative_weights

#: ``mu`` of the lattice's own scale (``μ = 1``) and ``tau`` of its own zero (``τ = 0``).
IDENTITY = 128
#: Refit rounds alternating with one descent pass each.
ROUNDS = 2
#: Share of the largest model's bytes the default refit depths may add to the artifact (its goal: at most 1.15x).
DEFAULT_SHARE = 0.12


def default_refit(group: int, depth: int) -> int:
    """How many of the shallowest depths ``bitalloc nest`` refits by default: as many as keep their bytes (2 per
    group each) within :data:`DEFAULT_SHARE` of the largest model's (``depth`` bits and 4 bytes per group)."""
    per_depth = 16 / group
    return max(0, min(depth - MIN_DEPTH, int(DEFAULT_SHARE * (depth + 32 / group) / per_depth)))


def refit_values(step: torch.Tensor, low: torch.Tensor, depth: int, k: int, mu: torch.Tensor, tau: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` (rows, groups) float32 of depth ``k`` refit by ``(mu, tau)`` bytes; a group whose fp16 scale
    would not be finite and positive, or whose zero would not be finite, decodes on the lattice instead."""
    d = step.to(torch.float32) * float(2 ** (depth - k))
    low = low.to(torch.float32)
    m = mu.to(torch.float32) / IDENTITY
    t = (tau.to(torch.float32) - IDENTITY) / 64
    scale = (d * m).to(torch.float16).to(torch.float32)
    zero = (low + d * (0.5 + t)).to(torch.float16).to(torch.float32)
    lattice_zero = (low + d / 2).to(torch.float16).to(torch.float32)
    bad = ~torch.isfinite(scale) | (scale <= 0)
    scale = torch.where(bad, d, scale)
    zero = torch.where(~torch.isfinite(zero), lattice_zero, zero)
    return scale, zero


def _lstsq_problem(w32: torch.Tensor, hessian: torch.Tensor, zs: list[torch.Tensor],
                   exact: tuple[torch.Tensor, torch.Tensor] | None, pad: int
                   ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """``(target, zs, hessian float64, active)`` of a per-group least squares over level values ``zs`` for
    :func:`~bitalloc.formats.refit.group_lstsq`: an exactly stored element's value is fixed (it leaves ``w −
    exact`` in the target, level 0, no offset), and ``pad`` padding columns complete the last group, weighing
    nothing."""
    target, active = w32, None
    if exact is not None:
        active = ~exact[0]
        zs = [torch.where(active, z, torch.zeros_like(z)) for z in zs]
        target = w32 - torch.where(exact[0], exact[1].to(torch.float32), torch.zeros_like(w32))
    h = hessian.to(w32.device, torch.float64)
    if pad:
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
        zs = [torch.nn.functional.pad(z, (0, pad)) for z in zs]
        target = torch.nn.functional.pad(target, (0, pad))
        active = None if active is None else torch.nn.functional.pad(active, (0, pad))
    return target, zs, h, active


def fit_refit(w: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor,
              depth: int, k: int, group: int, exact: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, tau)`` uint8 (rows, groups) of depth ``k``'s codes (module docstring): least squares, rounded to bytes,
    the lattice kept on rows where that is not better."""
    w32 = w.to(torch.float32)
    target, (z,), h, active = _lstsq_problem(w32, hessian, [codes.to(torch.float32)], exact,
                                             step.shape[1] * group - int(w32.shape[1]))
    d = step.to(torch.float64) * float(2 ** (depth - k))
    zero0 = low.to(torch.float64) + d / 2
    scale, offset = group_lstsq(target, z, group, h, d, zero0, active=active)
    mu = torch.round(scale / d * IDENTITY).clamp(1, 255).to(torch.uint8)
    tau = torch.round(((offset - low.to(torch.float64)) / d - 0.5) * 64 + IDENTITY).clamp(0, 255).to(torch.uint8)
    mu = torch.where(torch.isfinite(scale / d), mu, torch.full_like(mu, IDENTITY))
    tau = torch.where(torch.isfinite(offset), tau, torch.full_like(tau, IDENTITY))
    ident = torch.full_like(mu, IDENTITY)
    hf = hessian.to(w32.device, torch.float32)
    errs = []
    for m, t in ((ident, ident), (mu, tau)):
        e = with_exact(refit_depth_grid(step, low, depth, k, group, m, t).values(codes), exact) - w32
        errs.append(((e @ hf) * e).sum(1))
    worse = ~(errs[1] < errs[0])
    mu = torch.where(worse.unsqueeze(1), ident, mu)
    tau = torch.where(worse.unsqueeze(1), ident, tau)
    return mu, tau


def fit_lattice(w: torch.Tensor, hessian: torch.Tensor, leaf: torch.Tensor, step: torch.Tensor, low: torch.Tensor,
                depth: int, group: int, lam: dict[int, float],
                exact: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, low)`` (fp16 values, float32) refit to the codes: least squares of the ``lam``-weighted sum of the
    output errors of the depths ``lam`` names, each decoding on the lattice (``value ≈ step·2^(D−k)·(c_k + ½) +
    low``), rounded to fp16, the old lattice kept on rows where that is not better (or where a depth's scale would
    leave fp16).  The lattice is first chosen from the weights' range alone (:func:`~.codes.nested_grid`); once
    the codes are known, the Hessian says where in each bin the weights that chose it lie."""
    ks = sorted(k for k, x in lam.items() if x > 0)
    if not ks:
        return step, low
    w32 = w.to(torch.float32)
    levels = [((leaf >> (depth - k)).to(torch.float64) + 0.5) * float(2 ** (depth - k)) for k in ks]
    target, zs, h, active = _lstsq_problem(w32, hessian, levels, exact, step.shape[1] * group - int(w32.shape[1]))
    s, o = group_lstsq(target, zs, group, h, step.to(torch.float64), low.to(torch.float64), active=active,
                       weights=[lam[k] for k in ks])
    new_step = s.to(torch.float16).to(torch.float32)
    new_low = o.to(torch.float16).to(torch.float32)  # type: ignore[union-attr]
    widest = new_step * float(2 ** (depth - MIN_DEPTH))
    ok = torch.isfinite(new_step) & (new_step > 0) & torch.isfinite(new_low) & (widest <= FP16_MAX)
    ok &= torch.isfinite((new_low + widest / 2).to(torch.float16))  # the widest depth's zero stays an fp16 value
    new_step, new_low = torch.where(ok, new_step, step), torch.where(ok, new_low, low)
    hf = hessian.to(w32.device, torch.float32)
    errs = []
    for st, lw in ((step, low), (new_step, new_low)):
        tot = torch.zeros(w32.shape[0], dtype=torch.float64, device=w32.device)
        for k in ks:
            e = with_exact(depth_grid(st, lw, depth, k, group).values(leaf >> (depth - k)), exact) - w32
            tot += lam[k] * ((e @ hf) * e).sum(1).to(torch.float64)
        errs.append(tot)
    better = (errs[1] < errs[0]).unsqueeze(1)
    return torch.where(better, new_step, step), torch.where(better, new_low, low)


def refit_depth_grid(step: torch.Tensor, low: torch.Tensor, depth: int, k: int, group: int, mu: torch.Tensor,
                     tau: torch.Tensor) -> Grid:
    """The ``int{k}-g{group}`` grid of a refit depth."""
    scale, zero = refit_values(step, low, depth, k, mu, tau)
    return Grid(scale=scale, offset=zero, levels=torch.arange(1 << k, dtype=torch.float32, device=step.device),
                group_size=group)


def refit_codes(w: torch.Tensor, hessian: torch.Tensor, leaf: torch.Tensor, step: torch.Tensor, low: torch.Tensor,
                group: int, depth: int, refit: list[int], weighed: list[int],
                exact: tuple[torch.Tensor, torch.Tensor] | None = None, rounds: int = ROUNDS, passes: int = 1,
                emphasis: float = DEPTH_EMPHASIS
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """``(leaf, step, low, {k: (mu, tau)})``: ``rounds`` times, the lattice fit to the codes of the ``weighed``
    depths that decode on it (:func:`fit_lattice`), the ``refit`` depths' bytes fit to theirs, and one pass of
    descent on every ``weighed`` depth's output error (each relative to its own, times ``emphasis`` per depth:
    :func:`~.descent.relative_weights`) with those values; then a last fit.  ``passes = 0``: one fit, the codes
    unchanged."""
    rounds = rounds if passes > 0 else 0
    depths = list(range(min(weighed + refit), depth + 1))
    on_lattice = [k for k in weighed if k not in refit]
    corr: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grids() -> dict[int, Grid]:
        return {k: refit_depth_grid(step, low, depth, k, group, *corr[k]) if k in corr
                else depth_grid(step, low, depth, k, group) for k in depths}

    for r in range(rounds + 1):
        if on_lattice:
            g = grids()
            lam = relative_weights(w, hessian, {k: with_exact(g[k].values(leaf >> (depth - k)), exact)
                                                for k in on_lattice}, emphasis)
            step, low = fit_lattice(w, hessian, leaf, step, low, depth, group, lam, exact)
        for k in refit:
            corr[k] = fit_refit(w, hessian, leaf >> (depth - k), step, low, depth, k, group, exact)
        if r == rounds:
            break
        g = grids()
        lam = relative_weights(w, hessian, {k: with_exact(g[k].values(leaf >> (depth - k)), exact) for k in weighed},
                               emphasis)
        scales = torch.stack([g[k].scale for k in depths])
        zeros = torch.stack([g[k].offset for k in depths])
        leaf = descend_codes(w, hessian, leaf, scales, zeros, depths, depth, lam, group, 1, exact=exact)
    return leaf, step, low, corr


__all__ = ["DEFAULT_SHARE", "IDENTITY", "default_refit", "fit_lattice", "fit_refit", "refit_codes", "refit_depth_grid",
           "refit_values"]
