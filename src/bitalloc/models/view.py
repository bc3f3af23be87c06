"""ModelView: a causal LM seen as named weight tensors with roles, blocks and tie groups.

Names are parameter names as in the state dict (``model.layers.0.self_attn.q_proj.weight``).  Quantizable
tensors are every block linear, the embedding and the lm_head; a tied embedding/lm_head is ONE tensor named
by the embedding, with roles ``("lookup", "linear")``.  Everything else that is stored (norms, biases) is
*fixed*: it is kept at fp16 (2 bytes per parameter), or fp32 when a value lies beyond the fp16 range
(:func:`fixed_format`), which is what the packed export stores, and its bytes count in every budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from bitalloc.errors import InputError, NumericsError
from bitalloc.models.archs import ArchSpec

FIXED_BYTES_PER_PARAM = 2  # norms and biases are stored as fp16 ...
FP16_MAX = 65504.0  # ... unless a value lies beyond the fp16 range: then fp32


def fixed_format(t: torch.Tensor) -> str:
    """``fp16`` for a fixed tensor whose values fp16 holds, else ``fp32`` (never rounds a finite value to inf)."""
    if t.numel() and float(t.detach().abs().max()) > FP16_MAX:
        return "fp32"
    return "fp16"
Kind = Literal["linear", "embedding", "lm_head"]


@dataclass(frozen=True)
class TensorRef:
    """One quantizable 2-D weight ``(rows = outputs, cols = inputs)`` (an embedding is ``(vocab, hidden)``)."""

    name: str
    shape: tuple[int, int]
    roles: tuple[str, ...]
    module: str
    kind: Kind
    block: int | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"{self.name}: a quantizable tensor must be 2-D and non-empty, got {self.shape}")
        if not self.roles or not set(self.roles) <= {"lookup", "linear"}:
            raise ValueError(f"{self.name}: roles must be drawn from lookup/linear, got {self.roles}")
        if self.kind not in ("linear", "embedding", "lm_head"):
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class FixedTensor:
    """A stored tensor that is not allocated (norm weight, bias): kept at ``format`` (fp16, or fp32)."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    format: str = "fp16"


@dataclass(frozen=True, eq=False)
class Block:
    """One decoder block: its module and its linears in sequential groups (tensor names)."""

    index: int
    path: str
    module: torch.nn.Module
    groups: tuple[tuple[str, ...], ...]
    linears: dict[str, torch.nn.Linear] = field(repr=False)


class ModelView:
    """Names, roles, blocks and ties of a causal LM from the architecture table.  Weights stay in the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        from bitalloc.layout import layout_of

        self.model = model
        self.layout = layout_of(model)  # the one resolution of the model against the architecture map
        self.spec: ArchSpec = self.layout.spec
        self._params = dict(model.named_parameters())  # tied parameters appear once
        self._blocks = self._build_blocks()
        self._refs = self._build_refs()
        self._by_name = {r.name: r for r in self._refs}

    # ---- construction -------------------------------------------------------------------------
    def _module(self, path: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError as e:
            raise InputError(f"{self.spec.name} model has no module {path!r} (architecture mismatch)") from e

    def _build_blocks(self) -> list[Block]:
        lay = self.layout
        out = []
        for i, (path, blk) in enumerate(zip(lay.block_paths, lay.blocks)):
            linears: dict[str, torch.nn.Linear] = {}
            for rel in self.spec.linears:
                try:
                    mod = lay.linear(i, rel)
                except AttributeError as e:
                    raise InputError(f"{self.spec.name} model has no module {path}.{rel} (architecture mismatch)") from e
                if not isinstance(mod, torch.nn.Linear):
                    raise InputError(f"{path}.{rel} is a {type(mod).__name__}, expected a Linear")
                linears[lay.tensor_name(i, rel)] = mod
            out.append(Block(i, path, blk, tuple(map(tuple, lay.block_groups(i))), linears))
        return out

    def _build_refs(self) -> list[TensorRef]:
        emb, head = self.layout.embedding, self.layout.lm_head
        if not isinstance(emb, torch.nn.Embedding) or not isinstance(head, torch.nn.Linear):
            raise InputError(f"{self.spec.embedding} must be an Embedding and {self.spec.lm_head} a Linear")
        emb_name = self.layout.embedding_name
        refs = [TensorRef(emb_name, tuple(emb.weight.shape), ("lookup",), self.spec.embedding, "embedding")]
        for b in self._blocks:
            for name, lin in b.linears.items():
                refs.append(TensorRef(name, tuple(lin.weight.shape), ("linear",), name[: -len(".weight")],
                                      "linear", b.index))
        if self.tied:
            refs[0] = TensorRef(emb_name, refs[0].shape, ("lookup", "linear"), self.spec.embedding, "embedding")
        else:
            refs.append(TensorRef(f"{self.spec.lm_head}.weight", tuple(head.weight.shape), ("linear",),
                                  self.spec.lm_head, "lm_head"))
        return refs

    # ---- queries ------------------------------------------------------------------------------
    @property
    def tied(self) -> bool:
        """Whether the lm_head shares the embedding's storage."""
        return self.layout.tied

    def quantizable(self) -> list[TensorRef]:
        """Embedding, every block linear (block order, sequential order), then lm_head if untied."""
        return list(self._refs)

    def ref(self, name: str) -> TensorRef:
        """The TensorRef of a quantizable tensor (InputError for an unknown name)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise InputError(f"no quantizable tensor named {name!r}") from None

    def fixed(self) -> list[FixedTensor]:
        """Every other stored parameter (norms, biases), at its :func:`fixed_format` (2 or 4 bytes a parameter)."""
        quant = {r.name for r in self._refs} | {f"{self.spec.lm_head}.weight"}
        out = []
        for n, p in self._params.items():
            if n not in quant:
                fmt = fixed_format(p)
                out.append(FixedTensor(n, tuple(p.shape), p.numel() * (2 if fmt == "fp16" else 4), fmt))
        return out

    @property
    def fixed_bytes(self) -> int:
        return sum(f.nbytes for f in self.fixed())

    @property
    def total_params(self) -> int:
        """All stored parameters, tied tensors counted once (the bpw denominator)."""
        return sum(p.numel() for p in self._params.values())

    def blocks(self) -> list[Block]:
        """The decoder blocks in order, each with its linears in sequential groups."""
        return list(self._blocks)

    def tie_groups(self) -> list[tuple[str, ...]]:
        """Runtime-fused linears (fused qkv, gate/up) per block, as tensor names: optional constraints."""
        return [tuple(f"{b.path}.{rel}.weight" for rel in tg) for b in self._blocks for tg in self.spec.tie_groups]

    def module(self, name: str) -> torch.nn.Module:
        """The module that owns a quantizable tensor (the embedding for a tied lm_head)."""
        return self._module(self.ref(name).module)

    def get_weight(self, name: str) -> torch.Tensor:
        """The stored weight (a detached view: do not modify it, use set_weight)."""
        self.ref(name)
        return self._params[name].detach()

    @torch.no_grad()
    def set_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Overwrite a quantizable weight in place (cast to its dtype); a tied lm_head follows."""
        param = self._params[self.ref(name).name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise InputError(f"{name}: new weight has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        if not torch.isfinite(tensor).all():
            raise NumericsError(f"{name}: new weight contains NaN or Inf")
        param.data.copy_(tensor.to(device=param.device, dtype=param.dtype))
