"""Mixtures of value sets per group (``mix{3,4}-g{32,64,128}``): ids, exact bytes, an independent decoder,
the weighted set choice, GPTQ, batched measurement and row concatenation."""
from __future__ import annotations

import pytest
import torch

from bitalloc.formats import FormatError, get_format
from bitalloc.formats.mixture import SETS, MixtureFormat
from bitalloc.measure import measure_tensor
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.formats.refit import row_errors
from bitalloc.stats import LinearStats, TensorStats

IDS = ["mix4-g32", "mix4-g64", "mix4-g128", "mix3-g32", "mix3-g64", "mix3-g128"]


def _data(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    w[:, ::7] *= 3  # heavier tails in some groups
    x = torch.randn(2 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    x = x + 0.5 * x.roll(1, 1)
    return w, x.T @ x / (2 * cols)


def test_ids_and_refusals() -> None:
    assert get_format("MIX4-G32").id == "mix4-g32"
    assert isinstance(get_format("mix3-g128"), MixtureFormat)
    for bad in ("mix5-g32", "mix4-g16", "mix4", "mix4-g32-sym"):
        with pytest.raises(FormatError):
            get_format(bad)
    for bits, sets in SETS.items():  # four sorted sets of 2^bits distinct levels each
        assert len(sets) == 4
        for lv in sets.values():
            assert len(lv) == 1 << bits and list(lv) == sorted(set(lv))


@pytest.mark.parametrize("fid", IDS)
@pytest.mark.parametrize("shape", [(8, 256), (5, 200), (3, 40)])
def test_bytes_are_exact_and_decode_is_the_grid(fid: str, shape: tuple[int, int]) -> None:
    fmt = get_format(fid)
    w, h = _data(*shape, seed=1)
    q = quantize_weight(w, fmt, method="rtn")
    assert q.nbytes() == fmt.nbytes(shape)
    rows, cols = shape
    ng = -(-cols // fmt.group)
    bits = fmt.bits
    assert fmt.nbytes(shape) == -(-rows * ng * fmt.group * bits // 8) + 2 * rows * ng + -(-rows * ng * 2 // 8)
    grid = fmt.fit(w)
    codes, values = grid.snap(w)
    q2 = fmt.encode(codes, grid, shape)
    assert torch.equal(fmt.decode(q2), values)
    assert torch.equal(dequantize(q), fmt.decode(q))


def _bits(stream: bytes, start: int, n: int) -> int:
    return sum(((stream[(start + i) // 8] >> ((start + i) % 8)) & 1) << i for i in range(n))


@pytest.mark.parametrize("fid", ["mix4-g32", "mix3-g64"])
def test_an_independent_decoder_reads_the_same_values(fid: str) -> None:
    """Bits read one by one (LSB first), fp16 scales by struct, levels from the published table."""
    import struct

    fmt = get_format(fid)
    w, _ = _data(4, 100, seed=2)
    q = quantize_weight(w, fmt, method="rtn")
    codes, sets = bytes(q.parts["weight_packed"].tolist()), bytes(q.parts["weight_set"].tolist())
    raw = q.parts["weight_scale"].contiguous().view(torch.int16).reshape(-1).tolist()
    scales = [struct.unpack("<e", struct.pack("<h", v))[0] for v in raw]
    table = list(SETS[fmt.bits].values())
    ng = -(-100 // fmt.group)
    got = dequantize(q)
    for r in range(4):
        for c in range(100):
            g = r * ng + c // fmt.group
            code = _bits(codes, (r * ng * fmt.group + c) * fmt.bits, fmt.bits)
            want = scales[g] * table[_bits(sets, 2 * g, 2)][code]
            assert abs(float(got[r, c]) - want) <= 1e-6 * max(1.0, abs(want)), (r, c)


def test_each_group_takes_the_set_of_least_weighted_error() -> None:
    """The mixture is never worse, group by group, than IQ4_NL (whose codebook, divided by 16, is one of the sets)
    and the groups use more than one set."""
    w, h = _data(16, 512, seed=3)
    imp = torch.diagonal(h)
    mix = get_format("mix4-g32").fit(w, imp)
    iq = get_format("iq4_nl").fit(w, imp)

    def group_err(grid):
        return ((w - grid.snap(w)[1]) ** 2 * imp).reshape(16, -1, 32).sum(-1)

    assert bool((group_err(mix) <= group_err(iq) * (1 + 1e-5) + 1e-12).all())
    assert float(group_err(mix).sum()) < float(group_err(iq).sum())
    assert len(torch.unique(mix.set_index)) >= 3


@pytest.mark.parametrize("fid", ["mix4-g32", "mix3-g64", "mix4-g128"])
def test_gptq_beats_rtn_under_the_hessian(fid: str) -> None:
    w, h = _data(16, 200, seed=4)
    fmt = get_format(fid)
    e_rtn = float(row_errors(w, dequantize(quantize_weight(w, fmt, hessian=h, method="rtn")), h).sum())
    q = quantize_weight(w, fmt, hessian=h, method="gptq")
    assert q.nbytes() == fmt.nbytes(tuple(w.shape))
    assert float(row_errors(w, dequantize(q), h).sum()) < 0.9 * e_rtn


def test_batched_measurement_equals_one_format_at_a_time() -> None:
    w, h = _data(24, 256, seed=5)
    stats = TensorStats(roles=(LinearStats(h, 100, torch.rand(24), {}),))
    fids = ["mix4-g32", "int4-g32", "mix3-g64", "iq4_nl"]
    a = {r.format: r for r in measure_tensor("t", w, stats, fids, batched=True)}
    b = {r.format: r for r in measure_tensor("t", w, stats, fids, batched=False)}
    for f in fids:
        assert a[f].bytes == b[f].bytes == get_format(f).nbytes((24, 256))
        assert a[f].output_error == pytest.approx(b[f].output_error, rel=1e-6)
        assert a[f].fisher_error == pytest.approx(b[f].fisher_error, rel=1e-6)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_row_chunks_concatenate_to_the_same_bytes(method: str) -> None:
    w, h = _data(40, 192, seed=6)
    for fid in ("mix4-g32", "mix3-g128"):
        whole = quantize_weight(w, fid, hessian=h, method=method)
        parts = quantize_weight(w, fid, hessian=h, method=method, max_elems=8 * 192)
        assert set(whole.parts) == set(parts.parts)
        for name in whole.parts:
            assert torch.equal(whole.parts[name], parts.parts[name]), (fid, name)
    fmt = get_format("mix4-g32")
    q = quantize_weight(w[:6], fmt, method="rtn")
    with pytest.raises(FormatError):  # 6 rows x 6 groups x 2 bits do not end on a byte
        fmt.concat_rows([quantize_weight(w[:3], fmt, method="rtn"), q])


def test_bad_stored_parts_are_refused() -> None:
    fmt = get_format("mix4-g32")
    w, _ = _data(4, 64, seed=7)
    q = quantize_weight(w, fmt, method="rtn")
    from bitalloc.formats import QTensor

    broken = QTensor(q.format, q.shape, q.dtype, {k: v for k, v in q.parts.items() if k != "weight_set"})
    with pytest.raises(FormatError):
        fmt.decode(broken)
    grid = fmt.fit(w)
    codes, _ = grid.snap(w)
    with pytest.raises(FormatError):
        get_format("mix3-g32").encode(codes, grid, (4, 64))
