"""Shared pieces of the GGUF block types: the base class, fp16 helpers, weights and local refinement.

Every GGUF type stores a 2-D tensor row by row; a row (``cols`` = GGUF ``ne0``, the contiguous dim) is cut
into blocks of ``block_size`` (32 or 256) elements of ``type_size`` bytes each, exactly as
``gguf.GGML_QUANT_SIZES`` says.  ``weight_packed`` is the uint8 ``(rows, cols / block * type_size)`` array
of raw llama.cpp blocks, so a writer copies it into a GGUF file unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import NumericsError
from ..rounding.rtn import minmax_affine, round_fp16, snap_affine
from .base import Format, FormatError, QTensor, Shape

FP16_MAX = 65504.0


def fp16r(x: torch.Tensor) -> torch.Tensor:
    """Nearest fp16 value of ``x`` as float32 (saturating at ±65504, never inf)."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 little-endian bytes of ``x`` (..., n) -> uint8 (..., 2n)."""
    h = fp16r(x).to(torch.float16).contiguous()
    b = h.view(torch.uint8).reshape(*x.shape[:-1], x.shape[-1] * 2)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        b = b.reshape(*x.shape, 2).flip(-1).reshape(b.shape)
    return b


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2n) little-endian fp16 -> float32 (..., n)."""
    b = b.contiguous()
    if not _LITTLE:  # pragma: no cover
        b = b.reshape(*b.shape[:-1], -1, 2).flip(-1).reshape(b.shape).contiguous()
    return b.view(torch.float16).to(torch.float32)


_LITTLE = bool(torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0] == 1)


def nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Pack two int tensors of 4-bit values into bytes ``lo | hi << 4``."""
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8)


def bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8k) 0/1 values -> (..., k) bytes, bit i of byte j = bits[..., 8j + i] (little bit order)."""
    sh = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32)
    return (sh << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def element_weights(importance: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """Per-element weights of the scale search: None, or ``importance`` (cols,) / (rows, cols) as float32.

    A tiny floor (1e-6 of the mean) keeps every group's least-squares system well-posed when an
    importance vector has exact zeros (dead input channels).
    """
    if importance is None:
        return None
    imp = importance.detach().to(torch.float32)
    if imp.dim() == 1 and imp.shape[0] == shape[1]:
        imp = imp.unsqueeze(0).expand(shape)
    elif tuple(imp.shape) != tuple(shape):
        raise FormatError(f"importance of shape {tuple(importance.shape)} does not fit weights {tuple(shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise NumericsError("importance must be finite and non-negative")
    mean = float(imp.mean()) if imp.numel() else 0.0
    return imp + (1e-6 * mean if mean > 0 else 1.0)


def check_weights(w: torch.Tensor, fmt_id: str) -> torch.Tensor:
    if w.dim() != 2:
        raise FormatError(f"{fmt_id}: expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise NumericsError(f"{fmt_id}: weights hold NaN/Inf values")
    return w


RoundFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_CHUNK = 1 << 22


def _nearest_fn(levels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """u -> nearest level value (round-and-clamp for consecutive integers, bisection otherwise)."""
    lo, hi = float(levels[0]), float(levels[-1])
    if bool((levels[1:] - levels[:-1] == 1).all()) and lo == round(lo):
        return lambda u: torch.clamp(torch.round(u), lo, hi)
    mids = ((levels[1:] + levels[:-1]) * 0.5).contiguous()
    return lambda u: levels[torch.searchsorted(mids, u.contiguous())]


def _ls(x, w1, q, s, o, symmetric: bool, nonpos_offset: bool):
    """Weighted least-squares (scale, offset) over the last dim given level values q; old values if singular."""
    sxx, sxy = (w1 * q * q).sum(-1), (w1 * q * x).sum(-1)
    ok1 = sxx > 0
    s_only = torch.where(ok1, sxy / torch.where(ok1, sxx, torch.ones_like(sxx)), s)
    if symmetric:
        return s_only, o
    sw, sq, sy = w1.sum(-1), (w1 * q).sum(-1), (w1 * x).sum(-1)
    det = sw * sxx - sq * sq
    ok = det > 1e-9 * (sw * sxx).clamp_min(1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    s2 = torch.where(ok, (sw * sxy - sq * sy) / safe, s)
    o2 = torch.where(ok, (sy - s2 * sq) / sw, o)
    if nonpos_offset:  # K-quant mins are stored as non-negative integers: offset <= 0
        pos = o2 > 0
        s2, o2 = torch.where(pos, s_only, s2), torch.where(pos, torch.zeros_like(o2), o2)
    return s2, o2


def _candidates(x, levels, symmetric: bool, k: int):
    """Candidate (scale, offset) per group (g, K): scale ratios around min-max, anchored low/high/mid."""
    lmin, lmax = float(levels[0]), float(levels[-1])
    n_eff = (lmax - lmin) / (2.0 if symmetric else 1.0)
    delta = torch.linspace(-1.0, 1.0 + 0.15 * n_eff, k - 1)
    r = torch.cat([torch.ones(1), (n_eff + delta) / n_eff])  # > 1: clip the extremes
    if symmetric:
        m = x.gather(1, x.abs().argmax(1, keepdim=True))
        ss = [m / (t * r) for t in (lmin, lmax) if t != 0]
        s = torch.cat(ss, 1)
        return s, torch.zeros_like(s)
    xmin, xmax = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    s = (xmax - xmin) / ((lmax - lmin) * r)
    mid = (xmax + xmin) * 0.5 - s * (lmax + lmin) * 0.5
    return s.repeat(1, 3), torch.cat([xmin - s * lmin, xmax - s * lmax, mid], 1)


def search_grid(
    x: torch.Tensor, wt: torch.Tensor | None, levels: torch.Tensor, *, symmetric: bool, rnd: RoundFn,
    nonpos_offset: bool = False, k: int = 16, polish: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per group of ``x`` (n, g) minimising ``Σ wt·(x - scale·level - offset)²``.

    Every candidate of :func:`_candidates` gets RTN codes, a weighted least-squares refit, ``rnd`` (what is
    stored: fp16, or the identity for K-quant sub-scales) and its true error; the best wins, then ``polish``
    rounds of codes -> refit -> ``rnd`` (also trying the fp16 neighbours) keep any improvement.  The min-max
    grid is always a candidate, so the result is never worse than min-max RTN.
    """
    n, g = x.shape
    near = _nearest_fn(levels)
    s_out, o_out = torch.empty(n), torch.empty(n)
    per = max(1, _CHUNK // (g * k * (1 if symmetric else 3)))
    for a in range(0, n, per):
        xs = x[a:a + per]
        w1 = torch.ones_like(xs) if wt is None else wt[a:a + per]
        s, o = _candidates(xs, levels, symmetric, k)
        s_mm, o_mm = minmax_affine(xs, levels, symmetric=symmetric, round_params=rnd)
        s, o = rnd(torch.cat([s, s_mm.unsqueeze(1)], 1), torch.cat([o, o_mm.unsqueeze(1)], 1))
        x3, w3 = xs.unsqueeze(1), w1.unsqueeze(1)

        def err_of(s_, o_):
            s3, o3 = s_.unsqueeze(2), o_.unsqueeze(2)
            q_ = near(torch.where(s3 == 0, 0.0, (x3 - o3) / torch.where(s3 == 0, 1.0, s3)))
            return (w3 * (x3 - s3 * q_ - o3) ** 2).sum(-1), q_

        e0, q = err_of(s, o)
        s2, o2 = rnd(*_ls(x3, w3, q, s, o, symmetric, nonpos_offset))
        e2, _ = err_of(s2, o2)
        better = e2 < e0
        s, o, e = torch.where(better, s2, s), torch.where(better, o2, o), torch.where(better, e2, e0)
        i = e.argmin(1, keepdim=True)
        s_out[a:a + per], o_out[a:a + per] = s.gather(1, i).squeeze(1), o.gather(1, i).squeeze(1)
    return polish_grid(x, wt, levels, s_out, o_out, symmetric, rnd, nonpos_offset, polish)


def polish_grid(
    x: torch.Tensor, wt: torch.Tensor | None, levels: torch.Tensor, s: torch.Tensor, o: torch.Tensor,
    symmetric: bool, rnd: RoundFn, nonpos_offset: bool = False, iters: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate descent on groups ``x`` (n, g): codes -> weighted LS refit -> ``rnd`` -> codes, kept if better.

    With fp16 rounding it also tries the neighbouring fp16 values of the new scale, which rounding never sees.
    """
    w1 = torch.ones_like(x) if wt is None else wt

    def err(s_, o_):
        _, v = snap_affine(x, s_, o_, levels)
        return (w1 * (x - v) ** 2).sum(1)

    best = err(s, o)
    for _ in range(iters):
        codes, _ = snap_affine(x, s, o, levels)
        s2, o2 = rnd(*_ls(x, w1, levels[codes], s, o, symmetric, nonpos_offset))
        cands = [(s2, o2)]
        if rnd is round_fp16:
            h = s2.to(torch.float16)
            for step in (1, -1):
                nb = torch.nextafter(h, torch.full_like(h, step * math.inf)).to(torch.float32)
                cands.append((torch.where(torch.isfinite(nb), nb, s2), o2))
        improved = False
        for cs, co in cands:
            e = err(cs, co)
            better = e < best
            improved = improved or bool(better.any())
            s, o, best = torch.where(better, cs, s), torch.where(better, co, o), torch.where(better, e, best)
        if not improved:
            break
    return s, o


@dataclass(frozen=True)
class GGUFFormat(Format):
    """Base of every GGUF block type: exact bytes, shape rule, ``gguf_type`` for the writer."""

    name: str

    #: subclass tables: name -> spec
    def __post_init__(self) -> None:
        if self.name not in self._specs():
            raise FormatError(f"unknown GGUF type {self.name!r} for {type(self).__name__}")

    @classmethod
    def _specs(cls) -> dict:
        raise NotImplementedError

    @property
    def spec(self):
        return self._specs()[self.name]

    @property
    def id(self) -> str:
        return self.name

    @property
    def gguf_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name.upper()]

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.gguf_type][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.gguf_type][1]

    @property
    def bits(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def check_shape(self, shape: Shape) -> None:
        super().check_shape(shape)
        if len(shape) != 2:
            raise FormatError(f"{self.id}: GGUF block types store 2-D tensors, got shape {tuple(shape)}")
        if int(shape[1]) % self.block_size:
            raise FormatError(
                f"{self.id}: row length {shape[1]} (the contiguous dim) is not a multiple of the block size "
                f"{self.block_size}"
            )

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        return int(shape[0]) * (int(shape[1]) // self.block_size) * self.type_size

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size

    def blocks_of(self, q: QTensor) -> torch.Tensor:
        """The raw blocks of a stored tensor as uint8 (rows * nblocks, type_size), validated."""
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        self.check_shape(tuple(q.shape))
        raw = q.parts.get("weight_packed")
        rows, cols = int(q.shape[0]), int(q.shape[1])
        if raw is None or raw.dtype != torch.uint8 or raw.numel() != rows * self.row_bytes(cols):
            raise FormatError(f"{self.id}: weight_packed must be uint8 of {rows * self.row_bytes(cols)} bytes")
        return raw.reshape(-1, self.type_size)

    def packed(self, blocks: torch.Tensor, shape: Shape, dtype: str) -> QTensor:
        rows, cols = int(shape[0]), int(shape[1])
        raw = blocks.to(torch.uint8).reshape(rows, self.row_bytes(cols)).contiguous()
        return QTensor(self.id, (rows, cols), dtype, {"weight_packed": raw})

    def check_codes(self, codes: torch.Tensor, shape: Shape, nlevels: int) -> torch.Tensor:
        self.check_shape(tuple(shape))
        if tuple(codes.shape) != tuple(shape):
            raise FormatError(f"{self.id}: codes of shape {tuple(codes.shape)} do not match {tuple(shape)}")
        codes = codes.to(torch.int64)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= nlevels):
            raise FormatError(f"{self.id}: codes outside 0..{nlevels - 1}")
        return codes
