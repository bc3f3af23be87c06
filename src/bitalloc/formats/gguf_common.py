"""Shared pieces of the GGUF block types: the base class, fp16 helpers, weights and local refinement.

Every GGUF type stores a 2-D tensor row by row; a row (``cols`` = GGUF ``ne0``, the contiguous dim) is cut
into blocks of ``block_size`` (32 or 256) elements of ``type_size`` bytes each, exactly as
``gguf.GGML_QUANT_SIZES`` says.  ``weight_packed`` is the uint8 ``(rows, cols / block * type_size)`` array
of raw llama.cpp blocks, so a writer copies it into a GGUF file unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import NumericsError
from .fit import all_finite, minmax_affine, round_fp16
from .base import DECODE_CHUNK_ELEMS, Format, FormatError, QTensor, Shape

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
    return (sh << torch.arange(8, dtype=torch.int32, device=bits.device)).sum(-1).to(torch.uint8)


def element_weights(importance: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """Per-element weights of the scale search: None, or ``importance`` (cols,) / (rows, cols) as float32.

    A tiny floor (1e-6 of the mean) keeps every group's least-squares system well-posed when an
    importance vector has exact zeros (dead input channels).
    """
    if importance is None:
        return None
    imp = importance.detach().to(torch.float32)
    if not (imp.dim() == 1 and imp.shape[0] == shape[1]) and tuple(imp.shape) != tuple(shape):
        raise FormatError(f"importance of shape {tuple(importance.shape)} does not fit weights {tuple(shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise NumericsError("importance must be finite and non-negative")
    mean = float(imp.mean()) if imp.numel() else 0.0
    imp = imp + (1e-6 * mean if mean > 0 else 1.0)
    return imp.unsqueeze(0).expand(shape) if imp.dim() == 1 else imp  # a view: no (rows, cols) copy


def check_weights(w: torch.Tensor, fmt_id: str) -> torch.Tensor:
    if w.dim() != 2:
        raise FormatError(f"{fmt_id}: expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    if not all_finite(w):
        raise NumericsError(f"{fmt_id}: weights hold NaN/Inf values")
    return w


RoundFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
NearFn = Callable[[torch.Tensor], torch.Tensor]
#: elements of one (groups, candidates, group) work tensor: small enough to stay in cache
_CHUNK = 1 << 18
#: elements of one slab searched and polished together (bounds the memory of large tensors)
_OUTER = 1 << 21


def nearest_fn(levels: torch.Tensor) -> NearFn:
    """``u -> nearest level value`` for a sorted codebook (ties: the lower level, as Grid.snap); ``u`` is kept.

    Consecutive integer levels use round-and-clamp; codebooks whose midpoints are multiples of 1/2 (IQ4_NL)
    use an exact table on ``ceil(2u)``; anything else falls back to bisection.
    """
    lo, hi = float(levels[0]), float(levels[-1])
    if bool((levels[1:] - levels[:-1] == 1).all()) and lo == round(lo):
        return lambda u: torch.clamp(u, lo, hi).round_()
    mids = ((levels[1:] + levels[:-1]) * 0.5).contiguous()
    m2 = mids * 2
    if bool((m2 == torch.round(m2)).all()) and float(m2[-1] - m2[0]) < 1 << 16:
        a, b = int(m2[0]), int(m2[-1]) + 1
        t = torch.arange(a, b + 1, dtype=torch.float32, device=levels.device)
        table = levels[torch.searchsorted(m2, t, right=False)]  # count of mids with 2*mid < t

        def near_table(u: torch.Tensor) -> torch.Tensor:
            idx = torch.mul(u, 2).ceil_().clamp_(a, b).sub_(a).to(torch.int32)  # int64 casts are slow
            return table.index_select(0, idx.reshape(-1)).reshape(idx.shape)  # ~3x faster than table[idx]
        return near_table
    return lambda u: levels[torch.searchsorted(mids, u.contiguous())]


def _scaled(x: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``(x - o) / s`` per element of ``x`` (..., g) for scale/offset (...) as ``x·(1/s) - o/s``; 0 where s == 0."""
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    return (x * inv.unsqueeze(-1)).add_((-o * inv).unsqueeze(-1))  # (addcmul is slow on broadcast shapes)


def rowsum(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(-1)``.  (A BLAS matrix-vector product is faster but rounds rows differently by position, which
    would break the byte-identity of row-chunked fits.)"""
    return t.sum(-1)


def level_values(x: torch.Tensor, s: torch.Tensor, o: torch.Tensor, near: NearFn) -> torch.Tensor:
    """Nearest level value per element of ``x`` (..., g) for scale/offset (...) (zero scale -> ``near(0)``)."""
    return near(_scaled(x, s, o))


def grid_error(x, wt, s, o, near: NearFn) -> torch.Tensor:
    """``Σ_g wt·(x - s·near((x - o)/s) - o)²`` over the last dim; ``wt`` None means unit weights.

    Computed in code units, ``s²·Σ wt·(near(u) - u)²`` with ``u = (x - o)/s``: no division and fewer passes
    over the (groups, candidates, group) tensor than decoding; groups with a zero scale get ``Σ wt·(x - o)²``.
    """
    u = _scaled(x, s, o)
    d = near(u).sub_(u).square_()
    if wt is not None:
        d.mul_(wt)
    e = rowsum(d).mul_(s * s)
    zero = s == 0
    if bool(zero.any()):
        r = (x - o.unsqueeze(-1)).square_()
        e = torch.where(zero, rowsum(r if wt is None else r.mul_(wt)), e)
    return e


def _ls(x, w1, q, s, o, symmetric: bool, nonpos_offset: bool):
    """Weighted least-squares (scale, offset) over the last dim given level values q; old values if singular."""
    wq = q if w1 is None else w1 * q
    sxx, sxy = rowsum(wq * q), rowsum(wq * x)
    ok1 = sxx > 0
    s_only = torch.where(ok1, sxy / torch.where(ok1, sxx, torch.ones_like(sxx)), s)
    if symmetric:
        return s_only, o
    if w1 is None:
        sw, sq, sy = torch.full_like(sxx, x.shape[-1]), rowsum(q), rowsum(x).expand_as(sxx)
    else:
        sw, sq, sy = rowsum(w1).expand_as(sxx), rowsum(wq), rowsum(w1 * x).expand_as(sxx)
    det = sw * sxx - sq * sq
    ok = det > 1e-9 * (sw * sxx).clamp_min(1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    s2 = torch.where(ok, (sw * sxy - sq * sy) / safe, s)
    o2 = torch.where(ok, (sy - s2 * sq) / sw, o)
    if nonpos_offset:  # K-quant mins are stored as non-negative integers: offset <= 0
        pos = o2 > 0
        s2, o2 = torch.where(pos, s_only, s2), torch.where(pos, torch.zeros_like(o2), o2)
    return s2, o2


def _params(x, levels, symmetric: bool, delta: torch.Tensor):
    """Candidate (scale, offset) (n, A, K) for clip ratios ``delta`` (1 or n, K): A anchors low/high(/mid).

    ``delta`` is in units of one quantisation step around the min-max grid (> 0 clips the extremes).
    """
    lmin, lmax = float(levels[0]), float(levels[-1])
    n_eff = (lmax - lmin) / (2.0 if symmetric else 1.0)
    r = ((n_eff + delta) / n_eff).unsqueeze(1)  # (., 1, K)
    if symmetric:
        m = x.gather(1, x.abs().argmax(1, keepdim=True)).unsqueeze(2)  # (n, 1, 1) signed extreme
        t = torch.tensor([v for v in (lmin, lmax) if v != 0], device=x.device).reshape(1, -1, 1)
        s = m / (t * r)
        return s, torch.zeros_like(s)
    xmin, xmax = x.amin(1, keepdim=True).unsqueeze(2), x.amax(1, keepdim=True).unsqueeze(2)
    s = ((xmax - xmin) / ((lmax - lmin) * r)).expand(-1, 3, -1)
    o = torch.cat([xmin - s[:, :1] * lmin, xmax - s[:, :1] * lmax,
                   (xmax + xmin) * 0.5 - s[:, :1] * (lmax + lmin) * 0.5], 1)
    return s, o


def search_grid(
    x: torch.Tensor, wt: torch.Tensor | None, levels: torch.Tensor, *, symmetric: bool, rnd: RoundFn,
    nonpos_offset: bool = False, k: int | None = None, fine: int = 4, top: int | None = None, polish: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per group of ``x`` (n, g) minimising ``Σ wt·(x - scale·level - offset)²``.

    Coarse-to-fine clip search: ``k`` clip ratios per anchor (plus the min-max grid) get RTN codes under
    ``rnd`` (what is stored: fp16, or the identity for K-quant sub-scales) and their true error; ``fine``
    ratios between the best one's neighbours follow; the ``top`` best candidates then get a weighted
    least-squares refit (kept where it lowers the error), and :func:`polish_grid` finishes.  The min-max
    grid is always a candidate, so the result is never worse than min-max RTN.  Defaults (measured on
    N(0,1)/Laplace data, weighted and not): ``k = top = 8`` symmetric, ``k = top = 12`` affine.
    """
    n, g = x.shape
    if n * g > _OUTER:  # bounded memory: search and polish one slab of groups at a time
        step = max(1, _OUTER // g)
        parts = [search_grid(x[a:a + step], None if wt is None else wt[a:a + step], levels, symmetric=symmetric,
                             rnd=rnd, nonpos_offset=nonpos_offset, k=k, fine=fine, top=top, polish=polish)
                 for a in range(0, n, step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    k = k if k is not None else (8 if symmetric else 12)
    top = top if top is not None else (8 if symmetric else 12)
    if k < 2 or fine < 0 or top < 1:
        raise ValueError(f"search_grid: need k >= 2, fine >= 0, top >= 1 (got {k}, {fine}, {top})")
    dev = x.device
    levels = levels.to(dev)
    near = nearest_fn(levels)
    lmin, lmax = float(levels[0]), float(levels[-1])
    n_eff = (lmax - lmin) / (2.0 if symmetric else 1.0)
    span = 2.0 + 0.15 * n_eff
    coarse = torch.linspace(-1.0, 1.0 + 0.15 * n_eff, k, device=dev).unsqueeze(0)
    h = span / (k - 1)
    steps = torch.linspace(-h, h, fine + 2, device=dev)[1:-1] if fine else torch.zeros(0, device=dev)
    s_out, o_out = torch.empty(n, device=dev), torch.empty(n, device=dev)
    A = 1 if symmetric else 3
    s_mm_all, o_mm_all = minmax_affine(x, levels, symmetric=symmetric, round_params=rnd)
    per = max(1, _CHUNK // (g * (A * k + 1)))
    for a in range(0, n, per):
        xs = x[a:a + per]
        m = xs.shape[0]
        w3 = None if wt is None else wt[a:a + per].unsqueeze(1)
        x3 = xs.unsqueeze(1)
        s, o = _params(xs, levels, symmetric, coarse)
        s_mm, o_mm = s_mm_all[a:a + per], o_mm_all[a:a + per]
        s, o = rnd(torch.cat([s.reshape(m, -1), s_mm.unsqueeze(1)], 1), torch.cat([o.reshape(m, -1), o_mm.unsqueeze(1)], 1))
        e = grid_error(x3, w3, s, o, near)
        if fine:
            i = e[:, :-1].argmin(1, keepdim=True)
            anchor, j = i // k, i % k
            d = coarse[0][j] + steps.unsqueeze(0)  # (m, fine)
            sf, of = _params(xs, levels, symmetric, d)
            idx = anchor.unsqueeze(2).expand(-1, 1, fine)
            sf, of = rnd(sf.gather(1, idx).squeeze(1), of.gather(1, idx).squeeze(1))
            ef = grid_error(x3, w3, sf, of, near)
            s, o, e = torch.cat([s, sf], 1), torch.cat([o, of], 1), torch.cat([e, ef], 1)
        tk = min(top, e.shape[1])
        et, it = e.topk(tk, dim=1, largest=False)
        st, ot = s.gather(1, it), o.gather(1, it)
        q = level_values(x3, st, ot, near)
        s2, o2 = rnd(*_ls(x3, w3, q, st, ot, symmetric, nonpos_offset))
        e2 = grid_error(x3, w3, s2, o2, near)
        better = e2 < et
        st, ot, et = torch.where(better, s2, st), torch.where(better, o2, ot), torch.where(better, e2, et)
        b = et.argmin(1, keepdim=True)
        s_out[a:a + per], o_out[a:a + per] = st.gather(1, b).squeeze(1), ot.gather(1, b).squeeze(1)
    return polish_grid(x, wt, levels, s_out, o_out, symmetric, rnd, nonpos_offset, polish)


def polish_grid(
    x: torch.Tensor, wt: torch.Tensor | None, levels: torch.Tensor, s: torch.Tensor, o: torch.Tensor,
    symmetric: bool, rnd: RoundFn, nonpos_offset: bool = False, iters: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate descent on groups ``x`` (n, g): codes -> weighted LS refit -> ``rnd`` -> codes, kept if better.

    With fp16 rounding it also tries the neighbouring fp16 values of the new scale, which rounding never sees.
    Stops early once a round improves no group.
    """
    near = nearest_fn(levels)
    best = grid_error(x, wt, s, o, near)
    for _ in range(iters):
        q = level_values(x, s, o, near)
        s2, o2 = rnd(*_ls(x, wt, q, s, o, symmetric, nonpos_offset))
        cands = [(s2, o2)]
        if rnd is round_fp16:
            hh = s2.to(torch.float16)
            for step in (1, -1):
                nb = torch.nextafter(hh, torch.full_like(hh, step * math.inf)).to(torch.float32)
                cands.append((torch.where(torch.isfinite(nb), nb, s2), o2))
        improved = False
        for cs, co in cands:
            e = grid_error(x, wt, cs, co, near)
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

    def decode(self, q: QTensor, max_elems: int = DECODE_CHUNK_ELEMS) -> torch.Tensor:
        """float32 values, :meth:`decode_blocks` of at most ``max_elems`` values' blocks at a time into the result
        (blocks are decoded independently, so the values are those of decoding every block at once)."""
        b = self.blocks_of(q)
        out = torch.empty(b.shape[0], self.block_size, dtype=torch.float32, device=b.device)
        per = max(1, max_elems // self.block_size)
        for i in range(0, b.shape[0], per):
            out[i:i + per] = self.decode_blocks(b[i:i + per])
        return out.reshape(int(q.shape[0]), int(q.shape[1]))

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        """float32 values ``(n, block_size)`` of ``n`` raw blocks ``(n, type_size)`` uint8."""
        raise NotImplementedError

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

    def exact_blocks(self, q: QTensor) -> torch.Tensor:
        """:meth:`blocks_of` for a tensor holding exactly the parts :meth:`encode` writes (``weight_packed``
        uint8 ``(rows, row bytes)``, nothing else): what :meth:`~.base.Format.unpack` needs to give them back."""
        blocks = self.blocks_of(q)
        rows, cols = int(q.shape[0]), int(q.shape[1])
        self.check_parts(q, {"weight_packed": (torch.uint8, (rows, self.row_bytes(cols)))})
        return blocks

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor: every row holds whole blocks, so the raw rows simply stack."""
        rows, cols, dtype = self._check_concat(parts)
        raw = torch.cat([self.blocks_of(p).reshape(int(p.shape[0]), self.row_bytes(cols)) for p in parts])
        return QTensor(self.id, (rows, cols), dtype, {"weight_packed": raw.contiguous()})

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
