"""Screening (bitalloc.screen): the formats measured exactly are those that can matter at the budgets, and the
allocation from the screened table equals the exhaustive one."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from bitalloc.allocate import allocate
from bitalloc.budget import Budget, Constraints
from bitalloc.errors import BudgetError, InputError
from bitalloc.formats import get_format
from bitalloc.pipeline import make_plan, measure_model
from bitalloc.models.view import ModelView
from bitalloc.screen import (Screen, Selection, check_budget, estimate_rows, kind_of, near_options, record, select_formats,
                             spread)
from bitalloc.table import MeasureRow, Measurement, TensorInfo

from conftest import tiny_llama, token_ids

INT = ["int2-g32", "int3-g32", "int4-g32", "int5-g32", "int6-g32", "int8-g32", "int3-g64", "int4-g64"]


# --- synthetic tables: the exact frontier is known by construction -----------------------------------------
def _tables(seed: int, noise: float, n: int = 40) -> tuple[Measurement, Measurement]:
    """(exact, estimated): random tensors whose exact error falls ~4x per bit, and estimates off by a random
    factor in [1/(1+noise), 1+noise] per row."""
    rng = np.random.default_rng(seed)
    infos, exact, est = [], [], []
    for i in range(n):
        shape = (int(rng.choice([64, 128, 256])), int(rng.choice([128, 256])))
        name = f"model.layers.{i // 7}.t{i % 7}.weight"
        infos.append(TensorInfo(name, shape, shape[0] * shape[1]))
        scale = 10 ** rng.uniform(-3, 1)
        for f in INT:
            fmt = get_format(f)
            e = scale * 4.0 ** -fmt.bpw(shape) * rng.uniform(0.7, 1.4)
            fi = e * rng.uniform(0.5, 2)
            k, kf = (1 + noise) ** rng.uniform(-1, 1), (1 + noise) ** rng.uniform(-1, 1)
            exact.append(MeasureRow(name, f, fmt.nbytes(shape), e, fi))
            est.append(MeasureRow(name, f, fmt.nbytes(shape), e * k, fi * kf))
    return (Measurement(tuple(infos), tuple(exact), 1000, sum(t.numel for t in infos)),
            Measurement(tuple(infos), tuple(est), 1000, sum(t.numel for t in infos)))


def _restrict(table: Measurement, keep: dict[str, tuple[str, ...]]) -> Measurement:
    rows = tuple(r for r in table.rows if r.format in keep[r.tensor])
    return Measurement(table.tensors, rows, table.fixed_bytes, table.total_params, table.fingerprint)


BUDGETS = ("3.1bpw", "3.6bpw", "4.3bpw", "5bpw", "6.2bpw")


@pytest.mark.parametrize("seed,budgets", [(0, BUDGETS), (1, BUDGETS), (2, BUDGETS[1:3]), (3, BUDGETS[2:3])])
def test_screened_allocation_equals_exhaustive_on_synthetic_frontiers(seed, budgets):
    exact, est = _tables(seed, noise=0.5)
    screen = Screen(budgets, margin=0.5)
    keep, report = select_formats(est, screen)
    sub = _restrict(exact, keep)
    assert len(sub.rows) < (0.9 if len(budgets) > 2 else 0.6) * len(exact.rows)  # screening dropped something
    for b in budgets:
        full, mine = allocate(exact, b), allocate(sub, b)
        assert mine.assignments == full.assignments, b
        assert mine.total_bytes <= Budget.parse(b).resolve(exact.total_params)
    assert [r["bytes"] for r in report] == [Budget.parse(b).resolve(exact.total_params) for b in budgets]


def test_the_comparison_can_fail_without_a_margin():
    """With estimates off by up to 3x and no margin, some allocation differs: the test above is not vacuous."""
    differs = 0
    for seed in range(3):
        exact, est = _tables(seed, noise=2.0)
        keep, _ = select_formats(est, Screen(BUDGETS, margin=0.0))
        sub = _restrict(exact, keep)
        differs += sum(allocate(sub, b).assignments != allocate(exact, b).assignments for b in BUDGETS)
    assert differs > 0


def test_every_budget_stays_feasible_and_the_cheapest_format_is_kept():
    exact, est = _tables(1, noise=3.0)
    keep, _ = select_formats(est, Screen(BUDGETS, margin=0.0))
    sub = _restrict(exact, keep)
    for t in exact.tensors:
        cheapest = min(exact.rows_for(t.name), key=lambda r: r.bytes).bytes
        assert min(r.bytes for r in sub.rows_for(t.name)) == cheapest
    for b in BUDGETS:  # the estimated choice is always kept, so every budget is met from exact rows
        assert allocate(sub, b).total_bytes <= Budget.parse(b).resolve(exact.total_params)


def test_tie_groups_get_one_selection_and_keep_formats_are_measured():
    exact, est = _tables(2, noise=0.5)
    names = [t.name for t in exact.tensors]
    cons = Constraints(tie_groups=((names[0], names[1], names[2]), (names[7], names[8])))
    keep, _ = select_formats(est, Screen(BUDGETS, margin=0.5, constraints=cons, keep=("int8-g32",)))
    assert keep[names[0]] == keep[names[1]] == keep[names[2]] and keep[names[7]] == keep[names[8]]
    assert all("int8-g32" in v for v in keep.values())
    sub = _restrict(exact, keep)
    for b in BUDGETS:
        assert allocate(sub, b, cons).assignments == allocate(exact, b, cons).assignments


def test_near_options_window():
    b = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([8.0, 4.0, 2.0, 1.0])  # slopes 4, 2, 1
    assert near_options(b, e, 2.0, 0.0, 0.0).tolist() == [False, True, True, False]  # λ = 2: the tie 1-2
    assert near_options(b, e, 3.0, 0.0, 0.0).tolist() == [False, True, False, False]
    assert near_options(b, e, 3.0, 0.0, 0.2).tolist() == [True, True, True, False]
    assert near_options(b, e, 0.0, 0.0, 0.0).tolist() == [False, False, False, True]  # budget does not bind


def test_estimates_scale_rtn_by_the_sampled_ratio_of_the_kind_and_keep_the_activation_part():
    r = lambda t, f, e: MeasureRow(t, f, 10, e, e / 2)  # noqa: E731
    a, b, head = "model.layers.0.q.weight", "model.layers.1.q.weight", "lm_head.weight"
    rtn = {a: [r(a, "q4_0", 5.0)], b: [r(b, "q4_0", 9.0)], head: [r(head, "q4_0", 3.0)]}
    exact = {a: [r(a, "q4_0", 2.0)]}
    act = {(a, "q4_0"): (1.0, 0.5), (b, "q4_0"): (1.0, 0.5), (head, "q4_0"): (0.0, 0.0)}
    est = {x.tensor: x for x in estimate_rows(rtn, exact, act)}
    assert est[a] == exact[a][0]
    assert est[b].output_error == pytest.approx((9 - 1) * (2 - 1) / (5 - 1) + 1)  # weight part x 1/4, + act
    assert est[head].output_error == pytest.approx(3 / 4)  # no sample of its kind: the format's ratio
    assert kind_of("model.layers.12.mlp.experts.3.down.weight") == "model.layers.*.mlp.experts.*.down.weight"


def test_spread_and_screen_validation():
    assert spread(30, 3) == [0, 14, 29] and spread(2, 3) == [0, 1] and spread(5, 1) == [2]
    with pytest.raises(InputError, match="budget"):
        Screen(())
    with pytest.raises(InputError, match="margin"):
        Screen(("4bpw",), margin=-1)
    with pytest.raises(InputError, match="sample"):
        Screen(("4bpw",), sample_blocks=0)


def test_a_screened_table_refuses_other_budgets_objectives_and_constraints():
    exact, _ = _tables(0, noise=0.0)
    nbytes = Budget.parse("4bpw").resolve(exact.total_params)
    fp = {"screen": record(Screen(("4bpw",)), "fisher", [nbytes])}
    m = Measurement(exact.tensors, exact.rows, exact.fixed_bytes, exact.total_params, fp)
    check_budget(m, nbytes, None, "fisher")
    make_plan(m, "4bpw")
    with pytest.raises(BudgetError, match="screened for budgets"):
        make_plan(m, "4.5bpw")
    with pytest.raises(InputError, match="objective"):
        make_plan(m, "4bpw", objective="output")
    with pytest.raises(InputError, match="constraints"):
        make_plan(m, "4bpw", Constraints(max_bpw=6))
    bad = Measurement(exact.tensors, exact.rows, exact.fixed_bytes, exact.total_params, {"screen": "junk"})
    with pytest.raises(InputError, match="malformed"):
        make_plan(bad, "4bpw")
    make_plan(exact, "4.5bpw")  # an unscreened table serves every budget


# --- a tiny model, measured exhaustively and screened: same run, same budgets ------------------------------
TINY_FORMATS = ["int2-g32", "int3-g32", "int4-g32", "q4_0", "q8_0"]
TINY_BUDGETS = ("3.3bpw", "4bpw", "5.5bpw")


@pytest.fixture(scope="module")
def tiny_tables():
    model, windows = tiny_llama(), token_ids(4)
    full = measure_model(model, None, windows, TINY_FORMATS, "gptq", progress=False)
    screened = measure_model(model, None, windows, TINY_FORMATS, "gptq", progress=False,
                             screen=Screen(TINY_BUDGETS, sample_blocks=1))
    return full, screened


def test_screened_tiny_model_allocates_as_the_exhaustive_measurement(tiny_tables):
    full, screened = tiny_tables
    exact = {(r.tensor, r.format): r for r in full.rows}
    assert all(exact[(r.tensor, r.format)] == r for r in screened.rows)  # exact rows only, the same values
    assert len(screened.rows) < len(full.rows)
    for b in TINY_BUDGETS:
        p, q = make_plan(full, b), make_plan(screened, b)
        assert q.assignments == p.assignments, b
        assert q.error == p.error and q.total_bytes <= Budget.parse(b).resolve(full.total_params)


def test_screening_is_recorded_and_the_default_is_unchanged(tiny_tables):
    full, screened = tiny_tables
    assert "screen" not in full.fingerprint
    assert full.fingerprint["options"] == hashlib.sha256(repr((TINY_FORMATS, "gptq", True)).encode()).hexdigest()[:16]
    assert screened.fingerprint["options"] != full.fingerprint["options"]
    rec = screened.fingerprint["screen"]
    want = sorted(Budget.parse(b).resolve(full.total_params) for b in TINY_BUDGETS)
    assert rec.endswith("budgets=" + ",".join(map(str, want))) and "objective=fisher" in rec
    assert {k: v for k, v in screened.fingerprint.items() if k not in ("screen", "options")} == \
        {k: v for k, v in full.fingerprint.items() if k != "options"}
    with pytest.raises(BudgetError, match="screened"):
        make_plan(screened, "4.5bpw")
    assert math.isfinite(make_plan(full, "4.5bpw").error)


def test_a_selection_for_another_model_or_other_formats_is_refused():
    model = tiny_llama()
    exact, _ = _tables(0, noise=0.0)
    sel = Selection({t.name: ("int4-g32",) for t in exact.tensors}, {}, exact, "x", 0)
    with pytest.raises(InputError, match="other tensors"):
        measure_model(model, None, token_ids(1), ["int4-g32"], "gptq", fisher=False, progress=False, screen=sel)
    names = [r.name for r in ModelView(model).quantizable()]
    sel = Selection({n: ("int4-g32", "q8_0") for n in names}, {}, exact, "x", 0)
    with pytest.raises(InputError, match="not candidates"):
        measure_model(model, None, token_ids(1), ["int4-g32"], "gptq", fisher=False, progress=False, screen=sel)


def test_rtn_measurement_is_not_screened():
    m = measure_model(tiny_llama(), None, token_ids(2), ["int4-g32", "int8-g32"], "rtn", fisher=False,
                      progress=False, screen=Screen(("5bpw",)))
    assert "screen" not in m.fingerprint and len(m.rows) == 2 * len(m.tensors)
