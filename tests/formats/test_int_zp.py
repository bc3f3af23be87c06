"""Integer formats with an integer zero point (``intB-gG-zp``): ids, exact bytes, values ``scale * (q - zero)``
with integer zeros in range, the fit against the float-minimum variant, row blocks, GPTQ, learned scales."""
from __future__ import annotations

import itertools

import pytest
import torch

from bitalloc.errors import NumericsError
from bitalloc.formats import FormatError, Grid, get_format
from bitalloc.formats.int import BITS, GROUPS
from bitalloc.formats.int_zp import IntZpFormat, snap_zero
from bitalloc.formats.packing import unpack_bits
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.formats.refit import row_errors

ALL = [IntZpFormat(b, g) for b, g in itertools.product(BITS, GROUPS)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("text,fmt", [("int4-g128-zp", IntZpFormat(4, 128)), ("INT3-ROW-ZP", IntZpFormat(3, None)),
                                      ("int8-g32-zp", IntZpFormat(8, 32))])
def test_ids(text: str, fmt: IntZpFormat) -> None:
    assert get_format(text) == fmt and get_format(fmt.id) == fmt and fmt.id == text.lower()


@pytest.mark.parametrize("bad", ["int7-g128-zp", "int4-g16-zp", "int4-g128-zpp", "int4-zp"])
def test_bad_ids(bad: str) -> None:
    with pytest.raises(FormatError) as e:
        get_format(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fid,shape,expected", [
    ("int4-g128-zp", (3, 200), 3 * 256 // 2 + 3 * 2 * 2 + 3),  # codes padded to 256 cols, 6 fp16 scales, 6 zeros
    ("int3-row-zp", (5, 7), 14 + 10 + 2),  # 105 bits of codes, 5 scales, 15 bits of zeros
    ("int8-g32-zp", (2, 64), 128 + 8 + 4),
])
def test_nbytes_hand_computed(fid: str, shape: tuple[int, int], expected: int) -> None:
    fmt = get_format(fid)
    assert fmt.nbytes(shape) == expected
    q = quantize_weight(torch.randn(*shape, generator=_gen()), fmt, method="rtn")
    assert q.nbytes() == expected


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.id)
def test_values_are_scale_times_code_minus_integer_zero(fmt: IntZpFormat) -> None:
    w = torch.randn(9, 72, generator=_gen(1)) * 0.05 + 0.01
    q = quantize_weight(w, fmt, method="rtn")
    codes, grid = fmt.unpack(q)
    rows, cols = w.shape
    ng, gs = fmt.ngroups(cols), fmt.group_size(cols)
    zero = unpack_bits(q.parts["weight_zero_point"], fmt.bits, rows * ng).reshape(rows, ng)
    assert int(zero.max()) < (1 << fmt.bits) and torch.equal(fmt.zeros_of(grid), zero)
    scale = q.parts["weight_scale"].to(torch.float32)
    g = torch.arange(cols) // gs
    want = (codes - zero[:, g]).to(torch.float32) * scale[:, g]  # the library's (q - zero_point) * scale
    assert torch.equal(dequantize(q), want)
    assert torch.equal(fmt.encode(codes, grid, tuple(w.shape)).parts["weight_packed"], q.parts["weight_packed"])
    rel = float(((w - want) ** 2).sum() / (w ** 2).sum())
    assert rel < 4.0 ** -(fmt.bits - 2)  # a working quantizer: error falls with the width


def test_costs_fewer_bytes_than_the_float_minimum_and_keeps_most_of_its_accuracy() -> None:
    w = torch.randn(64, 256, generator=_gen(2)) * 0.02 + 0.004
    zp, fl, sym = (get_format(f) for f in ("int4-g64-zp", "int4-g64", "int4-g64-sym"))
    err = {f.id: float(((w - dequantize(quantize_weight(w, f, method="rtn"))) ** 2).sum()) for f in (zp, fl, sym)}
    assert sym.nbytes(w.shape) < zp.nbytes(w.shape) < fl.nbytes(w.shape)
    assert err[fl.id] <= err[zp.id] < err[sym.id]


def test_zero_and_constant_groups() -> None:
    w = torch.randn(8, 64, generator=_gen(3))
    w[0] = 0.0
    w[1] = 0.3
    w[2] = -1e-3
    d = dequantize(quantize_weight(w, get_format("int3-g32-zp"), method="rtn"))
    assert torch.equal(d[0], torch.zeros(64))
    assert torch.equal(d[1], torch.full((64,), float(torch.tensor(0.3).half())))
    assert torch.equal(d[2], torch.full((64,), float(torch.tensor(-1e-3).half())))


def test_groups_away_from_zero_are_stretched_to_reach_it() -> None:
    """All-positive and all-negative groups: the grid must hold 0 (an integer zero point), so it spans [0, max] or
    [min, 0] rather than cutting the values off at the zero point's limit."""
    g = _gen(7)
    w = torch.cat([1.0 + 0.2 * torch.rand(4, 64, generator=g), -3.0 - torch.rand(4, 64, generator=g)])
    for fid in ("int4-g32-zp", "int3-row-zp", "int8-g64-zp"):
        fmt = get_format(fid)
        d = dequantize(quantize_weight(w, fmt, method="rtn"))
        step = w.abs().amax(1) / ((1 << fmt.bits) - 1)  # the grid [0, max] or [min, 0]
        assert bool(((w - d).square().mean(1) <= 2 * step.square() / 12).all()), fid  # rounding noise, no cut-off


def test_snap_zero_stores_integers_in_range() -> None:
    scale = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.0, -0.2])
    offset = torch.tensor([-0.33, 0.5, -9.0, 0.0, 0.7, 0.35])
    s, o = snap_zero(scale, offset, 16)
    z = -o / torch.where(s == 0, torch.ones_like(s), s)
    assert torch.equal(z, torch.round(z)) and bool((z >= 0).all()) and bool((z <= 15).all())
    assert z.tolist()[:3] == [3.0, 0.0, 15.0] and float(s[4]) == float(torch.tensor(0.7).half())
    assert torch.equal(s, s.half().float())


def test_encode_refuses_what_it_cannot_store() -> None:
    fmt = get_format("int4-g32-zp")
    codes = torch.zeros(2, 32, dtype=torch.int64)
    lv = fmt.levels
    bad = [Grid(torch.full((2, 1), 0.1), torch.full((2, 1), -0.05), lv, 32),  # zero 0.5: not an integer
           Grid(torch.full((2, 1), 0.125), torch.full((2, 1), -0.125 * 16), lv, 32),  # zero 16: out of range
           Grid(torch.full((2, 1), 0.1001), torch.zeros(2, 1), lv, 32)]  # not an fp16 scale
    for grid in bad:
        with pytest.raises(FormatError) as e:
            fmt.encode(codes, grid, (2, 32))
        assert "\n" not in str(e.value)
    with pytest.raises(NumericsError):
        fmt.fit(torch.tensor([[float("nan")] * 32]))


def test_row_blocks_are_byte_identical_and_gptq_beats_rtn() -> None:
    w = torch.randn(40, 96, generator=_gen(4))
    x = torch.randn(256, 96, generator=_gen(5)) * torch.linspace(0.1, 2.0, 96)
    h = x.T @ x / 256
    for fid in ("int4-g32-zp", "int3-row-zp", "int5-g64-zp"):
        whole = quantize_weight(w, fid, hessian=h, max_elems=None)
        blocks = quantize_weight(w, fid, hessian=h, max_elems=8 * 96)  # 5 blocks of 8 rows
        assert all(torch.equal(whole.parts[k], blocks.parts[k]) for k in whole.parts)
        rtn = quantize_weight(w, fid, hessian=h, method="rtn")
        assert float(row_errors(w, dequantize(whole), h).sum()) < float(row_errors(w, dequantize(rtn), h).sum())


def test_learned_scales_are_stored_with_integer_zeros() -> None:
    fmt = get_format("int4-g32-zp")
    q = quantize_weight(torch.randn(4, 64, generator=_gen(6)), fmt, method="rtn")
    codes, grid = fmt.unpack(q)
    moved = fmt.with_scales(grid, grid.scale * 1.013, grid.offset + 0.0123)
    assert fmt.learns_scales
    fmt.zeros_of(moved)  # integers in range, fp16 scales: encodable
    assert torch.equal(fmt.unpack(fmt.encode(codes, moved, (4, 64)))[1].offset, moved.offset)


def test_a_packed_directory_of_zero_point_formats_loads_back_exactly(tmp_path) -> None:
    """Through the packed target and ``bitalloc.load``: every weight is the format's decode, the bytes the plan's."""
    from bitalloc import load
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import plan_for_assignments
    from bitalloc.quantize import quantize_model
    from bitalloc.targets.base import Capacity
    from bitalloc.targets.packed import PackedTarget

    from conftest import tiny_llama, token_ids

    model = tiny_llama(tie=True)
    view = ModelView(model)
    fids = ("int4-g32-zp", "int3-row-zp", "int2-g64-zp", "int8-g32-zp")
    plan = plan_for_assignments(view, {r.name: fids[i % len(fids)] for i, r in enumerate(view.quantizable())}, "zp")
    q = quantize_model(model, view, plan, token_ids(2), "gptq", progress=False)
    target = PackedTarget(tmp_path / "o")
    prepared = target.prepare(model, view, plan, q, {}, None)
    assert prepared.sizes["weights"] == plan.total_bytes
    target.write_verified(prepared, Capacity("x", plan.total_bytes, 0, 0, "weights"), overwrite=False)
    back = load(tmp_path / "o")
    for name, t in q.items():
        p = back.get_parameter(name)
        assert torch.equal(p, dequantize(t).reshape(p.shape)), name
