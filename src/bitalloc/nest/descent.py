"""Coordinate descent on nested codes: every depth's output error at once, one leaf code at a time.

The joint GPTQ loop of :func:`bitalloc.nest.codes.nested_codes` chooses each column's codes once, greedily, from
error-feedback targets.  This pass revisits them: for one column of every row at a time it tries all ``2^D`` leaf
codes (each fixes the codes of every depth, its top bits) and keeps the one that lowers

    J = Σ_k λ_k · tr(E_k H E_kᵀ),   E_k = V_k − W,

the sum over depths ``k`` of the output error ``tr(ΔW H ΔWᵀ)`` that ``measure`` stores for depth ``k``, each
weighed by ``λ_k``.  A move never raises ``J`` up to float rounding (the change of every candidate follows from
the gradient ``E_k H`` and ``H``'s diagonal, and the current code is kept unless another is strictly better), so
the descent improves on the codes it starts from or keeps them.

The gradient is kept up to date lazily, GPTQ-style: within a block of columns it is updated column by column for
that block only, and the rest of the matrix once per block by a matrix product.

Why it helps: the shared codes must serve depths whose GPTQ solutions differ; the greedy loop commits to a
column's codes before seeing the columns after it, the descent can trade one depth's error against another's
with every column known.  ``bench/nest_depths.py`` measures it per depth against direct GPTQ.
"""
from __future__ import annotations

import math

import torch

from ..errors import NumericsError


#: Growth per depth of a depth's weight beyond its own error's size (:func:`relative_weights`).
DEPTH_EMPHASIS = 1.5


def relative_weights(w: torch.Tensor, hessian: torch.Tensor, values: dict[int, torch.Tensor],
                     emphasis: float = DEPTH_EMPHASIS) -> dict[int, float]:
    """``λ_k = emphasis^k / tr(E_k H E_kᵀ)`` of the given values per depth: each depth's error counted relative to
    its own size, times ``emphasis`` per depth (a depth with no error, or a tensor with none, counts 1 for its
    error).  At ``emphasis = 1`` the trade between depths leaves the deep ones furthest from direct rounding (a
    deep code's value depends on every bit, a shallow one's only on its top bits); ``bench/nest_depths.py``
    compares the choices, ``bench/anysize.py`` shows the chosen one end to end."""
    hf = hessian.to(w.device, torch.float32)
    out = {}
    for k, v in values.items():
        e = v - w
        err = float(((e @ hf) * e).sum())
        out[k] = float(emphasis) ** k / (err if err > 0 and math.isfinite(err) else 1.0)
    return out


def descend_codes(w: torch.Tensor, hessian: torch.Tensor, leaf: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, depths: list[int], depth: int, lam: dict[int, float], group: int,
                  passes: int, block_size: int = 128, exact: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """Leaf codes (rows, cols) int64 after ``passes`` sweeps of coordinate descent on ``J`` (module docstring).

    ``scales``/``zeros``: (K, rows, groups) bin widths and zeros of ``depths`` (a depth's value is
    ``scale·(leaf >> (depth − k)) + zero``); ``exact``: ``(mask, values)`` of elements stored exactly
    (:func:`bitalloc.nest.codes.pick_outliers`): their value is the stored one at every depth and they keep their
    codes.  ``leaf`` is not modified."""
    w32 = w.detach().to(torch.float32)
    rows, cols = w32.shape
    dev = w32.device
    leaf = leaf.to(dev, torch.int64).clone()
    if passes <= 0 or cols == 0 or rows == 0:
        return leaf
    gidx = torch.div(torch.arange(cols, device=dev), group, rounding_mode="floor")
    nk = len(depths)
    shift = torch.tensor([depth - k for k in depths], device=dev).view(nk, 1, 1)
    lamt = torch.tensor([float(lam.get(k, 0.0)) for k in depths], device=dev).view(nk, 1, 1)
    cand = torch.arange(1 << depth, device=dev).view(1, 1, -1) >> shift  # (K, 1, 2^D): each leaf's code per depth
    hf = hessian.to(dev, torch.float32)
    hd = torch.diagonal(hf)
    dk, zk = scales.to(dev)[:, :, gidx], zeros.to(dev)[:, :, gidx]  # (K, rows, cols)
    values = dk * (leaf.unsqueeze(0) >> shift) + zk
    keep = None
    if exact is not None:
        keep = exact[0].to(dev)
        values = torch.where(keep.unsqueeze(0), exact[1].to(dev, torch.float32).unsqueeze(0), values)
    for _ in range(passes):
        grad = (values - w32.unsqueeze(0)) @ hf  # (K, rows, cols): E_k H, afresh each pass (no drift)
        for b0 in range(0, cols, block_size):
            b1 = min(cols, b0 + block_size)
            gb = grad[:, :, b0:b1].clone()
            moved = torch.zeros(nk, rows, b1 - b0, device=dev)
            hb = hf[b0:b1, b0:b1]
            for i in range(b1 - b0):
                j = b0 + i
                delta = dk[:, :, j:j + 1] * cand + zk[:, :, j:j + 1] - values[:, :, j:j + 1]  # (K, rows, 2^D)
                cost = (lamt * delta * (2 * gb[:, :, i:i + 1] + hd[j] * delta)).sum(0)  # ΔJ per candidate
                best_cost, best = cost.min(1)
                take = best_cost < 0
                if keep is not None:
                    take &= ~keep[:, j]
                if not bool(take.any()):
                    continue
                new = torch.where(take, best, leaf[:, j])
                newval = dk[:, :, j] * (new.unsqueeze(0) >> shift[:, :, 0]) + zk[:, :, j]
                newval = torch.where(take.unsqueeze(0), newval, values[:, :, j])  # (K, rows)
                step = newval - values[:, :, j]
                leaf[:, j] = new
                values[:, :, j] = newval
                moved[:, :, i] = step
                gb += step.unsqueeze(2) * hb[i].view(1, 1, -1)
            grad += moved @ hf[b0:b1]
    if not bool(torch.isfinite(grad).all()):
        raise NumericsError("nested codes: coordinate descent overflowed")
    return leaf


__all__ = ["DEPTH_EMPHASIS", "descend_codes", "relative_weights"]
