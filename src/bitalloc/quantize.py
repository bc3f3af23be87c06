"""Quantize a whole model by a plan, sequentially, block by block (as GPTQ does).

Each block is fed the outputs of the already-quantized blocks; inside a block the sequential groups
(``[q,k,v] → [o] → [gate,up] → [down]``) are quantized in order and the Hessian of each group's input is
recomputed after the previous groups were replaced by their dequantized values.  The embedding and lm_head
come last (their Hessian is that of the final-norm output after all quantized blocks).  Tensors the plan does
not allocate (norms, biases) are stored as fp16 -- or fp32 when a value lies beyond the fp16 range (see
:func:`fixed_format`) -- so the in-memory model equals what the export reloads.

Resumable runs (:mod:`bitalloc.jobs`) pass ``on_block`` (called after each block with its QTensors and the
hidden states at the next block's input) and ``start`` (a :class:`ResumeState` to continue from block k).

The work (forwards, Hessians, GPTQ and refits) runs where the :class:`~bitalloc.placement.Placement` says
(default: the CPU, today's results byte for byte); the QTensors handed out, and the hidden states given to
``on_block``, are in CPU memory, and the model's weights are back in their CPU storage (with the quantized
values) when :func:`quantize_model` returns.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import BlockRunner
from .layout import layout_of
from .errors import InputError
from .formats import QTensor, get_format
from .measure_pool import MeasurePool
from .models.spill import release_rows
from .models.view import ModelView, fixed_format
from .placement import Placement, qtensor_cpu
from .timing import StageTimer, timed
from . import rounding
from .rounding import Method, Rounder, dequantize, get_rounder, quantize_chunks
from .rounding.methods import GPTQ

log = logging.getLogger(__name__)



@dataclass(frozen=True, eq=False)
class ResumeState:
    """Where to continue a quantization: blocks ``< block`` are done (``qtensors``) and ``hidden`` holds the
    inputs of block ``block`` for every calibration window."""

    block: int
    qtensors: Mapping[str, QTensor]
    hidden: torch.Tensor

    def __post_init__(self) -> None:
        if self.block < 0:
            raise InputError(f"resume block must be non-negative, got {self.block}")
        if self.hidden.dim() != 3:
            raise InputError(f"resume hidden states must be (windows, ctx, hidden), got {tuple(self.hidden.shape)}")


BlockHook = Callable[[int, dict[str, QTensor], torch.Tensor], None]


def view_of(model: nn.Module, view: ModelView | None = None) -> ModelView:
    """``view`` when given, else a fresh :class:`ModelView` of ``model``."""
    return view if view is not None else ModelView(model)


def quantizable_names(view: ModelView) -> list[str]:
    """Allocated tensors (embedding, block linears, untied lm_head), as the view lists them."""
    return [r.name for r in view.quantizable()]


def fixed_names(view: ModelView) -> list[str]:
    """Stored tensors that are not allocated (norms, biases), tied tensors once."""
    return [f.name for f in view.fixed()]


def set_weight(model: nn.Module, name: str, value: torch.Tensor) -> None:
    p = model.get_parameter(name)
    if tuple(value.shape) != tuple(p.shape):
        raise InputError(f"{name}: new value of shape {tuple(value.shape)} does not match {tuple(p.shape)}")
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter (tied ones once), to restore after an in-place quantization."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def originals(model: nn.Module, source: nn.Module | None = None) -> Mapping[str, torch.Tensor]:
    """What :func:`restore` needs to give ``model`` back its present weights: ``source``'s own parameters when
    ``source`` holds exactly these values under the same names in memory of its own (a second load of the same
    model, such as a sweep's fp reference; checked here, value by value), so that no copy of the model is made;
    else a :func:`snapshot`.  ``source`` must then not change while the mapping is in use."""
    if source is not None:
        theirs = dict(source.named_parameters())
        mine = dict(model.named_parameters())
        if all(n in theirs and _same(p, theirs[n]) for n, p in mine.items()):
            return {n: theirs[n].detach() for n in mine}
        log.info("the reference's weights differ from the model's: a copy of the model is kept to restore it")
    return snapshot(model)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, and not the same memory (writing ``a`` must leave ``b`` as it is)."""
    with torch.no_grad():
        return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
                and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                and torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)))


def restore(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    for n, v in saved.items():
        set_weight(model, n, v)


def _quantize_one(
    model: nn.Module, name: str, fmt_id: str, hessian: torch.Tensor | None, method: Method,
    placement: Placement | None = None,
) -> QTensor:
    """Quantize one parameter in row blocks (byte-identical to the whole tensor) and write each block's
    dequantized values back as soon as it is done, so no full-size float32/int64 temporaries exist.  The rounding
    runs on ``placement``'s device (the weight is copied there when it is not); the QTensor is in CPU memory."""
    place = placement if placement is not None else Placement()
    p = model.get_parameter(name)
    fmt = get_format(fmt_id)
    parts: list[QTensor] = []
    # a block is written back after it was quantized; later blocks read only their own (untouched) rows
    w = place.to_device(p.detach())
    h = None if hessian is None else place.to_device(hessian)
    chunk = rounding.round_block_elems(int(w.shape[-1]), h is not None) if w.dim() == 2 else \
        rounding.ROW_CHUNK_ELEMS
    for rows, q in quantize_chunks(w, fmt, hessian=h, method=method, max_elems=chunk):
        with torch.no_grad():
            p[rows] = dequantize(q).reshape(p[rows].shape).to(p.dtype)
        release_rows(model, name, rows)  # a spilled weight keeps one block of rows resident (no-op otherwise)
        parts.append(qtensor_cpu(q))
        place.release()
    return parts[0] if len(parts) == 1 else fmt.concat_rows(parts)


def store_fixed(model: nn.Module, view: ModelView) -> dict[str, QTensor]:
    """fp16 (fp32 beyond the fp16 range) copies of the fixed tensors; the model's values are replaced by them."""
    out: dict[str, QTensor] = {}
    for name in fixed_names(view):
        w = model.get_parameter(name).detach()
        q = get_format(fixed_format(w)).store(w)
        set_weight(model, name, dequantize(q))
        out[name] = q
    return out


def quantize_model(
    model: nn.Module,
    view: ModelView | None,
    plan: Mapping[str, str] | Any,
    windows: torch.Tensor,
    method: Method = "gptq",
    *,
    batch_size: int = 8,
    progress: bool = True,
    on_block: BlockHook | None = None,
    start: ResumeState | None = None,
    placement: Placement | None = None,
    timer: StageTimer | None = None,
) -> dict[str, QTensor]:
    """Quantize ``model`` in place by ``plan`` (a Plan or ``{tensor: format id}``); returns every stored tensor.

    The result holds a QTensor for each allocated tensor (the plan's format) and for each fixed tensor
    (fp16).  The model's weights are replaced by the dequantized values, so it *is* the candidate model.
    ``method``: a registered rounding method (:mod:`bitalloc.rounding.methods`), whose per-block hook
    (:meth:`~bitalloc.rounding.Rounder.quantize_block`) asks the runner for the block's input statistics: "gptq"
    rounds each sequential group with the Hessian of its inputs after the groups before it; "rtn" uses the
    Hessian's diagonal only to weight the scale search, collected in one pass.  ``on_block(b, qtensors_of_block_b,
    hidden_after_b)`` is called after each block; ``start`` continues a run from its block (its QTensors are put
    back into the model first).
    ``placement``: where the work runs (default: the CPU); ``timer`` records ``quantize`` (the whole stage),
    ``quantize.round`` (GPTQ/RTN and refits) and the runner's ``calibrate.*`` stages.
    """
    rounder = get_rounder(method)
    lay = layout_of(model)
    view = view_of(model, view)
    assign = _assignments(model, view, plan)
    with timed(timer, "quantize"):
        out = _run(model, lay, assign, windows, rounder, batch_size, progress, on_block, start, placement, timer)
        out.update(store_fixed(model, view))
    return out


def _assignments(model: nn.Module, view: ModelView, plan: Mapping[str, str] | Any) -> dict[str, str]:
    """``{tensor: format id}`` of ``plan``, checked against the model: every allocated tensor once, nothing else,
    each format able to store its tensor (refused before any work)."""
    assign = dict(plan.assignments if hasattr(plan, "assignments") else plan)
    names = quantizable_names(view)
    missing = [n for n in names if n not in assign]
    extra = [n for n in assign if n not in set(names)]
    if missing or extra:
        raise InputError(f"the plan does not match the model: missing {missing[:3]} ({len(missing)}), "
                         f"unknown {extra[:3]} ({len(extra)})")
    for n in names:
        get_format(assign[n]).check_shape(tuple(model.get_parameter(n).shape))
    return assign


def assemble_rounded(model: nn.Module, view: ModelView | None, plan: Mapping[str, str] | Any,
                     rounded: Mapping[str, QTensor], *, timer: StageTimer | None = None) -> dict[str, QTensor]:
    """The quantization of ``plan`` from roundings made before it -- the measurement's (``--reuse-rounding``:
    :func:`bitalloc.pipeline.measure_model`'s ``on_rounded``) -- instead of rounding again: ``rounded`` holds each
    allocated tensor's QTensor in its planned format, which is written into ``model`` as dequantized values; the
    fixed tensors are stored as :func:`quantize_model` stores them.  No forward and no rounding runs here, and each
    tensor's error is exactly the measured one: every tensor was rounded with the full-precision model's inputs,
    where :func:`quantize_model` rounds each block on the inputs of the blocks already quantized."""
    view = view_of(model, view)
    assign = _assignments(model, view, plan)
    out: dict[str, QTensor] = {}
    with timed(timer, "quantize"):
        for name, fmt in assign.items():
            q = rounded.get(name)
            if q is None or q.format != fmt:
                raise InputError(f"{name}: the measurement kept no rounding into {fmt} (reuse needs the job that "
                                 "measured with --reuse-rounding)")
            set_weight(model, name, dequantize(q).reshape(model.get_parameter(name).shape))
            release_rows(model, name, slice(None))  # a spilled weight leaves memory once written (no-op otherwise)
            out[name] = q
        out.update(store_fixed(model, view))
    return out


def _quantize_pooled(model: nn.Module, pool: MeasurePool, items: Mapping[str, tuple[str, torch.Tensor | None]],
                     method: Method, place: Placement) -> dict[str, QTensor]:
    """:func:`_quantize_one` of every ``{name: (grid format id, hessian)}`` by ``pool``'s workers, side by side: each
    weight's row blocks come back as ``quantize_chunks`` of the whole weight gives them and are written back here
    (the same bytes as rounding them in this process)."""
    got = pool.quantize_tensors([(name, model.get_parameter(name).detach(), fmt_id, h)
                                 for name, (fmt_id, h) in items.items()], method, place,
                                release=functools.partial(release_rows, model))
    out: dict[str, QTensor] = {}
    for name, (fmt_id, _h) in items.items():
        p = model.get_parameter(name)
        parts = []
        for rows, q in got.pop(name):
            with torch.no_grad():
                p[rows] = dequantize(q).reshape(p[rows].shape).to(p.dtype)
            release_rows(model, name, rows)
            parts.append(q)
        out[name] = parts[0] if len(parts) == 1 else get_format(fmt_id).concat_rows(parts)
        place.release()
    return out


def _run(model: nn.Module, lay: Any, assign: dict[str, str], windows: torch.Tensor, rounder: Rounder, batch_size: int,
         progress: bool, on_block: BlockHook | None, start: ResumeState | None, placement: Placement | None,
         timer: StageTimer | None) -> dict[str, QTensor]:
    """The blocks and the head of :func:`quantize_model` under one runner (weights written back when it closes).
    Where the runner's placement has workers (on the CPU), the tensors the rounder rounds together go to them."""
    out: dict[str, QTensor] = {}

    def round_tensors(hs: Mapping[str, torch.Tensor | None], how: Method = rounder) -> dict[str, QTensor]:
        with timed(timer, "quantize.round"):
            place = runner.placement
            known = _pooled_name(how)
            pooled = {} if pool is None or known is None else {
                n: (assign[n], h) for n, h in hs.items()
                if get_format(assign[n]).is_grid and model.get_parameter(n).dim() == 2}
            done = _quantize_pooled(model, pool, pooled, known, place) if pooled and pool is not None else {}
            done.update({n: _quantize_one(model, n, assign[n], h, how, place) for n, h in hs.items()
                         if n not in pooled})
            return {n: done[n] for n in hs}

    with BlockRunner(model, windows, batch_size, placement=placement, timer=timer, write_back=True) as runner, \
            _pool_of(runner.placement, rounder) as pool:
        first = 0
        if start is not None:
            first = _restore_state(model, runner, start)
            out.update(start.qtensors)
        for b in tqdm(range(first, len(lay.blocks)), desc=f"quantize ({rounder.name})", disable=not progress,
                      leave=False):
            done = rounder.quantize_block(lay.block_groups(b), runner.collect, round_tensors)
            runner.advance()
            out.update(done)
            if on_block is not None:
                on_block(b, done, runner.hidden_cpu())
            log.debug("block %d quantized", b)
        h_head = runner.head_hessian()
        if lay.tied:
            out.update(round_tensors({lay.embedding_name: h_head}))
        else:
            out.update(round_tensors({lay.lm_head_name: h_head}))
            # a pure lookup has no input Hessian: rounded to nearest on its grid
            out.update(round_tensors({lay.embedding_name: None}, "rtn"))
    return out


def _pooled_name(how: Method) -> str | None:
    """The name the workers round ``how`` by, or None to round in this process: GPTQ only (measured faster in the
    workers, ``bench/quantize_workers.py``).  RTN's rounding is a few vectorised passes that two threads in one
    process already keep busy, and its gain in the workers was not shown; a method registered at run time is
    unknown to a fresh worker interpreter."""
    return "gptq" if type(get_rounder(how)) is GPTQ else None


def _pool_of(place: Placement, rounder: Rounder) -> "contextlib.AbstractContextManager[MeasurePool | None]":
    """The placement's worker processes for the stage: none on an accelerator, with one worker, or for a rounder
    the workers do not run (:func:`_pooled_name`; an RTN sweep point would start and stop them for nothing)."""
    if place.on_cpu and place.workers > 1 and _pooled_name(rounder) is not None:
        return MeasurePool(place.workers, place.worker_threads)
    return contextlib.nullcontext()


def _restore_state(model: nn.Module, runner: BlockRunner, start: ResumeState) -> int:
    """Put the finished blocks' dequantized weights into ``model`` and their output into ``runner``."""
    nblocks = len(runner.layout.blocks)
    if start.block > nblocks:
        raise InputError(f"cannot resume at block {start.block}: the model has {nblocks} blocks")
    want = (runner.hidden.shape[0], runner.hidden.shape[1], runner.hidden.shape[2])
    if tuple(start.hidden.shape) != want or start.hidden.dtype != runner.hidden.dtype:
        raise InputError(f"saved hidden states {tuple(start.hidden.shape)} do not match the calibration {want}")
    for name, q in start.qtensors.items():
        set_weight(model, name, dequantize(q).reshape(model.get_parameter(name).shape))
    runner.hidden = start.hidden.to(runner.placement.states_device)
    runner.block = start.block
    runner._hold(start.block)
    return start.block


def uniform_assignments(model: nn.Module, fmt_id: str, view: ModelView | None = None) -> dict[str, str]:
    """The uniform baseline: every allocated tensor in ``fmt_id``."""
    fmt = get_format(fmt_id)
    names = quantizable_names(view_of(model, view))
    for n in names:
        fmt.check_shape(tuple(model.get_parameter(n).shape))
    return {n: fmt.id for n in names}
