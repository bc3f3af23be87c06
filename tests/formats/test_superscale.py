"""What the formats on :mod:`bitalloc.formats.superscale` share, checked for both families (``int…-dq``,
``mix…-dq``): row blocks concatenate byte-identically, GPTQ beats RTN and ``refine`` never makes a row worse,
batched measurement equals the per-format path."""
from __future__ import annotations

import pytest
import torch

from bitalloc.formats import FormatError, get_format
from bitalloc.measure import measure_tensor
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.formats.refit import layer_output_error, row_errors
from bitalloc.rounding.rtn import rtn_round
from bitalloc.stats import LinearStats, TensorStats
from tests.rounding.test_gptq import correlated


def _w(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fid", ["int4-g32-dq", "int3-g16-dq7", "mix4-g16-dq5", "mix3-g32-dq7"])
def test_concat_rows_byte_identical(fid: str) -> None:
    fmt = get_format(fid)
    w = _w(23, 200, seed=5)
    whole = quantize_weight(w, fmt, method="rtn", max_elems=None)
    parts = [quantize_weight(w[a:b], fmt, method="rtn", max_elems=None) for a, b in ((0, 5), (5, 6), (6, 23))]
    joined = fmt.concat_rows(parts)
    assert joined.shape == whole.shape and set(joined.parts) == set(whole.parts)
    for k in whole.parts:
        assert torch.equal(joined.parts[k], whole.parts[k]), k
    chunked = quantize_weight(w, fmt, method="rtn", max_elems=8 * 200)  # row blocks of 8 inside quantize_weight
    assert all(torch.equal(chunked.parts[k], whole.parts[k]) for k in whole.parts)
    with pytest.raises(FormatError):
        fmt.concat_rows([parts[0], quantize_weight(w[:, :199], fmt, method="rtn")])


@pytest.mark.parametrize("fid", ["int4-g32-dq", "mix4-g16-dq5", "mix3-g16-dq5"])
def test_gptq_not_worse_than_rtn_and_refine_never_worse(fid: str) -> None:
    fmt = get_format(fid)
    _x, h = correlated(1024, 96, seed=2)
    w = _w(32, 96, seed=7)
    rtn = layer_output_error(w, dequantize(quantize_weight(w, fmt, hessian=h, method="rtn")), h)
    gptq = layer_output_error(w, dequantize(quantize_weight(w, fmt, hessian=h, method="gptq")), h)
    assert gptq < 0.8 * rtn
    grid = fmt.fit(w, torch.diagonal(h))
    codes, _ = rtn_round(w, grid)
    new = fmt.refine(w, codes, grid, h)
    assert bool((row_errors(w, new.values(codes), h) <= row_errors(w, grid.values(codes), h)).all())
    assert new is not grid  # the refit helps some row on a correlated Hessian
    q = fmt.encode(codes, new, tuple(w.shape))  # a refit grid is still storable
    assert torch.equal(fmt.decode(q), new.values(codes))


def test_batched_measurement_equals_per_format() -> None:
    g = torch.Generator().manual_seed(4)
    w = _w(24, 200, seed=4)
    x = torch.randn(400, 200, generator=g) * torch.rand(200, generator=g)
    x = x + 0.6 * x.roll(1, 1)
    st = TensorStats((LinearStats(x.T @ x / 400, 100, torch.rand(24, generator=g), {}),))
    fmts = ["int4-g32-dq", "int3-g16-dq", "int4-g64", "mix4-g16-dq5", "mix3-g32-dq"]
    for method in ("gptq", "rtn"):
        new = measure_tensor("t", w, st, fmts, method)
        old = measure_tensor("t", w, st, fmts, method, batched=False)
        assert [(r.format, r.bytes) for r in new] == [(r.format, r.bytes) for r in old]
        for a, b in zip(new, old):
            assert a.output_error == pytest.approx(b.output_error, rel=1e-6)
            assert a.fisher_error == pytest.approx(b.fisher_error, rel=1e-6)
