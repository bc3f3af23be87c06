"""The driver: measure a model once, then allocate, quantize and evaluate at any number of budgets.

``measure_model`` streams the fp model block by block (one block's statistics in memory at a time) and
calls :func:`bitalloc.measure.measure_tensor` per tensor; the result is fingerprinted by the model's
weights, the calibration windows and the options.  ``make_plan`` wraps :func:`bitalloc.allocate.allocate`;
``uniform_plan`` builds the baseline that gives every allocated tensor one format; ``best_uniform`` picks
the uniform format that fits a budget with the least predicted error.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from torch import nn

from .activations import roundings_for
from .budget import Budget, Constraints
from .calibrate import FisherStats, fisher_pass, stream_blocks
from .errors import BudgetError, InputError
from .formats import QTensor, get_format
from .io.atomic import tensor_digest
from .measure import Measurement, MeasureRow, TensorInfo, measure_tensor
from .measure_pool import MeasurePool
from .stats import TensorStats
from .plan import Plan, PlanEntry
from .models.view import ModelView
from .models.spill import release_parameter, release_rows
from .placement import Placement
from .quantize import view_of
from .rounding import get_rounder
from .timing import StageTimer, timed

if TYPE_CHECKING:  # pragma: no cover
    from .screen import Screen, Selection

log = logging.getLogger(__name__)


def _hash_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Consumes ``items`` one at a time (a generator may release each tensor after it is hashed)."""
    h = hashlib.sha256()
    for name, t in items:  # io.atomic.tensor_digest hashes dtype, shape and raw bytes without copying them
        h.update(name.encode() + b"\0" + tensor_digest(t).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) of every parameter's name, dtype, shape and bytes (spilled weights are released
    after each tensor, so hashing never makes the whole model resident)."""
    from .models.spill import released_parameters

    return _hash_tensors(released_parameters(model))


def fixed_bytes(view: ModelView) -> int:
    """Bytes of the tensors stored as they are: norms, biases at fp16, or fp32 when a value exceeds the fp16
    range (exactly what :func:`bitalloc.quantize.store_fixed` and the packed export store)."""
    return view.fixed_bytes


def tensor_infos(view: ModelView) -> list[TensorInfo]:
    return [TensorInfo(r.name, tuple(r.shape), r.numel, tuple(r.roles)) for r in view.quantizable()]


def fused_constraints(view: ModelView) -> Constraints:
    """The ``fused`` constraint: runtime-fused linears of every block (q/k/v, gate/up) share a format."""
    return Constraints(tie_groups=tuple(tuple(g) for g in view.tie_groups()))


@dataclass(frozen=True, eq=False)
class MeasureStart:
    """Where to continue a measurement: blocks ``< block`` are measured (``rows``, head rows excluded) and
    ``hidden`` holds the inputs of block ``block`` for every calibration window."""

    block: int
    hidden: torch.Tensor
    rows: tuple[MeasureRow, ...]

    def __post_init__(self) -> None:
        if self.block < 0:
            raise InputError(f"resume block must be non-negative, got {self.block}")
        if self.hidden.dim() != 3:
            raise InputError(f"resume hidden states must be (windows, ctx, hidden), got {tuple(self.hidden.shape)}")
        object.__setattr__(self, "rows", tuple(self.rows))


MeasureHook = Callable[[int, list[MeasureRow], torch.Tensor], None]
#: ``on_rounded(b, {(tensor, format id): QTensor})``: block ``b``'s roundings as the measurement made them
RoundedHook = Callable[[int, dict[tuple[str, str], QTensor]], None]


def measure_model(
    model: nn.Module,
    view: ModelView | None,
    windows: torch.Tensor,
    formats: Sequence[str],
    method: str = "gptq",
    fisher: bool = True,
    progress: bool = True,
    *,
    fisher_windows: torch.Tensor | None = None,
    batch_size: int = 8,
    fisher_stats: FisherStats | None = None,
    on_fisher: Callable[[FisherStats], None] | None = None,
    start: MeasureStart | None = None,
    on_block: MeasureHook | None = None,
    activation_noise: bool = True,
    placement: Placement | None = None,
    timer: StageTimer | None = None,
    screen: "Screen | Selection | None" = None,
    on_rounded: RoundedHook | None = None,
) -> Measurement:
    """The measurement table of ``model`` over ``formats`` (each tensor × each format that fits its shape).

    ``windows`` give the Hessians; the Fisher pass (gradients) uses ``fisher_windows`` (default: the same
    windows).  Errors are those of ``method`` rounding (a registered method: "gptq", "rtn") with fp inputs, plus,
    for formats whose runtime rounds the activations (GGUF types in llama.cpp), the output error of that rounding
    (``activation_noise=False``: the weights' error alone).

    Resuming (:mod:`bitalloc.jobs`): ``fisher_stats`` replaces the gradient pass (``on_fisher`` receives
    the statistics when the pass runs); ``start`` continues at its block with its rows; ``on_block(b, rows,
    hidden)`` is called after block ``b`` is measured, with its rows and the inputs of block ``b + 1``.

    ``placement``: where the Fisher pass, the block forwards and Hessians, and the measurement run (default: the
    CPU); each weight and its statistics are on its device when measured.  On the CPU, a placement with
    ``workers > 1`` (what :meth:`Placement.for_device` chooses for a model of 20M parameters or more on several
    threads) measures each block's tensors in that many worker processes (:mod:`bitalloc.measure_pool`): the same
    table and roundings, byte for byte.  ``timer`` records the stages (the workers' measurement clocks summed).

    ``screen`` (:mod:`bitalloc.screen`): measure exactly only the formats that can matter at its budgets (a
    first pass estimates every format by RTN; a :class:`~bitalloc.screen.Selection` from an earlier first pass
    skips it).  The table then holds those exact rows only and its fingerprint records the screening, so
    ``make_plan`` refuses other budgets.  With ``method="rtn"`` the estimate is exact: nothing is screened.

    ``on_rounded(b, {(tensor, format): QTensor})``, when given, receives every tensor's rounding into every format
    as it was measured (:func:`bitalloc.measure.measure_tensor`'s ``keep``), a block at a time (``b`` = the
    block; the head tensors last, as block ``len(blocks)``), each block before ``on_block``: a quantization can
    reuse them (:func:`bitalloc.quantize.assemble_rounded`).  Not with ``screen`` (its reused rows were rounded in
    the screening pass).
    """
    method = get_rounder(method).name
    if on_rounded is not None and screen is not None:
        raise InputError("reusing the measurement's rounding needs every row measured here: not with --screen")
    fmts = [get_format(f).id for f in formats]
    if not fmts:
        raise InputError("no candidate formats given")
    view = view_of(model, view)
    fw = windows if fisher_windows is None else fisher_windows
    grads = None
    if fisher:
        grads = fisher_stats
        if grads is None:
            grads = fisher_pass(model, view, fw, batch_size=max(1, batch_size // 4), progress=progress,
                                placement=placement, timer=timer)
            if on_fisher is not None:
                on_fisher(grads)
    infos = tensor_infos(view)
    rows: list[MeasureRow] = list(start.rows) if start is not None else []
    current: list[MeasureRow] = []

    kept: dict[tuple[str, str], QTensor] = {}

    def after(b: int, hidden: torch.Tensor) -> None:
        if on_rounded is not None:  # first: a block's checkpoint is never ahead of its rounding's
            on_rounded(b, dict(kept))
            kept.clear()
        if on_block is not None:
            on_block(b, list(current), hidden)

    roundings = roundings_for(fmts) if activation_noise else []
    place = placement if placement is not None else Placement()
    selection = None
    if screen is not None and method != "rtn":
        from .screen import Selection, screen_formats

        with timed(timer, "screen"):
            selection = screen if isinstance(screen, Selection) else screen_formats(
                model, view, windows, fmts, method, screen, fisher=grads, batch_size=batch_size,
                roundings=roundings, progress=progress, placement=placement, timer=timer)
        selection.check(fmts, [t.name for t in infos])
    parallel = place.on_cpu and place.workers > 1
    with MeasurePool(place.workers, place.worker_threads) if parallel else contextlib.nullcontext() as pool:
        for block in stream_blocks(model, view, windows, fisher=grads, batch_size=batch_size, progress=progress,
                                   start_block=start.block if start is not None else 0,
                                   start_hidden=start.hidden if start is not None else None, after_block=after,
                                   roundings=roundings, placement=placement, timer=timer):
            current.clear()
            current.extend(_measure_block(model, block, fmts, method, selection, place, pool, timer,
                                          None if on_rounded is None else kept))
            rows.extend(current)
            del block  # one block's statistics at a time
    if on_rounded is not None:  # the head tensors
        on_rounded(len(view.blocks()), dict(kept))
        kept.clear()
    fp = {
        "model": model_fingerprint(model),
        "calibration": _hash_tensors([("windows", windows)] + ([("fisher_windows", fw)] if fisher else [])),
        "options": hashlib.sha256(repr((fmts, method, bool(fisher)) + ((selection.record,) if selection else ())
                                       ).encode()).hexdigest()[:16],
        "method": method,
        "formats": ",".join(fmts),
        "windows": f"{windows.shape[0]}x{windows.shape[1]}",
        "fisher_windows": f"{fw.shape[0]}x{fw.shape[1]}" if fisher else "none",
    }
    if selection is not None:
        fp["screen"] = selection.record
    return Measurement(tuple(infos), tuple(rows), fixed_bytes(view), view.total_params, fp)


def _keep(kept: dict[tuple[str, str], QTensor], name: str, fmt: str, q: QTensor) -> None:
    kept[(name, fmt)] = q


def _measure_block(model: nn.Module, block: dict[str, TensorStats], fmts: Sequence[str], method: str,
                   selection: "Selection | None", place: Placement, pool: MeasurePool | None,
                   timer: StageTimer | None, kept: dict[tuple[str, str], QTensor] | None) -> list[MeasureRow]:
    """The rows of one block's tensors (``block``: their statistics), in its order: measured here one after the
    other, or by ``pool``'s workers side by side (the same rows); each tensor's roundings go to ``kept`` when
    given."""
    todo: list[tuple[str, torch.Tensor, TensorStats, Sequence[str]]] = []
    for name, stats in block.items():
        formats = fmts if selection is None else selection.to_measure(name)
        if formats:
            todo.append((name, model.get_parameter(name).detach(), stats, formats))
    measured: dict[str, list[MeasureRow]] = {}
    if pool is not None:
        got = pool.measure_block(todo, method, place, timer=timer,
                                 keep=None if kept is None else lambda t, f, q: _keep(kept, t, f, q),
                                 release=functools.partial(release_rows, model))
        measured.update(zip((name for name, *_ in todo), got))
        for name, *_ in todo:
            release_parameter(model, name)  # a spilled weight leaves memory once measured (no-op otherwise)
    else:
        for name, w, stats, formats in todo:
            measured[name] = measure_tensor(name, place.to_device(w), stats, formats, method, placement=place,
                                            grid_elems=place.stack_elems, timer=timer,
                                            release=functools.partial(release_rows, model, name),
                                            keep=None if kept is None else functools.partial(_keep, kept, name))
            release_parameter(model, name)  # a spilled weight leaves memory once measured (no-op otherwise)
    out: list[MeasureRow] = []
    for name in block:
        got = ([] if selection is None else list(selection.reused.get(name, ()))) + measured.get(name, [])
        if not got:
            shape = tuple(model.get_parameter(name).shape)
            raise InputError(f"none of the formats {list(fmts)} can store {name} of shape {shape}")
        out.extend(got)
    return out


def check_reachable(model: nn.Module, formats: Sequence[str], budgets: Sequence[str]) -> None:
    """Refuse, from names and shapes alone (a meta model is enough), budgets no allocation over ``formats`` can
    meet: below every tensor in its smallest format (norms and biases at fp16), or above every tensor in its
    largest (norms and biases at fp32); and a tensor none of the formats can store."""
    from .formats import get_format
    from .models.archs import arch_for

    spec = arch_for(model.config)
    params = dict(model.named_parameters())  # a tied lm_head once, under the embedding's name
    lo = hi = 0
    quantized = 0
    for name, p in params.items():
        if not spec.is_quantizable(name):
            continue
        shape = tuple(p.shape)
        sizes = [get_format(f).nbytes(shape) for f in formats if get_format(f).supports(shape)]
        if not sizes:
            raise InputError(f"tensor {name} {shape} can take none of the formats {', '.join(formats)}")
        lo, hi, quantized = lo + min(sizes), hi + max(sizes), quantized + p.numel()
    total = sum(p.numel() for p in params.values())
    lo, hi = lo + 2 * (total - quantized), hi + 4 * (total - quantized)
    for text in budgets:
        b = Budget.parse(text)
        nbytes = b.resolve(total)
        if nbytes < lo:
            raise BudgetError(f"budget {text} ({nbytes} B) is below the smallest model these formats can make "
                              f"({lo} B, {8 * lo / total:.3f} bpw)")
        if nbytes > hi:
            raise BudgetError(f"budget {text} ({nbytes} B) is above the largest model these formats can make "
                              f"({hi} B, {8 * hi / total:.3f} bpw): ask for at most that")


def make_plan(
    measurement: Measurement,
    budget: str | Budget,
    constraints: Constraints | None = None,
    objective: str | None = None,
) -> Plan:
    """Allocate formats under ``budget``: ``objective``, by default Fisher when the table has it, else output
    error (an objective asked for that the table lacks is refused, not replaced)."""
    from .allocate import allocate

    if objective is not None and objective not in measurement.objectives:
        raise InputError(f"objective {objective!r} needs errors the measurement table lacks (it has "
                         f"{', '.join(measurement.objectives)}; a table measured with --no-fisher has no Fisher errors)")
    from .screen import check_budget

    obj = objective or measurement.objectives[0]
    b = Budget.parse(budget)
    check_budget(measurement, b.resolve(measurement.total_params), constraints, obj)
    return allocate(measurement, b, constraints or Constraints(), obj)


plan = make_plan


def uniform_plan(measurement: Measurement, fmt_id: str, objective: str | None = None) -> Plan:
    """Every allocated tensor in ``fmt_id`` (which must have been measured for each), as a Plan."""
    fid = get_format(fmt_id).id
    obj = objective or measurement.objectives[0]
    entries = []
    for t in measurement.tensors:
        rows = {r.format: r for r in measurement.rows_for(t.name)}
        if fid not in rows:
            raise InputError(f"format {fid} was not measured for {t.name} (shape {t.shape})")
        r = rows[fid]
        err = r.fisher_error if obj == "fisher" else r.output_error
        entries.append(PlanEntry(t.name, fid, r.bytes, float(err if err is not None else r.output_error)))
    total = sum(e.bytes for e in entries) + measurement.fixed_bytes
    return Plan(
        entries=tuple(entries), fixed_bytes=measurement.fixed_bytes, total_params=measurement.total_params,
        budget_bytes=total, budget=f"uniform {fid}", objective=obj, solver="uniform", status="uniform",
        fingerprint=dict(measurement.fingerprint),
    )


def plan_for_assignments(view: ModelView, assignments: dict[str, str], label: str) -> Plan:
    """A Plan without a measurement (errors 0): exact bytes from the formats, for ``--format`` baselines."""
    entries = []
    for r in view.quantizable():
        fmt = get_format(assignments[r.name])
        entries.append(PlanEntry(r.name, fmt.id, int(fmt.nbytes(tuple(r.shape))), 0.0))
    fixed = fixed_bytes(view)
    total = sum(e.bytes for e in entries) + fixed
    return Plan(entries=tuple(entries), fixed_bytes=fixed, total_params=view.total_params, budget_bytes=total,
                budget=label, objective="output", solver="uniform", status="uniform")


def check_measurement(measurement: Measurement, model: nn.Module) -> None:
    """InputError when ``measurement`` was made for other weights than ``model``'s."""
    want = measurement.fingerprint.get("model")
    if want and want != model_fingerprint(model):
        raise InputError("the measurement was made for a different model (weight fingerprints differ)")
    measurement.check_tensors(tensor_infos(ModelView(model)))


class CachedReference:
    """The reference model's scored logits per window batch, computed once and reused by every evaluation."""

    def __init__(self, reference: nn.Module) -> None:
        self.reference = reference
        self._cache: dict[bytes, torch.Tensor] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha256(batch.numpy().tobytes()).digest() + str(tuple(batch.shape)).encode()
        if key not in self._cache:
            n_keep = batch.shape[1] - batch.shape[1] // 2
            with torch.no_grad():
                self._cache[key] = self.reference(input_ids=batch, logits_to_keep=n_keep, use_cache=False).logits
        return self._cache[key]


def best_uniform(measurement: Measurement, budget: str | Budget, objective: str | None = None) -> Plan:
    """The uniform plan that fits ``budget`` with the least predicted error (BudgetError if none fits)."""
    limit = Budget.parse(budget).resolve(measurement.total_params)
    best: Plan | None = None
    for f in measurement.formats():
        try:
            p = uniform_plan(measurement, f, objective)
        except InputError:
            continue
        if p.total_bytes <= limit and (best is None or (p.error, -p.total_bytes) < (best.error, -best.total_bytes)):
            best = p
    if best is None:
        raise BudgetError(f"no uniform format of {measurement.formats()} fits {budget} ({limit} B)")
    return best


def fitting_uniforms(measurement: Measurement, budget: str | Budget, top: int = 2) -> list[Plan]:
    """Uniform plans that fit ``budget``: the ``top`` largest plus the one with the least predicted error.

    Predicted errors do not always rank uniform formats as the measured KLD does (e.g. small groups at fewer
    bits vs larger groups at more bits), so a fair baseline is chosen by *measuring* these candidates.
    """
    limit = Budget.parse(budget).resolve(measurement.total_params)
    fits = []
    for f in measurement.formats():
        try:
            p = uniform_plan(measurement, f)
        except InputError:
            continue
        if p.total_bytes <= limit:
            fits.append(p)
    if not fits:
        raise BudgetError(f"no uniform format of {measurement.formats()} fits {budget} ({limit} B)")
    chosen = sorted(fits, key=lambda p: -p.total_bytes)[:max(1, top)]
    best = best_uniform(measurement, budget)
    if all(p.entries[0].format != best.entries[0].format for p in chosen):
        chosen.append(best)
    return chosen
