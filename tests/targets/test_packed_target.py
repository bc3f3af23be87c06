"""The packed directory as a job target: the budget resolved once, the size asserted by the writer, its own
finished output recognised from the digests saved before the write."""
from __future__ import annotations

import pytest

from bitalloc.budget import Budget
from bitalloc.errors import BudgetError
from bitalloc.measure import Measurement
from bitalloc.models.view import ModelView
from bitalloc.pipeline import plan_for_assignments, tensor_infos
from bitalloc.quantize import quantize_model, uniform_assignments
from bitalloc.targets.base import Capacity
from bitalloc.targets.packed import PackedTarget

from conftest import token_ids


def _quantized(model):
    view = ModelView(model)
    plan = plan_for_assignments(view, uniform_assignments(model, "int4-g32", view), "uniform int4-g32")
    return view, plan, quantize_model(model, view, plan, token_ids(2), "rtn", progress=False)


def _table(view) -> Measurement:
    return Measurement(tuple(tensor_infos(view)), (), view.fixed_bytes, view.total_params, {"model": "m"})


def test_capacity_is_the_budget_less_the_fixed_tensors(llama_model, tmp_path):
    view = ModelView(llama_model)
    m = _table(view)
    cap = PackedTarget(tmp_path / "o").capacity(Budget.parse("4bpw"), m, view)
    assert cap.limit == Budget.parse("4bpw").resolve(view.total_params) and cap.unit == "weights"
    assert cap.allocatable == cap.limit - view.fixed_bytes and cap.overhead == view.fixed_bytes
    budget = cap.plan_budget(m.fixed_bytes)  # what the allocator gets: the same bytes, the text the user typed
    assert budget.text == "4bpw" and budget.kind == "bytes" and budget.resolve(1) == cap.limit
    assert Capacity.from_dict(cap.to_dict()) == cap


def test_writer_asserts_the_size_and_recognises_its_output(llama_model, tmp_path):
    view, plan, q = _quantized(llama_model)
    target = PackedTarget(tmp_path / "o")
    prepared = target.prepare(llama_model, view, plan, q, {}, None)
    size = prepared.sizes["weights"]
    assert size == plan.total_bytes
    with pytest.raises(BudgetError, match="over its budget"):
        target.write_verified(prepared, Capacity("x", size - 1, 0, 0, "weights"), overwrite=False)
    assert not target.out.exists()
    assert target.is_ours(prepared.expected) is None  # nothing written yet
    written = target.write_verified(prepared, Capacity("x", size, 0, 0, "weights"), overwrite=False)
    assert written.info["bytes"] == size and written.n_tensors == len(q)
    again = target.is_ours(prepared.expected)
    assert again is not None and again.info == written.info
    other = dict(prepared.expected)
    other[sorted(other)[0]] = "0" * 64
    assert target.is_ours(other) is None
