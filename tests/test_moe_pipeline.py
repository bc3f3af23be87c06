"""The whole pipeline on tiny random MoE models: measure -> allocate -> quantize -> save -> load, per-expert formats,
and the ``bitalloc quantize`` command on a saved MoE directory."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from bitalloc import load
from bitalloc.evaluate import evaluate
from bitalloc.export.packed import save_packed
from bitalloc.models.view import ModelView
from bitalloc.pipeline import plan_for_assignments
from bitalloc.quantize import quantize_model

from conftest import measure_quantize_load, token_ids
from moe_tiny import MOE_ARCHS, tiny_moe

FORMATS = ["int2-g32", "int4-g32", "int8-g32"]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_measure_allocate_quantize_save_load_evaluate(arch, tmp_path):
    model, ref = tiny_moe(arch), tiny_moe(arch)
    m, loaded = measure_quantize_load(model, tmp_path / "out", FORMATS)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in {t.name for t in m.tensors}
    w = token_ids(2, seed=7)
    r = evaluate(loaded, ref, w)
    assert math.isfinite(r.kld) and r.kld > 0


def test_each_expert_keeps_its_own_format_in_the_packed_output(tmp_path):
    model = tiny_moe("qwen3_moe")
    view = ModelView(model)
    assign = {r.name: "int8-g32" for r in view.quantizable()}
    fmts = ["int2-g32", "int3-g32", "int4-g32", "q4_0"]
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assign[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = fmts[e]
    plan = plan_for_assignments(view, assign, "per expert")
    q = quantize_model(model, view, plan, token_ids(4), "rtn", progress=False)
    save_packed(tmp_path / "out", model, view, q, plan, None)
    meta = json.loads((tmp_path / "out" / "bitalloc.json").read_text())["tensors"]
    assert [meta[f"model.layers.0.mlp.experts.{e}.down_proj.weight"]["format"] for e in range(4)] == fmts
    loaded = load(tmp_path / "out")
    w = token_ids(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(w).logits, model(w).logits, rtol=0, atol=0)


def _moe_hf_dir(path: Path) -> Path:
    """A tiny Qwen2-MoE saved as safetensors with a WordLevel tokenizer; ``calib.txt`` beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(180)]
    text = " ".join(rng.choice(words) for _ in range(3000))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    path.mkdir(parents=True)
    tiny_moe("qwen2_moe", unfuse=False).save_pretrained(str(path))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    (path.parent / "calib.txt").write_text(text)
    return path


def test_quantize_command_on_a_moe_directory(tmp_path):
    from bitalloc.cli import main

    hf = _moe_hf_dir(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["quantize", str(hf), "--budget", "4bpw", "--formats", "int2-g32,int4-g32,int8-g32", "--calib",
            str(tmp_path / "calib.txt"), "--windows", "4", "--ctx", "32", "--fisher-windows", "2", "-q",
            "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "bitalloc.json").read_text())
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in meta["tensors"]
    assert meta["tensors"]["model.layers.0.mlp.gate.weight"]["format"] == "fp16"
    loaded = load(out)
    with torch.no_grad():
        assert torch.isfinite(loaded(token_ids(1, vocab=200)).logits).all()
