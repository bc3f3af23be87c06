"""The layer-output error of a weight change, and the least-squares refit of a grid's group scales (and
offsets) to fixed codes under it: the part of a format's grid fitting that knows the codes (``Format.refine``).

GPTQ chooses codes on a grid fixed beforehand from the weights and the Hessian's diagonal.  Once the codes
are known, each group's ``scale`` (and, for formats that store one freely, its ``offset``) can be chosen to
minimise the full error ``(w − v)ᵀ H (w − v)`` of each row, with ``v = scale_g · levels[code] + offset_g``: a
linear least-squares problem per row in ``groups`` (or ``2 · groups``) unknowns, because the Hessian couples
the groups of one row.  The format then rounds the solution to what it stores (fp16 for GGUF) and
:func:`refit_grid` keeps, row by row, whichever grid gives the smaller error after that rounding, so a
refit never makes a row worse in-sample.

Everything is float64; rows are solved in batches whose intermediates (a few ``rows × cols`` matrices and
the normal equations) stay within :data:`BATCH_BYTES`.  The only ``rows × cols × cols`` product is ``z H``,
taken a few groups at a time over the whole batch of rows (``rows × group`` times ``group × cols`` per group:
products the BLAS runs near its speed, where one product over every group at once left it a few rows at a
time); the old and new errors are the least squares' own quadratic form, so a refit costs one such product,
not four.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import torch

from .base import Grid

#: Upper bound on the float64 intermediate of one batch of rows (bytes).
BATCH_BYTES = 8 << 20
#: Ridge toward the current scales/offsets, relative to each unknown's own curvature: keeps unknowns that
#: the data does not determine (a group whose codes are all equal, dead input columns) where they were.
RIDGE = 1e-6
#: Most unknowns per row solved as one batched CPU call (:func:`_solve`); wider systems one at a time.
BATCHED_SOLVE_MAX = 128


def row_errors(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``(w_hat_r − w_r)ᵀ H (w_hat_r − w_r)`` for every row (output) ``r``: float64, shape ``rows``."""
    dw = w_hat.to(torch.float64) - w.to(torch.float64)
    return ((dw @ hessian.to(device=dw.device, dtype=torch.float64)) * dw).sum(1)


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` with ``ΔW = w_hat - w``: the mean squared layer-output error summed over outputs."""
    return float(row_errors(w, w_hat, hessian).sum())


def _normal_equations(
    w: torch.Tensor,
    z: torch.Tensor,
    group_size: int,
    hessian: torch.Tensor,
    with_offset: bool,
    active: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per batch of rows: ``(rows slice, M, b)`` of the least squares in the unknowns ``x`` = the row's group
    scales (then offsets when ``with_offset``): ``(w_r − v_r)ᵀ H (w_r − v_r) = w_rᵀ H w_r − 2 xᵀ b + xᵀ M x``
    with ``v_r = Σ_g x_g · z_g (+ x_g' · 1_g)``.  float64, without the ridge.

    The one product of size ``rows x cols x cols`` is ``z H``, formed for a whole batch of rows a few groups at a
    time (``z_gᵀ H_g``: ``rows x group x cols`` matrix products batched over as many groups as keep them within
    :data:`BATCH_BYTES`, then contracted with ``z``, ``1`` and ``w``); the offsets' terms need no ``w H`` unless
    ``active`` masks them."""
    rows, cols = (int(d) for d in w.shape)
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a multiple of the group size {group_size}")
    nb = cols // group_size
    h = hessian.to(device=w.device, dtype=torch.float64)
    h = (h + h.T) * 0.5
    hb = h.reshape(nb, group_size, cols)
    hs = hb.sum(1) if with_offset else None  # (nb, cols): 1_gᵀ H
    m_oo = hs.reshape(nb, nb, group_size).sum(-1) if with_offset and active is None else None  # 1_bᵀ H 1_c
    unknowns = nb * (2 if with_offset else 1)
    step = max(1, BATCH_BYTES // (8 * (4 * cols + unknowns * unknowns)))
    for a in range(0, rows, step):
        sl = slice(a, min(a + step, rows))
        zv = z[sl].to(torch.float64).reshape(-1, nb, group_size)
        wr = w[sl].to(torch.float64)
        ab = active[sl].to(torch.float64).reshape(-1, nb, group_size) if with_offset and active is not None else None
        r = int(zv.shape[0])
        gstep = max(1, BATCH_BYTES // (8 * r * cols))  # groups per product: z_gᵀ H of G groups is G x r x cols
        m_g, rhs_g, so_g, aa_g = [], [], [], []
        for g0 in range(0, nb, gstep):
            g1 = min(g0 + gstep, nb)
            y = torch.bmm(zv[:, g0:g1].transpose(0, 1), hb[g0:g1])  # (G, r, cols): z_gᵀ H per group g
            y4 = y.reshape(g1 - g0, r, nb, group_size)
            m_g.append(torch.einsum("grcj,rcj->rgc", y4, zv))
            rhs_g.append(torch.einsum("grj,rj->rg", y, wr))
            if ab is not None:  # offsets reach only the active elements
                so_g.append(torch.einsum("grcj,rcj->rgc", y4, ab))
                ya = torch.bmm(ab[:, g0:g1].transpose(0, 1), hb[g0:g1]).reshape(g1 - g0, r, nb, group_size)
                aa_g.append(torch.einsum("grcj,rcj->rgc", ya, ab))
            elif with_offset:
                so_g.append(y4.sum(-1).transpose(0, 1))
        m, rhs = torch.cat(m_g, 1), torch.cat(rhs_g, 1)
        if with_offset:
            m_so = torch.cat(so_g, 1)
            top = torch.cat([m, m_so], 2)
            if ab is not None:
                bottom = torch.cat([m_so.transpose(1, 2), torch.cat(aa_g, 1)], 2)
                hw = (wr @ h) * ab.reshape(wr.shape)
                rhs = torch.cat([rhs, hw.reshape(-1, nb, group_size).sum(-1)], 1)
            else:
                m_oo_r = m_oo.expand(top.shape[0], nb, nb)  # type: ignore[union-attr]
                bottom = torch.cat([m_so.transpose(1, 2), m_oo_r], 2)
                rhs = torch.cat([rhs, wr @ hs.T], 1)  # type: ignore[union-attr]
            m = torch.cat([top, bottom], 1)
        yield sl, m, rhs


def _solve(m: torch.Tensor, rhs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``x`` minimising ``xᵀ M x − 2 xᵀ b`` plus a tiny ridge toward ``x0`` (:data:`RIDGE`).

    On the CPU, systems of more than :data:`BATCHED_SOLVE_MAX` unknowns are solved one at a time: torch 2.13's
    batched CPU LU of such systems on several threads either fails (MKL prints a pivot error) or returns values
    that differ from one system's solve, and which of the two depends on the LU calls the process made before;
    so the same weight could round differently after a resume.  One system at a time is the same at any history
    (and, up to that size, equal to the batched call: same bytes as before)."""
    diag = m.diagonal(dim1=1, dim2=2).abs()
    ridge = RIDGE * diag + 1e-30 * (1.0 + diag.mean(1, keepdim=True))
    a, b = m + torch.diag_embed(ridge), (rhs + ridge * x0).unsqueeze(-1)
    if a.device.type == "cpu" and int(a.shape[-1]) > BATCHED_SOLVE_MAX:
        return torch.cat([torch.linalg.solve(a[i:i + 1], b[i:i + 1]) for i in range(int(a.shape[0]))])[..., 0]
    return torch.linalg.solve(a, b)[..., 0]


def _quad(m: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``xᵀ M x − 2 xᵀ b`` per row: the row's error up to its constant ``wᵀ H w``."""
    return (torch.einsum("rij,rj->ri", m, x) * x).sum(1) - 2.0 * (x * rhs).sum(1)


def group_lstsq(
    w: torch.Tensor,
    z: torch.Tensor | Sequence[torch.Tensor],
    group_size: int,
    hessian: torch.Tensor,
    scale0: torch.Tensor,
    offset0: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row and group, the ``scale`` (and ``offset`` when ``offset0`` is given) that minimise
    ``(w_r − v_r)ᵀ H (w_r − v_r)`` with ``v_rj = scale_{r,g(j)} · z_rj + offset_{r,g(j)}``.

    ``w`` and ``z`` (the level values of the codes) are ``rows × cols``; ``scale0``/``offset0``
    (``rows × groups``) are the current values, toward which a tiny ridge (:data:`RIDGE`) pulls
    undetermined unknowns.  ``active`` (bool ``rows × cols``, optional) marks the elements the group's offset
    reaches (elements stored exactly do not depend on it; their ``z`` must then be 0 too).  ``z`` may be several
    level-value tensors sharing the unknowns, with ``weights``: the sum of their errors so weighted is minimised.
    Returns float64 ``(scale, offset or None)``.
    """
    nb = int(scale0.shape[1])
    x0 = _unknowns(scale0, offset0)
    zs = [z] if isinstance(z, torch.Tensor) else list(z)
    lam = [1.0] * len(zs) if weights is None else [float(x) for x in weights]
    if not zs or len(lam) != len(zs):
        raise ValueError(f"group_lstsq: {len(zs)} level-value tensors but {len(lam)} weights")
    parts = zip(*(_normal_equations(w, zk, group_size, hessian, offset0 is not None, active) for zk in zs))
    xs = [_solve(sum(a * m for a, (_, m, _) in zip(lam, eqs)), sum(a * b for a, (_, _, b) in zip(lam, eqs)),
                 x0[eqs[0][0]]) for eqs in parts]
    x = torch.cat(xs) if xs else x0
    return x[:, :nb], (x[:, nb:] if offset0 is not None else None)


def _unknowns(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    s = scale.to(torch.float64)
    return s if offset is None else torch.cat([s, offset.to(device=s.device, dtype=torch.float64)], 1)


def refit_grid(
    w: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    hessian: torch.Tensor,
    *,
    offset: bool,
    rnd: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[Grid, torch.Tensor]:
    """``(grid, change)``: ``grid`` with every row's scales (and offsets when ``offset``) refit to ``codes`` by least
    squares under ``hessian`` and stored through ``rnd`` (the format's elementwise rounding of a scale, e.g. to fp16),
    and how much that changed each row's error (float64 ``(rows,)``: negative where the row took the refit, 0 where
    it kept its old scales; what ``Format.refine_measured`` reports).

    Rows whose refit error (after ``rnd``) is not smaller, or not finite, keep their old scales, so the
    result is never worse in-sample, row by row.  Both errors come from the least squares' own quadratic form
    (no further ``rows × cols × cols`` product); the change is their difference.  Offsets not refit
    (``offset=False``) stay where they are and the scales are fit around them.  ``grid.extra`` is carried over
    unchanged.
    """
    z = grid.level_values(codes)
    target, active = w, None
    if grid.exact_mask is not None:  # exactly stored elements leave a fixed residual and take no offset
        mask = grid.exact_mask.to(w.device)
        z = torch.where(mask, torch.zeros_like(z), z)
        w32 = w.to(torch.float32)
        target = torch.where(mask, w32 - grid.exact_values.to(w.device), w32)
        active = ~mask
    cols = int(w.shape[1])
    gs = grid.group_size
    if not offset and bool((grid.offset != 0).any()):  # fixed offsets: fit the scales to what they leave
        o = grid.offset.to(device=w.device, dtype=torch.float32).repeat_interleave(gs, 1)[:, :cols]
        target = target.to(torch.float32) - (o if active is None else o * active)
    nb = int(grid.scale.shape[1])
    x_old = _unknowns(grid.scale, grid.offset if offset else None).to(w.device)
    scale, off = grid.scale.clone(), grid.offset.clone()
    delta = torch.zeros(int(w.shape[0]), dtype=torch.float64, device=w.device)
    for sl, m, rhs in _normal_equations(target, z, gs, hessian, offset, active):
        x = _solve(m, rhs, x_old[sl])
        s32 = rnd(x[:, :nb].to(torch.float32))
        o32 = rnd(x[:, nb:].to(torch.float32)) if offset else grid.offset[sl]
        x_new = _unknowns(s32, o32 if offset else None)
        change = _quad(m, rhs, x_new) - _quad(m, rhs, x_old[sl])
        ok = torch.isfinite(s32).all(1) & torch.isfinite(o32).all(1) & (change < 0)
        delta[sl] = torch.where(ok, change, torch.zeros_like(change))
        keep = ok.unsqueeze(1).to(scale.device)
        scale[sl] = torch.where(keep, s32.to(scale.device), scale[sl])
        off[sl] = torch.where(keep, o32.to(off.device), off[sl])
    return dataclasses.replace(grid, scale=scale, offset=off, extra=dict(grid.extra)), delta


__all__ = ["refit_grid", "group_lstsq", "row_errors", "layer_output_error", "BATCH_BYTES", "BATCHED_SOLVE_MAX", "RIDGE"]
