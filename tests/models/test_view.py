from __future__ import annotations

import pytest
import torch

from bitalloc.errors import InputError, NumericsError
from bitalloc.models.view import FIXED_BYTES_PER_PARAM, ModelView


def test_tied_llama_refs(llama_model):
    v = ModelView(llama_model)
    refs = v.quantizable()
    assert v.tied
    assert refs[0].name == "model.embed_tokens.weight"
    assert refs[0].roles == ("lookup", "linear") and refs[0].kind == "embedding"
    assert refs[0].shape == (256, 64)
    assert not any(r.name.startswith("lm_head") for r in refs)
    linears = [r for r in refs if r.kind == "linear"]
    assert len(linears) == 2 * 7
    assert linears[0].name == "model.layers.0.self_attn.q_proj.weight" and linears[0].block == 0
    assert v.ref("model.layers.1.mlp.down_proj.weight").shape == (64, 128)
    # every parameter is either quantizable or fixed, tied once
    n_quant = sum(r.numel for r in refs)
    n_fixed = sum(f.nbytes for f in v.fixed()) // FIXED_BYTES_PER_PARAM
    assert n_quant + n_fixed == v.total_params == sum(p.numel() for p in llama_model.parameters())
    assert {f.name for f in v.fixed()} == {
        "model.norm.weight", *(f"model.layers.{i}.{n}.weight" for i in range(2)
                               for n in ("input_layernorm", "post_attention_layernorm"))}
    assert v.fixed_bytes == (64 * 5) * 2


def test_untied_qwen2_refs_and_biases(qwen2_model):
    v = ModelView(qwen2_model)
    refs = v.quantizable()
    assert not v.tied
    assert refs[0].roles == ("lookup",)
    assert refs[-1].name == "lm_head.weight" and refs[-1].kind == "lm_head" and refs[-1].roles == ("linear",)
    fixed = {f.name for f in v.fixed()}
    assert "model.layers.0.self_attn.q_proj.bias" in fixed
    assert v.total_params == sum(r.numel for r in refs) + sum(f.nbytes for f in v.fixed()) // 2


def test_blocks_groups_and_tie_groups(tiny_model):
    v = ModelView(tiny_model)
    blocks = v.blocks()
    assert [b.index for b in blocks] == [0, 1]
    g = blocks[1].groups
    assert [len(x) for x in g] == [3, 1, 2, 1]
    assert g[0][2] == "model.layers.1.self_attn.v_proj.weight" and g[3] == ("model.layers.1.mlp.down_proj.weight",)
    assert blocks[1].linears[g[3][0]] is tiny_model.model.layers[1].mlp.down_proj
    tg = v.tie_groups()
    assert len(tg) == 4 and tg[1] == ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    assert v.module("model.layers.0.mlp.up_proj.weight") is tiny_model.model.layers[0].mlp.up_proj


def test_set_weight_keeps_ties(llama_model, windows):
    v = ModelView(llama_model)
    new = torch.zeros(256, 64)
    v.set_weight("model.embed_tokens.weight", new)
    assert torch.equal(llama_model.lm_head.weight, new)
    assert torch.equal(v.get_weight("model.embed_tokens.weight"), new)
    with torch.no_grad():
        logits = llama_model(input_ids=windows).logits
    assert torch.equal(logits, torch.zeros_like(logits))  # lm_head really is the zeroed tensor


def test_set_weight_errors(llama_model):
    v = ModelView(llama_model)
    with pytest.raises(InputError, match="shape"):
        v.set_weight("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))
    with pytest.raises(InputError, match="no quantizable"):
        v.set_weight("model.norm.weight", torch.zeros(64))
    with pytest.raises(NumericsError, match="up_proj"):
        v.set_weight("model.layers.0.mlp.up_proj.weight", torch.full((128, 64), float("nan")))
    with pytest.raises(InputError):
        v.get_weight("lm_head.weight")  # tied: the tensor is named by the embedding


def test_unknown_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(InputError, match="unsupported architecture 'gpt2'.*llama"):
        ModelView(m)
