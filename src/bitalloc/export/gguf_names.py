"""HF <-> GGUF tensor names per architecture, and the q/k row permutation of Llama-family GGUFs.

llama.cpp names tensors ``token_embd.weight``, ``blk.N.attn_q.weight``... while transformers uses
``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``.  The map is a data table per
architecture (``general.architecture`` of the GGUF): global names plus per-block names with ``{N}``.

llama.cpp's converter also reorders the rows of Llama ``q_proj``/``k_proj`` so that the two halves of each
head's rotary pairs become interleaved (GGML's RoPE rotates adjacent pairs, HF's rotates ``(i, i + d/2)``);
transformers' GGUF loader undoes it on load.  The permutation acts on whole rows, and row-wise block
quantization treats rows independently, so a tensor is quantized in HF layout and its encoded rows are
then permuted (``to_gguf_rows``) — the bytes equal those of quantizing the permuted matrix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import InputError

# Global tensors (HF name -> GGUF name) and per-block tensors (HF suffix after ``model.layers.{N}.``).
_LLAMA_GLOBAL: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LLAMA_BLOCK: dict[str, str] = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


@dataclass(frozen=True)
class ArchNames:
    """The name table of one architecture and which tensors carry the rotary row permutation.

    ``rope_permuted`` maps a per-block HF suffix to the GGUF metadata key giving its head count
    (``{arch}`` is replaced by the architecture name).
    """

    arch: str
    global_names: Mapping[str, str]
    block_names: Mapping[str, str]
    rope_permuted: Mapping[str, str]

    def __post_init__(self) -> None:
        for table in (self.global_names, self.block_names):
            if len(set(table.values())) != len(table):
                raise ValueError(f"{self.arch}: duplicate GGUF names in the name table")
        for suffix in self.rope_permuted:
            if suffix not in self.block_names:
                raise ValueError(f"{self.arch}: permuted tensor {suffix!r} is not in the block table")


_PERMUTED = {
    "self_attn.q_proj.weight": "{arch}.attention.head_count",
    "self_attn.q_proj.bias": "{arch}.attention.head_count",
    "self_attn.k_proj.weight": "{arch}.attention.head_count_kv",
    "self_attn.k_proj.bias": "{arch}.attention.head_count_kv",
}

ARCHS: dict[str, ArchNames] = {
    "llama": ArchNames("llama", _LLAMA_GLOBAL, _LLAMA_BLOCK, _PERMUTED),
    # Same tensors, no rotary permutation in the converter (it applies only to Llama-style checkpoints).
    "qwen2": ArchNames("qwen2", _LLAMA_GLOBAL, _LLAMA_BLOCK, {}),
    "mistral": ArchNames("mistral", _LLAMA_GLOBAL, _LLAMA_BLOCK, _PERMUTED),
}

_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def arch_names(arch: str) -> ArchNames:
    try:
        return ARCHS[arch]
    except KeyError:
        raise InputError(
            f"GGUF architecture {arch!r} is not supported for export (supported: {', '.join(sorted(ARCHS))})"
        ) from None


def hf_to_gguf(name: str, arch: str = "llama") -> str:
    """GGUF name of an HF tensor name; raises :class:`InputError` for names outside the table."""
    names = arch_names(arch)
    if name in names.global_names:
        return names.global_names[name]
    m = _HF_BLOCK.match(name)
    if m and m.group(2) in names.block_names:
        return f"blk.{m.group(1)}.{names.block_names[m.group(2)]}"
    raise InputError(f"tensor {name!r} has no GGUF name for architecture {arch!r}")


def gguf_to_hf(name: str, arch: str = "llama") -> str:
    """HF name of a GGUF tensor name (inverse of :func:`hf_to_gguf`)."""
    names = arch_names(arch)
    for hf, gg in names.global_names.items():
        if gg == name:
            return hf
    m = _GGUF_BLOCK.match(name)
    if m:
        for suffix, gg in names.block_names.items():
            if gg == m.group(2):
                return f"model.layers.{m.group(1)}.{suffix}"
    raise InputError(f"GGUF tensor {name!r} has no HF name for architecture {arch!r}")


def rope_head_count(hf_name: str, arch: str, metadata: Mapping[str, object]) -> int | None:
    """Number of heads whose rows llama.cpp permutes in ``hf_name``, or None when it is not permuted."""
    names = arch_names(arch)
    m = _HF_BLOCK.match(hf_name)
    if not m or m.group(2) not in names.rope_permuted:
        return None
    key = names.rope_permuted[m.group(2)].format(arch=arch)
    if key not in metadata:
        raise InputError(f"GGUF metadata lacks {key!r}, needed to lay out {hf_name}")
    return int(metadata[key])  # type: ignore[call-overload]


def rope_row_order(rows: int, n_heads: int) -> torch.Tensor:
    """Row index ``perm`` with ``gguf_rows = hf_rows[perm]``.

    Within a head of ``d`` rows, GGUF row ``2i + j`` (j in {0, 1}) is HF row ``i + j * d/2``.
    """
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise InputError(f"cannot split {rows} rows into {n_heads} heads of even size")
    d = rows // n_heads
    i = torch.arange(d // 2)
    within = torch.stack([i, i + d // 2], dim=1).reshape(-1)  # [0, d/2, 1, d/2+1, ...]
    return (torch.arange(n_heads)[:, None] * d + within[None, :]).reshape(-1)


def to_gguf_rows(t: torch.Tensor, n_heads: int | None) -> torch.Tensor:
    """Reorder dim 0 of ``t`` (weights, raw block rows or a bias) from HF to GGUF order."""
    if n_heads is None:
        return t
    return t[rope_row_order(t.shape[0], n_heads)]


def to_hf_rows(t: torch.Tensor, n_heads: int | None) -> torch.Tensor:
    """Inverse of :func:`to_gguf_rows`."""
    if n_heads is None:
        return t
    perm = rope_row_order(t.shape[0], n_heads)
    out = torch.empty_like(t)
    out[perm] = t
    return out
