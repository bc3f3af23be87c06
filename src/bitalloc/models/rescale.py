"""The function-preserving rescaled reference model (issue 4, "The benchmark reference model").

The packaged SmolLM2 was dequantized from Q4_1/Q8_0, so its linears sit exactly on a Q4_1 grid and
re-quantizing onto that grid is artificially exact.  Per decoder block we draw per-channel factors
``s = exp(sigma · N(0, 1))`` from a generator seeded by ``(seed, layer)`` and fold them through pairs whose
product is unchanged:

(i)   input norm weight ·= s_a,            q/k/v input columns /= s_a
(ii)  MLP-input norm weight ·= s_m,        gate/up input columns /= s_m
(iii) v_proj output rows (and bias) ·= s_v, o_proj input columns /= s_v of the KV head serving each query head
(iv)  up_proj output rows (and bias) ·= s_u, down_proj input columns /= s_u

The embedding, final norm and lm_head are untouched (a tied embedding keeps its Q8_0 grid).  Products are
formed in float64 and cast back once, so fp32 logits agree to ~1e-5.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from bitalloc.errors import InputError
from bitalloc.models.archs import ArchSpec, arch_for

log = logging.getLogger(__name__)

_LAYER_STRIDE = 1_000_003  # seed for (seed, layer) = seed * stride + layer


def channel_factors(n: int, generator: torch.Generator, sigma: float) -> torch.Tensor:
    """``exp(sigma · N(0, 1))``, (n,) float64."""
    return torch.exp(sigma * torch.randn(n, generator=generator, dtype=torch.float64))


def _scale_(param: torch.Tensor, factor: torch.Tensor, dim: int, *, divide: bool = False) -> None:
    """``param ·= factor`` (or ``/=``) broadcast along ``dim``, computed in float64, stored in place."""
    shape = [1] * param.dim()
    shape[dim] = -1
    f = factor.reshape(shape)
    w = param.detach().to(torch.float64)
    w = w / f if divide else w * f
    param.data.copy_(w.to(param.dtype))


def _scale_norm_(norm: torch.nn.Module, s: torch.Tensor, offset: float) -> None:
    w = norm.weight.detach().to(torch.float64)
    norm.weight.data.copy_(((w + offset) * s - offset).to(norm.weight.dtype))


def _head_layout(config: Any, v_out: int, o_in: int) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` checked against the v_proj/o_proj shapes."""
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // n_heads if n_heads else None)
    if not n_heads or not head_dim or n_heads % n_kv or n_kv * head_dim != v_out or n_heads * head_dim != o_in:
        raise InputError(
            f"cannot rescale: attention layout heads={n_heads}, kv_heads={n_kv}, head_dim={head_dim} does not "
            f"match v_proj rows {v_out} / o_proj columns {o_in}"
        )
    return n_heads, n_kv, head_dim


def _get(module: torch.nn.Module, path: str, what: str) -> torch.nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError as e:
        raise InputError(f"cannot rescale: {what} has no module {path!r} (architecture mismatch)") from e


def _rescale_block_(block: torch.nn.Module, spec: ArchSpec, config: Any, gen: torch.Generator,
                    sigma: float, where: str) -> None:
    # (i), (ii): each norm feeds a group of linears that read its output directly.
    for norm_name, group in zip(spec.group_norms, spec.groups):
        if norm_name is None:
            continue
        norm = _get(block, norm_name, where)
        if getattr(norm, "weight", None) is None or norm.weight.dim() != 1:
            raise InputError(f"cannot rescale: {where}.{norm_name} has no per-channel weight")
        if getattr(norm, "bias", None) is not None:
            raise InputError(f"cannot rescale: {where}.{norm_name} has a bias (LayerNorm, not RMSNorm)")
        s = channel_factors(norm.weight.numel(), gen, sigma)
        _scale_norm_(norm, s, spec.norm_offset)
        for lin_name in group:
            _scale_(_get(block, lin_name, where).weight, s, 1, divide=True)
    # (iii) v rows / o columns, with grouped-query attention.
    v, o = _get(block, spec.v_proj, where), _get(block, spec.o_proj, where)
    n_heads, n_kv, head_dim = _head_layout(config, v.weight.shape[0], o.weight.shape[1])
    s_v = channel_factors(v.weight.shape[0], gen, sigma)
    kv_of_head = torch.arange(n_heads) // (n_heads // n_kv)
    s_o = s_v.reshape(n_kv, head_dim)[kv_of_head].reshape(-1)
    _scale_(v.weight, s_v, 0)
    if getattr(v, "bias", None) is not None:
        _scale_(v.bias, s_v, 0)
    _scale_(o.weight, s_o, 1, divide=True)
    # (iv) up rows / down columns.
    up, down = _get(block, spec.up_proj, where), _get(block, spec.down_proj, where)
    if up.weight.shape[0] != down.weight.shape[1]:
        raise InputError(f"cannot rescale: {where} up_proj rows != down_proj columns")
    s_u = channel_factors(up.weight.shape[0], gen, sigma)
    _scale_(up.weight, s_u, 0)
    if getattr(up, "bias", None) is not None:
        _scale_(up.bias, s_u, 0)
    _scale_(down.weight, s_u, 1, divide=True)


@torch.no_grad()
def rescale_llama_(model: torch.nn.Module, seed: int = 0, sigma: float = 0.1) -> None:
    """Rescale ``model`` in place so it computes the same function with every linear moved off its grid.

    Deterministic in ``(seed, sigma)``; works for every architecture in the table whose MLP input is a
    gate·up product (Llama, Mistral, Qwen2/3, Gemma3).  Refuses (InputError) models without that structure.
    """
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    spec = arch_for(model.config)
    if spec.experts is not None:  # the MLP norm also feeds the router: no function-preserving fold
        raise InputError(f"cannot rescale {spec.name}: Mixture-of-Experts models are not supported")
    if None in (spec.v_proj, spec.o_proj, spec.up_proj, spec.down_proj):
        raise InputError(f"cannot rescale {spec.name}: its v/o or up/down pairs live inside fused linears")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    blocks = _get(model, spec.blocks, "the model")
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise InputError(f"cannot rescale: {spec.blocks} is not a non-empty list of blocks")
    for i, block in enumerate(blocks):
        gen = torch.Generator().manual_seed(seed * _LAYER_STRIDE + i)
        _rescale_block_(block, spec, config, gen, sigma, f"{spec.blocks}.{i}")
    log.info("rescaled %d blocks (seed=%d, sigma=%g)", len(blocks), seed, sigma)


def load_reference(rescaled: bool = True, seed: int = 0) -> tuple[Any, Any]:
    """The packaged SmolLM2-135M-Instruct as ``(model, tokenizer)``: fp32, eval mode, rescaled if asked."""
    from bitalloc.models.sources import default_model_path, load_model

    model, tokenizer = load_model(default_model_path(), dtype=torch.float32)
    if rescaled:
        rescale_llama_(model, seed=seed)
    model.eval()
    return model, tokenizer
