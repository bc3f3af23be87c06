"""The one architecture map: everything bitalloc knows about a family of decoder-only transformers.

A row says where a causal LM keeps its blocks, linears, norms, embedding and lm_head (dotted module paths:
``blocks``/``embedding``/``final_norm``/``lm_head`` relative to the model, the rest relative to one decoder
block), which linears read one input (calibration groups), which a runtime fuses (optional tie constraints),
and, in ``gguf``, what llama.cpp calls the architecture, which hyper-parameters its GGUF metadata carries and
which value transforms its converter applies (the q/k row permutation of Llama-style checkpoints, Gemma's
``1 + w`` norm weights).  Tensor names are not tabled here: gguf-py's ``TensorNameMap`` (the table llama.cpp's
converter itself uses) names every HF parameter, and :mod:`bitalloc.models.gguf_map` applies it.

Supporting a new architecture that follows a known pattern is a new row here, not new code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from bitalloc.errors import InputError
from bitalloc.models.experts import ExpertSpec, expand_spec

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


#: GGUF key suffix (after ``{arch}.``) -> HF config attribute, shared by every llama.cpp decoder below.
#: ``rope.freq_base`` reads/writes the HF ``rope_parameters`` (see :mod:`bitalloc.models.gguf_map`).
_BASE_HPARAMS: tuple[tuple[str, str], ...] = (
    ("context_length", "max_position_embeddings"),
    ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"),
    ("feed_forward_length", "intermediate_size"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("rope.freq_base", "rope_theta"),
)
_ALWAYS_OPTIONAL = ("rope.freq_base", "rope.dimension_count", "attention.head_count_kv")
_HEAD_DIM = (("attention.key_length", "head_dim"), ("attention.value_length", "head_dim"))


@dataclass(frozen=True)
class GGUFSpec:
    """What llama.cpp calls an architecture and what its converter does to the HF checkpoint.

    arch:          ``general.architecture`` (gguf-py's ``MODEL_ARCH_NAMES``).
    hparams:       (GGUF key suffix, HF config attribute) pairs: written from the config, read back into it
                   (``head_dim``, ``rope_dim`` and ``rope_theta`` are derived: :mod:`bitalloc.models.gguf_map`).
                   A key listed twice fills two attributes on reading; the first pair is the one written.
    optional:      the keys of ``hparams`` a checkpoint may lack (a config value of None is not written).
    rope_permute:  the converter interleaves the rotary halves of q/k rows (Llama-style checkpoints).
    norm_shift:    the converter stores every ``*norm.weight`` plus this (Gemma's RMSNorm computes x̂·(1 + w)).
    assumes:       (HF config attribute, value) pairs llama.cpp's implementation of the architecture hard-codes
                   (Qwen3-MoE always renormalises the top-k routing weights): set when reading a GGUF, and a
                   config that differs has no faithful GGUF.
    """

    arch: str
    hparams: tuple[tuple[str, str], ...] = _BASE_HPARAMS
    optional: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # the converter writes these only when the config has them
        object.__setattr__(self, "optional", tuple(self.optional) + _ALWAYS_OPTIONAL)
    rope_permute: bool = False
    norm_shift: float = 0.0
    assumes: tuple[tuple[str, Any], ...] = ()


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
    v_proj/o_proj/up_proj/down_proj: the linear pairs whose inner channels can be rescaled (None where a
                 runtime-fused linear holds them, as Phi-3's qkv_proj and gate_up_proj: no rescale there).
    gguf:        the llama.cpp side (None: packed output only).
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
    v_proj: str | None = "self_attn.v_proj"
    o_proj: str | None = "self_attn.o_proj"
    up_proj: str | None = "mlp.up_proj"
    down_proj: str | None = "mlp.down_proj"
    gguf: GGUFSpec | None = None
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
            if lin is not None and lin not in names:
                raise ValueError(f"{self.name}: {lin} is not one of the block's linears")

    @property
    def linears(self) -> tuple[str, ...]:
        """All linears of one block, in sequential order."""
        return tuple(n for g in self.groups for n in g)

    def is_quantizable(self, name: str) -> bool:
        """Whether a parameter name is allocated a format: the embedding, the lm_head or a block linear's weight
        (norms, biases and routers are not)."""
        if name in (f"{self.embedding}.weight", f"{self.lm_head}.weight"):
            return True
        return name.startswith(self.blocks + ".") and any(name.endswith(f".{rel}.weight") for rel in self.linears)


def _llama_like(name: str, gguf: GGUFSpec, prefix: str = "model.") -> ArchSpec:
    return ArchSpec(
        name=name,
        blocks=f"{prefix}layers",
        embedding=f"{prefix}embed_tokens",
        final_norm=f"{prefix}norm",
        lm_head="lm_head",
        groups=(_ATTN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
        group_norms=("input_layernorm", None, "post_attention_layernorm", None),
        tie_groups=(_ATTN, _MLP_IN),
        gguf=gguf,
    )


def _gemma(name: str, prefix: str, gguf: GGUFSpec | None) -> ArchSpec:
    # Gemma 2 and 3: post_attention_layernorm normalises the attention OUTPUT; the MLP input is
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
        gguf=gguf,
    )


def _phi3() -> ArchSpec:
    # Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj, as llama.cpp does (attn_qkv, ffn_up).
    return ArchSpec(
        name="phi3",
        blocks="model.layers",
        embedding="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        group_norms=("input_layernorm", None, "post_attention_layernorm", None),
        tie_groups=(),
        v_proj=None, o_proj=None, up_proj=None, down_proj=None,
        gguf=GGUFSpec("phi3", _BASE_HPARAMS + (("rope.dimension_count", "rope_dim"),
                                              ("attention.sliding_window", "sliding_window")),
                      optional=("attention.sliding_window",)),
    )


_EXPERT_IN = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj")


_MOE = (("expert_count", "num_experts"), ("expert_used_count", "num_experts_per_tok"))


def _moe(name: str, shared: bool, count: str = "num_experts", gguf: GGUFSpec | None = None) -> ArchSpec:
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
        gguf=gguf,
    )


def _table() -> dict[str, ArchSpec]:
    swa = ("attention.sliding_window", "sliding_window")
    rope_dim = ("rope.dimension_count", "head_dim")
    gemma2 = GGUFSpec("gemma2", _BASE_HPARAMS + _HEAD_DIM + (
        ("attention.key_length", "query_pre_attn_scalar"), swa,
        ("attn_logit_softcapping", "attn_logit_softcapping"),
        ("final_logit_softcapping", "final_logit_softcapping")),
        optional=("attn_logit_softcapping", "final_logit_softcapping"), norm_shift=1.0)
    gemma3 = GGUFSpec("gemma3", _BASE_HPARAMS + _HEAD_DIM + (
        ("attention.key_length", "query_pre_attn_scalar"), swa,
        ("final_logit_softcapping", "final_logit_softcapping")),
        optional=("final_logit_softcapping", "attention.sliding_window"), norm_shift=1.0)
    table = {
        "llama": _llama_like("llama", GGUFSpec("llama", _BASE_HPARAMS + (rope_dim,), rope_permute=True)),
        "mistral": _llama_like("mistral", GGUFSpec("llama", _BASE_HPARAMS + (rope_dim, swa),
                                                   optional=("attention.sliding_window",), rope_permute=True)),
        "qwen2": _llama_like("qwen2", GGUFSpec("qwen2")),
        "qwen3": _llama_like("qwen3", GGUFSpec("qwen3", _BASE_HPARAMS + _HEAD_DIM)),
        "gemma2": _gemma("gemma2", "model.", gemma2),
        "gemma3_text": _gemma("gemma3_text", "model.", gemma3),
        # The multimodal Gemma 3: its language model is packed-only (llama.cpp keeps the vision tower apart).
        "gemma3": _gemma("gemma3", "model.language_model.", None),
        "phi3": _phi3(),
        # MoE: llama.cpp stacks the experts of a layer and projection into one tensor (ffn_gate_exps ...)
        "qwen2_moe": _moe("qwen2_moe", True, gguf=GGUFSpec("qwen2moe", _BASE_HPARAMS + _MOE + (
            ("expert_feed_forward_length", "moe_intermediate_size"),
            ("expert_shared_feed_forward_length", "shared_expert_intermediate_size")),
            assumes=(("norm_topk_prob", False),))),
        "qwen3_moe": _moe("qwen3_moe", False, gguf=GGUFSpec("qwen3moe", _BASE_HPARAMS + _HEAD_DIM + _MOE + (
            ("expert_feed_forward_length", "moe_intermediate_size"),), assumes=(("norm_topk_prob", True),))),
        # llama.cpp's OLMoE has as many K/V heads as query heads (its k_norm spans the hidden width)
        "olmoe": _moe("olmoe", False, gguf=GGUFSpec("olmoe", _BASE_HPARAMS + _MOE,
                                                     assumes=(("norm_topk_prob", False),))),
        # Mixtral: packed output only (llama.cpp files it under "llama", the dense row above reads those)
        "mixtral": _moe("mixtral", False, count="num_local_experts"),
    }
    return table


ARCHS: Mapping[str, ArchSpec] = MappingProxyType(_table())


def supported_types() -> tuple[str, ...]:
    """The HF ``model_type`` values bitalloc knows, sorted."""
    return tuple(sorted(ARCHS))


def gguf_model_type(gguf_arch: str) -> str:
    """The HF ``model_type`` that reads a GGUF of llama.cpp architecture ``gguf_arch`` (InputError if none)."""
    for name, spec in ARCHS.items():
        if spec.gguf is not None and spec.gguf.arch == gguf_arch:
            return name
    known = sorted({s.gguf.arch for s in ARCHS.values() if s.gguf is not None})
    raise InputError(f"GGUF architecture {gguf_arch!r} is not supported (supported: {', '.join(known)})")


def arch_for(config: Any) -> ArchSpec:
    """The ArchSpec of a transformers config (or model); InputError naming the type if unknown."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise InputError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_types())}"
        )
    return expand_spec(ARCHS[model_type], config)  # MoE rows: one copy of the expert groups per expert


def fused_groups(names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The runtime-fused groups (each row's ``tie_groups``, e.g. q/k/v and gate/up of every block, of every
    expert) among tensor names, for a table that holds names but no modules; groups of one are dropped."""
    have = set(names)
    found: dict[tuple[str, ...], None] = {}
    for spec in ARCHS.values():
        for tg in spec.tie_groups:
            first = re.compile(re.escape(spec.blocks) + r"\.(\d+)\." + re.escape(tg[0]).replace(r"\{e\}", r"(\d+)")
                               + r"\.weight$")
            for n in names:
                m = first.match(n)
                if m:
                    block, expert = m.group(1), (m.group(2) if m.lastindex and m.lastindex > 1 else "")
                    group = tuple(g for rel in tg
                                  if (g := f"{spec.blocks}.{block}.{rel.replace('{e}', expert)}.weight") in have)
                    if len(group) > 1:
                        found[group] = None
    return tuple(found)
