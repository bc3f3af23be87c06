"""Calibration statistics: the typed data that flows from ``calibrate`` into ``measure`` and ``quantize``.

A weight tensor can play several *roles* (a tied embedding is a row lookup at the input and the output
projection at the end), so its statistics are a tuple of role statistics and every error is the sum over
roles.  All expectations are means over calibration tokens, never sums, so they do not grow with the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class LinearStats:
    """Statistics of a tensor used as ``y = W x`` (W: out x in).

    hessian: ``E[x xᵀ]`` over tokens, (in, in) float32 — the layer-output error of ΔW is ``tr(ΔW H ΔWᵀ)``.
    grad_sq: ``E[(∂ log p(token) / ∂ y_j)²]`` per output channel, (out,) float32 — the diagonal Fisher of
             the layer output; ``½ Σ_j grad_sq_j (ΔW H ΔWᵀ)_jj`` estimates the loss increase (loss units).
    act_noise: per activation rounding R a runtime applies before the matmul (:mod:`bitalloc.activations`),
             ``E[((x − R(x)) · w_j)²]`` per output channel, (out,) — the output error the rounding adds to
             any format that uses it.  Empty when no candidate format needs one.
    """

    hessian: torch.Tensor
    ntokens: int
    grad_sq: torch.Tensor | None = None
    act_noise: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class LookupStats:
    """Statistics of a tensor used as a row lookup ``y = E[token]`` (E: vocab x hidden).

    token_freq: share of calibration tokens that are each id, (vocab,) float32, sums to 1.
    grad_sq:    ``E[(∂ log p / ∂ y_j)²]`` per hidden channel, (hidden,) float32, or None.
    """

    token_freq: torch.Tensor
    ntokens: int
    grad_sq: torch.Tensor | None = None


RoleStats = LinearStats | LookupStats


@dataclass(frozen=True, eq=False)
class TensorStats:
    """All roles of one weight tensor (one entry for a plain linear, two for a tied embedding)."""

    roles: tuple[RoleStats, ...]

    @property
    def hessian(self) -> torch.Tensor | None:
        """The input Hessian GPTQ rounds with: that of the first linear role, if any."""
        for r in self.roles:
            if isinstance(r, LinearStats):
                return r.hessian
        return None
