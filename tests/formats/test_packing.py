"""Bit packing: hand-computed golden byte patterns for every width, round trips, and bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.formats import FormatError
from bitalloc.formats import packing
from bitalloc.formats.packing import pack_bits, packed_nbytes, unpack_bits

# Code i occupies stream bits [i*b, (i+1)*b), LSB first; stream bit k is bit k%8 of byte k//8.
# Equivalently the stream is the little-endian integer sum(c_i << (i*b)).
GOLDEN = [
    # b=1: 1,0,1,1,0,0,0,1 -> 1 + 4 + 8 + 128 = 0x8D; then 1 -> 0x01
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0x8D, 0x01]),
    # b=2: 1 | 2<<2 | 3<<4 | 0<<6 = 1 + 8 + 48 = 0x39; then 3 -> 0x03 (ceil(10/8) = 2 bytes)
    (2, [1, 2, 3, 0, 3], [0x39, 0x03]),
    # b=3: 1 + 2<<3 + 3<<6 + 4<<9 + 5<<12 + 6<<15 + 7<<18 = 0x1F58D1 -> D1 58 1F
    (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
    # b=3, partial last byte: 1 + 2<<3 + 3<<6 = 0xD1 (bit 8 = high bit of code 3 = 0) -> D1 00
    (3, [1, 2, 3], [0xD1, 0x00]),
    # b=4: 1 | 2<<4 = 0x21, 3 | 4<<4 = 0x43, 15 -> 0x0F
    (4, [1, 2, 3, 4, 15], [0x21, 0x43, 0x0F]),
    # b=5: 1 + 2<<5 + 3<<10 + 31<<15 = 0x1 + 0x40 + 0xC00 + 0xF8000 = 0x0F8C41 -> 41 8C 0F
    (5, [1, 2, 3, 31], [0x41, 0x8C, 0x0F]),
    # b=6: 1 + 2<<6 + 3<<12 + 63<<18 = 0x1 + 0x80 + 0x3000 + 0xFC0000 = 0xFC3081 -> 81 30 FC
    (6, [1, 2, 3, 63], [0x81, 0x30, 0xFC]),
    # b=7: 1 + 127<<7 = 0x3F81 -> 81 3F
    (7, [1, 127], [0x81, 0x3F]),
    # b=8: bytes are the codes
    (8, [1, 2, 255, 0], [0x01, 0x02, 0xFF, 0x00]),
]


@pytest.mark.parametrize("bits,codes,expected", GOLDEN)
def test_golden_bytes(bits: int, codes: list[int], expected: list[int]) -> None:
    packed = pack_bits(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert packed.numel() == packed_nbytes(len(codes), bits)
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


def test_golden_widths_cover_every_int_format_width() -> None:
    assert {2, 3, 4, 5, 6, 8} <= {b for b, _, _ in GOLDEN}


def test_shape_is_flattened_row_major() -> None:
    codes = torch.tensor([[1, 2], [3, 0]])
    assert pack_bits(codes, 2).tolist() == [0x39]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    t = torch.tensor(codes, dtype=torch.int64)
    packed = pack_bits(t, bits)
    assert packed.numel() == (len(codes) * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, len(codes)), t)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_round_trip_across_chunks(bits: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1 << bits, (n,), generator=g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "_CHUNK", 16)  # many chunks per call
        packed = pack_bits(t, bits)
        assert torch.equal(unpack_bits(packed, bits, n), t)
    assert torch.equal(pack_bits(t, bits), packed)


def test_chunked_equals_single_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.randint(0, 32, (1001,), generator=torch.Generator().manual_seed(0))
    whole = pack_bits(t, 5)
    monkeypatch.setattr(packing, "_CHUNK", 24)
    assert torch.equal(pack_bits(t, 5), whole)
    assert torch.equal(unpack_bits(whole, 5, 1001), t)


def test_unused_high_bits_are_zero() -> None:
    assert pack_bits(torch.tensor([7]), 3).tolist() == [0x07]
    assert pack_bits(torch.tensor([63, 63]), 6).tolist() == [0xFF, 0x0F]


@pytest.mark.parametrize("bits,bad", [(2, 4), (3, 8), (4, -1), (8, 256)])
def test_rejects_out_of_range_codes(bits: int, bad: int) -> None:
    with pytest.raises(FormatError, match=r"\[0, "):
        pack_bits(torch.tensor([0, bad]), bits)


@pytest.mark.parametrize("bits", [0, 9, 2.0])
def test_rejects_bad_width(bits) -> None:
    with pytest.raises(FormatError, match="bit width"):
        pack_bits(torch.tensor([0]), bits)


def test_rejects_float_codes_and_bad_lengths() -> None:
    with pytest.raises(FormatError, match="integer"):
        pack_bits(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(FormatError, match="take 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(FormatError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int64), 4, 4)


def test_empty() -> None:
    assert pack_bits(torch.zeros(0, dtype=torch.int64), 3).numel() == 0
    assert unpack_bits(torch.zeros(0, dtype=torch.uint8), 3, 0).numel() == 0


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 120), seed=st.integers(0, 2**16),
       chunk=st.sampled_from([8, 16, 1 << 21]))
def test_matches_the_little_endian_integer(bits: int, n: int, seed: int, chunk: int) -> None:
    """Both directions against the layout's definition, a Python int ``Σ c_i << (i·b)`` written little-endian:
    codes of every width (8 included) pack to its bytes, and any bytes (padding bits set or not) unpack to its
    fields, across chunk boundaries."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    stream = sum(int(c) << (i * bits) for i, c in enumerate(codes.tolist()))
    nbytes = packed_nbytes(n, bits)
    raw = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.int64).to(torch.uint8)
    value = int.from_bytes(bytes(raw.tolist()), "little")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "_CHUNK", chunk)
        assert pack_bits(codes, bits).tolist() == list(stream.to_bytes(nbytes, "little"))
        assert unpack_bits(raw, bits, n).tolist() == [(value >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]
