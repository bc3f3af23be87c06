"""Make a dequantized bitalloc torch model compute its matmuls the way llama.cpp's x86 CPU backend does.

llama.cpp never multiplies a quantized weight with float activations: ``ggml_mul_mat`` first rounds the
activation rows to the weight type's ``vec_dot_type`` (Q8_0/Q8_1 or Q8_K: the rules are in
:mod:`bitalloc.activations`, and each GGUF format names its own in ``Format.activation_rounding``).  Since the
integer dot product of the weight codes with the rounded activations times the two scales equals the float
dot product of the dequantized weight with the rounded activations, replacing each activation row by its
round trip before a float matmul reproduces llama.cpp's arithmetic up to float summation order (and, for
q4_1/q5_1, Q8_1's block sum being stored as ``fp16(d * sum(q))``).  F32/F16/BF16 weights are left alone.

What this can and cannot do (measured on SmolLM2-135M, see tests/export/test_gguf_export.py): with 8-bit
activations the forward pass is *chaotic*.  A 1e-6 relative change of the embeddings moves the float
model's logits by KLD ~1e-10 but the Q8-activation model's by KLD ~5e-3 (top-1 ~97%), as much as its whole
distance from the float model: a rounding decision near a boundary flips on any last-bit difference
(summation order, llama.cpp's fp16 KV cache, ``127/amax`` vs ``1/d``) and the flip grows layer by layer.
llama.cpp's own repacked and plain kernels disagree with each other by as much (q4_0: KLD 4.6e-3, top-1
96.3%).  So the emulation reproduces llama.cpp's error *statistics*, not its logits token by token.

``with llamacpp_matmuls(model, types): model(ids)`` installs forward pre-hooks on the affected
``nn.Linear`` modules and removes them on exit; :func:`linear_types_from_gguf` reads ``types`` from a GGUF.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ..activations import get_rounding, q8_0_roundtrip, q8_k_roundtrip
from ..errors import InputError
from ..formats import FormatError, get_format

_FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})


def activation_roundtrip(weight_type: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation quantizer llama.cpp's CPU backend applies for a weight stored as ``weight_type``."""
    t = weight_type.lower()
    if t in _FLOAT_TYPES:
        return None
    try:
        rounding = get_format(t).activation_rounding
    except FormatError:
        rounding = None
    if rounding is None:
        raise InputError(f"no llama.cpp activation rule known for weight type {weight_type!r}")
    return get_rounding(rounding).fn


def linear_types_from_gguf(path: str | os.PathLike[str], model: nn.Module) -> dict[str, str]:
    """``{nn.Linear module name: stored GGUF type}`` of ``model``'s linears as stored in the GGUF at ``path``.

    A tied output head (no ``output.weight`` in the file) gets the token embedding's type, as llama.cpp then
    multiplies with ``token_embd``.
    """
    from ..io.gguf import GGUFFile
    from ..models.gguf_map import model_names

    names = model_names(model)
    with GGUFFile(path) as f:
        by_param = {hf: info.type.name.lower() for name, info in f.tensors.items() for hf in names.members(name)}
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        t = by_param.get(f"{name}.weight")
        if t is None and name == "lm_head" and "model.embed_tokens.weight" in by_param:
            t = by_param["model.embed_tokens.weight"]
        if t is None:
            raise InputError(f"linear {name!r} of the model has no weight in {path}")
        out[name] = t
    return out


@contextmanager
def llamacpp_matmuls(model: nn.Module, types: Mapping[str, str]) -> Iterator[int]:
    """Within the block, every ``nn.Linear`` named in ``types`` with a quantized type sees its input
    activations round-tripped through llama.cpp's Q8_0 / Q8_K; yields how many linears are affected."""
    modules = dict(model.named_modules())
    missing = [n for n in types if n not in modules or not isinstance(modules[n], nn.Linear)]
    if missing:
        raise InputError(f"not nn.Linear modules of the model: {missing[:5]}")
    plan = [(modules[n], fn) for n, t in types.items() if (fn := activation_roundtrip(t)) is not None]
    handles = []
    try:
        for mod, fn in plan:
            handles.append(mod.register_forward_pre_hook(_hook(fn)))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def _hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    def pre(_mod: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (fn(x).to(x.dtype), *args[1:])
    return pre


__all__ = ["activation_roundtrip", "linear_types_from_gguf", "llamacpp_matmuls", "q8_0_roundtrip",
           "q8_k_roundtrip"]
