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
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError, NumericsError
from ..formats.base import Grid
from ..formats.fit import all_finite
from .stacked import StackedGrid, stacked_codes

log = logging.getLogger(__name__)

#: Up to this many columns the factorisation runs in float64 (cost ~cols³, negligible below this).
FLOAT64_MAX_COLS = 4096
#: Smallest damping ever used, so that ``percdamp=0`` on an all-zero Hessian still factorises.
MIN_DAMP = 1e-10


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
        if u is not None:
            return u, lam
        del damped
        if attempt < max_damp_tries:
            log.info("GPTQ: Cholesky failed with damping %.3g; retrying with %.3g", lam, lam * 10)
            lam *= 10
    return None


def _try_factor(h: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor of ``h⁻¹``, computed in ``h``'s own memory (overwritten: the Cholesky factor, the
    inverse and its factor each in place, the same values as with new tensors, without three more n x n
    matrices), or None when a factorisation fails."""
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0 or not bool(torch.isfinite(h).all()):
        return None
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    if int(info) != 0 or not bool(torch.isfinite(h).all()) or not bool((torch.diagonal(h) > 0).all()):
        return None
    return h


@dataclass(frozen=True, eq=False)
class GPTQFactor:
    """What every GPTQ rounding of weights with this Hessian shares: the column processing ``order`` and
    the upper Cholesky factor ``upper`` (float32) of the permuted, damped inverse Hessian, or None when no
    damping made it factorisable (the weights are then rounded to nearest)."""

    order: torch.Tensor
    upper: torch.Tensor | None
    ncols: int
    #: the damping ``λ`` added to the diagonal before factorising (0 when there is no factor)
    damp: float = 0.0
    #: some input column was dead (``H_jj <= 0``) and decoupled while ``H`` coupled it to others (or had
    #: ``H_jj < 0``): the factor is then not that of ``H + λI`` in any way the feedback can undo
    decoupled: bool = False
    #: the dead input columns (bool, original order) when ``H``'s rows and columns there are exactly zero (inputs
    #: that are always 0), else None: the factor is that of ``H + λI`` with 1 added at them
    dead: torch.Tensor | None = None


def gptq_factor(
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    act_order: bool = True,
    max_damp_tries: int = 6,
    device: torch.device | str | None = None,
) -> GPTQFactor:
    """Check, decouple dead columns, order and factorise ``hessian`` (cols x cols) on ``device`` (default:
    the Hessian's own), once for any number of weights and grids rounded with it."""
    ncols = int(hessian.shape[0]) if hessian.dim() == 2 else -1
    if hessian.dim() != 2 or tuple(hessian.shape) != (ncols, ncols):
        raise InputError(f"GPTQ: the Hessian must be square, got shape {tuple(hessian.shape)}")
    if percdamp < 0 or max_damp_tries < 0:
        raise InputError(f"GPTQ: invalid percdamp={percdamp}, max_damp_tries={max_damp_tries}")
    hessian = hessian.detach().to(device if device is not None else hessian.device)
    if not all_finite(hessian):
        raise NumericsError(f"GPTQ: Hessian ({ncols}x{ncols}) contains NaN or Inf")
    dtype = torch.float64 if ncols <= FLOAT64_MAX_COLS else torch.float32
    h, dead = prepare_hessian(hessian, dtype)
    ndead = int(dead.sum())
    zero_dead = None
    if ndead:
        log.debug("GPTQ: %d dead input columns rounded to nearest", ndead)
        if not bool(hessian[dead].any()) and not bool(hessian[:, dead].any()):
            zero_dead = dead
    order = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order
             else torch.arange(ncols, device=h.device))
    h = h[order]  # one permutation at a time: at most two n x n copies exist
    h = h[:, order]
    factor = inverse_cholesky_upper(h, percdamp, max_damp_tries)
    if factor is None and dtype != torch.float64:
        factor = inverse_cholesky_upper(h.to(torch.float64), percdamp, max_damp_tries)
    if factor is None:
        log.warning("GPTQ: Hessian (%dx%d) could not be factorised after %d damping increases; using RTN",
                    ncols, ncols, max_damp_tries)
        return GPTQFactor(order, None, ncols)
    return GPTQFactor(order, factor[0].to(torch.float32), ncols, factor[1], ndead > 0 and zero_dead is None,
                      zero_dead)


@dataclass(frozen=True, eq=False)
class FactoredHessian:
    """A Hessian (cols x cols) with its :class:`GPTQFactor`, made once (:meth:`bitalloc.rounding.GPTQ.prepare`)
    for every row block of the weight it belongs to.  The factorisation costs ~cols³ (seconds at 5000 columns),
    as much as rounding hundreds of rows, and a weight is rounded in row blocks (:func:`~bitalloc.rounding.
    row_chunks`); rounding with it gives the codes a factorisation per block gives, to the bit."""

    hessian: torch.Tensor
    factor: GPTQFactor


def _check_weight(w: torch.Tensor, ncols: int, grids: Sequence[Grid], block_size: int) -> torch.Tensor:
    if w.dim() != 2:
        raise InputError(f"GPTQ: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = (int(d) for d in w.shape)
    if cols != ncols:
        raise InputError(f"GPTQ: Hessian shape ({ncols}, {ncols}) does not match weight columns {cols}")
    if block_size < 1:
        raise InputError(f"GPTQ: invalid block_size={block_size}")
    for grid in grids:
        if grid.rows != rows:
            raise InputError(f"GPTQ: grid has {grid.rows} rows, weight has {rows}")
    w32 = w.detach().to(torch.float32)
    if not all_finite(w32):
        raise NumericsError(f"GPTQ: weight ({rows}x{cols}) contains NaN or Inf")
    for grid in grids:
        if not (bool(torch.isfinite(grid.scale).all()) and bool(torch.isfinite(grid.offset).all())):
            raise NumericsError("GPTQ: grid scales/offsets contain NaN or Inf")
    return w32


def gptq_round_many(
    w: torch.Tensor,
    hessian: torch.Tensor | GPTQFactor,
    grids: Sequence[Grid],
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    max_damp_tries: int = 6,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-round ``w`` (rows x cols) onto every grid of ``grids`` at once: ``[(codes, values)]`` per grid.

    The grids' copies of the rows are stacked and rounded by one column loop (:mod:`.stacked`) with one
    factorisation (pass a :class:`GPTQFactor` to reuse one across calls; ``percdamp``, ``act_order`` and
    ``max_damp_tries`` then do not apply).  Each grid's codes are those :func:`gptq_round` gives for it
    alone up to float rounding in the blocked matrix products (bit-identical for a single grid).  A grid
    whose error feedback overflows is rounded to nearest, as is everything when the Hessian could not be
    factorised.  Memory: about ``len(grids)`` times that of one rounding; callers stack fewer rows to bound
    it (rows are independent).  Everything runs on ``w``'s device.
    """
    return [(c, v) for c, v, _ in gptq_round_many_measured(
        w, hessian, grids, block_size=block_size, percdamp=percdamp, act_order=act_order,
        max_damp_tries=max_damp_tries, errors=False)]


def gptq_round_many_measured(
    w: torch.Tensor,
    hessian: torch.Tensor | GPTQFactor,
    grids: Sequence[Grid],
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    max_damp_tries: int = 6,
    errors: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """:func:`gptq_round_many` with each grid's per-row layer-output error ``(ΔW H ΔWᵀ)_rr`` (float64), read off
    GPTQ's own error feedback: ``[(codes, values, row_errors)]``.

    With ``UᵀU = (H + λI)⁻¹`` (``U`` upper), the rounding makes ``W − Q = E·U`` for the scaled feedback
    ``E`` (column ``j`` holds ``(w'_j − q_j) / U_jj``), so ``ΔW (H + λI) ΔWᵀ = E Eᵀ`` as ``U (H + λI) Uᵀ = I``:
    the error is ``Σ_j E_rj² − λ‖ΔW_r‖²``, without the ``rows x cols²`` product that computing it from ``ΔW``
    costs.  It equals that product up to float rounding.  ``row_errors`` is None where the identity does not
    hold: no factor (RTN), a row whose feedback overflowed (RTN), or dead input columns (decoupled, so the
    factor is not that of ``H``'s own quadratic form, unless ``H`` is exactly zero there: those columns are then
    left out of the sums, :attr:`GPTQFactor.dead`), and everywhere when ``errors`` is False (the rounding alone, as
    :func:`gptq_round_many` asks for it: no sums kept in the column loop)."""
    grids = list(grids)
    if not grids:
        return []
    factor = hessian if isinstance(hessian, GPTQFactor) else gptq_factor(
        hessian, percdamp=percdamp, act_order=act_order, max_damp_tries=max_damp_tries, device=w.device)
    w32 = _check_weight(w, factor.ncols, grids, block_size)
    rows = int(w32.shape[0])
    codes_all: list[torch.Tensor | None] = [None] * len(grids)
    feedback: list[torch.Tensor | None] = [None] * len(grids)
    if factor.upper is not None:
        order = factor.order.to(w32.device)
        sg = StackedGrid.of(grids, w32.device)
        stacked = w32[:, order]  # a copy (indexed), which the loop may overwrite
        if len(grids) > 1:
            stacked = stacked.repeat(len(grids), 1)
        perm, bad, sq = stacked_codes(stacked, factor.upper.to(w32.device), sg, order, block_size,
                                      feedback_sq=errors and not factor.decoupled, overwrite=True,
                                      skip=None if factor.dead is None else factor.dead.to(w32.device)[order])
        del stacked
        bad_any = bad.reshape(len(grids), rows).any(1).tolist()
        for j, f in enumerate(sg.index):  # stacked block j holds grids[f]
            if bad_any[j]:
                log.warning("GPTQ: error feedback overflowed for a %dx%d weight; using RTN", rows, factor.ncols)
                continue
            codes = torch.empty((rows, factor.ncols), dtype=torch.int64, device=w32.device)
            codes[:, order] = perm[j * rows:(j + 1) * rows].to(torch.int64)
            codes_all[f] = codes
            feedback[f] = None if sq is None else sq[j * rows:(j + 1) * rows]
        del perm  # each grid's codes are copied out
    out = []
    for grid, codes, sq_f in zip(grids, codes_all, feedback):
        if codes is None:
            codes, _ = grid.snap(w32)
        values = grid.values(codes)
        assert all_finite(values), "GPTQ produced non-finite values from finite inputs"
        row_err = None
        if sq_f is not None:
            dw2 = (values - w32).square_()
            if factor.dead is not None:  # decoupled, H has nothing there: left out of the sums (stacked_codes)
                dw2[:, factor.dead.to(dw2.device)] = 0
            row_err = sq_f - factor.damp * dw2.sum(1, dtype=torch.float64)
            del dw2
        out.append((codes, values, row_err))
    return out


def gptq_round(
    w: torch.Tensor,
    hessian: torch.Tensor | GPTQFactor,
    grid: Grid,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    max_damp_tries: int = 6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``w`` (rows x cols) onto ``grid`` with GPTQ; returns ``(codes int64, values float32)``.

    ``hessian`` is ``E[xxᵀ]`` of the layer input (cols x cols), or its :class:`GPTQFactor`.
    ``values == grid.values(codes)`` exactly.
    """
    if w.dim() != 2:
        raise InputError(f"GPTQ: expected a 2-D weight, got shape {tuple(w.shape)}")
    if isinstance(hessian, torch.Tensor) and tuple(hessian.shape) != (int(w.shape[1]),) * 2:
        raise InputError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight columns {w.shape[1]}")
    if block_size < 1 or percdamp < 0 or max_damp_tries < 0:
        raise InputError(f"GPTQ: invalid block_size={block_size}, percdamp={percdamp}, "
                         f"max_damp_tries={max_damp_tries}")
    return gptq_round_many(w, hessian, [grid], block_size=block_size, percdamp=percdamp, act_order=act_order,
                           max_damp_tries=max_damp_tries)[0]
