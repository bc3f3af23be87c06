"""NF4 against bitsandbytes: its code book, its bytes (nibble order), its dequantize_4bit; the Format contract."""
from __future__ import annotations

import warnings

import pytest
import torch

from bitalloc.errors import NumericsError
from bitalloc.formats import FormatError, Grid, QTensor, get_format
from bitalloc.formats.nf4 import BLOCK, NF4_VALUES
from bitalloc.rounding import quantize_weight

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    F = pytest.importorskip("bitsandbytes.functional")


def _bnb(w):
    packed, state = F.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
    return packed, state


def _w(rows=24, cols=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, rows).unsqueeze(1)


def test_code_book_is_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_VALUES, dtype=torch.float32), F.get_4bit_type("nf4", device="cpu"))


def test_decode_of_bitsandbytes_bytes_equals_dequantize_4bit():
    w = _w()
    packed, state = _bnb(w)
    q = QTensor("nf4", tuple(w.shape), "float32", {"weight_packed": packed, "weight_scale": state.absmax})
    assert q.nbytes() == get_format("nf4").nbytes(tuple(w.shape))
    assert torch.equal(get_format("nf4").decode(q), F.dequantize_4bit(packed, state))


def test_encode_of_bitsandbytes_grid_gives_its_bytes():
    """Our RTN onto a grid whose scales are bnb's absmax reproduces bnb's packed bytes (nibble order included)."""
    w = _w(seed=1)
    packed, state = _bnb(w)
    fmt = get_format("nf4")
    rows, cols = w.shape
    grid = Grid(state.absmax.reshape(rows, -1), torch.zeros(rows, cols // BLOCK), fmt.levels, BLOCK)
    codes, _ = grid.snap(w)
    q = fmt.encode(codes, grid, (rows, cols))
    diff = (q.parts["weight_packed"] != packed).sum()
    # bnb scales by 1/absmax (a multiply), Grid.snap divides: a boundary tie may round differently
    assert int(diff) <= 2, int(diff)
    assert torch.equal(q.parts["weight_scale"], state.absmax)
    assert torch.equal(fmt.decode(q), grid.values(codes))


def test_our_bytes_decode_with_bitsandbytes():
    w = _w(seed=2)
    imp = torch.rand(w.shape[1]) + 0.1
    q = quantize_weight(w, "nf4", method="rtn", importance=imp)
    _, state = _bnb(w)
    state.absmax = q.parts["weight_scale"]
    assert torch.equal(get_format("nf4").decode(q), F.dequantize_4bit(q.parts["weight_packed"], state))


def test_fit_never_worse_than_absmax():
    w = _w(seed=3)
    imp = torch.rand(w.shape[1]) * 3
    fmt = get_format("nf4")
    grid = fmt.fit(w, imp)
    rows, cols = w.shape
    absmax = Grid(w.reshape(rows, -1, BLOCK).abs().amax(-1), torch.zeros(rows, cols // BLOCK), fmt.levels, BLOCK)
    err = lambda g: ((w - g.snap(w)[1]) ** 2 * imp).reshape(rows, -1, BLOCK).sum(-1)  # noqa: E731
    assert bool((err(grid) <= err(absmax)).all())
    assert float(err(grid).sum()) < 0.97 * float(err(absmax).sum())


def test_shapes_bytes_and_errors():
    fmt = get_format("nf4")
    assert fmt.nbytes((3, 128)) == 3 * 64 + 4 * 6 and fmt.bpw((64, 64)) == 4.5
    for bad in [(3, 100), (64,), (2, 2, 64), (0, 64)]:
        with pytest.raises(FormatError):
            fmt.check_shape(bad)
    w = _w()
    w[1, 2] = float("nan")
    with pytest.raises(NumericsError):
        fmt.fit(w)
    q = quantize_weight(_w(), "nf4", method="rtn")
    with pytest.raises(FormatError):
        fmt.decode(QTensor("nf4", q.shape, "float32", {"weight_packed": q.parts["weight_packed"]}))
