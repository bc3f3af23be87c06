"""Rounding algorithms as pure functions over tensors, plus the one entry point the pipeline calls.

``quantize_weight`` is format-agnostic: the format chooses its grid (scale search, ``Format.fit``), the
rounding method chooses codes on that grid (RTN: nearest point; GPTQ: error feedback with the Hessian),
and the format packs the codes (``Format.encode``).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..formats.base import Format, QTensor, get_format
from .gptq import gptq_round
from .rtn import rtn_round

Method = Literal["rtn", "gptq"]


def quantize_weight(
    w: torch.Tensor,
    fmt: Format | str,
    *,
    hessian: torch.Tensor | None = None,
    method: Method = "gptq",
    importance: torch.Tensor | None = None,
) -> QTensor:
    """Quantize one weight tensor (out x in, or a lookup table vocab x hidden) into ``fmt``.

    ``hessian`` (in x in, ``E[xxᵀ]``) drives GPTQ and, through its diagonal, the weighted scale search
    unless ``importance`` is given.  Without a Hessian, GPTQ degrades to RTN.
    """
    fmt = get_format(fmt)
    dtype = str(w.dtype).removeprefix("torch.")
    if not fmt.is_grid:
        return fmt.store(w)
    if w.dim() != 2:
        raise ValueError(f"{fmt.id}: grid formats store 2-D tensors, got shape {tuple(w.shape)}")
    fmt.check_shape(tuple(w.shape))
    w32 = w.detach().to(torch.float32)
    if importance is None and hessian is not None:
        importance = torch.diagonal(hessian).to(torch.float32).clamp_min(0)
    grid = fmt.fit(w32, importance)
    if method == "gptq" and hessian is not None:
        codes, _ = gptq_round(w32, hessian, grid)
    elif method in ("rtn", "gptq"):
        codes, _ = rtn_round(w32, grid)
    else:
        raise ValueError(f"unknown rounding method {method!r} (use 'rtn' or 'gptq')")
    return fmt.encode(codes, grid, tuple(w.shape), dtype)


def dequantize(q: QTensor) -> torch.Tensor:
    """float32 values of a stored tensor."""
    return get_format(q.format).decode(q)


__all__ = ["quantize_weight", "dequantize", "gptq_round", "rtn_round", "Method"]
