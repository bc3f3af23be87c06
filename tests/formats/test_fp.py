"""The Format contract for the float formats and NF4: exact bytes, round trips, row concatenation, ids,
shapes, weighted fits never worse than the plain rule, NaN refusal, GPTQ and the batched measurement."""
from __future__ import annotations

import pytest
import torch

from bitalloc.errors import NumericsError
from bitalloc.formats import FormatError, Grid, get_format
from bitalloc.formats.fp import FPGroupFormat
from bitalloc.formats.gguf_common import fp16r
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.formats.refit import layer_output_error

IDS = ["fp4-g32", "fp4-g64", "fp4-g128", "fp3-e1m1-g32", "fp5-e2m2-g64", "fp6-e2m3-g32", "fp6-e3m2-g128",
       "mxfp4", "nvfp4", "fp8", "nf4"]


def _w(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-2, 0.5, rows).unsqueeze(1)


def _hessian(cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("fid", IDS)
@pytest.mark.parametrize("shape", [(1, 128), (3, 256), (7, 384), (17, 128)])
def test_bytes_round_trip_and_grid_values(fid, shape):
    fmt = get_format(fid)
    assert fmt.id == fid and get_format(fid.upper()) is fmt
    w = _w(*shape)
    grid = fmt.fit(w)
    codes, values = grid.snap(w)
    q = fmt.encode(codes, grid, shape)
    assert q.nbytes() == fmt.nbytes(shape)
    d = fmt.decode(q)
    assert torch.equal(d, grid.values(codes)) and torch.equal(d, values)
    # every code of the code book survives packing
    g2 = torch.Generator().manual_seed(9)
    rnd = torch.randint(0, grid.levels.numel(), shape, generator=g2)
    q2 = fmt.encode(rnd, grid, shape)
    assert torch.equal(fmt.decode(q2), grid.values(rnd))


@pytest.mark.parametrize("fid", IDS)
def test_concat_rows_is_byte_identical(fid):
    w = _w(40, 256, seed=2)
    fmt = get_format(fid)
    whole = quantize_weight(w, fmt, method="rtn", max_elems=None)
    parts = quantize_weight(w, fmt, method="rtn", max_elems=8 * 256)
    assert set(whole.parts) == set(parts.parts)
    for k in whole.parts:
        assert whole.parts[k].dtype == parts.parts[k].dtype
        assert torch.equal(whole.parts[k].view(torch.uint8), parts.parts[k].view(torch.uint8)), k
    with pytest.raises(FormatError):
        fmt.concat_rows([whole, quantize_weight(_w(8, 128), fmt, method="rtn")])


def test_nvfp4_concat_shifts_scales_exactly():
    w = _w(16, 64, seed=3)
    w[8:] *= 1e-3  # the second block gets a global scale 2^10 larger
    fmt = get_format("nvfp4")
    parts = [quantize_weight(w[:8], fmt, method="rtn"), quantize_weight(w[8:], fmt, method="rtn")]
    assert float(parts[1].parts["weight_global_scale"][0]) > float(parts[0].parts["weight_global_scale"][0])
    joined = fmt.concat_rows(parts)
    assert torch.equal(fmt.decode(joined), torch.cat([fmt.decode(p) for p in parts]))
    w[8:] *= 1e-4  # now the small rows' scales fall out of E4M3's range under the big rows' global scale
    parts = [quantize_weight(w[:8], fmt, method="rtn"), quantize_weight(w[8:], fmt, method="rtn")]
    with pytest.raises(FormatError, match="quantize the tensor whole"):
        fmt.concat_rows(parts)


@pytest.mark.parametrize("bad", ["fp4-g48", "fp7-e3m3-g32", "fp5-g32", "fp4-e3m1-g32", "fp2-e1m0-g32", "fp4-g",
                                 "fp6-e0m5-g32", "mxfp6"])
def test_bad_ids(bad):
    with pytest.raises(FormatError):
        get_format(bad)


def test_keep_ids_still_resolve():
    assert get_format("fp16").id == "fp16" and get_format("fp32").id == "fp32"
    assert get_format("fp4-e2m1-g64").id == "fp4-g64"


@pytest.mark.parametrize("fid", IDS)
def test_bad_shapes(fid):
    fmt = get_format(fid)
    bad = [(4,), (2, 3, 64), (0, 64)] + ([] if fid == "fp8" else [(4, 100)])
    for shape in bad:
        with pytest.raises(FormatError):
            fmt.nbytes(shape)


@pytest.mark.parametrize("fid", IDS)
def test_nan_inf_refused(fid):
    w = _w(4, 128)
    w[0, 0] = float("inf")
    with pytest.raises(NumericsError):
        get_format(fid).fit(w)


def _plain(fmt, w):
    """The plain rule: absmax / largest level, stored as the format stores it (MX: the OCP exponent)."""
    rows, cols = w.shape
    gs = fmt.group_size(cols) if hasattr(fmt, "group_size") else 64
    amax = w.reshape(rows, -1, gs).abs().amax(-1)
    top = float(fmt.fit(w).levels[-1])
    if fmt.id == "mxfp4":
        s = 2.0 ** (torch.floor(torch.log2(amax)) - 2)
    elif fmt.id == "nvfp4":
        e = fmt.global_exp(float(w.abs().max()))
        s = fmt._rounder(e)(amax / top)
    elif isinstance(fmt, FPGroupFormat):
        s = fp16r(amax / top)
    else:
        s = amax / top
    return Grid(s, torch.zeros_like(s), fmt.fit(w).levels, gs)


@pytest.mark.parametrize("fid", IDS)
def test_fit_never_worse_than_plain_rule(fid):
    fmt = get_format(fid)
    w = _w(32, 256, seed=4)
    imp = torch.rand(256) ** 2 * 4
    grid, plain = fmt.fit(w, imp), _plain(fmt, w)
    err = lambda g: ((w - g.snap(w)[1]) ** 2 * imp).sum(1)  # noqa: E731
    assert bool((err(grid) <= err(plain)).all())
    assert float(err(grid).sum()) <= float(err(plain).sum())


@pytest.mark.parametrize("fid", IDS)
def test_gptq_and_refine(fid):
    fmt = get_format(fid)
    w = _w(16, 128, seed=5)
    h = _hessian(128)
    rtn = dequantize(quantize_weight(w, fmt, hessian=h, method="rtn"))
    gq = dequantize(quantize_weight(w, fmt, hessian=h, method="gptq"))
    assert layer_output_error(w, gq, h) < layer_output_error(w, rtn, h)
    grid = fmt.fit(w, torch.diagonal(h))
    codes, _ = grid.snap(w)
    ref = fmt.refine(w, codes, grid, h)
    before = ((w - grid.values(codes)) @ h * (w - grid.values(codes))).sum(1)
    after = ((w - ref.values(codes)) @ h * (w - ref.values(codes))).sum(1)
    assert bool((after <= before * (1 + 1e-6)).all())
    fmt.encode(codes, ref, tuple(w.shape))  # the refit grid is storable


def test_batched_measurement_mixes_codebooks():
    from bitalloc.measure import measure_tensor
    from bitalloc.stats import LinearStats, TensorStats

    w = _w(32, 128, seed=6)
    h = _hessian(128)
    stats = TensorStats((LinearStats(hessian=h, ntokens=512, grad_sq=torch.ones(32)),))
    fids = ["int4-g64", "nf4", "mxfp4", "nvfp4", "fp8", "fp4-g32", "iq4_nl", "fp6-e2m3-g32"]
    a = {r.format: r for r in measure_tensor("t", w, stats, fids, batched=True)}
    b = {r.format: r for r in measure_tensor("t", w, stats, fids, batched=False)}
    assert set(a) == set(fids)
    for f in fids:
        assert a[f].bytes == get_format(f).nbytes(tuple(w.shape))
        assert a[f].output_error == pytest.approx(b[f].output_error, rel=1e-3), f


@pytest.mark.parametrize("fid", IDS)
def test_zero_and_tiny_weights(fid):
    fmt = get_format(fid)
    w = torch.zeros(8, 128)
    w[1] = 1e-20 * torch.randn(128)
    w[2, 5] = 3.0
    q = quantize_weight(w, fmt, method="rtn")
    d = fmt.decode(q)
    assert bool(torch.isfinite(d).all()) and bool((d[0] == 0).all())
    assert float(d[2, 5]) == pytest.approx(3.0, rel=0.1)
