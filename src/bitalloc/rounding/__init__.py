"""Rounding algorithms as pure functions over tensors, plus the one entry point the pipeline calls.

``quantize_weight`` is format-agnostic: the format chooses its grid (scale search, ``Format.fit``), the
rounding method -- a :class:`~.methods.Rounder` from the registry (:mod:`.methods`: ``gptq``, ``rtn``) --
chooses codes on that grid, and the format packs the codes (``Format.encode``).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..formats.base import Format, QTensor, get_format
from ..formats.rotated import rotation_of
from .gptq import FactoredHessian, GPTQFactor, gptq_factor, gptq_round, gptq_round_many, gptq_round_many_measured
from .methods import (GPTQ_REFITS, ROUNDERS, Rounder, get_rounder, gptq_refit, gptq_refit_many,
                      gptq_refit_many_measured, method_names, register_rounder)
from .rtn import rtn_round

#: a rounding method: a registered name (:func:`~.methods.method_names`) or a :class:`~.methods.Rounder`
Method = str | Rounder

#: Tensors with more elements are quantized (and measured) in blocks of rows of at most this many elements.
ROW_CHUNK_ELEMS = 1 << 20
#: A weight rounded with a Hessian of ``cols`` columns may be cut into row blocks of up to ``cols² ÷`` this many
#: elements (:func:`round_block_elems`).
HESSIAN_BLOCK_SHARE = 8


def round_block_elems(cols: int, hessian: bool = True) -> int:
    """Most elements of one row block of a weight with ``cols`` columns that the quantization rounds at once:
    :data:`ROW_CHUNK_ELEMS`, or with a Hessian up to ``cols² ÷`` :data:`HESSIAN_BLOCK_SHARE`.  The Hessian and its
    GPTQ factorisation hold a few ``cols x cols`` matrices anyway, and a block costs some 30 bytes per element (its
    rows, their working copy, int64 codes, values), so such a block leaves the peak where the factorisation puts
    it; fewer, larger blocks pay GPTQ's per-column Python overhead less often.  Rows are rounded independently, so
    the bytes do not depend on it."""
    return max(ROW_CHUNK_ELEMS, cols * cols // HESSIAN_BLOCK_SHARE) if hessian else ROW_CHUNK_ELEMS


def row_chunks(rows: int, cols: int, max_elems: int | None = ROW_CHUNK_ELEMS) -> list[slice]:
    """Row blocks of a (rows, cols) tensor with at most ``max_elems`` elements each (None: one block).

    Blocks hold multiples of 8 rows (at least 8), so every block of every format starts on a byte boundary
    (a ``row``-group int format packs ``cols * bits`` bits per row)."""
    if max_elems is None or rows * cols <= max_elems:
        return [slice(0, rows)]
    if max_elems < 1:
        raise ValueError(f"max_elems must be positive, got {max_elems}")
    step = max(8, max_elems // max(cols, 1) // 8 * 8)
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def quantize_chunks(
    w: torch.Tensor,
    fmt: Format | str,
    *,
    hessian: torch.Tensor | None = None,
    method: Method = "gptq",
    importance: torch.Tensor | None = None,
    max_elems: int | None = ROW_CHUNK_ELEMS,
) -> Iterator[tuple[slice, QTensor]]:
    """``(rows, QTensor of w[rows])`` for consecutive row blocks of ``w`` (see :func:`row_chunks`).

    Every format's grid, RTN and GPTQ treat rows independently (groups run along columns; GPTQ's error
    feedback moves along columns), so the blocks are exactly the rows of :func:`quantize_weight` of the
    whole tensor, and ``fmt.concat_rows`` of them is byte-identical to it.  Temporaries (float32 copy,
    int64 codes, grids) exist for one block at a time.  A per-element ``importance`` (rows, cols) is not
    split (its mean enters some scale searches): the tensor is then one block.

    A format with an input rotation R (:func:`bitalloc.formats.rotated.rotation_of`: ``had-…``) fits, rounds and
    stores ``W·R`` under the Hessian ``Rᵀ·H·R`` (importance: its diagonal, or ``diag(Rᵀ·diag(importance)·R)``);
    every other format takes exactly the float operations it always did.
    """
    fmt = get_format(fmt)
    if not fmt.is_grid:
        if w.dim() < 2:
            yield slice(0, int(w.shape[0]) if w.dim() else 1), fmt.store(w)
            return
        for sl in row_chunks(int(w.shape[0]), math.prod(w.shape[1:]), max_elems):
            yield sl, fmt.store(w[sl])
        return
    if w.dim() != 2:
        raise ValueError(f"{fmt.id}: grid formats store 2-D tensors, got shape {tuple(w.shape)}")
    fmt.check_shape(tuple(w.shape))
    dtype = str(w.dtype).removeprefix("torch.")
    rot = rotation_of(fmt, int(w.shape[1]))  # None but for recorded rotations (had-…): they round W·R
    if rot is not None:
        importance = None if importance is None else rot.importance(importance.to(w.device))
        hessian = None if hessian is None else rot.conjugate(hessian)
    if importance is None and hessian is not None:
        importance = torch.diagonal(hessian).to(torch.float32).clamp_min(0)
    if importance is not None:
        importance = importance.to(w.device)
    rounder = get_rounder(method)
    rows, cols = (int(d) for d in w.shape)
    split = importance is None or importance.dim() == 1
    prepared = rounder.prepare(hessian, w.device)  # once for every row block (GPTQ: the factorisation)
    for sl in row_chunks(rows, cols, max_elems if split else None):
        w32 = w[sl].detach().to(torch.float32)
        if rot is not None:
            w32 = rot.apply(w32)
        grid = fmt.fit(w32, importance)
        codes, grid = rounder.round(w32, grid, fmt, prepared)
        yield sl, fmt.encode(codes, grid, tuple(w32.shape), dtype)


def quantize_weight(
    w: torch.Tensor,
    fmt: Format | str,
    *,
    hessian: torch.Tensor | None = None,
    method: Method = "gptq",
    importance: torch.Tensor | None = None,
    max_elems: int | None = ROW_CHUNK_ELEMS,
) -> QTensor:
    """Quantize one weight tensor (out x in, or a lookup table vocab x hidden) into ``fmt``.

    ``hessian`` (in x in, ``E[xxᵀ]``) drives GPTQ and, through its diagonal, the weighted scale search
    unless ``importance`` is given.  Without a Hessian, GPTQ degrades to RTN.  Tensors of more than
    ``max_elems`` elements are quantized in row blocks and joined (byte-identical; see
    :func:`quantize_chunks`).
    """
    fmt = get_format(fmt)
    if not fmt.is_grid:
        return fmt.store(w)
    parts = [q for _, q in quantize_chunks(w, fmt, hessian=hessian, method=method, importance=importance,
                                           max_elems=max_elems)]
    return parts[0] if len(parts) == 1 else fmt.concat_rows(parts)


def dequantize(q: QTensor) -> torch.Tensor:
    """float32 values of a stored tensor."""
    return get_format(q.format).decode(q)


__all__ = ["quantize_weight", "quantize_chunks", "row_chunks", "ROW_CHUNK_ELEMS", "HESSIAN_BLOCK_SHARE",
           "round_block_elems", "dequantize", "gptq_round",
           "gptq_round_many", "gptq_round_many_measured", "gptq_factor", "FactoredHessian", "GPTQFactor",
           "gptq_refit", "gptq_refit_many", "gptq_refit_many_measured", "GPTQ_REFITS", "rtn_round", "Method",
           "ROUNDERS", "Rounder", "get_rounder", "method_names", "register_rounder"]
