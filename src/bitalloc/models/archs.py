"""The architecture table: where a causal LM keeps its blocks, linears, norms, embedding and lm_head.

Supporting a new decoder-only architecture is a new row here, not new code.  Every name is a dotted module
path: ``blocks``/``embedding``/``final_norm``/``lm_head`` relative to the model, the rest relative to one
decoder block.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from bitalloc.errors import InputError
from bitalloc.models.experts import ExpertSpec, expand_spec

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class ArchSpec:
    """How one family of decoder-only transformers is laid out.

    groups:      the block's linears in sequential order; the linears of one group read the same input
                 (``[[q, k, v], [o], [gate, up], [down]]``), so calibration can collect one Hessian per group.
    group_norms: the norm whose output feeds each group (None where the input is not a norm output); the
                 function-preserving rescale folds per-channel factors into these.
    tie_groups:  runtime-fused linears (fused qkv, gate/up) that an engine may want in one format: offered
                 to the allocator as optional constraints.
    norm_offset: RMSNorm computes ``x̂ · (offset + weight)`` (0 for Llama, 1 for Gemma).
    v_proj/o_proj/up_proj/down_proj: the linear pairs whose inner channels can be rescaled.
    experts:     Mixture-of-Experts layers (:mod:`bitalloc.models.experts`): linears named with ``{e}`` are
                 one expert's; :func:`arch_for` repeats their groups for every expert of the model's config.
    """

    name: str
    blocks: str
    embedding: str
    final_norm: str
    lm_head: str
    groups: tuple[tuple[str, ...], ...]
    group_norms: tuple[str | None, ...]
    tie_groups: tuple[tuple[str, ...], ...]
    norm_offset: float = 0.0
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    experts: ExpertSpec | None = None

    def __post_init__(self) -> None:
        if not self.groups or any(not g for g in self.groups):
            raise ValueError(f"{self.name}: every linear group must be non-empty")
        if len(self.group_norms) != len(self.groups):
            raise ValueError(f"{self.name}: group_norms must have one entry per group")
        names = self.linears
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a linear appears in two groups")
        for tg in self.tie_groups:
            if not set(tg) <= set(names):
                raise ValueError(f"{self.name}: tie group {tg} names a linear not in the groups")
        for lin in (self.v_proj, self.o_proj, self.up_proj, self.down_proj):
            if lin not in names:
                raise ValueError(f"{self.name}: {lin} is not one of the block's linears")

    @property
    def linears(self) -> tuple[str, ...]:
        """All linears of one block, in sequential order."""
        return tuple(n for g in self.groups for n in g)


def _llama_like(name: str) -> ArchSpec:
    return ArchSpec(
        name=name,
        blocks="model.layers",
        embedding="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        groups=(_ATTN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
        group_norms=("input_layernorm", None, "post_attention_layernorm", None),
        tie_groups=(_ATTN, _MLP_IN),
    )


def _gemma3(name: str, prefix: str) -> ArchSpec:
    # Gemma3: post_attention_layernorm normalises the attention OUTPUT; the MLP input is
    # pre_feedforward_layernorm.  RMSNorm multiplies by (1 + weight).
    return ArchSpec(
        name=name,
        blocks=f"{prefix}layers",
        embedding=f"{prefix}embed_tokens",
        final_norm=f"{prefix}norm",
        lm_head="lm_head",
        groups=(_ATTN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
        group_norms=("input_layernorm", None, "pre_feedforward_layernorm", None),
        tie_groups=(_ATTN, _MLP_IN),
        norm_offset=1.0,
    )


_EXPERT_IN = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj")


def _moe(name: str, shared: bool, count: str = "num_experts") -> ArchSpec:
    # The router (mlp.gate, an (E, H) parameter) and Qwen2-MoE's shared_expert_gate (H -> 1) stay fixed fp16
    # tensors: they are tiny, their errors move routing decisions (which the per-linear error model does not
    # see), and llama.cpp does not quantize ffn_gate_inp either.  The MLP groups have no group norm: the
    # post-attention norm also feeds the router, so the function-preserving rescale does not apply.
    shared_groups = (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))
    groups = (_ATTN, ("self_attn.o_proj",), *(shared_groups if shared else ()), _EXPERT_IN, ("mlp.experts.{e}.down_proj",))
    return ArchSpec(
        name=name,
        blocks="model.layers",
        embedding="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        groups=groups,
        group_norms=("input_layernorm",) + (None,) * (len(groups) - 1),
        tie_groups=(_ATTN, *(shared_groups[:1] if shared else ()), _EXPERT_IN),
        up_proj="mlp.experts.{e}.up_proj",
        down_proj="mlp.experts.{e}.down_proj",
        experts=ExpertSpec("mlp.experts", count),
    )


def _table() -> dict[str, ArchSpec]:
    table = {t: _llama_like(t) for t in ("llama", "mistral", "qwen2", "qwen3")}
    table["qwen2_moe"] = _moe("qwen2_moe", shared=True)
    table["qwen3_moe"] = _moe("qwen3_moe", shared=False)
    table["olmoe"] = _moe("olmoe", shared=False)
    table["mixtral"] = _moe("mixtral", shared=False, count="num_local_experts")
    table["gemma3_text"] = _gemma3("gemma3_text", "model.")
    table["gemma3"] = _gemma3("gemma3", "model.language_model.")
    return table


ARCHS: Mapping[str, ArchSpec] = MappingProxyType(_table())


def supported_types() -> tuple[str, ...]:
    """The HF ``model_type`` values bitalloc knows, sorted."""
    return tuple(sorted(ARCHS))


def arch_for(config: Any) -> ArchSpec:
    """The ArchSpec of a transformers config (or model); InputError naming the type if unknown."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise InputError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_types())}"
        )
    return expand_spec(ARCHS[model_type], config)  # MoE rows: one copy of the expert groups per expert
