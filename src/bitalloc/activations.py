"""Activation roundings a runtime applies before a matmul, and the output error they cause.

llama.cpp's CPU backend never multiplies a quantized weight with float activations: it first rounds each
activation row to the weight type's ``vec_dot_type`` and then takes integer block dot products
(``quantize_row_q8_0``/``_q8_1`` in arch/x86/quants.c, ``quantize_row_q8_K_ref`` in ggml-quants.c):

=======  =====  ===============================================================  ======================
name     block  rule per block of the row                                        weights (CPU backend)
=======  =====  ===============================================================  ======================
q8_0     32     ``q = rint(x * (127 / amax))``, stored ``d = fp16(amax / 127)``    q4_0 q5_0 q8_0 iq4_nl,
                (Q8_1 rounds the same way)                                        q4_1 q5_1 (Q8_1)
q8_k     256    ``iscale = -127 / x_m`` (x_m: the signed element of largest         q2_k .. q6_k
                magnitude), ``q = min(127, rint(iscale * x))``, ``d = 1 / iscale``
=======  =====  ===============================================================  ======================

(rint: half to even; an all-zero block gives d = 0, q = 0.)  A format names the rounding its runtime applies
in :attr:`bitalloc.formats.Format.activation_rounding`.

The rounding adds an output error of its own, independent of how the weight was rounded: with
``d = x − R(x)`` the layer output moves by ``d · ŵ_j`` on output channel j.  :func:`activation_noise` gives
``E[(d · w_j)²]`` per output channel, the quantity :mod:`bitalloc.measure` adds to every format using ``R``
(the cross term with the weight error averages out: ``d`` does not depend on the weight's rounding).  On
SmolLM2-135M the Q8_K rounding of ffn_down's inputs costs KLD 0.0023, Q8_0's 0.0006 (``bench/activation_noise.py``,
which emulates llama.cpp's rounding with :mod:`bitalloc.export.llamacpp_emulation`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .errors import InputError
from .formats import Format, get_format
from .formats.gguf_common import fp16r

QK8_0 = 32
QK_K = 256


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


@dataclass(frozen=True)
class ActivationRounding:
    """A named activation rounding: ``fn`` maps (..., n) float activations to their rounded values; rows of
    ``n`` not divisible by ``block`` cannot be rounded (no format using it can store such a weight)."""

    name: str
    block: int
    fn: Callable[[torch.Tensor], torch.Tensor]

    def applies(self, cols: int) -> bool:
        return cols > 0 and cols % self.block == 0

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x − R(x)`` in float32: what the rounding takes away from the activations."""
        x = x.to(torch.float32)
        return x - self.fn(x)


_ROUNDINGS = {r.name: r for r in (ActivationRounding("q8_0", QK8_0, q8_0_roundtrip),
                                  ActivationRounding("q8_k", QK_K, q8_k_roundtrip))}
ROUNDING_NAMES = tuple(_ROUNDINGS)


def get_rounding(name: str) -> ActivationRounding:
    try:
        return _ROUNDINGS[name]
    except KeyError:
        raise InputError(f"unknown activation rounding {name!r} (known: {', '.join(ROUNDING_NAMES)})") from None


def roundings_for(formats: Iterable[str | Format]) -> list[str]:
    """The activation roundings the runtimes of ``formats`` apply (sorted names, each once)."""
    return sorted({r for f in formats if (r := get_format(f).activation_rounding) is not None})


def output_noise(residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ_tokens (d · w_j)²`` per output channel j, (out,) float64, for ``d = x − R(x)`` (:meth:`residual`,
    (tokens, in)) and ``weight`` (out, in): one residual serves every weight reading the same input."""
    return (residual @ weight.to(torch.float32).T).to(torch.float64).square().sum(0)


def gram_pays(in_features: int, out_features: int, tokens: int) -> bool:
    """Whether :func:`gram_noise` is the cheaper way to the noise of ``out_features`` output channels reading one
    input over ``tokens`` tokens: it costs ``tokens · in²`` (the residuals' Gram matrix, float32) plus ``out · in²``
    once in float64 (counted twice), where :func:`output_noise` costs ``tokens · in · out``."""
    return tokens * in_features * out_features > (tokens + 2 * out_features) * in_features * in_features


def residual_gram(residual: torch.Tensor) -> torch.Tensor:
    """``Σ_tokens d dᵀ`` (in, in), float32, of the residuals ``d`` (tokens, in): summed over batches, it gives
    :func:`output_noise` of any weight reading these inputs through :func:`gram_noise`."""
    return residual.T @ residual


def gram_noise(gram: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ_tokens (d · w_j)² = w_jᵀ (Σ d dᵀ) w_j`` per output channel j, (out,) float64, from the residuals'
    :func:`residual_gram` (summed over all batches) and ``weight`` (out, in): :func:`output_noise` summed over
    the same tokens, to float rounding."""
    w = weight.to(device=gram.device, dtype=torch.float64)
    return ((w @ gram.to(torch.float64)) * w).sum(1)


def activation_noise(x: torch.Tensor, weight: torch.Tensor, rounding: ActivationRounding) -> torch.Tensor:
    """``Σ_tokens ((x − R(x)) · w_j)²`` per output channel j, (out,) float64.

    ``x``: (tokens, in) activations, ``weight``: (out, in).  A sum over the tokens given, not a mean: the
    caller accumulates batches and divides by the token count once.
    """
    return output_noise(rounding.residual(x), weight)


__all__ = ["ActivationRounding", "QK8_0", "QK_K", "ROUNDING_NAMES", "activation_noise", "get_rounding",
           "gram_noise", "gram_pays", "output_noise", "q8_0_roundtrip", "q8_k_roundtrip", "residual_gram",
           "roundings_for"]
