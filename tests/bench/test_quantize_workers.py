"""The quantization-workers bench's plan: every tensor in a GGUF type that stores its shape, the types cycling."""
from __future__ import annotations

from bench.quantize_workers import mixed_plan
from bitalloc.formats import get_format
from bitalloc.quantize import quantizable_names, view_of
from tests.conftest import tiny_llama


def test_mixed_plan_stores_every_tensor_and_cycles_the_types() -> None:
    model = tiny_llama()
    plan = mixed_plan(model)
    assert set(plan) == set(quantizable_names(view_of(model)))
    for name, fmt in plan.items():
        assert get_format(fmt).supports(tuple(model.get_parameter(name).shape))
    assert len(set(plan.values())) >= 4
