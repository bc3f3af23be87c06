"""The allocator against brute force on hundreds of small random instances, plus its error paths."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from bitalloc.allocate import allocate
from bitalloc.budget import BpwBound, Budget, Constraints
from bitalloc.errors import BitallocError, BudgetError, InputError
from bitalloc.knapsack import Item, lagrangian
from bitalloc.measure import MeasureRow, Measurement, TensorInfo


def random_instance(rng: random.Random) -> tuple[Measurement, Constraints]:
    """2-6 tensors x 2-5 formats, some formats unmeasured, optional tie groups, pins and bpw bounds."""
    nt, nf = rng.randint(2, 6), rng.randint(2, 5)
    fmts = [f"f{j}" for j in range(nf)]
    tensors, rows = [], []
    for i in range(nt):
        numel = rng.choice([64, 128, 256])
        tensors.append(TensorInfo(f"t{i}", (numel // 8, 8), numel, ("linear",)))
        measured = [f for f in fmts if rng.random() < 0.9] or [fmts[0]]
        for f in measured:
            b = rng.randint(1, 4 * numel)
            # errors: mostly decreasing in bytes, with noise, exact ties and zeros sometimes
            e = max(0.0, rng.choice([0.0, 1.0, 2.5]) if rng.random() < 0.15 else 1e3 / b + rng.gauss(0, 0.5))
            fi = None if rng.random() < 0.02 else e * rng.uniform(0.1, 10)
            rows.append(MeasureRow(f"t{i}", f, b, e, fi))
    names = [t.name for t in tensors]
    ties: list[tuple[str, ...]] = []
    if rng.random() < 0.4:
        ties.append(tuple(rng.sample(names, rng.randint(2, min(3, nt)))))
    pinned = {}
    if rng.random() < 0.3:
        n = rng.choice(names)
        pinned[n] = rng.choice([r.format for r in rows if r.tensor == n])
    lo = rng.choice([None, None, 2.0, 8.0])
    hi = rng.choice([None, None, 20.0, 28.0])
    bounds = (BpwBound("t1", None, rng.choice([16.0, 32.0])),) if rng.random() < 0.3 else ()
    group = rng.random() < 0.2
    if group:  # a model tie group declared in the table itself
        tensors = [TensorInfo(t.name, t.shape, t.numel, t.roles, "g" if t.name in ("t0", "t1") else None)
                   for t in tensors]
    m = Measurement(tuple(tensors), tuple(rows), fixed_bytes=rng.randint(0, 50), total_params=sum(
        t.numel for t in tensors) + 10, fingerprint={"model": "random"})
    return m, Constraints(tie_groups=tuple(ties), pinned=pinned, min_bpw=lo, max_bpw=hi, bpw_bounds=bounds)


def brute_force(m: Measurement, c: Constraints, objective: str, budget_bytes: int) -> float | None:
    """Enumerate every combination of measured formats; apply every constraint directly."""
    names = [t.name for t in m.tensors]
    numel = {t.name: t.numel for t in m.tensors}
    opts = [[r for r in m.rows_for(n)] for n in names]
    groups = [set(g) for g in c.tie_groups]
    model_group = [t.name for t in m.tensors if t.group is not None]
    if model_group:
        groups.append(set(model_group))
    best = None
    for combo in itertools.product(*opts):
        fmt = {r.tensor: r.format for r in combo}
        if any(len({fmt[n] for n in g}) > 1 for g in groups):
            continue
        if any(fmt[n] != f for n, f in c.pinned.items()):
            continue
        ok = True
        for r in combo:
            if r.tensor in c.pinned:
                continue
            lo, hi = c.bounds_for(r.tensor)
            bpw = 8 * r.bytes / numel[r.tensor]
            if (lo is not None and bpw < lo) or (hi is not None and bpw > hi):
                ok = False
        if not ok or sum(r.bytes for r in combo) + m.fixed_bytes > budget_bytes:
            continue
        err = math.fsum(r.fisher_error if objective == "fisher" else r.output_error for r in combo)
        best = err if best is None else min(best, err)
    return best


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b)) + 1e-12


def test_ilp_and_lagrangian_match_brute_force_on_random_instances():
    rng = random.Random(1234)
    solved = infeasible = binding = 0
    for trial in range(400):
        m, c = random_instance(rng)
        objective = m.objectives[0]
        lo = m.fixed_bytes + sum(min(r.bytes for r in m.rows_for(t.name)) for t in m.tensors)
        hi = m.fixed_bytes + sum(max(r.bytes for r in m.rows_for(t.name)) for t in m.tensors)
        budget = rng.randint(max(1, lo - 20), hi + 5)
        truth = brute_force(m, c, objective, budget)
        for method in ("ilp", "lagrange", "auto"):
            if truth is None:
                with pytest.raises(BitallocError):
                    allocate(m, budget, c, objective=objective, method=method)
                continue
            plan = allocate(m, budget, c, objective=objective, method=method)
            assert plan.total_bytes <= budget, (trial, method)
            assert plan.objective == objective
            assert plan.gap_abs is not None and plan.gap_abs >= 0
            assert plan.lower_bound is not None and plan.lower_bound <= truth + 1e-9 * abs(truth) + 1e-12
            assert plan.error <= plan.lower_bound + plan.gap_abs + 1e-9 * abs(plan.error) + 1e-12
            assert plan.error >= truth - 1e-9 * abs(truth) - 1e-12
            if method in ("ilp", "auto"):
                assert _close(plan.error, truth), (trial, method, plan.error, truth)
            fmt = plan.assignments
            for g in c.tie_groups:
                assert len({fmt[n] for n in g}) == 1
            for n, f in c.pinned.items():
                assert fmt[n] == f
        solved += truth is not None
        infeasible += truth is None
        binding += truth is not None and truth > brute_force(m, c, objective, 10**9)  # type: ignore[operator]
    assert solved > 200 and infeasible > 10 and binding > 120  # every path was exercised


def test_budget_respected_to_the_byte():
    tensors = (TensorInfo("a", (10, 10), 100), TensorInfo("b", (10, 10), 100))
    rows = (MeasureRow("a", "x", 50, 1.0), MeasureRow("a", "y", 100, 0.0),
            MeasureRow("b", "x", 50, 1.0), MeasureRow("b", "y", 100, 0.5))
    m = Measurement(tensors, rows, fixed_bytes=7, total_params=208)
    assert allocate(m, 157, objective="output").assignments == {"a": "y", "b": "x"}
    assert allocate(m, 156, objective="output").assignments == {"a": "x", "b": "x"}
    assert allocate(m, 207, objective="output").assignments == {"a": "y", "b": "y"}
    plan = allocate(m, 10**9, objective="output")  # budget above the largest option: best everywhere
    assert plan.assignments == {"a": "y", "b": "y"} and plan.status == "optimal" and plan.gap_abs == 0


def test_infeasible_budget_names_smallest_size():
    tensors = (TensorInfo("a", (10, 10), 100),)
    m = Measurement(tensors, (MeasureRow("a", "x", 50, 1.0), MeasureRow("a", "y", 100, 0.0)),
                    fixed_bytes=14, total_params=116)
    with pytest.raises(BudgetError) as e:
        allocate(m, 63)
    msg = str(e.value)
    assert "64 B" in msg and "63 B" in msg and "MiB" in msg and f"{8 * 64 / 116:.4f} bpw" in msg
    with pytest.raises(BudgetError, match="smallest achievable"):
        allocate(m, "2bpw")
    # a pin raises the smallest size
    with pytest.raises(BudgetError, match="114 B"):
        allocate(m, 100, Constraints(pinned={"a": "y"}))


def test_fisher_falls_back_to_output_when_missing(caplog):
    tensors = (TensorInfo("a", (10, 10), 100),)
    m = Measurement(tensors, (MeasureRow("a", "x", 50, 1.0, None), MeasureRow("a", "y", 100, 0.0, None)),
                    fixed_bytes=0, total_params=100)
    with caplog.at_level("INFO"):
        plan = allocate(m, 100, objective="fisher")
    assert plan.objective == "output" and "output objective" in caplog.text


def test_constraint_errors():
    tensors = (TensorInfo("a", (10, 10), 100), TensorInfo("b", (10, 10), 100))
    rows = (MeasureRow("a", "x", 50, 1.0), MeasureRow("a", "y", 100, 0.0), MeasureRow("b", "y", 100, 0.5))
    m = Measurement(tensors, rows, fixed_bytes=0, total_params=200)
    with pytest.raises(InputError, match="unknown tensors"):
        allocate(m, 300, Constraints(tie_groups=(("a", "zz"),)))
    with pytest.raises(InputError, match="not measured"):
        allocate(m, 300, Constraints(pinned={"b": "x"}))
    with pytest.raises(InputError, match="different formats"):
        allocate(m, 300, Constraints(tie_groups=(("a", "b"),), pinned={"a": "x", "b": "y"}))
    with pytest.raises(InputError, match="matches no tensor"):
        allocate(m, 300, Constraints(bpw_bounds=(BpwBound("nope*", 1, 2),)))
    with pytest.raises(InputError, match="no measured format satisfies"):
        allocate(m, 300, Constraints(max_bpw=2.0))
    # tie group: only the common format y is possible
    assert allocate(m, 300, Constraints(tie_groups=(("a", "b"),))).assignments == {"a": "y", "b": "y"}
    # allowed patterns restrict formats
    plan = allocate(m, 300, Constraints(allowed=(("a", ("x*",)),)))
    assert plan["a"] == "x"
    with pytest.raises(InputError, match="method"):
        allocate(m, 300, method="simplex")  # type: ignore[arg-type]


def test_deterministic_tie_break_prefers_fewer_bytes():
    tensors = (TensorInfo("a", (10, 10), 100),)
    rows = (MeasureRow("a", "big", 100, 1.0), MeasureRow("a", "small", 60, 1.0), MeasureRow("a", "tiny", 40, 3.0))
    m = Measurement(tensors, rows, fixed_bytes=0, total_params=100)
    for method in ("ilp", "lagrange", "auto"):
        assert allocate(m, 100, method=method).assignments == {"a": "small"}


def test_lagrangian_gap_is_reported_when_not_optimal():
    # one item whose hull step does not fit; the fill picks the middle option
    it = Item(("a",), ("s", "m", "l"), np.array([0, 5, 10]), np.array([10.0, 6.0, 0.0]))
    sol = lagrangian([it], 6)
    assert sol.choice.tolist() == [1] and sol.objective == 6.0
    assert sol.lower_bound == pytest.approx(10.0 - 6 * 1.0) and sol.status == "feasible"


def test_larger_random_instances_auto_vs_ilp():
    rng = np.random.default_rng(0)
    for _ in range(5):
        nt, nf = 60, 12
        tensors, rows = [], []
        for i in range(nt):
            numel = int(rng.integers(1000, 5000))
            tensors.append(TensorInfo(f"t{i}", (numel,), numel))
            sens = float(rng.lognormal(0, 2))
            for j in range(nf):
                b = int(numel * (1 + j) / 4 + rng.integers(0, 50))
                rows.append(MeasureRow(f"t{i}", f"f{j}", b, sens * 2.0 ** (-2 * j) * float(rng.uniform(0.8, 1.2))))
        m = Measurement(tuple(tensors), tuple(rows), 0, sum(t.numel for t in tensors))
        budget = Budget.parse(f"{rng.uniform(3, 20):.2f}bpw")
        exact = allocate(m, budget, method="ilp", objective="output")
        lag = allocate(m, budget, method="lagrange", objective="output")
        assert exact.status == "optimal" and exact.error <= lag.error * (1 + 1e-9)
        assert lag.lower_bound <= exact.error * (1 + 1e-9) and lag.total_bytes <= exact.budget_bytes
        assert lag.gap_rel < 0.05
