"""Bit packing of small unsigned integer codes into one little-endian bitstream.

Layout (the same for every width ``b`` in 1..8): the codes form a single bitstream in which code ``i``
occupies bits ``[i*b, (i+1)*b)``, least significant bit first; bit ``k`` of the stream is bit ``k % 8`` of
byte ``k // 8``.  A stream of ``count`` codes takes exactly ``ceil(count * b / 8)`` bytes; the unused high
bits of the last byte are zero.  Examples (b = 3): codes ``[1, 2, 3]`` are the bits
``100 010 110`` (LSB first) = byte 0 ``0b11010001`` = 0xD1, byte 1 ``0b00000000`` = 0x00.

Both directions are vectorised (the only Python loops run over the ``b`` or 8 bit positions) and work in
chunks of whole bytes so the temporaries stay bounded for large tensors.
"""
from __future__ import annotations

import torch

from .base import FormatError

#: Codes per chunk; a multiple of 8, so every chunk starts on a byte boundary for any width.
_CHUNK = 1 << 21


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count * bits / 8)``."""
    _check_bits(bits)
    if count < 0:
        raise FormatError(f"cannot pack a negative number of codes ({count})")
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise FormatError(f"bit width must be an integer in 1..8, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, flattened in row-major order) into a 1-D uint8 tensor.

    Raises :class:`FormatError` for a bad width, a non-integer tensor or codes outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise FormatError(f"pack_bits needs an integer tensor of codes, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    count = flat.numel()
    out = torch.zeros(packed_nbytes(count, bits), dtype=torch.uint8)
    if count == 0:
        return out
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= (1 << bits):
        raise FormatError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, found range [{lo}, {hi}]")
    flat = flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    for start in range(0, count, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        n = chunk.numel()
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (n*bits,) bits, LSB first
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, torch.zeros(pad, dtype=torch.uint8)])
        octets = stream.reshape(-1, 8)
        byte = octets[:, 0].clone()
        for k in range(1, 8):
            byte |= octets[:, k] << k
        first = start * bits // 8  # start is a multiple of 8, so this is exact
        out[first:first + packed_nbytes(n, bits)] = byte
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of the stream as a 1-D int64 tensor.

    ``packed`` must be a 1-D uint8 tensor of exactly ``ceil(count * bits / 8)`` bytes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack_bits needs a uint8 tensor, got dtype {packed.dtype}")
    need = packed_nbytes(count, bits)
    flat = packed.reshape(-1)
    if flat.numel() != need:
        raise FormatError(f"{count} codes of {bits} bits take {need} bytes, got {flat.numel()}")
    out = torch.empty(count, dtype=torch.int64)
    shifts8 = torch.arange(8, dtype=torch.uint8)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        chunk = flat[first:first + packed_nbytes(n, bits)]
        stream = ((chunk.unsqueeze(1) >> shifts8) & 1).reshape(-1)[: n * bits].reshape(n, bits)
        code = stream[:, 0].to(torch.int64)
        for k in range(1, bits):
            code |= stream[:, k].to(torch.int64) << k
        out[start:start + n] = code
    return out


__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]
