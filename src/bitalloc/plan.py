"""The allocation result: which format each tensor gets, its bytes and predicted error, and how it was solved.

A plan is readable, editable JSON: a header (budget, totals, solver, gap) then one line per tensor in the
measurement's order.  ``Plan.load(path, measurement)`` re-validates an edited plan against the table and
recomputes every byte count and error from it, so hand edits can never smuggle in wrong numbers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BudgetError, InputError
from .checked import MAX_REAL, Checker, parse_json, read_text, short, versioned
from .measure import Measurement, json_with_lines, write_text_atomic

log = logging.getLogger(__name__)

PLAN_VERSION = 1
OBJECTIVES = ("fisher", "output")


@dataclass(frozen=True)
class PlanEntry:
    tensor: str
    format: str
    bytes: int
    error: float


@dataclass(frozen=True, eq=False)
class Plan:
    """``entries`` in measurement order; ``error`` of each entry is in the plan's ``objective``.

    ``gap_abs``/``gap_rel``: proven distance of the total error to the optimum (None for a hand-edited plan);
    ``lower_bound``: the bound it was proven against.  ``total_bytes`` = allocated + ``fixed_bytes``.
    """

    entries: tuple[PlanEntry, ...]
    fixed_bytes: int
    total_params: int
    budget_bytes: int
    budget: str
    objective: str
    solver: str
    status: str
    gap_abs: float | None = None
    gap_rel: float | None = None
    lower_bound: float | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "fingerprint", dict(self.fingerprint))
        if self.objective not in OBJECTIVES:
            raise InputError(f"plan objective must be one of {OBJECTIVES}, got {self.objective!r}")
        names = [e.tensor for e in self.entries]
        if len(set(names)) != len(names):
            raise InputError("plan lists a tensor twice")
        if self.total_params <= 0 or self.budget_bytes <= 0 or self.fixed_bytes < 0:
            raise InputError("plan: total_params and budget_bytes must be positive, fixed_bytes non-negative")

    @property
    def assignments(self) -> dict[str, str]:
        return {e.tensor: e.format for e in self.entries}

    @property
    def allocated_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def total_bytes(self) -> int:
        return self.allocated_bytes + self.fixed_bytes

    @property
    def error(self) -> float:
        return float(sum(e.error for e in self.entries))

    @property
    def bpw(self) -> float:
        return 8.0 * self.total_bytes / self.total_params

    def __getitem__(self, tensor: str) -> str:
        for e in self.entries:
            if e.tensor == tensor:
                return e.format
        raise KeyError(tensor)

    def summary(self) -> str:
        gap = "n/a" if self.gap_rel is None else f"{self.gap_rel:.2e}"
        return (
            f"{len(self.entries)} tensors, {self.total_bytes} B ({self.total_bytes / 2**20:.2f} MiB, "
            f"{self.bpw:.4f} bpw) of {self.budget_bytes} B budget ({self.budget}); {self.objective} error "
            f"{self.error:.6g}; {self.solver} {self.status}, gap {gap}"
        )

    # --- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> str:
        head: dict[str, Any] = {
            "format_version": PLAN_VERSION,
            "kind": "bitalloc.plan",
            "budget": self.budget,
            "budget_bytes": self.budget_bytes,
            "total_bytes": self.total_bytes,
            "fixed_bytes": self.fixed_bytes,
            "total_params": self.total_params,
            "bpw": round(self.bpw, 6),
            "objective": self.objective,
            "predicted_error": self.error,
            "solver": self.solver,
            "status": self.status,
            "gap_abs": self.gap_abs,
            "gap_rel": self.gap_rel,
            "lower_bound": self.lower_bound,
            "fingerprint": {k: self.fingerprint[k] for k in sorted(self.fingerprint)},
        }
        tensors = {e.tensor: {"format": e.format, "bytes": e.bytes, "error": e.error} for e in self.entries}
        return json_with_lines(head, {"tensors": tensors})

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        write_text_atomic(Path(path), self.to_json(), overwrite)

    @classmethod
    def from_json(cls, text: str, measurement: Measurement, source: str = "plan") -> "Plan":
        """Parse and re-validate against ``measurement``; bytes and errors are recomputed from the table.

        A tensor entry may be ``{"format": "q4_k", ...}`` or just ``"q4_k"``.  Every key is type-checked
        (:mod:`bitalloc.checked`); raises :class:`InputError` (naming ``source`` and the entry) for malformed
        values, unknown or missing tensors, unknown formats, formats not measured for a tensor or a broken
        tie group, and :class:`BudgetError` when the plan no longer fits its budget."""
        c = Checker(source)
        d = versioned(parse_json(text, source), "bitalloc.plan", PLAN_VERSION, source)
        tensors = c.obj(c.key(d, "tensors"), "tensors")
        fp = c.str_map(d.get("fingerprint", {}), "fingerprint")
        objective = c.choice(d.get("objective", "output"), "objective", OBJECTIVES)
        budget_bytes = c.count(c.key(d, "budget_bytes"), "budget_bytes", 1)
        budget = c.string(d.get("budget", str(budget_bytes)), "budget", 256)
        solver, status = (c.string(d.get(k, "edited"), k, 256) for k in ("solver", "status"))
        gaps = {k: c.opt_real(d.get(k), k, -MAX_REAL if k == "lower_bound" else 0.0)
                for k in ("gap_abs", "gap_rel", "lower_bound")}
        for k in ("total_bytes", "fixed_bytes", "total_params"):  # informational: recomputed from the table
            if d.get(k) is not None:
                c.count(d[k], k)
        for k in ("bpw", "predicted_error"):
            c.opt_real(d.get(k), k)
        if fp and measurement.fingerprint and fp != measurement.fingerprint:
            log.warning("%s: its fingerprint differs from the measurement's: it was made for another table", source)
        if objective == "fisher" and "fisher" not in measurement.objectives:
            raise c.fail("objective", "fisher, but the measurement has no Fisher errors")
        known = {t.name for t in measurement.tensors}
        unknown = [n for n in tensors if n not in known]
        if unknown:
            raise c.fail("tensors", f"names tensors not in the measurement: {short(unknown[:5], 200)}")
        missing = [t.name for t in measurement.tensors if t.name not in tensors]
        if missing:
            raise c.fail("tensors", f"no format for {len(missing)} tensors, e.g. {short(missing[:5], 200)}")
        entries: list[PlanEntry] = []
        edited = False
        for t in measurement.tensors:
            where = f"tensors[{short(t.name)}]"
            v = tensors[t.name]
            if isinstance(v, str):
                fmt_id, given = c.format_for(v, where).id, None
            else:
                ent = c.obj(v, where)
                fmt_id = c.format_for(c.key(ent, "format", where), f"{where}.format").id
                given = (None if ent.get("bytes") is None else c.count(ent["bytes"], f"{where}.bytes"),
                         c.opt_real(ent.get("error"), f"{where}.error"))
            rows = {r.format: r for r in measurement.rows_for(t.name)}
            if fmt_id not in rows:
                raise c.fail(where, f"format {fmt_id!r} was not measured for it (measured: {', '.join(rows)})")
            r = rows[fmt_id]
            err = r.fisher_error if objective == "fisher" else r.output_error
            assert err is not None
            if given != (r.bytes, err):
                edited = True
            entries.append(PlanEntry(t.name, fmt_id, r.bytes, float(err)))
        try:
            _check_groups(measurement, {e.tensor: e.format for e in entries})
        except InputError as e:
            raise c.fail("tensors", str(e)) from None
        plan = cls(
            entries=tuple(entries),
            fixed_bytes=measurement.fixed_bytes,
            total_params=measurement.total_params,
            budget_bytes=budget_bytes,
            budget=budget,
            objective=objective,
            solver="edited" if edited else solver,
            status="edited" if edited else status,
            gap_abs=None if edited else gaps["gap_abs"],
            gap_rel=None if edited else gaps["gap_rel"],
            lower_bound=None if edited else gaps["lower_bound"],
            fingerprint=dict(measurement.fingerprint),
        )
        if plan.total_bytes > plan.budget_bytes:
            raise BudgetError(
                f"{source} takes {plan.total_bytes} B ({plan.total_bytes / 2**20:.2f} MiB, {plan.bpw:.4f} bpw), "
                f"over its budget {plan.budget} = {plan.budget_bytes} B by {plan.total_bytes - plan.budget_bytes} B"
            )
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike, measurement: Measurement) -> "Plan":
        source = f"plan {path}"
        return cls.from_json(read_text(path, source), measurement, source)


def _check_groups(measurement: Measurement, assignments: dict[str, str]) -> None:
    """Tensors of one model tie group (``TensorInfo.group``) must share a format."""
    seen: dict[str, tuple[str, str]] = {}
    for t in measurement.tensors:
        if t.group is None:
            continue
        f = assignments[t.name]
        if t.group in seen and seen[t.group][1] != f:
            other, of = seen[t.group]
            raise InputError(
                f"tie group {t.group!r}: {t.name!r} has {f!r} but {other!r} has {of!r}; they must share a format"
            )
        seen.setdefault(t.group, (t.name, f))
