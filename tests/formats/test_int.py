"""Integer formats: ids, exact byte counts (hand-computed), grids, encode/decode, edge cases."""
from __future__ import annotations

import itertools

import pytest
import torch

from bitalloc.errors import NumericsError
from bitalloc.formats import FormatError, Grid, get_format
from bitalloc.formats.int import BITS, GROUPS, IntFormat
from bitalloc.formats.packing import unpack_bits
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.rounding.rtn import rtn_round

ALL = [IntFormat(b, g, s) for b, g, s in itertools.product(BITS, GROUPS, (False, True))]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- ids -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,canonical", [
    ("int4-g128", "int4-g128"), ("int4-g128-asym", "int4-g128"), ("INT4-G128-SYM", "int4-g128-sym"),
    ("int3-row", "int3-row"), ("int3-row-sym", "int3-row-sym"), ("int2-g32-asym", "int2-g32"),
    ("int8-g64", "int8-g64"),
])
def test_ids(text: str, canonical: str) -> None:
    fmt = get_format(text)
    assert isinstance(fmt, IntFormat) and fmt.id == canonical
    assert get_format(canonical) == fmt


def test_fields_and_defaults() -> None:
    f = get_format("int4-g128")
    assert (f.bits, f.group, f.symmetric) == (4, 128, False)
    assert get_format("int3-row-sym") == IntFormat(3, None, True)
    assert IntFormat(5, 64, False).bits == 5 and IntFormat(5, 64, False).is_grid


@pytest.mark.parametrize("bad,match", [
    ("int7-g128", "bits"), ("int1-row", "bits"), ("int4-g100", "groups"), ("int4-g0", "groups"),
    ("int4-g128-foo", "malformed"), ("int4", "malformed"), ("int4-row-sym-sym", "malformed"),
])
def test_bad_ids(bad: str, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        get_format(bad)


def test_bad_fields() -> None:
    with pytest.raises(FormatError):
        IntFormat(9, 128, False)
    with pytest.raises(FormatError):
        IntFormat(4, 16, False)
    with pytest.raises(FormatError):
        IntFormat(4, 128, "yes")  # type: ignore[arg-type]


# --- exact bytes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fid,shape,expected", [
    # codes ceil(3*256*4/8)=384 (200 cols padded to 256), scales 3*2*2=12, zeros 12
    ("int4-g128", (3, 200), 408),
    ("int4-g128-sym", (3, 200), 396),
    # per row: codes ceil(3*200*3/8)=225, scale 3*2, zero 3*2
    ("int3-row", (3, 200), 237),
    ("int3-row-sym", (3, 200), 231),
    # 33 cols -> 2 groups of 32 (64 padded): codes 5*64*2/8=80, scales 5*2*2=20, zeros 20
    ("int2-g32", (5, 33), 120),
    # 100 cols -> 2 groups of 64: codes 7*128*5/8=560, scales 28, zeros 28
    ("int5-g64", (7, 100), 616),
    ("int5-g64-sym", (7, 100), 588),
    # one element: 6 bits -> 1 byte, scale 2, zero 2
    ("int6-row", (1, 1), 5),
    # 130 cols -> 2 groups of 128: codes 2*256 = 512, scales 2*2*2 = 8
    ("int8-g128-sym", (2, 130), 520),
    # 7 cols padded to 32: codes 3*32*3/8 = 36, scales 6, zeros 6
    ("int3-g32", (3, 7), 48),
    # exact multiple, no padding: codes 4*256*4/8 = 512, 2 groups: scales 16, zeros 16
    ("int4-g128", (4, 256), 544),
    # odd bit count without padding: codes ceil(3*5*3/8) = ceil(45/8) = 6, scales 6, zeros 6
    ("int3-row", (3, 5), 18),
])
def test_nbytes_hand_computed(fid: str, shape: tuple[int, int], expected: int) -> None:
    assert get_format(fid).nbytes(shape) == expected


def test_bpw() -> None:
    # int4-g128 on 128-multiples: 4 + 32/128 = 4.25 bits; sym 4.125; int8-row on 576 cols: 8 + 16/576
    assert get_format("int4-g128").bpw((576, 1536)) == pytest.approx(4.25)
    assert get_format("int4-g128-sym").bpw((576, 1536)) == pytest.approx(4.125)
    assert get_format("int8-row-sym").bpw((10, 576)) == pytest.approx(8 + 16 / 576)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (0, 4), (4, 0), ()])
def test_bad_shapes(shape: tuple[int, ...]) -> None:
    fmt = get_format("int4-g128")
    with pytest.raises(FormatError, match="shape"):
        fmt.nbytes(shape)
    assert not fmt.supports(shape)


# --- grids and round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_round_trip_every_format(fmt: IntFormat) -> None:
    shape = (6, 150)  # partial last group for g32/g64/g128
    w = torch.randn(shape, generator=_gen(fmt.bits))
    grid = fmt.fit(w)
    n = 1 << fmt.bits
    expected_levels = torch.arange(-(n // 2), n // 2) if fmt.symmetric else torch.arange(0, n)
    assert torch.equal(grid.levels, expected_levels.float())
    gs = 150 if fmt.group is None else fmt.group
    assert grid.group_size == gs and tuple(grid.scale.shape) == (6, fmt.ngroups(150))
    assert torch.equal(grid.scale.half().float(), grid.scale)  # exactly the stored fp16 values
    if fmt.symmetric:
        assert bool((grid.offset == 0).all())
    codes, values = rtn_round(w, grid)
    q = fmt.encode(codes, grid, shape, "float32")
    assert q.nbytes() == fmt.nbytes(shape)
    assert q.parts["weight_packed"].dtype == torch.uint8
    assert ("weight_zero" in q.parts) == (not fmt.symmetric)
    out = fmt.decode(q)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(out, grid.values(codes))
    assert torch.equal(out, values)
    # quality sanity: relative error well below 1 and shrinking with bits
    rel = float(((w - out) ** 2).sum() / (w ** 2).sum())
    assert rel < 4.0 ** -(fmt.bits - 2.5)


def test_quantize_weight_entry_point_and_asym_alias() -> None:
    w = torch.randn(8, 64, generator=_gen())
    q = quantize_weight(w, "int4-g32-asym", method="rtn")
    assert q.format == "int4-g32"
    assert q.nbytes() == get_format("int4-g32").nbytes((8, 64))
    assert float(((dequantize(q) - w) ** 2).mean()) < 0.01


def test_higher_bits_lower_error() -> None:
    w = torch.randn(16, 128, generator=_gen())
    errs = [float(((get_format(f"int{b}-g64").decode(quantize_weight(w, f"int{b}-g64", method="rtn")) - w) ** 2)
                  .sum()) for b in BITS]
    assert errs == sorted(errs, reverse=True)


def test_symmetric_scale_may_be_negative_to_use_long_side() -> None:
    # max |w| is positive: level -8 with a negative scale represents it exactly at min-max
    w = torch.tensor([[0.0, 1.0, -0.5, 0.25]])
    grid = IntFormat(4, None, True).fit(w, search=False)
    assert float(grid.scale) == pytest.approx(-1 / 8)
    assert torch.allclose(rtn_round(w, grid)[1], w)


# --- edge cases -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fid", ["int4-g32", "int4-g32-sym", "int2-row", "int8-row-sym"])
def test_edge_values_never_nan(fid: str) -> None:
    fmt = get_format(fid)
    w = torch.zeros(5, 64)
    w[1] = 3.0                         # constant row
    w[2, :32] = 1e6                    # huge values: the fp16 scale is clamped, never inf
    w[2, 32:] = -1e6
    w[3] = torch.linspace(-1e-9, 1e-9, 64)  # below fp16 resolution
    w[4, 5] = 7.0                      # one spike in a zero row
    q = quantize_weight(w, fmt, method="rtn")
    out = fmt.decode(q)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[0], torch.zeros(64))  # all-zero row is exact
    assert torch.allclose(out[1], torch.full((64,), 3.0))
    assert bool(torch.isfinite(q.parts["weight_scale"].float()).all())


def test_rejects_nan_and_bad_importance() -> None:
    fmt = get_format("int4-g32")
    w = torch.randn(2, 32)
    w[0, 0] = float("nan")
    with pytest.raises(NumericsError):
        fmt.fit(w)
    with pytest.raises(FormatError, match="importance"):
        fmt.fit(torch.randn(2, 32), torch.ones(31))
    with pytest.raises(NumericsError, match="importance"):
        fmt.fit(torch.randn(2, 32), -torch.ones(32))


def test_encode_validates() -> None:
    fmt = get_format("int4-g32")
    w = torch.randn(2, 40, generator=_gen())
    grid = fmt.fit(w)
    codes, _ = rtn_round(w, grid)
    with pytest.raises(FormatError, match="do not match"):
        fmt.encode(codes[:, :39], grid, (2, 40))
    with pytest.raises(FormatError, match="fp16"):
        bad = Grid(grid.scale + 1e-4, grid.offset, grid.levels, grid.group_size)
        fmt.encode(codes, bad, (2, 40))
    with pytest.raises(FormatError, match="grid"):
        get_format("int4-g64").encode(codes, grid, (2, 40))
    with pytest.raises(FormatError):
        fmt.encode(codes + 16, grid, (2, 40))
    q = fmt.encode(codes, grid, (2, 40))
    with pytest.raises(FormatError, match="cannot decode"):
        get_format("int4-g32-sym").decode(q)


def _whole_decode(fmt, q):
    """The decode before it went by row blocks: every full-size temporary at once (the reference)."""
    rows, cols = q.shape
    gs, ng = fmt.group_size(cols), fmt.ngroups(cols)
    codes = unpack_bits(q.parts["weight_packed"], fmt.bits, rows * ng * gs).reshape(rows, ng * gs)[:, :cols]
    scale = q.parts["weight_scale"].to(torch.float32)
    zero = torch.zeros_like(scale) if fmt.symmetric else q.parts["weight_zero"].to(torch.float32)
    g = torch.div(torch.arange(cols), gs, rounding_mode="floor")
    return scale[:, g] * fmt.levels[codes] + zero[:, g]


@pytest.mark.parametrize("fid", ["int2-g64", "int3-g128", "int5-g32", "int8-g128", "int3-row", "int5-row",
                                 "int4-g128-sym", "int3-row-sym"])
@pytest.mark.parametrize("shape", [(1, 7), (13, 200), (37, 96), (64, 130)])
@pytest.mark.parametrize("max_elems", [1, 100, 1 << 20])
def test_decode_by_row_blocks_is_bitwise_the_whole_decode(fid, shape, max_elems):
    """Row blocks of any size (down to the fewest rows that end on a byte of the stream) give every value the
    whole-tensor arithmetic gives, zeros' signs included."""
    fmt = get_format(fid)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    w[0, 0] = -0.0
    q = quantize_weight(w, fmt)
    got, want = fmt.decode(q, max_elems=max_elems), _whole_decode(fmt, q)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
