"""Tiny random Mixture-of-Experts causal LMs (hidden 64, 2 layers, 4 experts, top-2, vocab 256), no downloads."""
from __future__ import annotations

from typing import Any

import torch

MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")


def moe_config(arch: str, **over: Any) -> Any:
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=128, num_experts_per_tok=2, initializer_range=0.05,
                  tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    common.update(over)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                              num_experts=4, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                              norm_topk_prob=True, **common)  # as Qwen3-MoE checkpoints and llama.cpp have it
    if arch == "olmoe":  # multi-head K/V, as OLMoE checkpoints and llama.cpp's olmoe have it
        return OlmoeConfig(intermediate_size=32, num_experts=4, **{**common, "num_key_value_heads": 4})
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=32, num_local_experts=4, **common)
    raise ValueError(arch)


def tiny_moe(arch: str, seed: int = 0, unfuse: bool = True, **over: Any) -> torch.nn.Module:
    """A tiny random MoE LM in fp32, eval mode, its experts unfused (per-expert linears) unless ``unfuse=False``;
    router weights scaled up so routing is decisive, norms randomised so quantization matters."""
    from transformers import AutoModelForCausalLM

    from bitalloc.models.experts import unfuse_experts

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(arch, **over)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    if unfuse:
        unfuse_experts(model)
    return model


def block_expert(model: torch.nn.Module, banned: int, layer: int = 0) -> None:
    """Make the router of ``layer`` never choose expert ``banned`` (a forward hook re-ranks without it)."""
    router = model.model.layers[layer].mlp.gate

    def hook(mod, args, out):
        logits = out[0].clone()
        logits[:, banned] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, mod.top_k, dim=-1)
        if getattr(mod, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        return out[0], top.to(out[1].dtype), idx

    router.register_forward_hook(hook)
