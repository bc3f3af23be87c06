"""Shared fixtures: tiny random causal LMs (hidden 64, 2 layers, vocab 256) and raw token-id windows.

No tokenizer is needed: tests feed ``LongTensor`` token ids directly.  Each fixture builds a fresh model, so
tests may modify it in place.
"""
from __future__ import annotations

import pytest
import torch

TINY_VOCAB = 256
TINY_CTX = 32


def _randomize_norms_(model: torch.nn.Module, seed: int) -> None:
    """Random (non-unit) norm weights and larger weights, so rescaling and quantization matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # biases
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def tiny_llama(tie: bool = True, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama (hidden 64, 4 heads / 2 KV heads, intermediate 128, vocab 256), fp32, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=tie, initializer_range=0.05)
    model = LlamaForCausalLM(cfg).float().eval()
    _randomize_norms_(model, seed)
    return model


def tiny_qwen2(tie: bool = False, seed: int = 1) -> torch.nn.Module:
    """A 2-layer Qwen2 (q/k/v biases; hidden 64, 4 heads / 2 KV heads, intermediate 128, vocab 256)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=tie, initializer_range=0.05)
    model = Qwen2ForCausalLM(cfg).float().eval()
    _randomize_norms_(model, seed)
    return model


def token_ids(n: int = 4, ctx: int = TINY_CTX, seed: int = 0, vocab: int = TINY_VOCAB) -> torch.Tensor:
    """Random token-id windows, (n, ctx) int64."""
    return torch.randint(0, vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama_model() -> torch.nn.Module:
    """Tiny Llama with tied embedding/lm_head."""
    return tiny_llama()


@pytest.fixture
def qwen2_model() -> torch.nn.Module:
    """Tiny Qwen2 with a separate lm_head and q/k/v biases."""
    return tiny_qwen2()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request) -> torch.nn.Module:
    """Each tiny architecture in turn."""
    return tiny_llama() if request.param == "llama" else tiny_qwen2()


@pytest.fixture
def windows() -> torch.Tensor:
    """Four random windows of 32 token ids (vocab 256)."""
    return token_ids()


def _tiny_config(model_type: str, tie: bool):
    """The config of a 2-layer model of ``model_type`` (hidden 64, 4 heads / 2 KV heads of 16, vocab 256)."""
    from transformers import AutoConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=128,
              tie_word_embeddings=tie, initializer_range=0.05, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    if model_type in ("qwen3", "gemma2", "gemma3_text"):
        kw["head_dim"] = 16
    if model_type in ("gemma2", "gemma3_text"):  # windows longer than any test context; llama.cpp's 1/sqrt(head_dim)
        kw.update(query_pre_attn_scalar=16, sliding_window=64)
    if model_type == "mistral":
        kw["sliding_window"] = None
    return AutoConfig.for_model(model_type, **kw)


#: every architecture of the map that has a GGUF side, with the tie each is tested with (Gemma is always tied)
ARCH_TIES = {"llama": True, "mistral": False, "qwen2": False, "qwen3": True, "gemma2": True, "gemma3_text": True,
             "phi3": False}


def tiny_arch(model_type: str, tie: bool | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of any architecture in the map (fp32, eval), norms and biases randomized."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _tiny_config(model_type, ARCH_TIES.get(model_type, False) if tie is None else tie)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    _randomize_norms_(model, seed)
    return model


def measure_quantize_load(model: torch.nn.Module, out, formats=("int2-g32", "int4-g32", "int8-g32"),
                          budget: str = "4.5bpw"):
    """measure (RTN) -> allocate -> quantize (GPTQ) -> packed directory -> ``bitalloc.load``, asserting what every
    architecture must satisfy (every quantizable tensor measured with finite errors, bytes exact, the loaded
    model equal to the quantized one); returns ``(measurement, loaded model)``."""
    import math

    from bitalloc import load
    from bitalloc.budget import Budget
    from bitalloc.export.packed import save_packed
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import make_plan, measure_model
    from bitalloc.quantize import quantize_model

    view = ModelView(model)
    m = measure_model(model, view, token_ids(4), list(formats), "rtn", progress=False)
    assert {t.name for t in m.tensors} == {r.name for r in view.quantizable()}
    assert all(r.fisher_error is not None and math.isfinite(r.output_error) and math.isfinite(r.fisher_error)
               for r in m.rows)
    plan = make_plan(m, budget)
    assert plan.total_bytes <= Budget.parse(budget).resolve(m.total_params)
    q = quantize_model(model, view, plan, token_ids(4), "gptq", progress=False)
    info = save_packed(out, model, view, q, plan, None)
    assert info["bytes"] == plan.total_bytes
    loaded = load(out)
    ids = token_ids(2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    return m, loaded
