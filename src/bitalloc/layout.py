"""The one resolution of a model against the architecture map (:func:`layout_of`: its blocks, embedding, final
norm, lm_head and tie, as modules), which :class:`bitalloc.models.view.ModelView` names and the calibration passes
hook, and small helpers shared by those passes (window batches, finiteness checks, early stop of a forward pass)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError, NumericsError
from .formats.fit import all_finite
from .models.archs import ArchSpec, arch_for


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early."""


@dataclass(frozen=True, eq=False)
class Layout:
    """The modules of a model that calibration hooks, with the tensor names the rest of bitalloc uses."""

    spec: ArchSpec
    blocks: tuple[nn.Module, ...]
    block_paths: tuple[str, ...]
    embedding: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    tied: bool

    @property
    def embedding_name(self) -> str:
        return f"{self.spec.embedding}.weight"

    @property
    def lm_head_name(self) -> str:
        """The tensor that plays the output-projection role (the embedding itself when tied)."""
        return self.embedding_name if self.tied else f"{self.spec.lm_head}.weight"

    def tensor_name(self, block: int, linear: str) -> str:
        return f"{self.block_paths[block]}.{linear}.weight"

    def block_groups(self, block: int) -> list[list[str]]:
        """Tensor names of block ``block`` in sequential groups (one shared input per group)."""
        return [[self.tensor_name(block, lin) for lin in g] for g in self.spec.groups]

    def linear(self, block: int, linear: str) -> nn.Module:
        return self.blocks[block].get_submodule(linear)


def layout_of(model: nn.Module) -> Layout:
    """Resolve the architecture table row of ``model`` to its modules (InputError if it does not match)."""
    spec = arch_for(model.config)
    try:
        blocks = model.get_submodule(spec.blocks)
        emb = model.get_submodule(spec.embedding)
        norm = model.get_submodule(spec.final_norm)
        head = model.get_submodule(spec.lm_head)
    except AttributeError as e:
        raise InputError(f"the model does not match the {spec.name} layout: {e}") from e
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise InputError(f"{spec.blocks} is not a non-empty list of decoder blocks")
    n = len(blocks)
    return Layout(
        spec=spec,
        blocks=tuple(blocks),
        block_paths=tuple(f"{spec.blocks}.{i}" for i in range(n)),
        embedding=emb,
        final_norm=norm,
        lm_head=head,
        tied=shares_storage(head.weight, emb.weight),
    )


def block0_inputs(model: nn.Module, lay: Layout, **inputs: Any) -> torch.Tensor:
    """The inputs of block 0 for the model's ``inputs`` (``input_ids=`` or ``inputs_embeds=``), computed by the model
    itself (whatever it does before the first block, e.g. an embedding scale), with the graph when gradients are
    on; the forward stops there."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
        got.append(args[0] if args else kw["hidden_states"])
        raise StopForward

    h = lay.blocks[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        pass
    finally:
        h.remove()
    return got[0]


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor, or two views of the same storage (a tie made by copying the parameter object's data)."""
    if a is b:
        return True
    if a.is_meta or b.is_meta:
        return False
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def window_batches(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise InputError(f"calibration windows must be a non-empty (n, ctx>=2) tensor, got {tuple(windows.shape)}")


def require_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):  # one min/max pass: isfinite(t).all() is three full-size temporaries on the CPU
        raise NumericsError(f"non-finite values (NaN/Inf) in {what}")
