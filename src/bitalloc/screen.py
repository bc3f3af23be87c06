"""Screening: measure exactly (GPTQ) only the formats that can matter at the requested budgets.

Pass 1 (:func:`screen_formats`) streams the model once and measures every tensor in every candidate format
with RTN (cheap), and the tensors of a few spread blocks (``Screen.sample_blocks``) with the exact method as
well.  The sample gives, per tensor kind (the name with its block index wildcarded) and format, the ratio
exact / RTN of the *weight* part of the error (the runtime's activation-rounding part is known exactly and
added back); every other tensor is estimated as its RTN weight error × that ratio + its activation part.

Selection (:func:`select_formats`, pure) works on that estimated table.  At each requested budget it takes the
LP multiplier λ of the estimated knapsack and the gap G between the estimated optimum and the Lagrangian
bound.  An option f of an item (a tensor, or a tie group) is kept when it could be in an optimal allocation
if every true error lay within a factor (1 + margin) of its estimate and the true λ within that factor too:
there is a λ' in [λ/(1+m), λ(1+m)] with ``ê_f/(1+m) + λ'·b_f <= min_g (ê_g·(1+m) + λ'·b_g) + G``
(reduced-cost fixing: an option whose reduced cost exceeds the gap is in no optimal allocation).  Always kept:
each item's cheapest option, its estimated choice at every budget (bytes are exact, so every screened budget
stays feasible from exact rows alone) and the ``Screen.keep`` formats.

Pass 2 is :func:`bitalloc.pipeline.measure_model` measuring only the selected formats (the sampled blocks'
exact rows are reused).  The table holds exact rows only; the estimates stay in :class:`Selection`.  Its
fingerprint's ``screen`` entry records budgets, objective, constraints and margin, and :func:`check_budget`
(called by ``pipeline.make_plan``) refuses to allocate the table for anything it was not screened for.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .budget import Budget, Constraints
from .errors import BudgetError, InputError
from .formats import get_format
from .placement import Placement
from .table import MeasureRow, Measurement, TensorInfo

log = logging.getLogger(__name__)

#: Default tolerance: true errors (and λ) assumed within a factor 1 + margin of the estimates.
DEFAULT_MARGIN = 1.0
#: Default number of blocks measured exactly for every format (spread over the model) to calibrate ratios.
DEFAULT_SAMPLE_BLOCKS = 3
_OBJECTIVES = ("fisher", "output")
_FIELD = {"fisher": "fisher_error", "output": "output_error"}


@dataclass(frozen=True)
class Screen:
    """What to screen for: ``budgets`` (as for :func:`bitalloc.pipeline.make_plan`), the ``constraints`` and
    ``objective`` the allocation will use (None: Fisher when measured, else output), the ``margin`` and the
    number of exactly measured sample blocks; ``keep``: formats measured exactly for every tensor anyway
    (e.g. uniform baselines)."""

    budgets: tuple[Budget, ...]
    margin: float = DEFAULT_MARGIN
    sample_blocks: int = DEFAULT_SAMPLE_BLOCKS
    keep: tuple[str, ...] = ()
    constraints: Constraints = field(default_factory=Constraints)
    objective: str | None = None

    def __post_init__(self) -> None:
        budgets = tuple(Budget.parse(b) for b in self.budgets)
        if not budgets:
            raise InputError("screening needs at least one budget (measure without screening when there is none)")
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise InputError(f"screening margin must be finite and non-negative, got {m!r}")
        if isinstance(self.sample_blocks, bool) or not isinstance(self.sample_blocks, int) or self.sample_blocks < 1:
            raise InputError(f"screening needs at least one sample block, got {self.sample_blocks!r}")
        if self.objective not in (None,) + _OBJECTIVES:
            raise InputError(f"screening objective must be 'fisher' or 'output', got {self.objective!r}")
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "margin", float(m))
        object.__setattr__(self, "keep", tuple(get_format(f).id for f in self.keep))
        object.__setattr__(self, "constraints", self.constraints or Constraints())


@dataclass(frozen=True, eq=False)
class Selection:
    """Pass 1's result: per tensor the formats to hold exact rows for, the exact rows pass 1 already measured
    (``reused``), the estimated table it selected from (never allocated from by the pipeline), the
    fingerprint ``record``, the number of (tensor, format) candidates and pass 1's seconds."""

    formats: Mapping[str, tuple[str, ...]]
    reused: Mapping[str, tuple[MeasureRow, ...]]
    estimates: Measurement
    record: str
    candidates: int
    seconds: float = 0.0

    def to_measure(self, name: str) -> list[str]:
        """Formats of ``name`` still to measure exactly (selected, not already measured in pass 1)."""
        done = {r.format for r in self.reused.get(name, ())}
        return [f for f in self.formats.get(name, ()) if f not in done]

    def check(self, formats: Sequence[str], tensors: Sequence[str]) -> None:
        """InputError unless this selection was made for exactly ``tensors`` over candidates within ``formats``."""
        if set(self.formats) != set(tensors):
            raise InputError("the screening selection was made for other tensors than this model's")
        extra = sorted({f for v in self.formats.values() for f in v} - set(formats))
        if extra:
            raise InputError(f"the screening selection names formats {extra} that are not candidates here")

    @property
    def exact_measurements(self) -> int:
        """Exact (GPTQ) measurements of both passes together."""
        return sum(len(v) for v in self.reused.values()) + sum(len(self.to_measure(n)) for n in self.formats)


# --- estimation -------------------------------------------------------------------------------------
def kind_of(name: str) -> str:
    """The tensor's kind: its name with block (and expert) indices wildcarded."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


def estimate_rows(
    rtn: Mapping[str, Sequence[MeasureRow]],
    exact: Mapping[str, Sequence[MeasureRow]],
    act: Mapping[tuple[str, str], tuple[float, float | None]],
) -> list[MeasureRow]:
    """Estimated rows for every tensor of ``rtn``: exact rows where measured, else the RTN weight error
    (row minus its activation part ``act[(tensor, format)]``) × the geometric-mean exact/RTN ratio of that
    kind and format over the measured tensors (of that format alone when the kind has none; 1 when neither)
    + the activation part."""
    logs: dict[str, dict[tuple[str, str], list[float]]] = {"output": {}, "fisher": {}}
    for name, rows in exact.items():
        base = {r.format: r for r in rtn[name]}
        for r in rows:
            a = act.get((name, r.format), (0.0, 0.0))
            for i, obj in enumerate(_OBJECTIVES[::-1]):  # output, fisher
                ex, rt = getattr(r, _FIELD[obj]), getattr(base[r.format], _FIELD[obj])
                if ex is None or rt is None or a[i] is None:
                    continue
                num, den = ex - a[i], rt - a[i]
                if num > 0 and den > 0:
                    ratio = math.log(num / den)
                    logs[obj].setdefault((kind_of(name), r.format), []).append(ratio)
                    logs[obj].setdefault(("", r.format), []).append(ratio)
    mean = {obj: {k: math.exp(sum(v) / len(v)) for k, v in d.items()} for obj, d in logs.items()}
    out: list[MeasureRow] = []
    for name, rows in rtn.items():
        if name in exact:
            out.extend(exact[name])
            continue
        for r in rows:
            a = act.get((name, r.format), (0.0, 0.0))
            vals = []
            for i, obj in enumerate(_OBJECTIVES[::-1]):
                v = getattr(r, _FIELD[obj])
                if v is None or a[i] is None:
                    vals.append(None)
                    continue
                k = mean[obj].get((kind_of(name), r.format), mean[obj].get(("", r.format), 1.0))
                vals.append(max(v - a[i], 0.0) * k + a[i])
            out.append(MeasureRow(name, r.format, r.bytes, float(vals[0]), vals[1]))
    return out


# --- selection --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Item:
    members: tuple[str, ...]
    formats: tuple[str, ...]
    bytes: np.ndarray
    error: np.ndarray


def _items(table: Measurement, constraints: Constraints, objective: str) -> list[_Item]:
    """Tie groups (constraints and tensor groups) merged; each item's options = formats legal for all members."""
    constraints.validate(table)
    root = {t.name: t.name for t in table.tensors}

    def find(n: str) -> str:
        while root[n] != n:
            root[n] = root[root[n]]
            n = root[n]
        return n

    groups = [list(g) for g in constraints.tie_groups]
    by_group: dict[str, list[str]] = {}
    for t in table.tensors:
        if t.group is not None:
            by_group.setdefault(t.group, []).append(t.name)
    for g in groups + list(by_group.values()):
        for n in g[1:]:
            root[find(n)] = find(g[0])
    members: dict[str, list[str]] = {}
    for t in table.tensors:
        members.setdefault(find(t.name), []).append(t.name)
    items = []
    for names in members.values():
        per = [{r.format: r for r in table.rows_for(n)} for n in names]
        legal = [f for f in per[0] if all(f in rows and constraints.permits(n, table.tensor(n).numel, rows[f])
                                          for n, rows in zip(names, per))]
        if not legal:
            raise InputError(f"{names[0]}: no candidate format is legal for it under the constraints")
        b = np.array([sum(rows[f].bytes for rows in per) for f in legal], dtype=np.float64)
        e = np.array([sum(float(getattr(rows[f], _FIELD[objective])) for rows in per) for f in legal])
        items.append(_Item(tuple(names), tuple(legal), b, e))
    return items


def _choose(items: list[_Item], lam: float) -> int:
    """Bytes of the Lagrangian choice at ``lam`` (least error + lam·bytes; ties: fewer bytes)."""
    total = 0
    for it in items:
        v = it.error + lam * it.bytes
        best = np.flatnonzero(v <= v.min())
        total += int(it.bytes[best].min())
    return total


def multiplier(items: list[_Item], capacity: int) -> float:
    """The LP multiplier λ of the knapsack: the least λ >= 0 whose Lagrangian choice fits ``capacity``."""
    if _choose(items, 0.0) <= capacity:
        return 0.0
    slopes = []
    for it in items:
        db = it.bytes[:, None] - it.bytes[None, :]
        de = it.error[None, :] - it.error[:, None]
        ok = (db > 0) & (de > 0)
        slopes.append((de[ok] / db[ok]).ravel())
    cand = np.unique(np.concatenate(slopes))
    lo, hi = 0, len(cand) - 1
    if _choose(items, float(cand[hi])) > capacity:
        raise BudgetError(f"the estimated table cannot fit {capacity} B of allocated tensors")
    while lo < hi:
        mid = (lo + hi) // 2
        if _choose(items, float(cand[mid])) <= capacity:
            hi = mid
        else:
            lo = mid + 1
    return float(cand[lo])


def near_options(b: np.ndarray, e: np.ndarray, lam: float, gap: float, margin: float) -> np.ndarray:
    """Mask of options f with some λ' in [λ/(1+m), λ(1+m)] such that ``e_f/(1+m) + λ'·b_f <= e_g·(1+m) +
    λ'·b_g + gap`` for every option g."""
    s = 1.0 + margin
    c = e[:, None] / s - e[None, :] * s - gap  # need c + λ'·(b_f − b_g) <= 0 for every g
    db = b[:, None] - b[None, :]
    tol = 1e-12 * (np.abs(e[:, None]) + np.abs(e[None, :]) + gap)
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = np.where(db > 0, -c / db, np.inf).min(axis=1)
        lower = np.where(db < 0, c / -db, -np.inf).max(axis=1)
    same = np.where(db == 0, c <= tol, True).all(axis=1)
    lo, hi = np.maximum(lower, lam / s), np.minimum(upper, lam * s)
    return same & (lo <= hi * (1 + 1e-12) + 1e-300)


def select_formats(estimates: Measurement, screen: Screen) -> tuple[dict[str, tuple[str, ...]], list[dict]]:
    """Per tensor the formats to measure exactly (see the module docstring), and per budget the estimated
    allocation's λ, gap and error (diagnostics)."""
    from .allocate import allocate

    objective = screen.objective or estimates.objectives[0]
    if objective not in estimates.objectives:
        raise InputError(f"screening objective {objective!r} needs errors the measurement lacks")
    items = _items(estimates, screen.constraints, objective)
    keep: list[set[str]] = []
    for it in items:
        cheapest = min(range(len(it.formats)), key=lambda i: (it.bytes[i], it.error[i]))
        keep.append({it.formats[cheapest]} | {f for f in screen.keep if f in it.formats})
    report = []
    for budget in screen.budgets:
        plan = allocate(estimates, budget, screen.constraints, objective)  # type: ignore[arg-type]
        capacity = plan.budget_bytes - estimates.fixed_bytes
        lam = multiplier(items, capacity)
        bound = math.fsum(float((it.error + lam * it.bytes).min()) for it in items) - lam * capacity
        gap = max(0.0, plan.error - bound)
        chosen = plan.assignments
        for it, k in zip(items, keep):
            k.add(chosen[it.members[0]])
            k.update(f for f, ok in zip(it.formats, near_options(it.bytes, it.error, lam, gap, screen.margin)) if ok)
        report.append({"budget": str(budget), "bytes": plan.budget_bytes, "lambda": lam, "gap": gap,
                       "estimated_error": plan.error})
    out = {}
    for it, k in zip(items, keep):
        for n in it.members:
            out[n] = tuple(f for f in it.formats if f in k)
    return out, report


# --- the fingerprint record and the allocation check --------------------------------------------------
def constraints_digest(constraints: Constraints | None) -> str:
    text = json.dumps((constraints or Constraints()).to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def record(screen: Screen, objective: str, budgets_bytes: Iterable[int]) -> str:
    """The ``screen`` fingerprint entry: what the table is valid for."""
    return (f"objective={objective};margin={screen.margin:g};sample={screen.sample_blocks};"
            f"constraints={constraints_digest(screen.constraints)};budgets={','.join(map(str, sorted(set(budgets_bytes))))}")


def _parse_record(text: str) -> dict[str, str]:
    try:
        d = dict(kv.split("=", 1) for kv in text.split(";"))
        [int(b) for b in d["budgets"].split(",")]
        d["objective"], d["constraints"]  # noqa: B018 - presence
    except (ValueError, KeyError):
        raise InputError(f"the measurement's screen record {text[:80]!r} is malformed") from None
    return d


def check_budget(measurement: Measurement, budget_bytes: int, constraints: Constraints | None, objective: str) -> None:
    """Refuse allocating a screened table at a budget, objective or constraints it was not screened for
    (a format that could matter there may never have been measured).  Unscreened tables pass."""
    text = measurement.fingerprint.get("screen")
    if text is None:
        return
    d = _parse_record(text)
    budgets = [int(b) for b in d["budgets"].split(",")]
    if budget_bytes not in budgets:
        raise BudgetError(f"the measurement table was screened for budgets of {', '.join(map(str, budgets))} B only; "
                          f"allocating it at {budget_bytes} B could miss formats never measured exactly: measure "
                          f"again screened for this budget, or without screening")
    if objective != d["objective"]:
        raise InputError(f"the measurement table was screened for the {d['objective']} objective, not {objective}")
    if constraints_digest(constraints) != d["constraints"]:
        raise InputError("the measurement table was screened under other allocation constraints than these")


# --- pass 1 -----------------------------------------------------------------------------------------
def spread(n: int, k: int) -> list[int]:
    """``k`` block indices spread evenly over ``n`` blocks (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def screen_formats(
    model: nn.Module,
    view,
    windows: torch.Tensor,
    formats: Sequence[str],
    method: str,
    screen: Screen,
    *,
    fisher=None,
    batch_size: int = 8,
    roundings: Sequence[str] = (),
    progress: bool = False,
    placement: Placement | None = None,
    timer: Any = None,
) -> Selection:
    """Pass 1: RTN rows for every tensor × format, exact rows for the sampled blocks, estimates, selection.
    ``placement``/``timer``: as :func:`bitalloc.pipeline.measure_model`."""
    from .calibrate import stream_blocks
    from .measure import activation_error, measure_tensor
    from .models.spill import release_parameter, release_rows

    t0 = time.perf_counter()
    place = placement if placement is not None else Placement()
    sampled = set(spread(len(view.blocks()), screen.sample_blocks))
    rtn: dict[str, list[MeasureRow]] = {}
    exact: dict[str, list[MeasureRow]] = {}
    act: dict[tuple[str, str], tuple[float, float | None]] = {}
    for block in stream_blocks(model, view, windows, fisher=fisher, batch_size=batch_size, progress=progress,
                               roundings=roundings, placement=placement, timer=timer):
        for name, stats in block.items():
            w = place.to_device(model.get_parameter(name).detach())  # the stats are on the device already
            release = functools.partial(release_rows, model, name)
            rtn[name] = measure_tensor(name, w, stats, formats, "rtn", release=release, placement=place,
                                       grid_elems=place.stack_elems, timer=timer)
            if not rtn[name]:
                raise InputError(f"none of the formats {list(formats)} can store {name} of shape {tuple(w.shape)}")
            for r in rtn[name]:
                act[(name, r.format)] = activation_error(stats, get_format(r.format).activation_rounding,
                                                         int(w.shape[0]))
            if view.ref(name).block in sampled:
                exact[name] = measure_tensor(name, w, stats, [r.format for r in rtn[name]], method, release=release,
                                             placement=place, grid_elems=place.stack_elems, timer=timer)
            release_parameter(model, name)
        del block
    infos = [TensorInfo(r.name, tuple(r.shape), r.numel, tuple(r.roles)) for r in view.quantizable()]
    est = Measurement(tuple(infos), tuple(estimate_rows(rtn, exact, act)), view.fixed_bytes, view.total_params,
                      {"estimated": "rtn x sampled exact/rtn ratio"})
    chosen, report = select_formats(est, screen)
    objective = screen.objective or est.objectives[0]
    rec = record(screen, objective, (r["bytes"] for r in report))
    for name, rows in exact.items():  # every exact row measured is kept (more exact choice never hurts)
        chosen[name] = tuple(dict.fromkeys(list(chosen[name]) + [r.format for r in rows]))
    sel = Selection(chosen, {k: tuple(v) for k, v in exact.items()}, est, rec,
                    sum(len(v) for v in rtn.values()), time.perf_counter() - t0)
    log.info("screening: %d of %d exact measurements (%.0f%% saved); pass 1 took %.1f s; %s",
             sel.exact_measurements, sel.candidates, 100 * (1 - sel.exact_measurements / max(sel.candidates, 1)),
             sel.seconds, "; ".join(f"{r['budget']}: λ={r['lambda']:.3g}" for r in report))
    return sel
