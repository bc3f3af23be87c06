"""The packed safetensors directory: names, verification, refusal to overwrite, reload."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bitalloc.api import load
from bitalloc.errors import InputError
from bitalloc.export.packed import part_key, read_packed, save_packed
from bitalloc.models.view import ModelView
from bitalloc.pipeline import plan_for_assignments
from bitalloc.quantize import quantize_model, uniform_assignments

from conftest import token_ids


def _packed(model, tmp_path, fmt="int4-g32"):
    view = ModelView(model)
    assign = uniform_assignments(model, fmt, view)
    plan = plan_for_assignments(view, assign, f"uniform {fmt}")
    q = quantize_model(model, view, plan, token_ids(2), "rtn", progress=False)
    return view, q, plan


def test_part_names():
    assert part_key("a.b.weight", "weight_scale") == "a.b.weight_scale"
    assert part_key("a.b.weight", "weight") == "a.b.weight"
    assert part_key("a.q_proj.bias", "weight") == "a.q_proj.bias"


def test_self_describing_files_and_reload(qwen2_model, tmp_path):
    view, q, plan = _packed(qwen2_model, tmp_path)
    info = save_packed(tmp_path / "o", qwen2_model, view, q, plan, None)
    names = set(load_file(str(tmp_path / "o" / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    assert "model.layers.0.self_attn.q_proj.weight_scale" in names
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert load_file(str(tmp_path / "o" / "model.safetensors"))["model.norm.weight"].dtype == torch.float16
    meta = json.loads((tmp_path / "o" / "bitalloc.json").read_text())
    assert meta == info and meta["plan"]["kind"] == "bitalloc.plan"
    assert meta["tensors"]["lm_head.weight"]["format"] == "int4-g32"
    assert (tmp_path / "o" / "config.json").is_file()
    m2 = load(tmp_path / "o")
    w = token_ids(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(m2(w).logits, qwen2_model(w).logits, rtol=0, atol=0)


def test_existing_directory_is_refused_unless_overwrite(llama_model, tmp_path):
    view, q, plan = _packed(llama_model, tmp_path)
    (tmp_path / "o").mkdir()
    with pytest.raises(InputError, match="already exists"):
        save_packed(tmp_path / "o", llama_model, view, q, plan, None)
    save_packed(tmp_path / "o", llama_model, view, q, plan, None, overwrite=True)
    assert read_packed(tmp_path / "o")[0]["tied"] is True


def test_incomplete_tensors_and_broken_dirs_are_refused(llama_model, tmp_path):
    view, q, plan = _packed(llama_model, tmp_path)
    q.pop("model.norm.weight")
    with pytest.raises(InputError, match="missing"):
        save_packed(tmp_path / "o", llama_model, view, q, plan, None)
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="not a bitalloc packed directory"):
        read_packed(tmp_path)
