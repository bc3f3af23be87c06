"""Mixtures of value sets per group, ``mix{b}-g{G}`` (BitMoD-style data-type mixtures).

Every group of ``G`` consecutive input columns of a row picks, by importance-weighted squared error, one of
four ``b``-bit value sets (``2^b`` levels each) and an fp16 scale: ``w ≈ scale[r, g] · sets[k[r, g]][code]``.
The scale may be negative, so each set also serves as its mirror image (BitMoD's ``_pos``/``_neg`` pairs come
free and the four index values go to genuinely different shapes):

* 4 bits (:data:`SETS4`): ``int`` = -8..7 (uniform), ``nl`` = IQ4_NL's codebook / 16 (fitted to LLM weights),
  ``er`` = FP4 E2M1 ×2 with the redundant -0 replaced by +10 (extra resolution between 8 and 12), ``ea`` = the
  same with +16 (extra asymmetric range);
* 3 bits (:data:`SETS3`): ``int`` = -4..3, ``er`` = FP3 {0, ±1, ±2, ±4} + 3, ``ea`` = FP3 + 6, ``lm`` = the 8-level
  Lloyd-Max quantizer of N(0, 1) ×2 in sixteenths (no zero level).

Measured (RTN, SQNR dB, 512x1024 N(0,1) / Laplace, SmolLM2-135M rescaled linears): mix4-g32 (4.5625 bpw)
23.04 / 22.28 / 23.19 (all 210 linears) against IQ4_NL (4.5 bpw) 22.67 / 21.41 / 22.58, the FP-like sets winning
the heavy-tailed groups; mix3-g32 (3.5625 bpw) 16.69 / 15.64 / 16.32 (bench sample) matches int3-g32 (4.0 bpw)
16.59 / 15.22 / 16.33.  Of the 4-bit sets tried, {int, nl, er, ea} was best; sets shifted by whole steps (a
quantized zero point: -8..7, -6..9, -4..11, -2..13) were 1.3 dB worse on SmolLM2.

Exact storage of a ``(rows, cols)`` tensor, ``ng = ceil(cols / G)``, rows padded with zero codes to ``ng·G``:

* ``weight_packed``: the ``b``-bit codes (index within the group's set) of ``(rows, ng·G)`` as one
  :func:`~.packing.pack_bits` stream: ``ceil(rows·ng·G·b / 8)`` bytes;
* ``weight_scale``: fp16 ``(rows, ng)``: ``2·rows·ng`` bytes;
* ``weight_set``: the 2-bit set index of every group, one ``pack_bits`` stream: ``ceil(rows·ng·2 / 8)`` bytes.

Example: ``(4, 64)`` mix4-g32 = 128 + 16 + 2 = 146 bytes (4.5625 bpw).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import NumericsError
from .refit import refit_grid
from .fit import round_fp16
from .base import REGISTRY, Format, FormatError, Grid, QTensor, Shape
from .gguf_common import element_weights, fp16r, grid_error, nearest_fn, search_grid
from .packing import pack_bits, packed_nbytes, unpack_bits

_FP4 = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
_FP4_BASE = tuple(sorted({v for a in _FP4 for v in (a, -a)}))  # 15 values: one of the two zeros is redundant
_FP3_BASE = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: the 8-level Lloyd-Max quantizer of N(0, 1) (±0.245, ±0.756, ±1.344, ±2.152) ×2, rounded to sixteenths
_LLOYD3 = (-69, -43, -24, -8, 8, 24, 43, 69)

#: name -> levels of the 4-bit sets, in set-index order
SETS4: dict[str, tuple[float, ...]] = {
    "int": tuple(float(i) for i in range(-8, 8)),
    "nl": tuple(v / 16.0 for v in _IQ4NL),
    "er": tuple(sorted(_FP4_BASE + (10.0,))),
    "ea": tuple(sorted(_FP4_BASE + (16.0,))),
}
#: name -> levels of the 3-bit sets, in set-index order
SETS3: dict[str, tuple[float, ...]] = {
    "int": tuple(float(i) for i in range(-4, 4)),
    "er": tuple(sorted(_FP3_BASE + (3.0,))),
    "ea": tuple(sorted(_FP3_BASE + (6.0,))),
    "lm": tuple(v / 16.0 for v in _LLOYD3),
}
SETS = {3: SETS3, 4: SETS4}
GROUPS = (32, 64, 128)
INDEX_BITS = 2
_ID = re.compile(r"mix(\d+)-g(\d+)")


@dataclass(frozen=True)
class MixtureFormat(Format):
    """``bits``-bit codes into one of four value sets per group of ``group`` columns, fp16 scale per group."""

    bits: int = 4  # type: ignore[assignment]
    group: int = 32

    def __post_init__(self) -> None:
        if self.bits not in SETS or isinstance(self.bits, bool):
            raise FormatError(f"mixture formats support bits in {sorted(SETS)}, got {self.bits!r}")
        if self.group not in GROUPS or isinstance(self.group, bool):
            raise FormatError(f"mixture formats support groups {GROUPS}, got {self.group!r}")

    @property
    def id(self) -> str:
        return f"mix{self.bits}-g{self.group}"

    @property
    def levels(self) -> torch.Tensor:
        """The value sets, ``(4, 2^bits)`` float32, row ``k`` = set index ``k``."""
        return torch.tensor(list(SETS[self.bits].values()), dtype=torch.float32)

    # --- geometry -----------------------------------------------------------------------------
    def check_shape(self, shape: Shape) -> None:
        shape = tuple(shape)
        self.check_2d(shape)

    def ngroups(self, cols: int) -> int:
        return -(-cols // self.group)

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        rows, cols = (int(d) for d in shape)
        ng = self.ngroups(cols)
        return packed_nbytes(rows * ng * self.group, self.bits) + 2 * rows * ng + packed_nbytes(rows * ng, INDEX_BITS)

    # --- grid ---------------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        """Per group, every set's best fp16 scale (weighted clip search + polish, :func:`.gguf_common.search_grid`),
        then the set of least weighted error."""
        self.check_shape(tuple(w.shape))
        w = w.detach().to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise NumericsError(f"{self.id}: weight of shape {tuple(w.shape)} holds NaN/Inf values")
        rows, cols = (int(d) for d in w.shape)
        gs, ng = self.group, self.ngroups(cols)
        pad = ng * gs - cols
        imp = element_weights(importance, (rows, cols))
        if pad:  # the last column replicated with zero weight (min/max unchanged)
            w = torch.cat([w, w[:, -1:].expand(rows, pad)], 1)
            real = torch.ones(rows, cols, device=w.device) if imp is None else imp
            imp = torch.cat([real, torch.zeros(rows, pad, device=w.device)], 1)
        x = w.reshape(-1, gs)
        wt = None if imp is None else imp.reshape(-1, gs)
        levels = self.levels.to(w.device)
        best_s = best_e = best_k = None
        for k in range(int(levels.shape[0])):
            m = search_multiplier(levels[k])  # levels·m have half-integer midpoints: the fast exact nearest
            lv = levels[k] * m
            s, _ = search_grid(x, wt, lv, symmetric=True, rnd=round_fp16)
            e = grid_error(x, wt, s, torch.zeros_like(s), nearest_fn(lv))
            s = fp16r(s * m)  # exact (m a power of two) unless it leaves the fp16 range
            if best_e is None:
                best_s, best_e, best_k = s, e, torch.zeros_like(s, dtype=torch.int64)
            else:
                better = e < best_e
                best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
                best_k = torch.where(better, torch.full_like(best_k, k), best_k)
        assert best_s is not None and best_k is not None
        scale = best_s.reshape(rows, ng)
        return Grid(scale, torch.zeros_like(scale), levels, gs, set_index=best_k.reshape(rows, ng))

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        """Least-squares fp16 scales for the codes under the Hessian (sets fixed); padded shapes keep theirs."""
        return self.refine_measured(w, codes, grid, hessian)[0]

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor | None]:
        if int(w.shape[1]) % self.group:
            return grid, None
        return refit_grid(w, codes, grid, hessian, offset=False, rnd=fp16r)

    def _check_grid(self, grid: Grid, rows: int, ng: int) -> None:
        if grid.group_size != self.group or tuple(grid.scale.shape) != (rows, ng) or grid.set_index is None \
                or tuple(grid.set_index.shape) != (rows, ng):
            raise FormatError(f"{self.id}: grid (group {grid.group_size}, scale {tuple(grid.scale.shape)}) is not "
                              f"one of this format's for {rows} rows of {ng} groups")
        if grid.levels.shape != self.levels.shape or not torch.equal(grid.levels.float(), self.levels):
            raise FormatError(f"{self.id}: grid levels are not this format's value sets")
        if not torch.equal(fp16r(grid.scale), grid.scale) or bool((grid.offset != 0).any()):
            raise FormatError(f"{self.id}: grid scales are not fp16 values or its offsets are not zero")

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        """Packed codes, fp16 scales and packed set indices, built on the CPU."""
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        rows, cols = shape
        ng, gs = self.ngroups(cols), self.group
        codes, grid = codes.cpu(), grid.to("cpu")
        if tuple(codes.shape) != shape:
            raise FormatError(f"{self.id}: codes of shape {tuple(codes.shape)} do not match the tensor shape {shape}")
        self._check_grid(grid, rows, ng)
        full = torch.zeros(rows, ng * gs, dtype=torch.int64)
        full[:, :cols] = codes
        parts = {"weight_packed": pack_bits(full, self.bits),
                 "weight_scale": grid.scale.to(torch.float16).contiguous(),
                 "weight_set": pack_bits(grid.set_index, INDEX_BITS)}
        return QTensor(format=self.id, shape=shape, dtype=dtype, parts=parts)

    def _expect(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        ng = self.ngroups(cols)
        return {"weight_packed": (torch.uint8, (packed_nbytes(rows * ng * self.group, self.bits),)),
                "weight_scale": (torch.float16, (rows, ng)),
                "weight_set": (torch.uint8, (packed_nbytes(rows * ng, INDEX_BITS),))}

    def _check_parts(self, q: QTensor, rows: int, cols: int) -> None:
        self.check_parts(q, self._expect(rows, cols))

    def _parse(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """The padded codes (rows, ng·G) and the grid of a stored tensor, checked."""
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        shape = tuple(int(d) for d in q.shape)
        self.check_shape(shape)
        rows, cols = shape
        ng, gs = self.ngroups(cols), self.group
        self._check_parts(q, rows, cols)
        codes = unpack_bits(q.parts["weight_packed"], self.bits, rows * ng * gs).reshape(rows, ng * gs)
        sets = unpack_bits(q.parts["weight_set"], INDEX_BITS, rows * ng).reshape(rows, ng)
        scale = q.parts["weight_scale"].to(torch.float32)
        return codes, Grid(scale, torch.zeros_like(scale), self.levels, gs, set_index=sets)

    def decode(self, q: QTensor) -> torch.Tensor:
        codes, grid = self._parse(q)
        return grid.values(codes)[:, :int(q.shape[1])]

    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """Codes (rows, cols) and the grid :meth:`fit` would build (fp16 scales, offset 0, the set indices)."""
        codes, grid = self._parse(q)
        return codes[:, :int(q.shape[1])].contiguous(), grid

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor: scales stack; the code and set-index streams join on byte boundaries, so
        every part but the last must hold a multiple of 4 rows (any multiple of 8 works)."""
        rows, cols, dtype = self._check_concat(parts)
        ng = self.ngroups(cols)
        for p in parts[:-1]:
            if int(p.shape[0]) * ng * INDEX_BITS % 8:
                raise FormatError(f"{self.id}: a part of {int(p.shape[0])} rows x {cols} columns does not end on a "
                                  f"byte boundary; split at multiples of 8 rows")
        for p in parts:
            self._check_parts(p, int(p.shape[0]), cols)
        out = {name: torch.cat([p.parts[name] for p in parts]) for name in parts[0].parts}
        return QTensor(format=self.id, shape=(rows, cols), dtype=dtype, parts=out)


def search_multiplier(levels: torch.Tensor) -> float:
    """The smallest power of two ``m <= 256`` making every midpoint of ``levels·m`` a multiple of 1/2 (so
    :func:`.gguf_common.nearest_fn` takes its table path); 1 when none does."""
    for e in range(9):
        m = float(1 << e)
        m2 = (levels[1:] + levels[:-1]) * m
        if bool((m2 == torch.round(m2)).all()):
            return m
    return 1.0


def parse_mixture(format_id: str) -> MixtureFormat | None:
    """``mix4-g32`` -> :class:`MixtureFormat`; other families -> None (a malformed ``mix`` id: FormatError)."""
    key = format_id.strip().lower()
    m = _ID.fullmatch(key)
    if m is None:
        if key.startswith("mix") and "-dq" not in key:  # mix…-dq ids: .mixture_dq
            raise FormatError(f"malformed mixture format id {format_id!r}; expected mix{{3,4}}-g{{32,64,128}}, "
                              f"e.g. mix4-g32")
        return None
    return MixtureFormat(int(m.group(1)), int(m.group(2)))


REGISTRY.register("mixture", parse_mixture, examples=["mix4-g32", "mix4-g64", "mix3-g64"])

__all__ = ["MixtureFormat", "parse_mixture", "SETS", "SETS3", "SETS4", "GROUPS"]
