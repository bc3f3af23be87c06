"""Bit packing of small unsigned integer codes into one little-endian bitstream.

Layout (the same for every width ``b`` in 1..8): the codes form a single bitstream in which code ``i``
occupies bits ``[i*b, (i+1)*b)``, least significant bit first; bit ``k`` of the stream is bit ``k % 8`` of
byte ``k // 8``.  A stream of ``count`` codes takes exactly ``ceil(count * b / 8)`` bytes; the unused high
bits of the last byte are zero.  Examples (b = 3): codes ``[1, 2, 3]`` are the bits
``100 010 110`` (LSB first) = byte 0 ``0b11010001`` = 0xD1, byte 1 ``0b00000000`` = 0x00.

Both directions work on words of 8 codes, which take exactly ``b`` bytes: a word is the int64
``Σ_i code_i << (i·b)`` (at most 64 bits), and its bytes are its ``b`` low octets, least significant first — the
bitstream above, written 8 codes at a time.  The only Python loops run over the 8 codes or the ``b`` bytes of a
word, in chunks of whole words so the temporaries stay bounded for large tensors.
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
    if bits == 8:  # a code per byte (and a word would reach int64's sign bit)
        out.copy_(flat.to(torch.uint8))
        return out
    for start in range(0, count, _CHUNK):
        chunk = flat[start:start + _CHUNK].to(torch.int64)
        n = chunk.numel()
        words = -(-n // 8)
        if n % 8:
            chunk = torch.cat([chunk, chunk.new_zeros(words * 8 - n)])
        codes8 = chunk.reshape(words, 8)
        word = codes8[:, 0].clone()
        for i in range(1, 8):
            word |= codes8[:, i] << (i * bits)
        octets = torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], dim=1).to(torch.uint8).reshape(-1)
        first = start * bits // 8  # start is a multiple of 8, so this is exact
        out[first:first + packed_nbytes(n, bits)] = octets[:packed_nbytes(n, bits)]
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
    if bits == 8:  # the codes are the bytes (in CPU memory, as every width returns them)
        return flat.to(device="cpu", dtype=torch.int64)
    out = torch.empty(count, dtype=torch.int64)
    mask = (1 << bits) - 1
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        words = -(-n // 8)
        first = start * bits // 8
        chunk = flat[first:first + packed_nbytes(n, bits)].to(torch.int64)
        if chunk.numel() < words * bits:  # the last word's missing bytes hold only padding
            chunk = torch.cat([chunk, chunk.new_zeros(words * bits - chunk.numel())])
        octets = chunk.reshape(words, bits)
        word = octets[:, 0].clone()
        for k in range(1, bits):
            word |= octets[:, k] << (8 * k)
        codes = torch.stack([(word >> (i * bits)) & mask for i in range(8)], dim=1).reshape(-1)
        out[start:start + n] = codes[:n]
    return out


__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]
