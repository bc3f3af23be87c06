"""Packed directory round trip of the float formats and NF4 (bitalloc.export.packed, bitalloc.load)."""
from __future__ import annotations

import pytest
import torch

from bitalloc.api import load
from bitalloc.export.packed import read_packed, save_packed
from bitalloc.formats import get_format
from bitalloc.models.view import ModelView
from bitalloc.pipeline import plan_for_assignments
from bitalloc.quantize import quantize_model, uniform_assignments

from conftest import token_ids


@pytest.mark.parametrize("fid", ["nf4", "mxfp4", "nvfp4", "fp8", "fp4-g32", "fp6-e2m3-g32"])
def test_packed_save_load_round_trip(llama_model, tmp_path, fid):
    view = ModelView(llama_model)
    plan = plan_for_assignments(view, uniform_assignments(llama_model, fid, view), f"uniform {fid}")
    q = quantize_model(llama_model, view, plan, token_ids(2), "rtn", progress=False)
    save_packed(tmp_path / "o", llama_model, view, q, plan, None)
    _, back = read_packed(tmp_path / "o")
    for name, qt in q.items():
        if not get_format(qt.format).is_grid:
            continue
        b = back[name]
        assert b.format == fid and set(b.parts) == set(qt.parts)
        for k, t in qt.parts.items():
            assert b.parts[k].dtype == t.dtype and torch.equal(b.parts[k].view(torch.uint8), t.view(torch.uint8))
        assert torch.equal(get_format(fid).decode(b), get_format(fid).decode(qt))
    m2 = load(tmp_path / "o")
    with torch.no_grad():
        assert bool(torch.isfinite(m2(token_ids(1, seed=3)).logits).all())
