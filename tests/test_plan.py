"""Plan JSON: round trip, one line per tensor, and re-validation of hand-edited plans."""
from __future__ import annotations

import json

import pytest

from bitalloc.allocate import allocate
from bitalloc.errors import BudgetError, InputError
from bitalloc.measure import MeasureRow, Measurement, TensorInfo
from bitalloc.plan import Plan


def _table() -> Measurement:
    tensors = (TensorInfo("a", (8, 16), 128), TensorInfo("b", (8, 16), 128, group="qkv"),
               TensorInfo("c", (8, 16), 128, group="qkv"))
    rows = []
    for n, s in (("a", 1.0), ("b", 2.0), ("c", 0.5)):
        rows += [MeasureRow(n, "int4-g32", 80, 4.0 * s, 0.4 * s), MeasureRow(n, "int8-row", 136, 0.1 * s, 0.01 * s),
                 MeasureRow(n, "fp16", 256, 1e-4 * s, 1e-5 * s)]
    return Measurement(tensors, tuple(rows), fixed_bytes=32, total_params=400, fingerprint={"model": "m1"})


def test_round_trip_and_readable(tmp_path):
    m = _table()
    plan = allocate(m, "9bpw")
    path = tmp_path / "plan.json"
    plan.save(path)
    text = path.read_text()
    lines = text.splitlines()
    for n in ("a", "b", "c"):  # one line per tensor, in measurement order
        assert sum(1 for ln in lines if ln.strip().startswith(f'"{n}": {{"format"')) == 1
    assert [ln.strip()[1] for ln in lines if '"format"' in ln] == ["a", "b", "c"]
    back = Plan.load(path, m)
    assert back.entries == plan.entries and back.solver == plan.solver and back.status == plan.status
    assert back.total_bytes == plan.total_bytes == json.loads(text)["total_bytes"]
    assert back.budget == "9bpw" and back.budget_bytes == 450 and back.gap_abs == plan.gap_abs
    assert back.to_json() == text
    assert plan.assignments["b"] == plan.assignments["c"]  # the table's tie group


def _edit(plan: Plan, tmp_path, fn) -> str:
    d = json.loads(plan.to_json())
    fn(d)
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(d, indent=1))
    return str(p)


def test_edited_plan_is_revalidated(tmp_path):
    m = _table()
    plan = allocate(m, 10_000)  # everything fp16
    def to_int4(d):
        d["tensors"]["a"] = "INT4-G32"  # bare string, any case; bytes recomputed
        d["tensors"]["b"]["bytes"] = 1  # a lie that must be ignored
    edited = Plan.load(_edit(plan, tmp_path, to_int4), m)
    assert edited["a"] == "int4-g32" and edited.solver == "edited" and edited.gap_abs is None
    assert edited.total_bytes == 80 + 256 + 256 + 32
    assert edited.error == pytest.approx(0.4 + 2e-5 + 0.5e-5)

    bad = {
        "names tensors not in": lambda d: d["tensors"].__setitem__("zz", "fp16"),
        "no format for": lambda d: d["tensors"].pop("a"),
        "tensors.'a'.: unknown format": lambda d: d["tensors"].__setitem__("a", "blah9"),
        "not measured for it": lambda d: d["tensors"].__setitem__("a", "q8_0"),
        "must share a format": lambda d: d["tensors"].__setitem__("b", "int4-g32"),
        "not a bitalloc plan": lambda d: d.__setitem__("kind", "x"),
        "format_version": lambda d: d.__setitem__("format_version", 99),
    }
    for msg, fn in bad.items():
        with pytest.raises(InputError, match=msg):
            Plan.load(_edit(plan, tmp_path, fn), m)
    with pytest.raises(BudgetError, match="over its budget"):
        Plan.load(_edit(plan, tmp_path, lambda d: d.__setitem__("budget_bytes", 500)), m)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        Plan.load(tmp_path / "junk.json", m)
    with pytest.raises(InputError, match="cannot read"):
        Plan.load(tmp_path / "missing.json", m)


def test_plan_properties():
    m = _table()
    plan = allocate(m, 10_000, objective="output")
    assert plan.bpw == pytest.approx(8 * plan.total_bytes / 400)
    assert plan.allocated_bytes == 3 * 256 and "gap" in plan.summary()
