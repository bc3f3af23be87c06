"""Multiple-choice knapsack solvers over plain arrays: the exact ILP (HiGHS) and the Lagrangian hull method.

An :class:`Item` is one choice (a tensor or a tie group) with Pareto-optimal options sorted by bytes; a
:class:`Solution` picks one option per item.  Both solvers return the error of their choice and a proven
lower bound on the optimum (HiGHS' dual bound, or the LP relaxation = fractional convex-hull solution).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Gaps below this (relative) count as proven optimal.
REL_EPS = 1e-12


@dataclass(frozen=True, eq=False)
class Item:
    """Tensors sharing one choice; options are Pareto-optimal, sorted by bytes (increasing) and error
    (strictly decreasing)."""

    members: tuple[str, ...]
    formats: tuple[str, ...]
    bytes: np.ndarray  # int64
    error: np.ndarray  # float64


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # option index per item
    objective: float
    lower_bound: float
    solver: str
    status: str


def _hull(b: np.ndarray, e: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of Pareto points sorted by bytes (strictly convex, slopes < 0)."""
    h: list[int] = []
    for k in range(len(b)):
        while len(h) >= 2:
            i, j = h[-2], h[-1]
            # pop j when it lies on or above the segment i -> k
            if (e[j] - e[i]) * (b[k] - b[i]) >= (e[k] - e[i]) * (b[j] - b[i]):
                h.pop()
            else:
                break
        h.append(k)
    return h


def lagrangian(items: list[Item], capacity: int) -> Solution:
    """Greedy exchange along the convex hulls, then a greedy fill; the LP bound proves the gap."""
    choice = np.zeros(len(items), dtype=np.int64)
    incs: list[tuple[float, int, int, int, int]] = []  # (-slope, item, step, from, to)
    for i, it in enumerate(items):
        h = _hull(it.bytes, it.error)
        for s in range(len(h) - 1):
            db = int(it.bytes[h[s + 1]] - it.bytes[h[s]])
            de = float(it.error[h[s]] - it.error[h[s + 1]])
            incs.append((-de / db, i, s, h[s], h[s + 1]))
    incs.sort()
    rem = capacity - bytes_of(items, choice)
    lower = None
    for neg_slope, i, _s, a, b in incs:
        db = int(items[i].bytes[b] - items[i].bytes[a])
        if db > rem:
            lower = objective_of(items, choice) + neg_slope * rem  # the fractional LP optimum
            break
        choice[i] = b
        rem -= db
    if lower is None:
        obj = objective_of(items, choice)
        return Solution(choice, obj, obj, "lagrange", "optimal")
    choice = _greedy_fill(items, choice, rem)
    obj = objective_of(items, choice)
    lower = min(lower, obj)
    status = "optimal" if obj - lower <= REL_EPS * max(abs(obj), 1e-300) else "feasible"
    return Solution(choice, obj, lower, "lagrange", status)


def _greedy_fill(items: list[Item], choice: np.ndarray, rem: int) -> np.ndarray:
    """Repeatedly make the single move (one item to another option) that fits and lowers the error most."""
    item_of = np.concatenate([np.full(len(it.formats), i) for i, it in enumerate(items)])
    opt_of = np.concatenate([np.arange(len(it.formats)) for it in items])
    b = np.concatenate([it.bytes for it in items])
    e = np.concatenate([it.error for it in items])
    start = np.cumsum([0] + [len(it.formats) for it in items])[:-1]
    choice = choice.copy()
    while True:
        cur = start[item_of] + choice[item_of]
        db = b - b[cur]
        de = e[cur] - e
        ok = (db <= rem) & (de > 0)
        if not ok.any():
            return choice
        cand = np.flatnonzero(ok)
        # most error removed; ties -> fewest extra bytes, then lowest index (deterministic)
        k = cand[np.lexsort((cand, db[cand], -de[cand]))[0]]
        choice[item_of[k]] = opt_of[k]
        rem -= int(db[k])


def objective_of(items: list[Item], choice: np.ndarray) -> float:
    return math.fsum(float(it.error[int(c)]) for it, c in zip(items, choice))


def bytes_of(items: list[Item], choice: np.ndarray) -> int:
    return sum(int(it.bytes[int(c)]) for it, c in zip(items, choice))


def solve_ilp(items: list[Item], capacity: int, time_limit: float, start: np.ndarray | None = None) -> Solution | None:
    """Exact multiple-choice knapsack with HiGHS (``scipy.optimize.milp``); None if no solution was found.

    Costs and bytes are taken relative to each item's smallest option (a constant shift) and costs are
    scaled so that HiGHS' absolute gap tolerance is negligible.  The chosen bytes are re-checked in exact
    integers; should a tolerance let the row slip over the capacity, the row is tightened and re-solved.
    ``start`` (a feasible choice, e.g. the Lagrangian one) only sets the cost scale.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, vstack

    sizes = np.array([len(it.formats) for it in items])
    n = int(sizes.sum())
    item_of = np.repeat(np.arange(len(items)), sizes)
    b_red = np.concatenate([it.bytes - it.bytes[0] for it in items]).astype(np.float64)
    e_red = np.concatenate([it.error - it.error[-1] for it in items])
    base_e = math.fsum(float(it.error[-1]) for it in items)
    rhs = capacity - sum(int(it.bytes[0]) for it in items)
    ref = objective_of(items, start) - base_e if start is not None else float(e_red.sum())
    scale = 1e4 / ref if ref > 0 else 1.0
    one_hot = csr_array((np.ones(n), (item_of, np.arange(n))), shape=(len(items), n))
    a = vstack([one_hot, csr_array(b_red.reshape(1, n))]).tocsr()
    lo = np.concatenate([np.ones(len(items)), [-np.inf]])
    first_bound = None
    for _attempt in range(4):
        hi = np.concatenate([np.ones(len(items)), [float(rhs)]])
        res = milp(
            e_red * scale,
            constraints=LinearConstraint(a, lo, hi),
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "presolve": True},
        )
        if res.x is None:
            log.info("HiGHS: %s (status %s)", res.message, res.status)
            return None
        if first_bound is None:  # only the untightened problem's dual bound bounds the true optimum
            first_bound = getattr(res, "mip_dual_bound", None)
        choice = np.zeros(len(items), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for i, (o, k) in enumerate(zip(offsets, sizes)):
            choice[i] = int(np.argmax(res.x[o : o + k]))
        over = bytes_of(items, choice) - capacity
        if over <= 0:
            break
        log.debug("HiGHS solution is %d B over the capacity after rounding: tightening", over)
        rhs -= over
    else:  # pragma: no cover - tolerances never slip four times in a row
        return None
    obj = objective_of(items, choice)
    bound = first_bound
    lower = base_e + float(bound) / scale if bound is not None and np.isfinite(bound) else -math.inf
    lower = min(lower, obj)
    status = "optimal" if res.status == 0 else ("time_limit" if res.status == 1 else f"highs_status_{res.status}")
    return Solution(choice, obj, lower, "ilp", status)
