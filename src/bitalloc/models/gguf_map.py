"""The llama.cpp side of the architecture map, applied: tensor names, value transforms and hyper-parameters.

Names come from gguf-py's ``TensorNameMap`` (the table llama.cpp's converter uses), evaluated over the HF model's
own parameter names, so the reverse direction is the inverse of the same map, never a second table.  Values:
llama.cpp's converter reorders the rows of Llama-style ``q_proj``/``k_proj`` so that the two rotary halves of each
head are interleaved (GGML's RoPE rotates adjacent pairs, HF's rotates ``(i, i + d/2)``), and stores Gemma's norm
weights as ``1 + w``.  The permutation acts on whole rows, and row-wise block quantization treats rows
independently, so a tensor is quantized in HF layout and its encoded rows are permuted (:func:`to_gguf_rows`):
the bytes equal those of quantizing the permuted matrix.  Hyper-parameters: :func:`gguf_hparams` writes the
``{arch}.*`` keys of an HF config, :func:`config_from_gguf` rebuilds the config from them and the tensor shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from bitalloc.errors import InputError
from bitalloc.models.archs import ARCHS, ArchSpec, GGUFSpec, arch_for, gguf_model_type
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


# ----------------------------------------------------------------------------------- hyper-parameters
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


def _scalar(metadata: Mapping[str, Any], key: str) -> Any:
    v = metadata[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"GGUF metadata {key!r} must be a number, got {v!r}")
    return v


def _set_rope_scaling(config: Any, metadata: Mapping[str, Any], arch: str) -> None:
    """Linear RoPE scaling from ``{arch}.rope.scaling.*`` (Gemma 3's global layers, say); other kinds refused."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return
    if kind != "linear":
        raise InputError(f"the GGUF's RoPE scaling {kind!r} is not supported (linear and rope_freqs factors are)")
    factor = _scalar(metadata, f"{arch}.rope.scaling.factor")
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
    for key, attr in g.hparams:
        full = f"{arch}.{key}"
        if full not in metadata:
            if key in g.optional:
                continue
            raise InputError(f"the GGUF lacks the metadata key {full!r} that a {arch} model needs")
        value = _scalar(metadata, full)
        if attr != "rope_dim":  # written for llama.cpp; the config derives it from head_dim
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
    if theta is not None:
        rp = getattr(config, "rope_parameters", None)
        if isinstance(rp, dict) and "full_attention" in rp:
            rp["full_attention"]["rope_theta"] = float(theta)
        elif isinstance(rp, dict):
            rp["rope_theta"] = float(theta)
        else:
            config.rope_theta = float(theta)
    return config




def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The causal LM of ``config`` with its parameters on the meta device (no weight memory; buffers stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    spec = arch_for(config)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as e:
        raise InputError(f"cannot build a {config.model_type} model from its config: {e}") from e
    if getattr(config, "tie_word_embeddings", False):  # not every model class ties on the meta device
        model.get_submodule(spec.lm_head).weight = model.get_submodule(spec.embedding).weight
    unfuse_experts(model)  # MoE: per-expert linears, as bitalloc sees the model (on the meta device too)
    return model


def gguf_file_names(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> GGUFNames:
    """The name map of a GGUF's model, from its metadata and tensor shapes alone (no weights read)."""
    return model_names(empty_model(config_from_gguf(metadata, shapes)))


__all__ = ["GGUFNames", "RUNTIME_TENSORS", "config_from_gguf", "empty_model", "gguf_file_names", "gguf_hparams",
           "gguf_spec", "model_names", "names_for", "rope_row_order", "to_gguf_rows", "to_hf_rows"]
