"""Make a dequantized bitalloc torch model compute its matmuls the way llama.cpp's x86 CPU backend does.

llama.cpp never multiplies a quantized weight with float activations: ``ggml_mul_mat`` first converts the
activation rows to the weight type's ``vec_dot_type`` and then takes integer block dot products.  The
activation quantizers (arch/x86/quants.c ``quantize_row_q8_0``/``_q8_1``, ggml-quants.c
``quantize_row_q8_K_ref``, and their 4-row forms in repack.cpp used by the repacked q4_0/iq4_nl/q4_K/q2_K):

=========  =====  ============================================================  ========================
vec type   block  rule per block of the row                                     used for weights
=========  =====  ============================================================  ========================
Q8_0/Q8_1  32     ``q = rint(x * (127 / amax))``, stored ``d = fp16(amax / 127)``  q4_0 q5_0 q8_0 iq4_nl /
                                                                                 q4_1 q5_1 (Q8_1)
Q8_K       256    ``iscale = -127 / x_m`` (x_m: the signed element of largest      q2_k .. q6_k
                  magnitude), ``q = min(127, rint(iscale * x))``, ``d = 1/iscale``
=========  =====  ============================================================  ========================

(rint: half to even; an all-zero block gives d = 0, q = 0.)  Since the integer dot product of the weight
codes with ``q`` times the two scales equals the float dot product of the dequantized weight with ``d * q``,
replacing each activation row by its Q8 round trip before a float matmul reproduces llama.cpp's arithmetic
up to float summation order (and, for q4_1/q5_1, Q8_1's block sum being stored as ``fp16(d * sum(q))``).
F32/F16/BF16 weights are left alone.

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

from ..errors import InputError
from ..formats.gguf_common import fp16r

QK8_0 = 32
QK_K = 256

_Q8_0_TYPES = frozenset({"q4_0", "q5_0", "q8_0", "iq4_nl", "q4_1", "q5_1"})  # Q8_1 quantizes like Q8_0
_Q8_K_TYPES = frozenset({"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"})
_FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})


def _blocks(x: torch.Tensor, block: int, what: str) -> torch.Tensor:
    if x.shape[-1] % block:
        raise InputError(f"{what}: activation row length {x.shape[-1]} is not a multiple of {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def q8_0_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 (and Q8_1) round trip of ``x`` (..., n) per block of 32 along the last dim, float32.

    As ``quantize_row_q8_0``/``_q8_1`` (arch/x86/quants.c) and ``ggml_quantize_mat_q8_0_4x8`` (repack.cpp)
    compute it: ``d = amax / 127``, multiplier ``127 / amax`` (not ``1 / d``), ``_mm256_round_ps`` nearest
    (half to even); the portable reference (``roundf``, ``1 / d``) differs only at rounding ties.
    """
    xb = _blocks(x.to(torch.float32), QK8_0, "Q8_0")
    amax = xb.abs().amax(-1, keepdim=True)
    zero = amax == 0
    mult = torch.where(zero, torch.zeros_like(amax), 127.0 / torch.where(zero, torch.ones_like(amax), amax))
    return (torch.round(xb * mult) * fp16r(amax / 127.0)).reshape(x.shape)


def q8_k_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Q8_K round trip of ``x`` (..., n) per block of 256 along the last dim, float32."""
    xb = _blocks(x.to(torch.float32), QK_K, "Q8_K")
    m = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # signed extreme (the first one, as llama.cpp)
    zero = m == 0
    iscale = -127.0 / torch.where(zero, torch.ones_like(m), m)
    q = torch.round(iscale * xb).clamp_max(127.0)  # nearest_int: half to even
    d = torch.where(zero, torch.zeros_like(m), 1.0 / iscale)
    return (q * d).reshape(x.shape)


def activation_roundtrip(weight_type: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation quantizer llama.cpp's CPU backend applies for a weight stored as ``weight_type``."""
    t = weight_type.lower()
    if t in _Q8_0_TYPES:
        return q8_0_roundtrip
    if t in _Q8_K_TYPES:
        return q8_k_roundtrip
    if t in _FLOAT_TYPES:
        return None
    raise InputError(f"no llama.cpp activation rule known for weight type {weight_type!r}")


def linear_types_from_gguf(path: str | os.PathLike[str], model: nn.Module, arch: str = "llama") -> dict[str, str]:
    """``{nn.Linear module name: stored GGUF type}`` of ``model``'s linears as stored in the GGUF at ``path``.

    A tied output head (no ``output.weight`` in the file) gets the token embedding's type, as llama.cpp then
    multiplies with ``token_embd``.
    """
    from ..export.gguf_names import gguf_to_hf
    from ..io.gguf import GGUFFile

    with GGUFFile(path) as f:
        by_param = {gguf_to_hf(name, arch): info.type.name.lower() for name, info in f.tensors.items()}
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
