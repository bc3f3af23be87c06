"""What the formats with integer group scales under one fp16 super-scale per row share (:mod:`.int_dq`,
:mod:`.mixture_dq`): their id fields, geometry, byte count, row-aligned parts, row packing of small integers,
the super-scale search, and the checks of encode/unpack.

Such a format stores every part as 2-D with one row per tensor row, each row starting on a byte boundary, so row
blocks stack (:meth:`RowSuperScaled.concat_rows`).  Subclasses are frozen dataclasses with ``bits``, ``group`` and
``sbits`` fields; they define ``_part_shapes(rows, cols)`` (name -> (dtype, 2-D shape)) and ``FAMILY`` / the
allowed values for the one-line refusals.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from .base import Format, FormatError, QTensor, Shape
from .gguf_common import bits_to_bytes, check_weights, element_weights, fp16r
from .packing import unpack_bits

#: candidate super-scales per row, as multiples of (largest group value / largest integer)
_SUPER_STEPS = 41
#: elements of the weight fitted at once
_FIT_ELEMS = 1 << 20


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b``, 0 where ``b`` is 0."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def super_search(vals: torch.Tensor, wgt: torch.Tensor, hi: int) -> torch.Tensor:
    """fp16 ``d`` (R,) minimising ``Σ_g wgt·(vals - d·clamp(round(vals/d), 0, hi))²`` over candidates around
    ``max(vals) / hi`` (vals >= 0, (R, ng))."""
    top = vals.amax(1, keepdim=True)
    f = torch.linspace(0.6, 1.4, _SUPER_STEPS, device=vals.device)
    cand = fp16r(top / (hi * f))  # (R, K)
    ints = torch.clamp(torch.round(safe_div(vals.unsqueeze(1), cand.unsqueeze(2))), 0, hi)
    err = (wgt.unsqueeze(1) * (vals.unsqueeze(1) - cand.unsqueeze(2) * ints) ** 2).sum(2)
    return cand.gather(1, err.argmin(1, keepdim=True)).squeeze(1)


def _bits_of(bytes_: torch.Tensor) -> torch.Tensor:
    """uint8 (R, n) -> (R, 8n) 0/1 int64, bit i of byte j at 8j + i (the pack_bits order)."""
    return ((bytes_.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1).reshape(bytes_.shape[0], -1)


def pack_row_ints(v: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) ``bits``-bit integers -> (rows, ceil(n*bits/8)) bytes, each row one pack_bits stream (the last
    byte's unused high bits zero), so row blocks stack."""
    rows, n = v.shape
    b = ((v.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(rows, n * bits)
    b = torch.cat([b, torch.zeros(rows, (-n * bits) % 8, dtype=b.dtype)], 1)
    return bits_to_bytes(b).reshape(rows, -1)


def unpack_row_ints(b: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_row_ints`: (rows, n) int64."""
    v = _bits_of(b)[:, :n * bits].reshape(b.shape[0], n, bits)
    return (v << torch.arange(bits)).sum(-1)


#: the scale bits an id without a number after ``-dq`` means
DEFAULT_SCALE_BITS = 6


class RowSuperScaled(Format):
    """Shared ids, geometry and checks; see the module docstring for what a subclass provides."""

    bits: int
    group: int
    sbits: int
    #: the id's prefix before the bits ("int", "mix")
    PREFIX: str = ""
    #: e.g. "double-quantized integer": names the family in refusals
    FAMILY: str = ""
    #: field name -> allowed values
    ALLOWED: dict[str, tuple[int, ...]] = {}
    #: two ids shown when one is malformed
    EXAMPLES: tuple[str, str] = ("", "")

    def __post_init__(self) -> None:
        for name, allowed in self.ALLOWED.items():
            val = getattr(self, name)
            if isinstance(val, bool) or val not in allowed:
                raise FormatError(f"{self.FAMILY} formats support {name} in {allowed}, got {val!r}")

    @property
    def id(self) -> str:
        tail = "" if self.sbits == DEFAULT_SCALE_BITS else str(self.sbits)
        return f"{self.PREFIX}{self.bits}-g{self.group}-dq{tail}"

    @classmethod
    def parse(cls, format_id: str) -> "RowSuperScaled | None":
        """``{PREFIX}{bits}-g{group}-dq[{sbits}]`` -> the format; ids of other families -> None; a malformed
        ``-dq`` id of this prefix -> one-line FormatError."""
        key = format_id.strip().lower()
        if not (key.startswith(cls.PREFIX) and "-dq" in key):
            return None
        m = re.fullmatch(rf"{cls.PREFIX}(\d+)-g(\d+)-dq(\d*)", key)
        if m is None:
            a = cls.ALLOWED
            raise FormatError(f"malformed {cls.FAMILY} format id {format_id!r}; expected e.g. {cls.EXAMPLES[0]}, "
                              f"{cls.EXAMPLES[1]} (bits {a['bits']}, groups {a['group']}, scale bits {a['sbits']})")
        bits, group, sbits = m.groups()
        return cls(int(bits), int(group), int(sbits) if sbits else DEFAULT_SCALE_BITS)  # type: ignore[call-arg]

    def _part_shapes(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
        raise NotImplementedError

    def check_shape(self, shape: Shape) -> None:
        self.check_2d(shape)

    def ngroups(self, cols: int) -> int:
        return -(-cols // self.group)

    def nbytes(self, shape: Shape) -> int:
        self.check_shape(shape)
        rows, cols = (int(d) for d in shape)
        parts = self._part_shapes(rows, cols).values()
        return sum(rows * shp[1] * (2 if dt == torch.float16 else 1) for dt, shp in parts)

    def _fit_rows(self, x: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The subclass's fit of whole rows: groups ``x`` and weights ``wt`` (R, ng, G) -> per-row/per-group
        tensors (each with R leading)."""
        raise NotImplementedError

    def _fit_by_rows(self, w: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """:meth:`_fit_rows` over ``w`` (checked, the last group padded by replicating the last column with
        weight 0, so group ranges are unchanged) in blocks of rows of about :data:`_FIT_ELEMS` elements (bounds
        the search's temporaries); its outputs joined along the rows."""
        w = check_weights(w, self.id)
        self.check_shape(tuple(w.shape))
        rows, cols = (int(n) for n in w.shape)
        G, ng = self.group, self.ngroups(cols)
        pad = ng * G - cols
        imp = element_weights(importance, (rows, cols))
        wt = torch.ones(rows, cols, device=w.device) if imp is None else imp
        if pad:
            w = torch.cat([w, w[:, -1:].expand(rows, pad)], 1)
            wt = torch.cat([wt, torch.zeros(rows, pad, device=w.device)], 1)
        x, wt = w.reshape(rows, ng, G), wt.reshape(rows, ng, G)
        step = max(1, _FIT_ELEMS // (ng * G))
        outs = [self._fit_rows(x[a:a + step], wt[a:a + step]) for a in range(0, rows, step)]
        return tuple(torch.cat(parts) for parts in zip(*outs))

    def _full_codes(self, codes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``codes`` (on the CPU, int64) checked against ``shape`` and the code range, padded with zero codes to
        whole groups: (rows, ngroups·group)."""
        codes = codes.cpu().to(torch.int64)
        if tuple(codes.shape) != shape:
            raise FormatError(f"{self.id}: codes of shape {tuple(codes.shape)} do not match the tensor shape {shape}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << self.bits):
            raise FormatError(f"{self.id}: codes outside 0..{(1 << self.bits) - 1}")
        rows, cols = shape
        full = torch.zeros(rows, self.ngroups(cols) * self.group, dtype=torch.int64)
        full[:, :cols] = codes
        return full

    def _check_parts(self, q: QTensor) -> None:
        self.check_parts(q, self._part_shapes(int(q.shape[0]), int(q.shape[1])))

    def _stored(self, q: QTensor) -> tuple[int, torch.Tensor]:
        """``(ngroups, weight_super as float32)`` of a stored tensor of this format, its parts checked and its
        super-scales finite."""
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format!r}")
        shape = tuple(int(n) for n in q.shape)
        self.check_shape(shape)
        self._check_parts(q)
        sup = q.parts["weight_super"].cpu().to(torch.float32)
        if not bool(torch.isfinite(sup).all()):
            raise FormatError(f"{self.id}: stored super-scales hold NaN/Inf")
        return self.ngroups(shape[1]), sup

    def _stored_codes(self, q: QTensor) -> torch.Tensor:
        """The codes (rows, cols) of a checked stored tensor."""
        rows, cols = (int(n) for n in q.shape)
        n = self.ngroups(cols) * self.group
        codes = unpack_bits(q.parts["weight_packed"].cpu().reshape(-1), self.bits, rows * n)
        return codes.reshape(rows, n)[:, :cols].contiguous()

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """Row blocks -> one tensor: every part stores whole rows on byte boundaries, so they stack."""
        rows, cols, dtype = self._check_concat(parts)
        for p in parts:
            self._check_parts(p)
        out = {name: torch.cat([p.parts[name] for p in parts]) for name in self._part_shapes(1, cols)}
        return QTensor(format=self.id, shape=(rows, cols), dtype=dtype, parts=out)


__all__ = ["RowSuperScaled", "DEFAULT_SCALE_BITS", "safe_div", "super_search", "pack_row_ints", "unpack_row_ints"]
