from __future__ import annotations

import copy

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.models.rescale import load_reference, rescale_llama_


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rescale_preserves_function_and_changes_weights(tiny_model, windows):
    before = _logits(tiny_model, windows)
    ref = copy.deepcopy(tiny_model.state_dict())
    rescale_llama_(tiny_model, seed=0, sigma=0.1)
    after = _logits(tiny_model, windows)
    assert (after - before).abs().max().item() < 1e-4
    sd = tiny_model.state_dict()
    changed = {k for k in ref if not torch.equal(ref[k], sd[k])}
    for suffix in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight", "input_layernorm.weight",
                   "post_attention_layernorm.weight"):
        assert any(k.endswith(suffix) for k in changed), suffix
    assert not any(k.startswith(("model.embed_tokens", "lm_head", "model.norm")) for k in changed)
    # relative change of a linear is of order sigma
    k = "model.layers.0.mlp.down_proj.weight"
    rel = ((sd[k] - ref[k]).norm() / ref[k].norm()).item()
    assert 0.03 < rel < 0.3


def test_rescale_is_deterministic_and_seeded(llama_model):
    a, b, c = llama_model, copy.deepcopy(llama_model), copy.deepcopy(llama_model)
    rescale_llama_(a, seed=3)
    rescale_llama_(b, seed=3)
    rescale_llama_(c, seed=4)
    k = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert not torch.equal(a.state_dict()[k], c.state_dict()[k])


def test_rescale_o_columns_follow_their_kv_head(llama_model):
    """4 query heads share 2 KV heads: o column (h, c) is divided by v row factor (h // 2, c)."""
    old = copy.deepcopy(llama_model)
    rescale_llama_(llama_model, seed=0, sigma=0.3)
    att, att0 = llama_model.model.layers[0].self_attn, old.model.layers[0].self_attn
    # v rows are also divided by the input-norm factor of column 0: compare up to that constant
    s_v = (att.v_proj.weight / att0.v_proj.weight)[:, 0].double()  # (kv * hd,)
    s_v = s_v / s_v[0]
    s_o = (att0.o_proj.weight / att.o_proj.weight)[0].double()  # (heads * hd,)
    s_o = s_o / s_o[0]
    hd = 16
    expected = s_v.reshape(2, hd)[torch.tensor([0, 0, 1, 1])].reshape(-1)
    assert torch.allclose(s_o, expected, rtol=1e-5)
    assert not torch.allclose(s_o, s_v.reshape(2, hd).repeat(2, 1).reshape(-1), rtol=1e-3)
    # each layer draws its own factors
    r0 = llama_model.model.layers[0].input_layernorm.weight / old.model.layers[0].input_layernorm.weight
    r1 = llama_model.model.layers[1].input_layernorm.weight / old.model.layers[1].input_layernorm.weight
    assert not torch.allclose(r0, r1)


def test_rescale_refuses_unknown_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(InputError, match="gpt2"):
        rescale_llama_(m)


def test_rescale_refuses_bad_sigma(llama_model):
    with pytest.raises(InputError):
        rescale_llama_(llama_model, sigma=0.0)


def _q4_1_like_error(w: torch.Tensor) -> float:
    """Max |w - Q(w)| for asymmetric 4-bit blocks of 32 with fp16 scale and min (min-max), fp32 math."""
    b = w.reshape(-1, 32).float()
    lo, hi = b.min(1, keepdim=True).values, b.max(1, keepdim=True).values
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = ((b - m) / safe).round().clamp(0, 15)
    return (q * d + m - b).abs().max().item()


@pytest.mark.slow
def test_reference_model_is_function_preserving_and_off_grid():
    from bitalloc.data import default_eval_files, read_texts, token_windows
    from bitalloc.evaluate import evaluate
    from bitalloc.models.sources import default_model_path, load_model

    original, tok = load_model(default_model_path())
    lin = "model.layers.3.mlp.down_proj"
    assert _q4_1_like_error(original.get_submodule(lin).weight) == 0.0
    model, _ = load_reference(rescaled=True, seed=0)
    assert _q4_1_like_error(model.get_submodule(lin).weight) > 1e-4
    windows = token_windows(tok, read_texts(default_eval_files()), ctx=512, max_windows=1)
    assert (_logits(model, windows) - _logits(original, windows)).abs().max().item() < 1e-3
    res = evaluate(model, original, windows)
    assert res.kld < 1e-9 and res.top1 == 1.0
    assert res.ppl == pytest.approx(res.ref_ppl, rel=1e-5)
    again, _ = load_reference(rescaled=True, seed=0)
    assert torch.equal(again.get_submodule(lin).weight, model.get_submodule(lin).weight)


def _other_arch(kind: str) -> torch.nn.Module:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        m = Qwen3ForCausalLM(Qwen3Config(**common))
    elif kind == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        m = MistralForCausalLM(MistralConfig(**common))
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        m = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=16))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return m.float().eval()


@pytest.mark.parametrize("kind", ["qwen3", "mistral", "gemma3_text"])
def test_rescale_other_architectures(kind, windows):
    from bitalloc.models.view import ModelView

    model = _other_arch(kind)
    assert model.config.model_type == kind
    before = _logits(model, windows)
    w0 = model.model.layers[0].mlp.gate_proj.weight.clone()
    rescale_llama_(model, seed=1)
    assert (_logits(model, windows) - before).abs().max().item() < 1e-4
    assert not torch.equal(w0, model.model.layers[0].mlp.gate_proj.weight)
    assert len(ModelView(model).quantizable()) == 1 + 2 * 7 + (0 if model.config.tie_word_embeddings else 1)
