"""Checks of a model's metadata before anything believes it: ``config.json`` and GGUF hyper-parameters.

Every value that sizes something (vocabulary, widths, head and layer counts, experts) must be an integer in a
plausible range, every number finite, flags real booleans, and the sizes must fit together (``hidden_size``
divisible by the heads when no ``head_dim`` is given, query heads by K/V heads, ``top-k`` at most the
experts).  These checks run before transformers sees the config and before a model is built from it; the
tensor headers are then compared with the model the config describes (:mod:`bitalloc.models.preflight`).
Files are read only when they are regular files (a FIFO is refused without being opened).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from bitalloc.checked import read_json
from bitalloc.errors import InputError

_K = 1 << 10
#: integer sizes: key -> (smallest, largest) accepted; generous bounds on what any released model uses
INT_RANGES: Mapping[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, _K), "num_attention_heads": (1, _K), "num_key_value_heads": (1, _K),
    "head_dim": (1, 1 << 13), "max_position_embeddings": (1, 1 << 27), "sliding_window": (0, 1 << 27),
    "num_experts": (1, 4 * _K), "num_local_experts": (1, 4 * _K), "num_experts_per_tok": (1, 4 * _K),
    "moe_intermediate_size": (1, 1 << 20), "shared_expert_intermediate_size": (0, 1 << 20),
    "decoder_sparse_step": (1, _K), "original_max_position_embeddings":
    (1, 1 << 27), "sliding_window_pattern": (1, _K), "num_shared_experts": (0, _K), "n_shared_experts": (0, _K),
}
#: floats that must be positive (and finite)
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_local_base_freq", "factor",
                   "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")
#: flags that change which tensors exist or how they are read: a string "false" must not count as true
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob", "use_sliding_window")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _walk_finite(v: Any, where: str, depth: int = 0) -> None:
    """Every number anywhere in the config is finite and of a sane magnitude (``1e400`` parses as inf)."""
    if depth > 32:
        raise InputError(f"{where}: nested deeper than 32 levels")
    if isinstance(v, float) and not math.isfinite(v):
        raise InputError(f"{where}: {v!r} is not a finite number")
    if _is_int(v) and abs(v) >= 1 << 63:
        raise InputError(f"{where}: {v} is beyond the 64-bit integer range")
    if isinstance(v, dict):
        for k, x in v.items():
            _walk_finite(x, f"{where}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v[:100_000]):
            _walk_finite(x, f"{where}[{i}]", depth + 1)


def check_values(cfg: Mapping[str, Any], where: str) -> None:
    """Types, ranges and consistency of one config object's known keys (``where`` names it in errors)."""
    for key, (lo, hi) in INT_RANGES.items():
        v = cfg.get(key)
        if v is None:
            continue
        if not _is_int(v) or not lo <= v <= hi:
            raise InputError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {v!r:.60}")
    for key in POSITIVE_FLOATS:
        v = cfg.get(key)
        if v is not None and (not _is_num(v) or not 0 < v < 1e30):
            raise InputError(f"{where}: {key} must be a positive finite number, got {v!r:.60}")
    v = cfg.get("partial_rotary_factor")
    if v is not None and (not _is_num(v) or not 0 < v <= 1):
        raise InputError(f"{where}: partial_rotary_factor must be in (0, 1], got {v!r:.60}")
    for key in BOOLS:
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise InputError(f"{where}: {key} must be true or false, got {cfg[key]!r:.60}")
    for key in ("model_type", "torch_dtype", "dtype", "hidden_act"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise InputError(f"{where}: {key} must be a string, got {cfg[key]!r:.60}")
    arch = cfg.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise InputError(f"{where}: architectures must be a list of class names, got {arch!r:.60}")
    for key in _TOKEN_IDS:
        ids = cfg.get(key)
        ids = ids if isinstance(ids, list) else [ids]
        if not all(i is None or (_is_int(i) and 0 <= i < 1 << 31) for i in ids):
            raise InputError(f"{where}: {key} must be a token id (a non-negative integer), got {cfg[key]!r:.60}")
    heads, kv, hidden = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads"), cfg.get("hidden_size")
    if heads is not None and kv is not None and heads % kv:
        raise InputError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if heads is not None and hidden is not None and cfg.get("head_dim") is None and hidden % heads:
        raise InputError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    top, n = cfg.get("num_experts_per_tok"), cfg.get("num_experts", cfg.get("num_local_experts"))
    if top is not None and n is not None and _is_int(n) and top > n:
        raise InputError(f"{where}: num_experts_per_tok {top} exceeds the {n} experts")
    types = cfg.get("layer_types")
    layers = cfg.get("num_hidden_layers")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)
                                  and (layers is None or len(types) == layers)):
        raise InputError(f"{where}: layer_types must list one string per layer ({layers})")
    for key in ("rope_scaling", "rope_parameters"):
        rp = cfg.get(key)
        if rp is None:
            continue
        if not isinstance(rp, dict):
            raise InputError(f"{where}: {key} must be an object, got {rp!r:.60}")
        check_values(rp, f"{where}.{key}")
        for field in ("rope_type", "type"):
            if field in rp and not (isinstance(rp[field], str) and rp[field] in _rope_types()):
                raise InputError(f"{where}: {key}.{field} {rp[field]!r:.60} is not a RoPE type transformers knows "
                                 f"({', '.join(sorted(_rope_types()))})")
    for key, sub in cfg.items():
        if key.endswith("_config") and key != "quantization_config":
            if sub is not None and not isinstance(sub, dict):
                raise InputError(f"{where}: {key} must be an object, got {sub!r:.60}")
            if sub is not None:
                check_values(sub, f"{where}.{key}")


def _rope_types() -> set[str]:
    """The RoPE scaling types transformers implements (an unknown one fails inside it, after a warning)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return {"default", "su", *ROPE_INIT_FUNCTIONS}


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of an HF directory, checked (types, ranges, consistency) before transformers reads it."""
    from bitalloc.models.archs import ARCHS, supported_types

    file = path / "config.json"
    cfg = read_json(file, "model config")
    if not isinstance(cfg, dict):
        raise InputError(f"model config {file} must be a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise InputError(f"unsupported architecture {model_type!r:.60} in {file}; "
                         f"supported model types: {', '.join(supported_types())}")
    if "quantization_config" in cfg:
        raise InputError(f"{file} describes an already quantized checkpoint (quantization_config); give the "
                         "unquantized model")
    _walk_finite(cfg, str(file))
    check_values(cfg, str(file))
    return cfg


def check_gguf_value(key: str, value: Any, attr: str) -> Any:
    """One GGUF hyper-parameter for HF config attribute ``attr``: a finite number, a positive integer where
    ``attr`` is a size (in the range of :data:`INT_RANGES`), a positive float for eps/theta/factors."""
    if not _is_num(value) or not math.isfinite(value):
        raise InputError(f"GGUF metadata {key!r} must be a finite number, got {value!r:.60}")
    if attr in INT_RANGES or attr == "rope_dim":
        lo, hi = INT_RANGES.get(attr, (1, 1 << 13))
        if int(value) != value or not lo <= value <= hi:
            raise InputError(f"GGUF metadata {key!r} ({attr}) must be an integer in [{lo}, {hi}], got {value!r}")
        return int(value)
    if attr in POSITIVE_FLOATS and not 0 < value < 1e30:
        raise InputError(f"GGUF metadata {key!r} ({attr}) must be positive, got {value!r}")
    return value


__all__ = ["check_gguf_value", "check_values", "read_config"]
