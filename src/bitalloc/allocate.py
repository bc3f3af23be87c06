"""The allocator: choose one format per tensor to minimise the predicted error under a byte budget.

This is a multiple-choice knapsack.  Tie groups are merged into *items* (one choice for all members; bytes
and errors summed), dominated options are dropped, then it is solved

* exactly, as an ILP with HiGHS (binary x[i, f], one choice per item, Σ bytes·x ≤ budget − fixed bytes),
  reporting HiGHS' status and MIP gap; or
* fast, by the Lagrangian / convex-hull method: greedy exchange along each item's lower convex hull of
  (bytes, error) by marginal slope, then a greedy fill of the bytes left.  The LP relaxation of the knapsack
  is exactly the fractional hull solution, so its value is a proven lower bound and the reported gap is the
  distance to it.

``method="auto"`` runs the Lagrangian first (it is often already proven optimal), then the ILP for instances
up to ``AUTO_ILP_MAX_VARS`` options, keeping the Lagrangian answer when the ILP runs out of time.
"""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from .budget import Budget, BpwBound, Constraints
from .errors import BudgetError, InputError
from .knapsack import REL_EPS, Item, Solution, bytes_of, lagrangian, objective_of, solve_ilp
from .measure import Measurement
from .plan import Plan, PlanEntry

log = logging.getLogger(__name__)

#: Largest number of (item, option) variables ``method="auto"`` hands to the ILP.
AUTO_ILP_MAX_VARS = 100_000

__all__ = ["allocate", "Budget", "BpwBound", "Constraints", "Plan", "AUTO_ILP_MAX_VARS"]


def allocate(
    table: Measurement,
    budget: Budget | str | int,
    constraints: Constraints | None = None,
    objective: Literal["fisher", "output"] = "fisher",
    method: Literal["auto", "ilp", "lagrange"] = "auto",
    time_limit: float = 60.0,
) -> Plan:
    """The least-error assignment of measured formats to tensors whose total size fits ``budget``.

    Raises :class:`BudgetError` when even the smallest choices do not fit (the message names the smallest
    achievable size) and :class:`InputError` for constraints that name unknown tensors or leave a tensor no
    legal format.
    """
    if objective not in ("fisher", "output"):
        raise InputError(f"objective must be 'fisher' or 'output', got {objective!r}")
    if method not in ("auto", "ilp", "lagrange"):
        raise InputError(f"method must be 'auto', 'ilp' or 'lagrange', got {method!r}")
    if not (time_limit > 0):
        raise InputError(f"time_limit must be positive, got {time_limit!r}")
    if objective == "fisher" and "fisher" not in table.objectives:
        log.info("the measurement has no Fisher errors for every row: allocating with the output objective")
        objective = "output"
    budget = Budget.parse(budget)
    budget_bytes = budget.resolve(table.total_params)
    constraints = constraints or Constraints()
    constraints.validate(table)
    items = _build_items(table, constraints, objective)

    capacity = budget_bytes - table.fixed_bytes
    smallest = table.fixed_bytes + sum(int(it.bytes[0]) for it in items)
    if smallest > budget_bytes:
        raise BudgetError(
            f"budget {budget} = {budget_bytes} B ({budget_bytes / 2**20:.3f} MiB, "
            f"{8 * budget_bytes / table.total_params:.4f} bpw) cannot be met: the smallest achievable size "
            f"with these formats and constraints is {smallest} B ({smallest / 2**20:.3f} MiB, "
            f"{8 * smallest / table.total_params:.4f} bpw)"
        )
    sol = _solve(items, capacity, method, time_limit)
    entries = _entries(table, items, sol.choice, objective)
    obj = sol.objective
    gap_abs = max(0.0, obj - sol.lower_bound)
    plan = Plan(
        entries=entries,
        fixed_bytes=table.fixed_bytes,
        total_params=table.total_params,
        budget_bytes=budget_bytes,
        budget=str(budget),
        objective=objective,
        solver=sol.solver,
        status=sol.status,
        gap_abs=gap_abs,
        gap_rel=gap_abs / obj if obj > 0 else 0.0,
        lower_bound=sol.lower_bound,
        fingerprint=dict(table.fingerprint),
    )
    if plan.total_bytes > budget_bytes:  # pragma: no cover - guarded by the solvers
        raise AssertionError(f"allocator bug: {plan.total_bytes} B over budget {budget_bytes} B")
    log.info("allocated: %s", plan.summary())
    return plan


# --- items ------------------------------------------------------------------------------------------
def _build_items(table: Measurement, constraints: Constraints, objective: str) -> list[Item]:
    order = {t.name: i for i, t in enumerate(table.tensors)}
    parent = list(range(len(table.tensors)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    groups: list[list[str]] = [list(g) for g in constraints.tie_groups]
    by_group: dict[str, list[str]] = {}
    for t in table.tensors:
        if t.group is not None:
            by_group.setdefault(t.group, []).append(t.name)
    groups.extend(by_group.values())
    for g in groups:
        root = find(order[g[0]])
        for n in g[1:]:
            parent[find(order[n])] = root
    members: dict[int, list[str]] = {}
    for t in table.tensors:
        members.setdefault(find(order[t.name]), []).append(t.name)

    items = []
    for names in sorted(members.values(), key=lambda ns: order[ns[0]]):
        items.append(_item(table, constraints, objective, tuple(names)))
    return items


def _item(table: Measurement, constraints: Constraints, objective: str, names: tuple[str, ...]) -> Item:
    what = names[0] if len(names) == 1 else f"tie group {list(names)}"
    pins = {constraints.pinned[n] for n in names if n in constraints.pinned}
    if len(pins) > 1:
        raise InputError(f"{what}: members are pinned to different formats {sorted(pins)}")
    per_member = []
    for n in names:
        rows = {r.format: r for r in table.rows_for(n)}
        if not rows:
            raise InputError(f"tensor {n!r} has no measured format")
        per_member.append(rows)
    common = [f for f in per_member[0] if all(f in rows for rows in per_member[1:])]
    if pins:
        (pin,) = pins
        if pin not in common:
            raise InputError(f"{what} is pinned to {pin!r}, which was not measured for every member")
        for n, rows in zip(names, per_member):  # the pin binds the group; other members keep their bounds
            if not constraints.permits(n, table.tensor(n).numel, rows[pin]):
                raise InputError(f"{what} is pinned to {pin!r}, which the bpw bounds / allowed formats of {n!r} forbid")
        legal = [pin]
    else:
        if not common:
            raise InputError(f"{what}: no format was measured for every member of the tie group")
        legal = [
            f for f in common
            if all(constraints.permits(n, table.tensor(n).numel, rows[f]) for n, rows in zip(names, per_member))
        ]
        if not legal:
            raise InputError(
                f"{what}: no measured format satisfies the constraints (bpw bounds / allowed formats); "
                f"measured: {', '.join(common)}"
            )
    options = []
    for f in legal:
        b = sum(rows[f].bytes for rows in per_member)
        e = 0.0
        for rows in per_member:
            v = rows[f].fisher_error if objective == "fisher" else rows[f].output_error
            assert v is not None
            e += v
        options.append((b, e, f))
    options.sort()
    kept: list[tuple[int, float, str]] = []
    for b, e, f in options:  # Pareto front: strictly less error for more bytes; ties -> smaller bytes
        if not kept or e < kept[-1][1]:
            kept.append((b, e, f))
    return Item(
        members=names,
        formats=tuple(f for _, _, f in kept),
        bytes=np.array([b for b, _, _ in kept], dtype=np.int64),
        error=np.array([e for _, e, _ in kept], dtype=np.float64),
    )


def _entries(table: Measurement, items: list[Item], choice: np.ndarray, objective: str) -> tuple[PlanEntry, ...]:
    fmt_of = {n: it.formats[int(c)] for it, c in zip(items, choice) for n in it.members}
    out = []
    for t in table.tensors:
        row = next(r for r in table.rows_for(t.name) if r.format == fmt_of[t.name])
        err = row.fisher_error if objective == "fisher" else row.output_error
        out.append(PlanEntry(t.name, row.format, row.bytes, float(err)))  # type: ignore[arg-type]
    return tuple(out)


# --- solvers ----------------------------------------------------------------------------------------
def _solve(items: list[Item], capacity: int, method: str, time_limit: float) -> Solution:
    best = np.array([len(it.formats) - 1 for it in items], dtype=np.int64)
    if bytes_of(items, best) <= capacity:  # the budget does not bind: every item takes its least error
        obj = objective_of(items, best)
        return Solution(best, obj, obj, "lagrange" if method == "lagrange" else "ilp", "optimal")
    lag = lagrangian(items, capacity)
    if method == "lagrange":
        return lag
    nvars = sum(len(it.formats) for it in items)
    proven = lag.objective - lag.lower_bound <= REL_EPS * max(abs(lag.objective), 1e-300)
    if method == "auto" and (proven or nvars > AUTO_ILP_MAX_VARS):
        return lag
    ilp = solve_ilp(items, capacity, time_limit, start=lag.choice)
    if ilp is None:
        log.warning("the ILP found no solution within %.1f s: using the Lagrangian solution", time_limit)
        return lag
    lb = max(ilp.lower_bound, lag.lower_bound)
    if lag.objective < ilp.objective:
        return Solution(lag.choice, lag.objective, lb, "lagrange", lag.status)
    return Solution(ilp.choice, ilp.objective, lb, ilp.solver, ilp.status)
