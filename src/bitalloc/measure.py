"""Measuring the table: for every tensor and candidate format, the predicted errors of storing it so.

Two error functions (pure, over tensors, float64 accumulation), summed over a tensor's roles:

* ``output_error``  = Σ_roles tr(ΔW H ΔWᵀ)            (lookup role: Σ_v freq_v ‖ΔE_v‖²)
* ``fisher_error``  = ½ Σ_roles Σ_j grad_sq_j (ΔW H ΔWᵀ)_jj   (lookup: ½ Σ_v freq_v Σ_j grad_sq_j ΔE_vj²)

A format whose runtime rounds the activations (``Format.activation_rounding``: llama.cpp's Q8_0/Q8_K) adds
the output error of that rounding, :func:`activation_error`, to both.

The table itself (:class:`Measurement`, its rows and JSON) lives in :mod:`bitalloc.table`; its names are
re-exported here.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .errors import InputError, NumericsError
from .formats import Format, Grid, QTensor, get_format
from .formats.fit import all_finite
from .formats.rotated import Rotation, rotation_of
from .rounding import ROW_CHUNK_ELEMS, Method, dequantize, get_rounder, quantize_chunks, row_chunks
from .placement import Placement, qtensor_cpu
from .stats import LinearStats, LookupStats, TensorStats
from .timing import StageTimer, timed
from .table import (  # noqa: F401  (re-exported: the table's historical home)
    FORMAT_VERSION, ROLES, MeasureRow, Measurement, TensorInfo, json_with_lines, parse_versioned_json,
    write_text_atomic,
)

log = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 20  # rows of ΔW·H computed at once: ~8 MiB of float64

#: ``keep(format id, QTensor)``: receives a tensor's rounding into one format as the measurement made it
Keep = Callable[[str, QTensor], None]
#: one row block of a tensor rounded into every grid format (:func:`grid_chunks`): per format id its ``(output,
#: fisher)`` error on those rows, and its rounding of them when kept (else None)
GridChunk = tuple[dict[str, tuple[float, "float | None"]], "dict[str, QTensor] | None"]
#: ``source(grid formats, elements per row block)``: the :data:`GridChunk` of each of a tensor's row blocks, in order
GridSource = Callable[[Sequence[Format], int], Iterable[GridChunk]]


# --- error functions ----------------------------------------------------------------------------
def _row_quad(dw: torch.Tensor, h: torch.Tensor | None, col_w: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row quadratic forms in float64, over chunks of rows: (ΔW H ΔWᵀ)_jj when ``h`` is given, else
    Σ_c col_w_c ΔW_jc² (col_w = 1 when None)."""
    rows, cols = dw.shape
    out = torch.empty(rows, dtype=torch.float64, device=dw.device)
    h = None if h is None else h.to(dw.device)
    col_w = None if col_w is None else col_w.to(dw.device)
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for a in range(0, rows, step):
        d = dw[a : a + step].to(torch.float64)
        if h is not None:
            out[a : a + step] = ((d @ h) * d).sum(dim=1)
        elif col_w is not None:
            out[a : a + step] = d.square_() @ col_w
        else:
            out[a : a + step] = d.square_().sum(dim=1)
    return out


def _hessian(role: LinearStats, cols: int) -> torch.Tensor:
    h = role.hessian
    if tuple(h.shape) != (cols, cols):
        raise InputError(f"hessian of shape {tuple(h.shape)} does not fit a weight with {cols} input columns")
    if not all_finite(h):
        raise NumericsError("hessian contains NaN or Inf")
    return h.to(torch.float64)


def _check(dw: torch.Tensor, stats: TensorStats) -> None:
    if dw.dim() != 2:
        raise InputError(f"error functions take a 2-D ΔW, got shape {tuple(dw.shape)}")
    if not all_finite(dw):
        raise NumericsError("ΔW contains NaN or Inf")
    if not stats.roles:
        raise InputError("tensor statistics have no roles")


def output_error(dw: torch.Tensor, stats: TensorStats) -> float:
    """Σ_roles tr(ΔW H ΔWᵀ) (lookup role: Σ_v freq_v ‖ΔE_v‖²), non-negative, float64 accumulation."""
    _check(dw, stats)
    rows, cols = dw.shape
    total = 0.0
    for role in stats.roles:
        if isinstance(role, LinearStats):
            total += float(_row_quad(dw, _hessian(role, cols)).sum())
        elif isinstance(role, LookupStats):
            total += float(_vector(role.token_freq, rows, "token_freq", dw.device) @ _row_quad(dw, None))
        else:
            raise InputError(f"unknown role statistics {type(role).__name__}")
    return max(total, 0.0)


def fisher_error(dw: torch.Tensor, stats: TensorStats) -> float | None:
    """½ Σ_roles Σ_j grad_sq_j (ΔW H ΔWᵀ)_jj (lookup: ½ Σ_v freq_v Σ_j grad_sq_j ΔE_vj²); None when a role
    has no ``grad_sq``."""
    _check(dw, stats)
    if any(r.grad_sq is None for r in stats.roles):
        return None
    rows, cols = dw.shape
    total = 0.0
    for role in stats.roles:
        if isinstance(role, LinearStats):
            g = _vector(role.grad_sq, rows, "grad_sq", dw.device)
            total += float(g @ _row_quad(dw, _hessian(role, cols)))
        elif isinstance(role, LookupStats):
            f = _vector(role.token_freq, rows, "token_freq", dw.device)
            total += float(f @ _row_quad(dw, None, _vector(role.grad_sq, cols, "grad_sq", dw.device)))
        else:
            raise InputError(f"unknown role statistics {type(role).__name__}")
    return max(0.5 * total, 0.0)


def activation_error(stats: TensorStats, rounding: str | None, rows: int) -> tuple[float, float | None]:
    """``(output, fisher)`` error the runtime's activation rounding adds, whatever the weight's rounding:
    Σ_linear roles Σ_j act_j and ½ Σ Σ_j grad_sq_j act_j, with ``act = role.act_noise[rounding]``
    (:mod:`bitalloc.activations`).  Roles measured without that rounding (and lookups) add nothing."""
    out, fisher = 0.0, 0.0
    if rounding is None:
        return out, fisher
    for role in stats.roles:
        if not isinstance(role, LinearStats) or rounding not in role.act_noise:
            continue
        act = _vector(role.act_noise[rounding], rows, f"{rounding} activation noise")
        out += float(act.sum())
        fisher = None if role.grad_sq is None or fisher is None else \
            fisher + 0.5 * float(_vector(role.grad_sq, rows, "grad_sq") @ act)
    return out, fisher


def _vector(v: torch.Tensor | None, n: int, what: str, device: torch.device | None = None) -> torch.Tensor:
    assert v is not None
    if tuple(v.shape) != (n,):
        raise InputError(f"{what} of shape {tuple(v.shape)} does not match {n} entries")
    if not torch.isfinite(v).all():
        raise NumericsError(f"{what} contains NaN or Inf")
    return v.to(device=device if device is not None else v.device, dtype=torch.float64)


def measure_tensor(
    name: str,
    w: torch.Tensor,
    stats: TensorStats,
    formats: Sequence[str | Format],
    method: Method = "gptq",
    *,
    max_elems: int | None = ROW_CHUNK_ELEMS,
    release: Callable[[slice], None] | None = None,
    batched: bool = True,
    stack_elems: int | None = None,
    grid_elems: int | None = None,
    placement: Placement | None = None,
    timer: StageTimer | None = None,
    keep: Keep | None = None,
    grid_source: GridSource | None = None,
    checked: bool = False,
) -> list[MeasureRow]:
    """Quantize ``w`` into every format that supports its shape and measure the resulting errors.

    ``ΔW = dequantize(quantize_weight(w, fmt, hessian=stats.hessian, method=method)) − w``; bytes are the
    format's exact ``nbytes(shape)``.  Formats that cannot store the shape are skipped (logged).

    ``method``: a registered rounding method (:mod:`bitalloc.rounding.methods`).  ``batched`` (the default) rounds
    every grid format of the tensor together (:meth:`~bitalloc.rounding.Rounder.round_many`; GPTQ: one Hessian
    factorisation and one column loop over the formats' stacked rows, :func:`bitalloc.rounding.gptq_refit_many`),
    ΔW from the grid values of the codes (what ``decode`` of the stored bytes gives); where GPTQ's own error
    feedback gives a format's layer-output error (:meth:`~bitalloc.rounding.Rounder.round_many_measured`: every
    format its last refit left unchanged), that is taken instead of the ``rows x cols²`` product with ΔW.  The
    errors equal the per-format path's (``batched=False``: :func:`bitalloc.rounding.quantize_chunks` and
    ``dequantize`` per format, as ``quantize_weight`` stores it) up to float rounding in GPTQ's blocked products
    and float32 feedback.  The formats × rows × cols stack holds at most ``stack_elems`` elements (default: the
    placement's, :attr:`~bitalloc.placement.Placement.stack_elems`): rows are batched in blocks of at most that
    many ÷ formats (rows are independent), and of at most ``grid_elems`` elements of ``w`` (default:
    ``max_elems``; the pipeline passes the stack's bound, so that only the stack bounds them: each block is one
    Python loop over the columns, whose per-column overhead fewer, larger blocks pay less often).  A recorded
    rotation (``had-…``) rounds ``W·R`` under ``Rᵀ·H·R`` in its own stack (one per rotation) and its ΔW is rotated
    back: the errors are the original weight's, as ``decode`` gives it.  Everything runs on ``w``'s device;
    ``timer`` gets ``measure.factor`` (the Hessian's factorisation, once per weight), ``measure.fit``,
    ``measure.gptq``, ``measure.refit``, ``measure.errors`` (and ``measure.store`` for pass-through formats).
    ``placement``: the run's policy (default: that of ``w``'s device), whose chunk size and memory release the
    measurement follows.  ``keep(format id, QTensor)``, when given, receives every format's
    rounding of ``w`` as it was measured (in CPU memory; it decodes to exactly the values whose errors the row
    holds): what a quantization can reuse instead of rounding again (``--reuse-rounding``).  ``grid_source``, when
    given, supplies the row blocks' results of the grid formats instead of rounding them here (the measurement
    workers of :mod:`bitalloc.measure_pool` compute them with :func:`grid_chunks`); they are summed in the same order.
    ``checked``: the caller has already found every value of ``w`` finite (:func:`check_finite`; the pool does,
    before any worker sees the weight), so it is not read again for that.

    Bounded memory: a tensor of more than ``max_elems`` elements is quantized and measured in blocks of rows
    (:func:`bitalloc.rounding.quantize_chunks`).  Every format quantizes rows independently and both errors
    are sums over rows (per-row ``grad_sq`` / ``token_freq`` sliced with the block, the Hessian shared), so
    the table equals the unchunked one up to float64 summation order.  ``release(rows)``, when given, is
    called after each block of rows was read (a spilled weight drops those pages: only one block of a big
    tensor is then resident at a time): after the finite check, after each batched block of the grid
    formats and after each block of every other format.
    """
    drop = release if release is not None else (lambda _rows: None)
    get_rounder(method)  # an unknown method is refused before any work
    place = placement if placement is not None else Placement.for_device(w.device)
    shape = tuple(w.shape)
    nrows = int(shape[0]) if shape else 1
    if stats.roles and all(r.ntokens == 0 for r in stats.roles):
        # e.g. a MoE expert the router never chose: every error is 0, so the allocator gives it the cheapest format
        log.warning("%s received no calibration tokens: its measured error is 0 for every format, so it will get "
                    "the cheapest one; calibrate with more (or more varied) text to measure it", name)
    if not checked:
        check_finite(name, w, max_elems, drop)
    if w.dim() == 2:
        _check_rows(stats, nrows)
    fmts = []
    for spec in formats:
        fmt = get_format(spec)
        if fmt.supports(shape):
            fmts.append(fmt)
        else:
            log.debug("%s: format %s cannot store shape %s, skipped", name, fmt.id, shape)
    errs: dict[str, tuple[float, float | None]] = {}
    if batched and w.dim() == 2:
        grid_fmts = [f for f in fmts if f.is_grid]
        elems = grid_block_elems(len(grid_fmts), max_elems if grid_elems is None else grid_elems,
                                 place.stack_elems if stack_elems is None else stack_elems)
        chunks = grid_source(grid_fmts, elems) if grid_source is not None and grid_fmts else \
            grid_chunks(name, w, stats, grid_fmts, method, elems, place, timer, keep is not None, drop)
        errs.update(_accumulate(grid_fmts, chunks, keep))
        fmts_alone = [f for f in fmts if not f.is_grid]
    else:
        fmts_alone = fmts
    for fmt in fmts_alone:
        with timed(timer, "measure.store" if not fmt.is_grid else "measure.quantize"):
            errs[fmt.id] = _measure_one(name, w, stats, fmt, method, max_elems, drop, place, keep)
    rows: list[MeasureRow] = []
    for fmt in fmts:
        out_err, fi_err = errs[fmt.id]
        if w.dim() == 2:
            act_out, act_fi = activation_error(stats, fmt.activation_rounding, nrows)
            out_err += act_out
            fi_err = None if fi_err is None or act_fi is None else fi_err + act_fi
        rows.append(MeasureRow(name, fmt.id, int(fmt.nbytes(shape)), out_err, fi_err))
    return rows


def _measure_one(name: str, w: torch.Tensor, stats: TensorStats, fmt: Format, method: Method,
                 max_elems: int | None, drop: Callable[[slice], None], place: Placement, keep: Keep | None = None
                 ) -> tuple[float, float | None]:
    """(output, fisher) error of one format as :func:`quantize_weight` stores it, block by block (``keep``: see
    :func:`measure_tensor`)."""
    out_err, fi_err = 0.0, 0.0
    kept: list[QTensor] = []
    for sl, q in quantize_chunks(w, fmt, hessian=stats.hessian, method=method, max_elems=max_elems):
        if keep is not None:
            kept.append(qtensor_cpu(q))
        w32 = w[sl].detach().to(torch.float32)
        dw = dequantize(q).to(device=w32.device, dtype=torch.float32).reshape(w32.shape) - w32
        if not all_finite(dw):
            raise NumericsError(f"{name}: quantizing into {fmt.id} produced NaN or Inf")
        part = rows_of(stats, sl) if w.dim() == 2 else stats
        out_err += output_error(dw, part)
        fe = fisher_error(dw, part)
        fi_err = None if fe is None or fi_err is None else fi_err + fe
        del q, w32, dw
        drop(sl)
        place.release()
    if keep is not None:
        keep(fmt.id, _joined(fmt, kept))
    return out_err, fi_err


def _joined(fmt: Format, parts: list[QTensor]) -> QTensor:
    """Row blocks of one tensor as one QTensor (byte-identical to rounding it whole: rows are independent)."""
    return parts[0] if len(parts) == 1 else fmt.concat_rows(parts)


def check_finite(name: str, w: torch.Tensor, max_elems: int | None, drop: Callable[[slice], None]) -> None:
    """NumericsError naming ``name`` unless every value of ``w`` is finite, read a block of at most ``max_elems``
    elements of rows at a time (a 2-D weight), ``drop(rows)`` after each block."""
    for sl in row_chunks(int(w.shape[0]), math.prod(w.shape[1:]), max_elems) if w.dim() == 2 else [slice(None)]:
        if not all_finite(w[sl]):
            raise NumericsError(f"weight {name!r} contains NaN or Inf")
        drop(sl)


def grid_block_elems(nfmts: int, max_elems: int | None, stack_elems: int) -> int:
    """Most elements of one row block of a tensor rounded into ``nfmts`` grid formats at once: the stack of every
    format's copy of it holds at most ``stack_elems``, one copy at most ``max_elems``."""
    if stack_elems < 1:
        raise ValueError(f"stack_elems must be positive, got {stack_elems}")
    cap = max(1, stack_elems // max(nfmts, 1))
    return cap if max_elems is None else min(cap, max_elems)


def grid_formats(formats: Sequence[str | Format], shape: tuple[int, ...]) -> list[Format]:
    """The grid formats of ``formats`` that can store ``shape`` (those :func:`measure_tensor` rounds together)."""
    return [f for f in map(get_format, formats) if f.is_grid and f.supports(shape)]


def grid_chunks(name: str, w: torch.Tensor, stats: TensorStats, fmts: Sequence[Format], method: Method,
                block_elems: int, place: Placement, timer: StageTimer | None = None, keep: bool = False,
                drop: Callable[[slice], None] | None = None) -> Iterator[GridChunk]:
    """Every grid format of ``fmts`` fit and rounded together, a row block (:func:`row_chunks` of ``block_elems``)
    at a time: each block's :data:`GridChunk`, in order (rows are independent, so the blocks of a range of rows
    are those of the whole tensor when the range starts on a block boundary).  ``drop(rows)`` after each block."""
    if not fmts:
        return
    rounder = get_rounder(method)
    dev = w.device
    rows, cols = (int(d) for d in w.shape)
    hessian = stats.hessian
    hessian = None if hessian is None else hessian.detach().to(dev)
    if hessian is not None and tuple(hessian.shape) != (cols, cols):
        raise InputError(f"hessian of shape {tuple(hessian.shape)} does not fit a weight with {cols} input columns")
    groups = _rotation_groups(fmts, cols, hessian)
    with timed(timer, "measure.factor"):  # once for every row block (GPTQ: the Hessian's factorisation)
        prepared = [rounder.prepare(h_g, dev) for _rot, _members, h_g, _imp in groups]
    role_h = _role_hessians(stats, cols, dev)  # after the factorisation's scratch matrices are freed
    dtype = str(w.dtype).removeprefix("torch.")
    for sl in row_chunks(rows, cols, block_elems):
        w32 = w[sl].detach().to(device=dev, dtype=torch.float32)
        # per format: codes, grid, rotation, and the rows' errors under the Hessian where the rounding gave them
        done: list[tuple[torch.Tensor, Grid, Rotation | None, torch.Tensor | None]] = \
            [None] * len(fmts)  # type: ignore[list-item]
        for (rot, members, _h, importance), h_g in zip(groups, prepared):
            w_g = w32 if rot is None else rot.apply(w32)
            g_fmts = [fmts[i] for i in members]
            with timed(timer, "measure.fit"):
                grids = [f.fit(w_g, importance) for f in g_fmts]
            got = rounder.round_many_measured(w_g, h_g, grids, g_fmts, timer)
            for i, (codes, grid, row_err) in zip(members, got):
                done[i] = (codes, grid, rot, row_err if rot is None else None)
            del w_g, grids, got
        part = rows_of(stats, sl)
        errs: dict[str, tuple[float, float | None]] = {}
        with timed(timer, "measure.errors"):
            for fmt, (codes, grid, rot, row_err) in zip(fmts, done):
                values = grid.values(codes)
                dw = (values if rot is None else rot.apply_t(values)) - w32
                if not all_finite(dw):
                    raise NumericsError(f"{name}: quantizing into {fmt.id} produced NaN or Inf")
                errs[fmt.id] = _errors(dw, part, role_h, row_err)
        # the stored form of exactly what was measured (rotated formats store W·R's codes)
        kept = {fmt.id: qtensor_cpu(fmt.encode(codes, grid, tuple(w32.shape), dtype))
                for fmt, (codes, grid, _rot, _err) in zip(fmts, done)} if keep else None
        del w32, done
        if drop is not None:
            drop(sl)
        place.release()
        yield errs, kept


def _accumulate(fmts: Sequence[Format], chunks: Iterable[GridChunk], keep: Keep | None
                ) -> dict[str, tuple[float, float | None]]:
    """(output, fisher) error per grid format: the row blocks' sums, in order (``keep``: see :func:`measure_tensor`;
    it gets each format's blocks joined)."""
    errs: dict[str, tuple[float, float | None]] = {f.id: (0.0, 0.0) for f in fmts}
    kept: dict[str, list[QTensor]] = {f.id: [] for f in fmts}
    for chunk, qs in chunks:
        for fmt in fmts:
            o, fi = chunk[fmt.id]
            o0, f0 = errs[fmt.id]
            errs[fmt.id] = (o0 + o, None if f0 is None or fi is None else f0 + fi)
            if keep is not None:
                if qs is None:
                    raise ValueError("a row block came without its rounding, which keep needs")
                kept[fmt.id].append(qs[fmt.id])
    if keep is not None:
        for fmt in fmts:
            keep(fmt.id, _joined(fmt, kept.pop(fmt.id)))
    return errs


def _rotation_groups(fmts: Sequence[Format], cols: int, hessian: torch.Tensor | None
                     ) -> list[tuple[Rotation | None, list[int], torch.Tensor | None, torch.Tensor | None]]:
    """The formats (indices into ``fmts``) that round one weight under one Hessian: ``(rotation, members,
    Hessian, importance)``, the unrotated formats first with ``hessian`` itself, then one group per recorded
    rotation (``had-…``: ``W·R`` under ``Rᵀ·H·R``; ΔW is rotated back before the errors).  Importance: the
    Hessian's diagonal, clamped at 0."""
    groups: dict[tuple[int, int] | None, tuple[Rotation | None, list[int]]] = {None: (None, [])}
    for i, fmt in enumerate(fmts):
        rot = rotation_of(fmt, cols)
        key = None if rot is None else rot.key
        groups.setdefault(key, (rot, []))[1].append(i)
    out = []
    for rot, members in groups.values():
        if members:
            h = hessian if rot is None or hessian is None else rot.conjugate(hessian)
            out.append((rot, members, h, None if h is None else torch.diagonal(h).to(torch.float32).clamp_min(0)))
    return out


def _role_hessians(stats: TensorStats, cols: int, device: torch.device) -> list[torch.Tensor | None]:
    """float64 Hessian (checked, on ``device``) of every linear role; None for lookup roles."""
    return [_hessian(r, cols).to(device) if isinstance(r, LinearStats) else None for r in stats.roles]


def _errors(dw: torch.Tensor, stats: TensorStats, hessians: Sequence[torch.Tensor | None],
            first_linear: torch.Tensor | None = None) -> tuple[float, float | None]:
    """(:func:`output_error`, :func:`fisher_error`) of ``dw`` with one quadratic form per role
    (``hessians`` from :func:`_role_hessians`, already checked).  ``first_linear``: the per-row quadratic form of
    the first linear role (the Hessian GPTQ rounded with, :attr:`TensorStats.hessian`) when the rounding already
    gave it (:meth:`~bitalloc.rounding.Rounder.round_many_measured`), instead of computing it from ``dw``."""
    if not stats.roles:
        raise InputError("tensor statistics have no roles")
    rows, cols = dw.shape
    out, fisher = 0.0, 0.0
    for role, h in zip(stats.roles, hessians):
        if isinstance(role, LinearStats):
            q = _row_quad(dw, h) if first_linear is None else first_linear.to(dw.device)
            first_linear = None
            out += float(q.sum())
            fisher = None if role.grad_sq is None or fisher is None else \
                fisher + float(_vector(role.grad_sq, rows, "grad_sq", dw.device) @ q)
        elif isinstance(role, LookupStats):
            f = _vector(role.token_freq, rows, "token_freq", dw.device)
            out += float(f @ _row_quad(dw, None))
            fisher = None if role.grad_sq is None or fisher is None else \
                fisher + float(f @ _row_quad(dw, None, _vector(role.grad_sq, cols, "grad_sq", dw.device)))
        else:
            raise InputError(f"unknown role statistics {type(role).__name__}")
    return max(out, 0.0), None if fisher is None else max(0.5 * fisher, 0.0)


def _check_rows(stats: TensorStats, rows: int) -> None:
    """InputError unless every per-row statistic (linear ``grad_sq``, lookup ``token_freq``) has ``rows`` entries."""
    for role in stats.roles:
        if isinstance(role, LinearStats) and role.grad_sq is not None:
            _vector(role.grad_sq, rows, "grad_sq")
        elif isinstance(role, LookupStats):
            _vector(role.token_freq, rows, "token_freq")


def rows_of(stats: TensorStats, sl: slice) -> TensorStats:
    """The statistics of rows ``sl``: per-row vectors sliced, Hessian and per-column vectors shared."""
    roles: list[LinearStats | LookupStats] = []
    for r in stats.roles:
        if isinstance(r, LinearStats):
            roles.append(LinearStats(r.hessian, r.ntokens, None if r.grad_sq is None else r.grad_sq[sl],
                                     {k: v[sl] for k, v in r.act_noise.items()}))
        elif isinstance(r, LookupStats):
            roles.append(LookupStats(r.token_freq[sl], r.ntokens, r.grad_sq))
        else:
            raise InputError(f"unknown role statistics {type(r).__name__}")
    return TensorStats(roles=tuple(roles))
