"""Float-element formats: ``fp4-g{32,64,128}``, ``fp{b}-e{E}m{M}-g{G}``, ``mxfp4``, ``nvfp4``, ``fp8``.

Every element is a :class:`~.fp_common.MiniFloat` (sign, ``E`` exponent and ``M`` mantissa bits, OCP MX
semantics: subnormals, no inf/NaN) times a scale shared by ``G`` consecutive input columns of one row.
The :class:`~.base.Grid` has ``levels`` = the element type's sorted unique values (one level for ±0),
``scale`` = the decoded scale exactly as :meth:`decode` computes it, ``offset`` = 0.

Stored parts of a ``(rows, cols)`` tensor (``cols`` must be a multiple of ``G``; ``ng = cols / G``):

* ``weight_packed`` uint8 ``(rows, cols · b / 8)``: the element codes ``sign << (E+M) | magnitude`` of the
  tensor in row-major order as one little-endian bitstream (:mod:`.packing`); for 4-bit elements element
  ``2k`` is the low nibble of byte ``k``, ``2k + 1`` the high nibble — compressed-tensors'
  ``pack_fp4_to_uint8`` layout (E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 = codes 0..7, bit 3 = sign).
  ``fp8``: float8_e4m3fn ``(rows, cols)`` (the byte is the code), as compressed-tensors stores FP8 weights.
* ``fp4-g{G}`` / ``fp{b}-e{E}m{M}-g{G}``: ``weight_scale`` fp16 ``(rows, ng)``; value = ``scale · element``.
  Bits per weight ``b + 16 / G``.  Ids: E + M = b - 1, b in 3..6, E >= 1 (``fp4-e2m1-g32`` = ``fp4-g32``).
* ``mxfp4`` (OCP MX, compressed-tensors ``mxfp4-pack-quantized``): E2M1, G = 32, ``weight_scale`` uint8
  ``(rows, ng)`` = the E8M0 biased exponent: scale ``2^(byte - 127)`` (255, NaN, is never written). 4.25 bpw.
* ``nvfp4`` (compressed-tensors ``nvfp4-pack-quantized``): E2M1, G = 16, ``weight_scale`` float8_e4m3fn
  ``(rows, ng)``, ``weight_global_scale`` float32 ``(1,)``; value = ``element · (scale_fp8 / global)`` computed
  in float32 exactly as compressed-tensors' ``dequantize`` does (it stores the global scale, not its
  reciprocal: ``global = 448 · 6 / amax`` there).  Here ``global`` is the power of two ``2^e`` just below
  ``448 · 6 / amax / 2`` (one binade of head room for the scale search), so ``scale_fp8 / global`` is exact
  and row blocks fitted separately can be joined by exact power-of-two shifts of their E4M3 scales
  (:meth:`NVFP4Format.concat_rows`).  4.5 bpw + 4 bytes.
* ``fp8``: E4M3FN elements, ``weight_scale`` float32 ``(rows, 1)`` (compressed-tensors' channel-wise scale
  shape; float32 chosen), value = ``element · scale`` (``stored.to(float32) * scale``).  8 bpw + 32 / cols.
  RTN codes equal torch's ``(w / scale).to(float8_e4m3fn)`` except at exact midpoints between two levels,
  which :meth:`Grid.snap` sends to the lower level and torch's cast to the even one.

Scale searches are importance-weighted (:func:`~.fp_common.search_scale`; MX: the OCP exponent
``floor(log2 amax) - 2`` and its neighbours, :func:`~.fp_common.best_of`) and never worse than the plain
rule (absmax / OCP exponent).  ``refine`` refits the stored scales to GPTQ's codes under the Hessian
(:func:`~bitalloc.formats.refit.refit_grid`, rounded to storage, never worse row by row), except for
``mxfp4`` (power-of-two scales: the refit rounded back gained nothing).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .base import REGISTRY, Format, FormatError, QTensor
from .fp_common import E2M1, E4M3FN, FloatFormat, MiniFloat, best_of, pack_codes, search_scale, unpack_codes

GROUPS = (32, 64, 128)
FP8_MAX = 448.0


@dataclass(frozen=True)
class FPGroupFormat(FloatFormat):
    """``fp{b}-e{E}m{M}-g{G}``: mini-float elements, one fp16 scale per ``G`` columns."""

    def __post_init__(self) -> None:
        if self.group not in GROUPS or isinstance(self.group, bool):
            raise FormatError(f"fp formats support groups {GROUPS}, got {self.group!r}")
        if not 3 <= 1 + self.ebits + self.mbits <= 6 or self.ebits < 1 or self.mbits < 0:
            raise FormatError(f"fp formats need 3..6 bits with E >= 1 (sign + E + M), got e{self.ebits}m{self.mbits}")

    @property
    def id(self) -> str:
        if (self.ebits, self.mbits) == (2, 1):
            return f"fp4-g{self.group}"
        return f"fp{self.elem.bits}-e{self.ebits}m{self.mbits}-g{self.group}"


@dataclass(frozen=True)
class MXFP4Format(FloatFormat):
    """OCP MXFP4: E2M1 elements, one E8M0 (uint8 biased exponent) scale per 32 columns."""

    @property
    def id(self) -> str:
        return "mxfp4"

    def _scale_nbytes(self, rows: int, ng: int) -> int:
        return rows * ng

    def _scale_parts_spec(self, rows, ng):
        return {"weight_scale": (torch.uint8, (rows, ng))}

    def _fit_scales(self, x, wt, w):
        amax = x.abs().amax(1)
        _, ex = torch.frexp(amax)  # amax = m · 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
        e0 = torch.where(amax > 0, ex - 1 - 2, torch.zeros_like(ex))  # OCP: floor(log2 amax) - emax(E2M1)
        cands = torch.stack([e0, e0 + 1, e0 - 1], 1).clamp(-127, 127)
        return best_of(x, wt, self.elem.levels.to(x.device), _pow2(cands)), {}

    def _scale_parts(self, grid):
        m, ex = torch.frexp(grid.scale)
        if not bool((m == 0.5).all()) or bool(((ex - 1) < -127).any()) or bool(((ex - 1) > 127).any()):
            raise FormatError(f"{self.id}: grid scales are not E8M0 powers of two (use {self.id}.fit)")
        return {"weight_scale": (ex - 1 + 127).to(torch.uint8).contiguous()}

    def _scales(self, parts):
        b = parts["weight_scale"]
        if b.numel() and int(b.max()) == 255:
            raise FormatError(f"{self.id}: E8M0 scale 255 is NaN")
        return _pow2(b.to(torch.int32) - 127)

    def refine_measured(self, w, codes, grid, hessian):
        """No refit: least-squares scales rounded back to powers of two gained nothing on SmolLM2 (measured)."""
        return grid, None


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """``2^e`` as float32, exact (subnormals included) for integer ``e`` in -149..127."""
    return torch.ldexp(torch.ones(e.shape, device=e.device), e.to(torch.int32))


@dataclass(frozen=True)
class NVFP4Format(FloatFormat):
    """NVFP4: E2M1 elements, one E4M3 scale per 16 columns, one float32 (power-of-two) global scale."""

    @property
    def id(self) -> str:
        return "nvfp4"

    def _scale_nbytes(self, rows, ng):
        return rows * ng + 4

    def _scale_parts_spec(self, rows, ng):
        return {"weight_scale": (torch.float8_e4m3fn, (rows, ng)), "weight_global_scale": (torch.float32, (1,))}

    @staticmethod
    def global_exp(amax: float) -> int:
        """``e`` of the global scale ``2^e``: the block scales of ``amax`` land in E4M3's top binade but one."""
        if not amax > 0:
            return 0
        return max(-120, min(120, math.floor(math.log2(FP8_MAX * E2M1.max / amax)) - 1))

    @staticmethod
    def _rounder(e: int):
        up, down = 2.0 ** e, 2.0 ** -e

        def rnd(s: torch.Tensor) -> torch.Tensor:
            return (s * up).clamp(0, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * down
        return rnd

    def _fit_scales(self, x, wt, w):
        e = self.global_exp(float(w.abs().max()) if w.numel() else 0.0)
        return search_scale(x, wt, self.elem.levels.to(x.device), self._rounder(e)), {"global_exp": e}

    def _round_scale(self, grid):
        return self._rounder(int(grid.extra["global_exp"]))

    def _scale_parts(self, grid):
        e = grid.extra.get("global_exp")
        if not isinstance(e, int):
            raise FormatError(f"{self.id}: grid has no global exponent (use {self.id}.fit)")
        f8 = (grid.scale * 2.0 ** e).to(torch.float8_e4m3fn)
        if not torch.equal(f8.to(torch.float32) * 2.0 ** -e, grid.scale):
            raise FormatError(f"{self.id}: grid scales are not E4M3 values under the global scale 2^{e}")
        return {"weight_scale": f8.contiguous(), "weight_global_scale": torch.tensor([2.0 ** e], dtype=torch.float32)}

    def _scales(self, parts):
        g = parts["weight_global_scale"]
        if not (bool(torch.isfinite(g).all()) and float(g[0]) > 0):
            raise FormatError(f"{self.id}: the global scale must be a positive number, got {float(g[0])}")
        return parts["weight_scale"].to(torch.float32) / g  # compressed-tensors: scale / global_scale

    def _extra(self, parts):
        g = float(parts["weight_global_scale"][0])
        m, e = math.frexp(g)
        if m != 0.5 or not -120 <= e - 1 <= 120:
            raise FormatError(f"{self.id}: global scale {g} is not a power of two 2^e, |e| <= 120, as fit stores")
        return {"global_exp": e - 1}

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor under the smallest global scale; each part's E4M3 scales are shifted by
        the power-of-two ratio, which must be exact (else FormatError: quantize the tensor whole)."""
        rows, cols, dtype = self._check_concat(parts)
        for p in parts:
            self._checked(p)
        gs = [float(p.parts["weight_global_scale"][0]) for p in parts]
        g = min(gs)
        scales = []
        for p, gp in zip(parts, gs):
            s8 = p.parts["weight_scale"]
            if gp != g:
                ratio = g / gp
                if math.frexp(ratio)[0] != 0.5:
                    raise FormatError(f"{self.id}: row blocks with global scales {gp} and {g} cannot be joined")
                t = s8.to(torch.float32) * ratio
                s8 = t.to(torch.float8_e4m3fn)
                if not torch.equal(s8.to(torch.float32), t):
                    raise FormatError(f"{self.id}: row blocks fitted with global scales {gp} and {g} cannot be joined "
                                      f"exactly (a block scale leaves E4M3's range); quantize the tensor whole")
            scales.append(s8)
        out = {"weight_packed": torch.cat([p.parts["weight_packed"] for p in parts]),
               "weight_scale": torch.cat(scales), "weight_global_scale": torch.tensor([g], dtype=torch.float32)}
        return QTensor(self.id, (rows, cols), dtype, out)


@dataclass(frozen=True)
class FP8Format(FloatFormat):
    """FP8 E4M3FN elements (torch.float8_e4m3fn) with one float32 scale per output row."""

    @property
    def elem(self) -> MiniFloat:
        return E4M3FN

    @property
    def id(self) -> str:
        return "fp8"

    def group_size(self, cols: int) -> int:
        return cols

    def _scale_nbytes(self, rows, ng):
        return 4 * rows

    def _scale_parts_spec(self, rows, ng):
        return {"weight_scale": (torch.float32, (rows, 1))}

    def _expect(self, rows, cols):
        return {"weight_packed": (torch.float8_e4m3fn, (rows, cols)), "weight_scale": (torch.float32, (rows, 1))}

    def _fit_scales(self, x, wt, w):
        return search_scale(x, wt, self.elem.levels.to(x.device), _f32, ratios=(0.98, 0.95, 0.9, 0.85, 0.8)), {}

    def _scale_parts(self, grid):
        if not bool(torch.isfinite(grid.scale).all()):
            raise FormatError(f"{self.id}: grid scales must be finite")
        return {"weight_scale": grid.scale.to(torch.float32).contiguous()}

    def _round_scale(self, grid):
        return _f32

    def _pack(self, codes):
        return pack_codes(codes, self.elem).view(torch.float8_e4m3fn)

    def _unpack(self, packed, rows, cols):
        return unpack_codes(packed.view(torch.uint8), self.elem, rows, cols)


def _f32(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.float32)


_FP_ID = re.compile(r"fp(\d)-(?:e(\d)m(\d)-)?g(\d+)")


def parse_fp(format_id: str) -> Format | None:
    """``fp4-g32``, ``fp6-e2m3-g64``, ``mxfp4``, ``nvfp4``, ``fp8`` -> the format; other families -> None."""
    key = format_id.strip().lower()
    if key == "mxfp4":
        return MXFP4Format(2, 1, 32)
    if key == "nvfp4":
        return NVFP4Format(2, 1, 16)
    if key in ("fp8", "fp8-e4m3"):
        return FP8Format(4, 3, 1)
    if not re.fullmatch(r"fp\d+-.*", key):  # fp16/fp32 and unknown ids ("fp12") are not this family's
        return None
    m = _FP_ID.fullmatch(key)
    if m is None:
        raise FormatError(f"malformed float format id {format_id!r}; expected e.g. fp4-g32, fp6-e2m3-g64, mxfp4, "
                          f"nvfp4, fp8")
    bits, e, mb, g = m.groups()
    if e is None:
        if bits != "4":
            raise FormatError(f"{format_id!r}: say the exponent/mantissa split, e.g. fp{bits}-e2m{int(bits) - 3}-g{g}")
        e, mb = "2", "1"
    if int(bits) != 1 + int(e) + int(mb):
        raise FormatError(f"{format_id!r}: sign + e{e} + m{mb} is not {bits} bits")
    return FPGroupFormat(int(e), int(mb), int(g))


REGISTRY.register("fp", parse_fp, examples=["fp4-g32", "mxfp4", "nvfp4", "fp8", "fp6-e2m3-g64"])

__all__ = ["FPGroupFormat", "MXFP4Format", "NVFP4Format", "FP8Format", "parse_fp", "GROUPS"]
