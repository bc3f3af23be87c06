"""GPTQ onto a fixed grid: choose codes that minimise the layer-output error ``tr(ΔW H ΔWᵀ)``.

The grid (scales, offsets, groups) is chosen by the format *before* rounding, from the original weights
("static groups"), so act-order only changes the order in which columns are rounded: column ``j`` always
uses ``grid.group_of(j)`` of its original index.  The algorithm is that of the GPTQ paper (Frantar et al.,
2022): the upper Cholesky factor ``U`` of ``H⁻¹`` gives, column by column, the optimal update of the
not-yet-rounded columns for the rounding error of the current one; updates are applied within a block of
``block_size`` columns eagerly and to the remaining columns lazily, once per block.

Robustness: non-finite inputs raise :class:`~bitalloc.errors.NumericsError`; dead input columns
(``H_jj <= 0``) are decoupled and rounded to nearest; the damping is raised tenfold whenever a Cholesky
factorisation fails, and after ``max_damp_tries`` failures the weight is rounded to nearest (RTN).
"""
from __future__ import annotations

import logging

import torch

from ..errors import InputError, NumericsError
from ..formats.base import Grid

log = logging.getLogger(__name__)

#: Up to this many columns the factorisation runs in float64 (cost ~cols³, negligible below this).
FLOAT64_MAX_COLS = 4096
#: Smallest damping ever used, so that ``percdamp=0`` on an all-zero Hessian still factorises.
MIN_DAMP = 1e-10


def row_errors(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``(w_hat_r − w_r)ᵀ H (w_hat_r − w_r)`` for every row (output) ``r``: float64, shape ``rows``."""
    dw = w_hat.to(torch.float64) - w.to(torch.float64)
    return ((dw @ hessian.to(torch.float64)) * dw).sum(1)


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` with ``ΔW = w_hat - w``: the mean squared layer-output error summed over outputs."""
    return float(row_errors(w, w_hat, hessian).sum())


def prepare_hessian(hessian: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrised copy of ``hessian`` with dead columns decoupled, and the boolean mask of dead columns.

    A dead column (``H_jj <= 0``, e.g. an input feature that is always zero) gets ``H_jj = 1`` and a zero
    row/column, so it neither receives nor propagates rounding error.
    """
    h = hessian.to(dtype)
    h = (h + h.T).mul_(0.5)
    dead = torch.diagonal(h) <= 0
    if bool(dead.any()):
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1
    return h, dead


def inverse_cholesky_upper(
    h: torch.Tensor, percdamp: float = 0.01, max_damp_tries: int = 6
) -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU = (H + λI)⁻¹``) and the damping ``λ`` used.

    ``λ = percdamp · mean(diag H)`` (at least :data:`MIN_DAMP`), multiplied by 10 after each failed
    factorisation, at most ``max_damp_tries`` times.  Returns None when every attempt failed.
    """
    n = h.shape[0]
    lam = max(percdamp * float(torch.diagonal(h).mean()), MIN_DAMP) if n else MIN_DAMP
    for attempt in range(max_damp_tries + 1):
        damped = h.clone()
        damped.diagonal().add_(lam)  # == h + lam·I, without an n x n identity
        u = _try_factor(damped)
        del damped
        if u is not None:
            return u, lam
        if attempt < max_damp_tries:
            log.info("GPTQ: Cholesky failed with damping %.3g; retrying with %.3g", lam, lam * 10)
            lam *= 10
    return None


def _try_factor(h: torch.Tensor) -> torch.Tensor | None:
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not bool(torch.isfinite(lower).all()):
        return None
    hinv = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()) or not bool((torch.diagonal(upper) > 0).all()):
        return None
    return upper


def gptq_codes(
    w: torch.Tensor, u: torch.Tensor, grid: Grid, cols: torch.Tensor, block_size: int
) -> torch.Tensor | None:
    """Codes for ``w`` (columns already in processing order, original indices ``cols``) given ``U``.

    Pure: ``w`` is not modified.  Returns int64 codes in the processing order, or None when the error
    feedback overflowed (non-finite updated weights).
    """
    w = w.clone()
    rows, n = w.shape
    codes = torch.empty((rows, n), dtype=torch.int64)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            c, q = grid.snap(w1[:, i : i + 1], cols[i1 + i : i1 + i + 1])
            codes[:, i1 + i] = c[:, 0]
            e = (w1[:, i] - q[:, 0]) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        if not bool(torch.isfinite(err1).all()):
            return None
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes


def gptq_round(
    w: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    max_damp_tries: int = 6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``w`` (rows x cols) onto ``grid`` with GPTQ; returns ``(codes int64, values float32)``.

    ``hessian`` is ``E[xxᵀ]`` of the layer input (cols x cols).  ``values == grid.values(codes)`` exactly.
    """
    if w.dim() != 2:
        raise InputError(f"GPTQ: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, ncols = w.shape
    if tuple(hessian.shape) != (ncols, ncols):
        raise InputError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight columns {ncols}")
    if grid.rows != rows:
        raise InputError(f"GPTQ: grid has {grid.rows} rows, weight has {rows}")
    if block_size < 1 or percdamp < 0 or max_damp_tries < 0:
        raise InputError(f"GPTQ: invalid block_size={block_size}, percdamp={percdamp}, "
                         f"max_damp_tries={max_damp_tries}")
    w32 = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise NumericsError(f"GPTQ: weight ({rows}x{ncols}) contains NaN or Inf")
    if not bool(torch.isfinite(hessian).all()):
        raise NumericsError(f"GPTQ: Hessian ({ncols}x{ncols}) contains NaN or Inf")
    if not (bool(torch.isfinite(grid.scale).all()) and bool(torch.isfinite(grid.offset).all())):
        raise NumericsError("GPTQ: grid scales/offsets contain NaN or Inf")

    dtype = torch.float64 if ncols <= FLOAT64_MAX_COLS else torch.float32
    h, dead = prepare_hessian(hessian.detach(), dtype)
    if bool(dead.any()):
        log.debug("GPTQ: %d dead input columns rounded to nearest", int(dead.sum()))
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(ncols)
    h = h[order][:, order]
    factor = inverse_cholesky_upper(h, percdamp, max_damp_tries)
    if factor is None and dtype != torch.float64:
        factor = inverse_cholesky_upper(h.to(torch.float64), percdamp, max_damp_tries)
    perm_codes = None
    if factor is None:
        log.warning("GPTQ: Hessian (%dx%d) could not be factorised after %d damping increases; using RTN",
                    ncols, ncols, max_damp_tries)
    else:
        perm_codes = gptq_codes(w32[:, order], factor[0].to(torch.float32), grid, order, block_size)
        if perm_codes is None:
            log.warning("GPTQ: error feedback overflowed for a %dx%d weight; using RTN", rows, ncols)
    if perm_codes is None:
        codes, _ = grid.snap(w32)
    else:
        codes = torch.empty_like(perm_codes)
        codes[:, order] = perm_codes
    values = grid.values(codes)
    assert bool(torch.isfinite(values).all()), "GPTQ produced non-finite values from finite inputs"
    return codes, values
