"""Least-squares refit of a grid's group scales (and offsets) to fixed codes, under the layer-output error.

GPTQ chooses codes on a grid fixed beforehand from the weights and the Hessian's diagonal.  Once the codes
are known, each group's ``scale`` (and, for formats that store one freely, its ``offset``) can be chosen to
minimise the full error ``(w − v)ᵀ H (w − v)`` of each row, with ``v = scale_g · levels[code] + offset_g``: a
linear least-squares problem per row in ``groups`` (or ``2 · groups``) unknowns, because the Hessian couples
the groups of one row.  The format then rounds the solution to what it stores (fp16 for GGUF) and
:func:`refit_grid` keeps, row by row, whichever grid gives the smaller error after that rounding, so a
refit never makes a row worse in-sample.

Everything is float64; rows are solved in batches so the ``rows × groups × cols`` intermediate stays
within :data:`BATCH_BYTES`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..formats.base import Grid
from .gptq import row_errors

#: Upper bound on the float64 intermediate of one batch of rows (bytes).
BATCH_BYTES = 32 << 20
#: Ridge toward the current scales/offsets, relative to each unknown's own curvature: keeps unknowns that
#: the data does not determine (a group whose codes are all equal, dead input columns) where they were.
RIDGE = 1e-6


def group_lstsq(
    w: torch.Tensor,
    z: torch.Tensor,
    group_size: int,
    hessian: torch.Tensor,
    scale0: torch.Tensor,
    offset0: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row and group, the ``scale`` (and ``offset`` when ``offset0`` is given) that minimise
    ``(w_r − v_r)ᵀ H (w_r − v_r)`` with ``v_rj = scale_{r,g(j)} · z_rj + offset_{r,g(j)}``.

    ``w`` and ``z`` (the level values of the codes) are ``rows × cols``; ``scale0``/``offset0``
    (``rows × groups``) are the current values, toward which a tiny ridge (:data:`RIDGE`) pulls
    undetermined unknowns.  ``active`` (bool ``rows × cols``, optional) marks the elements the group's offset
    reaches (elements stored exactly do not depend on it; their ``z`` must then be 0 too).  Returns float64
    ``(scale, offset or None)``.
    """
    rows, cols = (int(d) for d in w.shape)
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a multiple of the group size {group_size}")
    nb = cols // group_size
    h = hessian.to(device=w.device, dtype=torch.float64)
    h = (h + h.T) * 0.5
    hb = h.reshape(nb, group_size, cols)
    with_offset = offset0 is not None
    m_oo = hb.sum(1).reshape(nb, nb, group_size).sum(-1) if with_offset and active is None else None  # 1_bᵀ H 1_c
    step = max(1, BATCH_BYTES // (8 * nb * cols))
    scales, offsets = [], []
    for a in range(0, rows, step):
        sl = slice(a, min(a + step, rows))
        zb = z[sl].to(torch.float64).reshape(-1, nb, group_size)
        wr = w[sl].to(torch.float64)
        y = torch.einsum("rbi,bij->rbj", zb, hb)  # z_bᵀ H, one row of H per group member
        y4 = y.reshape(-1, nb, nb, group_size)
        m = torch.einsum("rbcj,rcj->rbc", y4, zb)
        rhs = torch.einsum("rbj,rj->rb", y, wr)
        x0 = scale0[sl].to(torch.float64)
        if with_offset and active is not None:  # offsets reach only the active elements
            ab = active[sl].to(torch.float64).reshape(-1, nb, group_size)
            ya = torch.einsum("rbi,bij->rbj", ab, hb).reshape(-1, nb, nb, group_size)
            m_so = torch.einsum("rbcj,rcj->rbc", y4, ab)
            top = torch.cat([m, m_so], 2)
            bottom = torch.cat([m_so.transpose(1, 2), torch.einsum("rbcj,rcj->rbc", ya, ab)], 2)
            m = torch.cat([top, bottom], 1)
            hw = (wr @ h) * ab.reshape(wr.shape)
            rhs = torch.cat([rhs, hw.reshape(-1, nb, group_size).sum(-1)], 1)
            x0 = torch.cat([x0, offset0[sl].to(torch.float64)], 1)  # type: ignore[index]
        elif with_offset:
            m_so = y4.sum(-1)
            top = torch.cat([m, m_so], 2)
            bottom = torch.cat([m_so.transpose(1, 2), m_oo.expand(top.shape[0], nb, nb)], 2)
            m = torch.cat([top, bottom], 1)
            hw = wr @ h
            rhs = torch.cat([rhs, hw.reshape(-1, nb, group_size).sum(-1)], 1)
            x0 = torch.cat([x0, offset0[sl].to(torch.float64)], 1)  # type: ignore[index]
        diag = m.diagonal(dim1=1, dim2=2).abs()
        ridge = RIDGE * diag + 1e-30 * (1.0 + diag.mean(1, keepdim=True))
        m = m + torch.diag_embed(ridge)
        x = torch.linalg.solve(m, (rhs + ridge * x0).unsqueeze(-1))[..., 0]
        scales.append(x[:, :nb])
        if with_offset:
            offsets.append(x[:, nb:])
    return torch.cat(scales), (torch.cat(offsets) if with_offset else None)


def refit_grid(
    w: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    hessian: torch.Tensor,
    *,
    offset: bool,
    rnd: Callable[[torch.Tensor], torch.Tensor],
) -> Grid:
    """``grid`` with every row's scales (and offsets when ``offset``) refit to ``codes`` by least squares
    under ``hessian`` and stored through ``rnd`` (the format's rounding of a scale, e.g. to fp16).

    Rows whose refit error (after ``rnd``) is not smaller, or not finite, keep their old scales, so the
    result is never worse in-sample, row by row.  ``grid.extra`` is carried over unchanged.
    """
    if grid.plain:
        z = grid.levels[codes]
        s, o = group_lstsq(w, z, grid.group_size, hessian, grid.scale, grid.offset if offset else None)
    else:  # a mixture's codes index each group's own set; exactly stored elements leave a fixed residual
        z = grid.level_values(codes)
        target, active = w, None
        if grid.exact_mask is not None:
            mask = grid.exact_mask.to(w.device)
            z = torch.where(mask, torch.zeros_like(z), z)
            target = torch.where(mask, w.to(torch.float32) - grid.exact_values.to(w.device), w.to(torch.float32))
            active = ~mask
        s, o = group_lstsq(target, z, grid.group_size, hessian, grid.scale, grid.offset if offset else None, active)
    s32 = rnd(s.to(torch.float32))
    o32 = rnd(o.to(torch.float32)) if o is not None else grid.offset
    new = dataclasses.replace(grid, scale=s32, offset=o32, extra=dict(grid.extra))
    old_err = row_errors(w, grid.values(codes), hessian)
    new_err = row_errors(w, new.values(codes), hessian)
    ok = torch.isfinite(s32).all(1) & torch.isfinite(o32).all(1) & (new_err < old_err)
    keep = ok.unsqueeze(1)
    return dataclasses.replace(grid, scale=torch.where(keep, s32, grid.scale),
                               offset=torch.where(keep, o32, grid.offset), extra=dict(grid.extra))


__all__ = ["refit_grid", "group_lstsq", "row_errors", "BATCH_BYTES", "RIDGE"]
