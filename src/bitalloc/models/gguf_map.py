"""The llama.cpp side of the architecture map, applied: tensor names, value transforms and hyper-parameters.

Names come from gguf-py's ``TensorNameMap`` (the table llama.cpp's converter uses), evaluated over the HF model's
own parameter names, so the reverse direction is the inverse of the same map, never a second table.  Values:
llama.cpp's converter reorders the rows of Llama-style ``q_proj``/``k_proj`` so that the two rotary halves of each
head are interleaved (GGML's RoPE rotates adjacent pairs, HF's rotates ``(i, i + d/2)``), and stores Gemma's norm
weights as ``1 + w``.  The permutation acts on whole rows, and row-wise block quantization treats rows
independently, so a tensor is quantized in HF layout and its encoded rows are permuted (:func:`to_gguf_rows`):
the bytes equal those of quantizing the permuted matrix.  Hyper-parameters: :mod:`bitalloc.models.gguf_config`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from bitalloc.errors import InputError
from bitalloc.models.archs import ARCHS, ArchSpec, GGUFSpec, arch_for
from bitalloc.models.experts import unfuse_experts

_ROPE_HEADS = {"self_attn.q_proj": "attention.head_count", "self_attn.k_proj": "attention.head_count_kv"}
#: tensors a GGUF may carry beside the model's parameters; kept as they are in an export.
RUNTIME_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def gguf_spec(spec: ArchSpec) -> GGUFSpec:
    if spec.gguf is None:
        known = sorted(n for n, s in ARCHS.items() if s.gguf is not None)
        raise InputError(f"architecture {spec.name!r} has no GGUF export (GGUF architectures: {', '.join(known)})")
    return spec.gguf


def _name_map(arch: str, n_blocks: int) -> Any:
    import gguf

    for a, n in gguf.MODEL_ARCH_NAMES.items():
        if n == arch:
            return gguf.get_tensor_name_map(a, n_blocks)
    raise InputError(f"gguf-py does not know the llama.cpp architecture {arch!r}")


_EXPERT = re.compile(r"^(?P<stem>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.(?P<leaf>weight|bias)$")


@dataclass(frozen=True)
class GGUFNames:
    """HF parameter name <-> GGUF tensor name for one model, with the converter's value transforms.

    Most GGUF tensors hold one parameter; llama.cpp stacks the experts of one MoE layer and projection into one
    3-D tensor (``blk.N.ffn_gate_exps``: ``(experts, rows, cols)``), listed in ``stacks`` in expert order.
    """

    spec: ArchSpec
    to_gguf_map: Mapping[str, str]
    to_hf_map: Mapping[str, str]
    stacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_gguf(self, hf: str) -> str:
        try:
            return self.to_gguf_map[hf]
        except KeyError:
            raise InputError(f"tensor {hf!r} has no GGUF name for architecture {self.spec.name!r}") from None

    def members(self, gg: str) -> tuple[str, ...]:
        """The HF parameters stored in GGUF tensor ``gg``: one, the experts stacked in it, or none for a runtime
        tensor (``rope_freqs``); InputError for a name that is none of these."""
        if gg in self.to_hf_map:
            return (self.to_hf_map[gg],)
        if gg in self.stacks:
            return self.stacks[gg]
        if gg in RUNTIME_TENSORS:
            return ()
        raise InputError(f"GGUF tensor {gg!r} is not a parameter of the {self.spec.name} model")

    def to_hf(self, gg: str) -> str | None:
        """The one HF parameter of a GGUF tensor; None for a runtime tensor or stacked experts (see
        :meth:`members`); InputError for a name the model does not have."""
        m = self.members(gg)
        return m[0] if gg in self.to_hf_map else None

    def rope_heads(self, hf: str, metadata: Mapping[str, Any]) -> int | None:
        """Heads whose rows llama.cpp's converter permuted in ``hf`` (None when it does not permute it)."""
        g = gguf_spec(self.spec)
        if not g.rope_permute:
            return None
        stem = hf.rsplit(".", 1)[0]
        for rel, key in _ROPE_HEADS.items():
            if stem.endswith("." + rel) and stem.startswith(self.spec.blocks + "."):
                full = f"{g.arch}.{key}"
                if full not in metadata:
                    raise InputError(f"GGUF metadata lacks {full!r}, needed to lay out {hf}")
                return int(metadata[full])
        return None

    def norm_shift(self, hf: str) -> float:
        """What the converter adds to this tensor's values (Gemma norms: 1)."""
        return gguf_spec(self.spec).norm_shift if hf.endswith("norm.weight") else 0.0

    def to_gguf_value(self, hf: str, t: torch.Tensor, metadata: Mapping[str, Any]) -> torch.Tensor:
        """A float tensor in HF layout -> the values llama.cpp's converter would store."""
        shift = self.norm_shift(hf)
        return to_gguf_rows(t + shift if shift else t, self.rope_heads(hf, metadata))

    def from_gguf_value(self, hf: str, t: torch.Tensor, metadata: Mapping[str, Any]) -> torch.Tensor:
        """Inverse of :meth:`to_gguf_value`."""
        t = to_hf_rows(t, self.rope_heads(hf, metadata))
        shift = self.norm_shift(hf)
        return t - shift if shift else t


def names_for(spec: ArchSpec, param_names: Iterable[str], n_blocks: int) -> GGUFNames:
    """The name map over ``param_names`` (every one must have a GGUF name: InputError naming the first that has none).
    An expert's projection (``…experts.{e}.gate_proj.weight``) is named as the stacked tensor of its layer."""
    nm = _name_map(gguf_spec(spec).arch, n_blocks)
    fwd: dict[str, str] = {}
    stacked: dict[str, dict[int, str]] = {}
    for hf in param_names:
        m = _EXPERT.match(hf)
        key = f"{m['stem']}.{m['proj']}.{m['leaf']}" if m else hf
        gg = nm.get_name(key, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise InputError(f"tensor {hf!r} of the {spec.name} model has no llama.cpp name "
                             f"(architecture {gguf_spec(spec).arch!r})")
        fwd[hf] = gg
        if m:
            stacked.setdefault(gg, {})[int(m["e"])] = hf
    stacks = {gg: tuple(by_e[e] for e in sorted(by_e)) for gg, by_e in stacked.items()}
    for gg, by_e in stacked.items():
        if sorted(by_e) != list(range(len(by_e))):
            raise InputError(f"the experts stacked in {gg} are not numbered 0..{len(by_e) - 1}")
    inv: dict[str, str] = {}
    for hf, gg in fwd.items():
        if gg in stacks:
            continue
        if gg in inv:
            raise InputError(f"two tensors of the {spec.name} model map to the GGUF name {gg!r}")
        inv[gg] = hf
    return GGUFNames(spec, fwd, inv, stacks)


def model_names(model: torch.nn.Module) -> GGUFNames:
    """The name map of a model's stored parameters (a tied lm_head is the embedding: it has no tensor of its own)."""
    spec = arch_for(model.config)
    params = dict(model.named_parameters())  # a tied lm_head appears once, under the embedding's name
    n_blocks = len(model.get_submodule(spec.blocks))
    return names_for(spec, params, n_blocks)


# ----------------------------------------------------------------------------------- rotary permutation
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


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The causal LM of ``config`` with its parameters on the meta device (no weight memory; buffers stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    spec = arch_for(config)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except InputError:
        raise
    except Exception as e:  # transformers on values that passed the config checks: still the input's fault
        from bitalloc.checked import error_line as one_line

        raise InputError(f"cannot build a {config.model_type} model from its config: {one_line(e)}") from e
    if getattr(config, "tie_word_embeddings", False):  # not every model class ties on the meta device
        model.get_submodule(spec.lm_head).weight = model.get_submodule(spec.embedding).weight
    unfuse_experts(model)  # MoE: per-expert linears, as bitalloc sees the model (on the meta device too)
    return model


def gguf_file_names(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> GGUFNames:
    """The name map of a GGUF's model, from its metadata and tensor shapes alone (no weights read)."""
    from bitalloc.models.gguf_config import config_from_gguf

    return model_names(empty_model(config_from_gguf(metadata, shapes)))


__all__ = ["GGUFNames", "RUNTIME_TENSORS", "empty_model", "gguf_file_names", "gguf_spec", "model_names", "names_for",
           "rope_row_order", "to_gguf_rows", "to_hf_rows"]
