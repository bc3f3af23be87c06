"""The hyper-parameters of the architecture map's llama.cpp side: HF config <-> GGUF ``{arch}.*`` metadata.

:func:`gguf_hparams` writes the keys of a row's :class:`~bitalloc.models.archs.GGUFSpec` from an HF config (as
llama.cpp's converter does); :func:`config_from_gguf` rebuilds the transformers config from them, the tensor shapes
(vocabulary, tie, biases) and what llama.cpp's implementation assumes.  RoPE scaling: linear ``rope.scaling.*`` keys
both ways, and Llama 3's per-dimension ``rope_freqs`` factors applied to a built model (:func:`apply_rope_factors`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bitalloc.errors import InputError
from bitalloc.models.archs import ARCHS, arch_for, gguf_model_type
from bitalloc.models.config_checks import check_gguf_value, check_values
from bitalloc.models.gguf_map import gguf_spec


def _rope_theta(config: Any) -> float | None:
    rp = getattr(config, "rope_parameters", None) or {}
    rp = rp.get("full_attention", rp)
    theta = rp.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def _head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else int(config.hidden_size) // int(config.num_attention_heads)


def _config_value(config: Any, attr: str) -> Any:
    """An HF config attribute, or one the map derives: ``head_dim`` (hidden / heads where the config has none),
    ``rope_dim`` (rotary dimensions: head_dim × partial_rotary_factor), ``rope_theta`` (from rope_parameters)."""
    if attr == "rope_theta":
        return _rope_theta(config)
    if attr == "head_dim":
        return _head_dim(config)
    if attr == "rope_dim":
        rp = getattr(config, "rope_parameters", None) or {}
        factor = rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        return int(_head_dim(config) * float(factor))
    return getattr(config, attr, None)


def _rope_scaling_keys(config: Any, arch: str) -> dict[str, Any]:
    """``rope.scaling.*`` of a config with linear RoPE scaling (what the converter writes for it)."""
    rp = getattr(config, "rope_parameters", None) or {}
    rp = rp.get("full_attention", rp)
    kind = rp.get("rope_type", "default")
    if kind in (None, "default"):
        return {}
    if kind != "linear":
        raise InputError(f"RoPE scaling {kind!r} has no GGUF form here (linear only; llama3's factors are a tensor)")
    return {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": float(rp["factor"])}


def gguf_hparams(config: Any) -> dict[str, Any]:
    """The ``{arch}.*`` hyper-parameter keys of an HF config, as llama.cpp's converter writes them."""
    spec = arch_for(config)
    g = gguf_spec(spec)
    for attr, value in g.assumes:
        if getattr(config, attr, value) != value:
            raise InputError(f"llama.cpp's {g.arch} assumes {attr}={value!r}; this {spec.name} config has "
                             f"{getattr(config, attr)!r}, which no {g.arch} GGUF can express")
    out: dict[str, Any] = _rope_scaling_keys(config, g.arch)
    for key, attr in g.hparams:
        full = f"{g.arch}.{key}"
        if full in out:
            continue
        value = _config_value(config, attr)
        if value is None:
            if key in g.optional:
                continue
            raise InputError(f"the {spec.name} config has no {attr!r}, needed for the GGUF key {full!r}")
        out[full] = value
    return out


def _set_rope_scaling(config: Any, metadata: Mapping[str, Any], arch: str) -> None:
    """Linear RoPE scaling from ``{arch}.rope.scaling.*`` (Gemma 3's global layers, say); other kinds refused."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return
    if kind != "linear":
        raise InputError(f"the GGUF's RoPE scaling {kind!r} is not supported (linear and rope_freqs factors are)")
    key = f"{arch}.rope.scaling.factor"
    if key not in metadata:
        raise InputError(f"the GGUF's linear RoPE scaling has no {key!r}")
    factor = check_gguf_value(key, metadata[key], "factor")
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or not factor > 0:
        raise InputError(f"cannot apply the GGUF's linear RoPE scaling (factor {factor!r}) to a {arch} config")
    target = rp["full_attention"] if "full_attention" in rp else rp
    target.update(rope_type="linear", factor=float(factor))


def apply_rope_factors(model: torch.nn.Module, factors: torch.Tensor) -> int:
    """Divide every rotary frequency table of ``model`` by llama.cpp's per-dimension ``rope_freqs`` factors (how
    a converted Llama 3 keeps its RoPE scaling; llama.cpp computes θ_i / factor_i); returns the tables changed."""
    n = 0
    for mod in model.modules():
        inv = getattr(mod, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.shape == factors.shape:
            mod.inv_freq = inv / factors.to(inv.dtype)
            if isinstance(getattr(mod, "original_inv_freq", None), torch.Tensor):
                mod.original_inv_freq = mod.inv_freq.clone()
            n += 1
    if not n:
        raise InputError(f"the GGUF's rope_freqs ({tuple(factors.shape)}) fit no rotary table of the model")
    return n


def config_from_gguf(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """The transformers config of a GGUF: the map's keys, the vocabulary from ``token_embd``, ties and biases
    from which tensors exist.  ``shapes`` are numpy-order tensor shapes by GGUF name."""
    from transformers import AutoConfig

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise InputError("the GGUF has no general.architecture")
    model_type = gguf_model_type(arch)
    g = gguf_spec(ARCHS[model_type])
    kw: dict[str, Any] = {}
    rope_dim = None
    for key, attr in g.hparams:
        full = f"{arch}.{key}"
        if full not in metadata:
            if key in g.optional:
                continue
            raise InputError(f"the GGUF lacks the metadata key {full!r} that a {arch} model needs")
        value = check_gguf_value(full, metadata[full], attr)
        if attr == "rope_dim":  # rotary dimensions: a partial_rotary_factor below 1 (Phi-4-mini), once built
            rope_dim = value
        else:
            kw.setdefault(attr, value)
    kw.update(dict(g.assumes))
    theta = kw.pop("rope_theta", None)
    if "token_embd.weight" not in shapes or len(shapes["token_embd.weight"]) != 2:
        raise InputError("the GGUF has no 2-D token_embd.weight")
    kw["vocab_size"] = int(shapes["token_embd.weight"][0])
    kw["tie_word_embeddings"] = "output.weight" not in shapes
    if "blk.0.attn_q.bias" in shapes and model_type not in ("qwen2",):
        kw["attention_bias"] = True
    for attr, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):  # ids the model config checks against the vocabulary
        v = metadata.get(f"tokenizer.ggml.{key}")
        kw[attr] = int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < kw["vocab_size"] else None
    check_values(kw, "GGUF metadata")  # heads divide hidden_size, K/V heads divide heads, top-k <= experts
    if "head_dim" not in kw and kw.get("num_attention_heads"):
        kw["head_dim"] = int(kw["hidden_size"]) // int(kw["num_attention_heads"])
    for attr in ("max_position_embeddings", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window", "num_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if attr in kw:
            if int(kw[attr]) != kw[attr] or int(kw[attr]) <= 0:
                raise InputError(f"GGUF metadata: {attr} must be a positive integer, got {kw[attr]!r}")
            kw[attr] = int(kw[attr])
    try:
        config = AutoConfig.for_model(model_type, **kw)
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"cannot build a {model_type} config from the GGUF metadata: {e}") from e
    _set_rope_scaling(config, metadata, arch)
    if rope_dim is not None and int(rope_dim) != kw["head_dim"]:
        rp = getattr(config, "rope_parameters", None)
        if not isinstance(rp, dict) or not 0 < rope_dim < kw["head_dim"] or rope_dim % 2:
            raise InputError(f"GGUF metadata: {arch}.rope.dimension_count {rope_dim!r} does not fit head_dim "
                             f"{kw['head_dim']}")
        rp["partial_rotary_factor"] = float(rope_dim) / kw["head_dim"]
    if theta is not None:
        rp = getattr(config, "rope_parameters", None)
        if isinstance(rp, dict) and "full_attention" in rp:
            rp["full_attention"]["rope_theta"] = float(theta)
        elif isinstance(rp, dict):
            rp["rope_theta"] = float(theta)
        else:
            config.rope_theta = float(theta)
    return config


__all__ = ["apply_rope_factors", "config_from_gguf", "gguf_hparams"]
