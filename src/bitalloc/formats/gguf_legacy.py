"""The 32-wide GGUF block types Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 and IQ4_NL, bit-exact with llama.cpp.

One fp16 scale ``d`` (and for the ``_1`` types one fp16 min ``m``) per block of 32 along a row:

==========  =====================================  ==============================  =====
type        value                                  bytes of one block              size
==========  =====================================  ==============================  =====
q4_0        d * (q - 8),   q in 0..15              d, qs[16]                       18
q4_1        d * q + m,     q in 0..15              d, m, qs[16]                    20
q5_0        d * (q - 16),  q in 0..31              d, qh[4], qs[16]                22
q5_1        d * q + m,     q in 0..31              d, m, qh[4], qs[16]             24
q8_0        d * q,         q in -128..127 (int8)   d, qs[32]                       34
iq4_nl      d * kvalues[q], q in 0..15             d, qs[16]                       18
==========  =====================================  ==============================  =====

``qs[j]`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble; ``qh`` is a
little-endian uint32 whose bit ``j`` is bit 4 of element ``j``.  The Grid has one group per block with
``scale = d`` and ``offset = m`` (0 for the symmetric types) exactly as stored; the code is the stored
unsigned value (Q8_0: the int8 plus 128), so every stored byte pattern is a Grid code and back.

The scales are chosen by :func:`.gguf_common.search_grid` (importance-weighted clip search with
least-squares refits, errors compared after fp16 rounding) and then polished by coordinate descent over
fp16 neighbours (:func:`.gguf_common.polish_grid`), which is never worse than the search result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .refit import refit_grid
from .fit import round_fp16
from .base import FormatError, Grid, QTensor, Shape
from .gguf_common import (GGUFFormat, bits_to_bytes, check_weights, element_weights, fp16_bytes,
                          fp16_from_bytes, fp16r, nibbles, search_grid)

#: IQ4_NL's non-uniform 4-bit codebook (llama.cpp ``kvalues_iq4nl``).
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class LegacySpec(NamedTuple):
    levels: tuple[float, ...]
    symmetric: bool
    qbits: int  # bits of one stored code (4, 5, 8)


_SPECS: dict[str, LegacySpec] = {
    "q4_0": LegacySpec(tuple(float(i) for i in range(-8, 8)), True, 4),
    "q4_1": LegacySpec(tuple(float(i) for i in range(16)), False, 4),
    "q5_0": LegacySpec(tuple(float(i) for i in range(-16, 16)), True, 5),
    "q5_1": LegacySpec(tuple(float(i) for i in range(32)), False, 5),
    "q8_0": LegacySpec(tuple(float(i) for i in range(-128, 128)), True, 8),
    "iq4_nl": LegacySpec(tuple(float(v) for v in IQ4NL_VALUES), True, 4),
}
QK = 32


@dataclass(frozen=True)
class GGUFLegacy(GGUFFormat):
    """A 32-wide GGUF block type (``q8_0 q5_1 q5_0 q4_1 q4_0 iq4_nl``)."""

    #: llama.cpp's CPU kernels round the activations to Q8_0 (Q8_1 for q4_1/q5_1: the same values)
    activation_rounding = "q8_0"

    @classmethod
    def _specs(cls) -> dict:
        return _SPECS

    @property
    def levels(self) -> torch.Tensor:
        return torch.tensor(self.spec.levels, dtype=torch.float32)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        w = check_weights(w, self.id)
        self.check_shape(tuple(w.shape))
        rows, cols = w.shape
        imp = element_weights(importance, (rows, cols))
        x = w.reshape(-1, QK)
        wt = None if imp is None else imp.reshape(-1, QK)
        levels, sym = self.levels.to(w.device), self.spec.symmetric
        s, o = search_grid(x, wt, levels, symmetric=sym, rnd=round_fp16)
        nb = cols // QK
        return Grid(s.reshape(rows, nb), o.reshape(rows, nb), levels, QK)

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        """Least-squares fp16 ``d`` (and ``m`` for the ``_1`` types) for the codes (:mod:`.refit`)."""
        return self.refine_measured(w, codes, grid, hessian)[0]

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor]:
        return refit_grid(w, codes, grid, hessian, offset=not self.spec.symmetric, rnd=fp16r)

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        """The raw llama.cpp blocks, built on the CPU (codes and grid are moved there first)."""
        spec = self.spec
        codes = self.check_codes(codes.cpu(), shape, len(spec.levels))
        grid = grid.to("cpu")
        rows, cols = int(shape[0]), int(shape[1])
        if grid.group_size != QK or tuple(grid.scale.shape) != (rows, cols // QK):
            raise FormatError(f"{self.id}: grid is not one of this type's (group size {grid.group_size})")
        if grid.levels.numel() != len(spec.levels) or not torch.equal(grid.levels.float(), self.levels):
            raise FormatError(f"{self.id}: grid levels are not this type's codebook")
        d = grid.scale.to(torch.float32).reshape(-1, 1)
        m = grid.offset.to(torch.float32).reshape(-1, 1)
        if not torch.equal(fp16r(d), d) or not torch.equal(fp16r(m), m):
            raise FormatError(f"{self.id}: grid scales/offsets are not fp16 values")
        if spec.symmetric and bool((m != 0).any()):
            raise FormatError(f"{self.id}: symmetric type with a non-zero grid offset")
        q = codes.reshape(-1, QK)
        parts = [fp16_bytes(d)]
        if not spec.symmetric:
            parts.append(fp16_bytes(m))
        if spec.qbits == 8:
            parts.append((q - 128).to(torch.int8).view(torch.uint8))  # code = stored int8 + 128
        else:
            if spec.qbits == 5:
                parts.append(bits_to_bytes((q >> 4) & 1))
            parts.append(nibbles(q[:, :16], q[:, 16:]))
        return self.packed(torch.cat(parts, dim=1), shape, dtype)

    def _parse(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Raw blocks (n, type_size) -> ``(d (n, 1), m (n, 1) or None, codes (n, 32) int64)``, float32 d/m as
        stored and the codes as :meth:`encode` takes them (the stored unsigned value; Q8_0: the int8 + 128)."""
        spec = self.spec
        d = fp16_from_bytes(b[:, 0:2])
        pos = 2
        m = None
        if not spec.symmetric:
            m = fp16_from_bytes(b[:, 2:4])
            pos = 4
        if spec.qbits == 8:
            return d, m, b[:, pos:].to(torch.int64) ^ 0x80  # two's complement int8 + 128 = the byte with bit 7 flipped
        qh = None
        if spec.qbits == 5:
            hb = b[:, pos:pos + 4].to(torch.int64)
            qh = ((hb.unsqueeze(-1) >> torch.arange(8, device=b.device)) & 1).reshape(-1, 32)
            pos += 4
        qs = b[:, pos:pos + 16].to(torch.int64)
        code = torch.cat([qs & 0xF, qs >> 4], dim=1)
        if qh is not None:
            code = code | (qh << 4)
        return d, m, code

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        d, m, code = self._parse(b)
        if spec.levels[0] != 0.0 and self.name != "iq4_nl":  # uniform symmetric: level = code + lowest level
            vals = (code + int(spec.levels[0])).to(torch.float32)
        else:
            vals = self.levels.to(b.device)[code]
        out = d * vals
        if m is not None:
            out = out + m
        return out.reshape(b.shape[0], self.block_size)

    # --- recovery -------------------------------------------------------------------------------------
    learns_scales = True

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """Codes (rows, cols) and the grid :meth:`fit` would build: ``scale = d``, ``offset = m`` (0 for the
        symmetric types) per block of 32, this type's levels."""
        rows, cols = int(q.shape[0]), int(q.shape[1])
        d, m, code = self._parse(self.exact_blocks(q))
        nb = cols // QK
        scale = d.reshape(rows, nb)
        offset = torch.zeros_like(scale) if m is None else m.reshape(rows, nb)
        return code.reshape(rows, cols), Grid(scale, offset, self.levels.to(scale.device), QK)

    def with_scales(self, grid: Grid, scale: torch.Tensor, offset: torch.Tensor) -> Grid:
        """fp16 ``d`` (and ``m`` for the ``_1`` types; the symmetric types keep offset 0), clamped to ±65504."""
        d = fp16r(scale.detach().to(torch.float32))
        m = torch.zeros_like(d) if self.spec.symmetric else fp16r(offset.detach().to(torch.float32))
        return Grid(d, m, grid.levels, grid.group_size, grid.extra, grid.set_index, grid.exact_mask,
                    grid.exact_values)

__all__ = ["GGUFLegacy", "IQ4NL_VALUES", "LegacySpec"]
