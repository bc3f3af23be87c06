"""sweep: every budget and method from measurement tables, per-method tables, uniform baselines."""
from __future__ import annotations

import math

import pytest
import torch

from bitalloc.models.view import ModelView
from bitalloc.pipeline import make_plan, measure_model
from bitalloc.sweep import sweep

from conftest import tiny_llama, token_ids

FORMATS = ["int2-g32", "int4-g32", "int8-g32"]


def test_each_method_is_allocated_from_its_own_table():
    model, ref = tiny_llama(), tiny_llama()
    view = ModelView(model)
    calib, evals = token_ids(2), token_ids(2, seed=5)
    tables = {m: measure_model(model, view, calib, FORMATS, m, fisher=False, progress=False) for m in ("rtn", "gptq")}
    assert tables["rtn"].rows != tables["gptq"].rows  # GPTQ errors differ from RTN ones
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    points = sweep(model, view, tables, ["4bpw"], ["rtn", "gptq"], calib, evals, ref, progress=False,
                   uniform=["int4-g32"])
    for method in ("rtn", "gptq"):
        alloc = next(p for p in points if p.kind == "allocated" and p.method == method)
        want = make_plan(tables[method], "4bpw")
        assert alloc.predicted_error == pytest.approx(want.error, rel=1e-12)
        assert alloc.bytes == want.total_bytes and math.isfinite(alloc.kld)
    for n, p in model.named_parameters():  # the model is left with its original weights
        assert torch.equal(p, before[n])
    with pytest.raises(ValueError, match="no measurement given"):
        sweep(model, view, {"rtn": tables["rtn"]}, ["4bpw"], ["gptq"], calib, evals, ref, progress=False)
