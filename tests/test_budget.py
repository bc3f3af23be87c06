"""Budget parsing and resolution; constraint validation."""
from __future__ import annotations

import pytest

from bitalloc.budget import BpwBound, Budget, Constraints
from bitalloc.errors import BudgetError, InputError
from bitalloc.measure import MeasureRow, Measurement, TensorInfo


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("3.5bpw", "bpw", 3.5),
        ("3.5 BPW", "bpw", 3.5),
        ("120MB", "bytes", 120_000_000),
        ("120MiB", "bytes", 120 * 2**20),
        ("1.2GiB", "bytes", int(1.2 * 2**30)),
        ("1.5GB", "bytes", 1_500_000_000),
        ("88201792B", "bytes", 88201792),
        ("88201792", "bytes", 88201792),
        (" 64 kib ", "bytes", 65536),
        ("2KB", "bytes", 2000),
        ("1e6", "bytes", 1_000_000),
    ],
)
def test_parse(text, kind, value):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, value)
    assert str(b) == text.strip()


@pytest.mark.parametrize("text", ["", "bpw", "3.5 bits", "-3bpw", "0", "0bpw", "0.4B", "12 MBs", "1,000", "nan", "inf"])
def test_parse_rejects(text):
    with pytest.raises(BudgetError):
        Budget.parse(text)


def test_parse_int_and_reject_nonpositive():
    assert Budget.parse(1000).resolve(1) == 1000
    with pytest.raises(BudgetError):
        Budget.parse(0)
    with pytest.raises(BudgetError):
        Budget.parse(3.5)  # type: ignore[arg-type]


def test_resolve_bpw_floors():
    assert Budget.parse("3.5bpw").resolve(1001) == 437  # floor(3.5*1001/8) = floor(437.9375)
    assert Budget.parse("8bpw").resolve(134515008) == 134515008
    assert Budget.parse("120MiB").resolve(5) == 120 * 2**20


def _table() -> Measurement:
    tensors = (TensorInfo("l.0.q", (4, 4), 16), TensorInfo("l.0.k", (4, 4), 16))
    rows = (MeasureRow("l.0.q", "a", 8, 1.0), MeasureRow("l.0.k", "a", 8, 1.0), MeasureRow("l.0.k", "b", 16, 0.0))
    return Measurement(tensors, rows, fixed_bytes=0, total_params=32)


def test_constraints_validate_and_permit():
    m = _table()
    c = Constraints(min_bpw=1, max_bpw=6, bpw_bounds=(BpwBound("*.k", None, 8.0),), allowed=(("*.q", ("a*",)),))
    c.validate(m)
    q, k = m.rows_for("l.0.q"), m.rows_for("l.0.k")
    assert c.permits("l.0.q", 16, q[0])  # 4 bpw, allowed 'a*'
    assert c.permits("l.0.k", 16, k[1])  # 8 bpw: override max 8 applies to *.k
    assert not Constraints(max_bpw=6).permits("l.0.k", 16, k[1])
    assert Constraints(max_bpw=1, pinned={"l.0.k": "b"}).permits("l.0.k", 16, k[1])  # a pin overrides bounds
    assert Constraints.from_dict(c.to_dict()) == c
    with pytest.raises(InputError, match="matches no tensor"):
        Constraints(allowed=(("x.*", ("a",)),)).validate(m)
    with pytest.raises(InputError, match="not measured"):
        Constraints(pinned={"l.0.q": "b"}).validate(m)
    with pytest.raises(InputError, match="not in the measurement"):
        Constraints(pinned={"zz": "b"}).validate(m)
    with pytest.raises(InputError, match="larger than"):
        Constraints(min_bpw=5, max_bpw=4)
    with pytest.raises(InputError, match="empty"):
        Constraints(tie_groups=((),))
