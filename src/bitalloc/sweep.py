"""Many budgets from one measurement: allocate + quantize + evaluate each, uniform baselines beside them.

Every point starts from the same fp weights (restored before each quantization from the reference, a second load
of the same model, or from a snapshot when the reference differs) and is scored
against the same cached reference logits, so points differ only by their plan and rounding method; each point
is therefore independent of the others, which is what lets :mod:`bitalloc.jobs.sweep` resume a sweep point by
point (``sweep(..., done=..., on_point=...)``).
"""
from __future__ import annotations

import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .budget import Budget, Constraints
from .errors import InputError
from .evaluate import evaluate
from .measure import Measurement
from .models.view import ModelView
from .pipeline import CachedReference, fitting_uniforms, make_plan, uniform_plan
from .placement import Placement
from .plan import Plan
from .quantize import assemble_rounded, originals, quantize_model, restore
from .timing import StageTimer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One quantized model: how it was chosen and how good it is."""

    kind: str  # "allocated" | "uniform"
    budget: str
    method: str
    label: str  # "allocated" or the uniform format id
    bytes: int
    bpw: float
    predicted_error: float
    ppl: float
    ref_ppl: float
    kld: float
    top1: float
    seconds: float  # wall time of quantize + evaluate (a resumed sweep keeps the value saved with the point)

    @classmethod
    def from_dict(cls, d: Any) -> Point:
        """The inverse of ``dataclasses.asdict`` (InputError naming what is wrong with a saved point)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(d, Mapping) or sorted(d) != sorted(names):
            raise InputError(f"a saved sweep point must have exactly the keys {names}, got {d!r:.200}")
        vals: dict[str, Any] = {}
        for f in fields(cls):
            v = d[f.name]
            if f.type == "str" and isinstance(v, str):
                vals[f.name] = v
            elif f.type == "int" and isinstance(v, int) and not isinstance(v, bool):
                vals[f.name] = v
            elif f.type == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
                vals[f.name] = v  # kept as saved, so the JSON written from it is the same text
            else:
                raise InputError(f"a saved sweep point has a malformed {f.name!r}: {v!r:.80}")
        return cls(**vals)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
#: ``rounded(assignments)``: the kept roundings (``{tensor: QTensor}``) of a plan's ``{tensor: format id}``
Rounded = Callable[[Mapping[str, str]], Mapping[str, Any]]


def point_key(index: int, method: str, kind: str, budget: str, label: str) -> str:
    """A stable file-name-safe key of the ``index``-th point of a sweep (checkpoint name in a job)."""
    return _UNSAFE.sub("_", f"p{index:04d}_{method}_{kind}_{label}_{budget}")[:120]


def run_point(
    model: nn.Module, view: ModelView, saved: dict[str, torch.Tensor], plan: Plan, kind: str, budget: str,
    method: str, calib: torch.Tensor, eval_windows: torch.Tensor, reference: CachedReference,
    *, progress: bool = True, placement: Placement | None = None, timer: StageTimer | None = None,
    recover: Any = None, recover_windows: tuple[torch.Tensor, int] | None = None,
    rounded: Rounded | None = None,
) -> Point:
    """Restore the fp weights, quantize by ``plan`` with ``method`` (or, with ``rounded``, assemble the plan from the
    roundings ``rounded(assignments)`` returns: :func:`bitalloc.quantize.assemble_rounded`), recover (a
    :class:`~bitalloc.recover.RecoverConfig` whose mode is not "none", toward the reference model, on
    ``recover_windows`` = ``(windows, held-out guard windows)`` as :func:`bitalloc.recover.training_windows`
    gives them, default ``calib`` checked on its first windows) and evaluate;
    the model keeps the result."""
    t0 = time.perf_counter()
    restore(model, saved)
    if rounded is not None:
        q = assemble_rounded(model, view, plan, rounded(plan.assignments), timer=timer)
    else:
        q = quantize_model(model, view, plan, calib, method=method, progress=progress,  # type: ignore[arg-type]
                           placement=placement, timer=timer)
    if recover is not None and recover.active:
        from .recover import recover_model

        teacher = reference.reference if isinstance(reference, CachedReference) else reference
        train_on, guard = (calib, 0) if recover_windows is None else recover_windows
        recover_model(model, teacher, train_on, q, recover, placement=placement, progress=progress, timer=timer,
                      guard=guard)
    r = evaluate(model, reference, eval_windows, placement=placement, timer=timer)
    label = "allocated" if kind == "allocated" else plan.entries[0].format
    return Point(kind, budget, method, label, plan.total_bytes, plan.bpw, plan.error, r.ppl, r.ref_ppl, r.kld,
                 r.top1, time.perf_counter() - t0)


def _plans(measurement: Measurement, budgets: Sequence[str | Budget], constraints: Constraints | None,
           uniform: Sequence[str] | None, uniform_candidates: int) -> list[tuple[str, str, Plan]]:
    """The allocated plan of every budget, then the uniform baselines (each format once)."""
    plans: list[tuple[str, str, Plan]] = [("allocated", str(b), make_plan(measurement, b, constraints))
                                          for b in budgets]
    if uniform is None:
        seen: set[str] = set()
        for b in budgets:
            for p in fitting_uniforms(measurement, b, uniform_candidates):
                if p.entries[0].format not in seen:
                    seen.add(p.entries[0].format)
                    plans.append(("uniform", str(b), p))
    else:
        plans.extend(("uniform", f, uniform_plan(measurement, f)) for f in uniform)
    return plans


def sweep(
    model: nn.Module, view: ModelView, measurement: Measurement | Mapping[str, Measurement],
    budgets: Sequence[str | Budget], methods: Sequence[str], calib: torch.Tensor, eval_windows: torch.Tensor,
    reference: nn.Module, *, constraints: Constraints | None = None, uniform: Sequence[str] | None = None,
    progress: bool = True, uniform_candidates: int = 2, done: Mapping[str, Point] | None = None,
    on_point: Callable[[str, Point], None] | None = None, placement: Placement | None = None,
    timer: StageTimer | None = None, recover: Any = None, recover_windows: tuple[torch.Tensor, int] | None = None,
    rounded: Rounded | None = None,
) -> list[Point]:
    """For every budget and method: the allocated plan and the uniform formats that fit the same bytes.

    ``measurement`` is one table for every method, or ``{method: table}`` so that each rounding method is
    allocated from errors measured with that rounding (GPTQ lowers low-bit errors far more than high-bit
    ones, so an RTN-measured table misallocates GPTQ models).  Per budget the ``uniform_candidates`` largest
    fitting uniform formats and the one with the least predicted error are all quantized and evaluated, so
    the best uniform baseline is picked by *measured* quality (:func:`best_measured_uniform`).  ``uniform``
    (format ids) replaces them by a fixed list.  ``recover`` (a RecoverConfig) trains every point's model after
    its quantization (:func:`run_point`).  ``rounded``: every point is assembled from the roundings it returns for
    the point's assignments instead of quantized (``--reuse-rounding``; one method).  The model is left with its
    original weights.

    Resuming: every point has a key (:func:`point_key`); a point whose key is in ``done`` is taken from it
    (checked against its plan) instead of being computed, and ``on_point(key, point)`` is called after each
    point computed here (to checkpoint it; an exception from it stops the sweep).
    """
    tables = dict(measurement) if isinstance(measurement, Mapping) else {m: measurement for m in methods}
    missing = [m for m in methods if m not in tables]
    if missing:
        raise ValueError(f"no measurement given for method(s) {missing}")
    saved = originals(model, reference)  # the reference's own weights when they are the model's: no copy
    ref = CachedReference(reference)
    done = done or {}
    points: list[Point] = []
    try:
        for method in methods:
            for kind, b, p in _plans(tables[method], budgets, constraints, uniform, uniform_candidates):
                label = "allocated" if kind == "allocated" else p.entries[0].format
                key = point_key(len(points), method, kind, b, label)
                if key in done:
                    pt = _check_saved(key, done[key], kind, b, method, label, p)
                    log.info("%s %s %s: saved point reused", kind, b, method)
                else:
                    pt = run_point(model, view, saved, p, kind, b, method, calib, eval_windows, ref, progress=progress,
                                   placement=placement, timer=timer, recover=recover,
                                   recover_windows=recover_windows, rounded=rounded)
                    log.info("%s %s %s: %d B, %.4f bpw, kld %.5f", kind, b, method, pt.bytes, pt.bpw, pt.kld)
                    if on_point is not None:
                        on_point(key, pt)
                points.append(pt)
    finally:
        restore(model, saved)
    return points


def _check_saved(key: str, pt: Point, kind: str, budget: str, method: str, label: str, plan: Plan) -> Point:
    want = (kind, budget, method, label, plan.total_bytes)
    got = (pt.kind, pt.budget, pt.method, pt.label, pt.bytes)
    if got != want:
        raise InputError(f"saved sweep point {key} is {got}, but the sweep now plans {want}; "
                         "remove the job directory to start over")
    return pt


def best_measured_uniform(points: Sequence[Point], budget_bytes: int, method: str) -> Point:
    """The uniform point of ``method`` within ``budget_bytes`` with the least measured KLD."""
    fits = [p for p in points if p.kind == "uniform" and p.method == method and p.bytes <= budget_bytes]
    if not fits:
        raise ValueError(f"no uniform point of method {method} within {budget_bytes} bytes")
    return min(fits, key=lambda p: (p.kld, -p.bytes))


def format_table(points: Sequence[Point]) -> str:
    head = f"{'kind':<10} {'budget':<14} {'method':<6} {'format':<16} {'MiB':>8} {'bpw':>7} {'ppl':>9} {'kld':>9} {'top1':>7}"
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(
            f"{p.kind:<10} {p.budget:<14} {p.method:<6} {p.label:<16} {p.bytes / 2**20:>8.2f} {p.bpw:>7.3f} "
            f"{p.ppl:>9.3f} {p.kld:>9.5f} {p.top1:>7.4f}"
        )
    return "\n".join(lines)


def plot(points: Sequence[Point], path: Path, title: str) -> None:
    """Size (MiB) vs KLD, allocated lines and uniform markers on the same axes, one colour per method
    (written atomically)."""
    _write_atomic(Path(path), plot_png(points, title))


def plot_png(points: Sequence[Point], title: str) -> bytes:
    """The PNG of :func:`plot` (the same points and title give the same bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"rtn": "tab:blue", "gptq": "tab:red"}
    for method in dict.fromkeys(p.method for p in points):
        c = colours.get(method, None)
        alloc = sorted((p for p in points if p.method == method and p.kind == "allocated"), key=lambda p: p.bytes)
        uni = sorted((p for p in points if p.method == method and p.kind == "uniform"), key=lambda p: p.bytes)
        if alloc:
            ax.plot([p.bytes / 2**20 for p in alloc], [max(p.kld, 1e-9) for p in alloc], "o-", color=c,
                    label=f"allocated ({method})")
        if uni:
            ax.plot([p.bytes / 2**20 for p in uni], [max(p.kld, 1e-9) for p in uni], "s--", color=c, alpha=0.6,
                    label=f"uniform ({method})")
            for p in uni:
                ax.annotate(p.label, (p.bytes / 2**20, max(p.kld, 1e-9)), fontsize=7, alpha=0.7)
    ax.set_xlabel("size of all weights (MiB)")
    ax.set_ylabel("KLD to the fp model (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def results_json(points: Sequence[Point], extra: Mapping[str, Any]) -> str:
    """The text of ``sweep.json``: ``extra`` (in its order), then the points."""
    return json.dumps({**extra, "points": [asdict(p) for p in points]}, indent=1) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    from .io.atomic import atomic_write

    with atomic_write(path, overwrite=True) as f:
        f.write(data)


def write_results(out_dir: Path, points: Sequence[Point], extra: dict, title: str) -> tuple[Path, Path]:
    """``sweep.json`` and ``sweep.png`` in ``out_dir``, each written atomically (replacing old ones)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out_dir / "sweep.json", out_dir / "sweep.png"
    _write_atomic(jpath, results_json(points, extra).encode())
    _write_atomic(ppath, plot_png(points, title))
    return jpath, ppath


def budget_label(b: str) -> str:
    return str(Budget.parse(b))
