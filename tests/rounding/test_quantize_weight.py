"""Row-chunked quantization: byte-identical to the whole tensor for every format family; concat_rows rules."""
from __future__ import annotations

import pytest
import torch

from bitalloc.formats import FormatError, get_format
from bitalloc.rounding import dequantize, quantize_chunks, quantize_weight, row_chunks

# one or two of every family: int grouped/row (asym, sym, odd widths), GGUF legacy and K-quants, keep
FORMATS = ["int4-g32", "int3-g64-sym", "int3-row", "int5-row-sym", "q8_0", "q4_1", "iq4_nl", "q4_k", "q6_k",
           "q3_k", "fp16", "bf16"]


def _data(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    x = torch.randn(3 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    return w, x.T @ x / (3 * cols)


def _same(a, b) -> None:
    assert (a.format, tuple(a.shape), a.dtype) == (b.format, tuple(b.shape), b.dtype)
    assert set(a.parts) == set(b.parts)
    for k in a.parts:
        assert a.parts[k].dtype == b.parts[k].dtype and torch.equal(a.parts[k], b.parts[k]), k


@pytest.mark.parametrize("fid", FORMATS)
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_chunked_is_byte_identical_to_whole(fid: str, method: str) -> None:
    rows, cols = 61, 256  # 61 rows: not a multiple of the 16-row blocks
    w, h = _data(rows, cols)
    whole = quantize_weight(w, fid, hessian=h, method=method, max_elems=None)
    chunks = list(quantize_chunks(w, fid, hessian=h, method=method, max_elems=16 * cols))
    assert [(s.start, s.stop) for s, _ in chunks] == [(0, 16), (16, 32), (32, 48), (48, 61)]
    _same(get_format(fid).concat_rows([q for _, q in chunks]), whole)
    _same(quantize_weight(w, fid, hessian=h, method=method, max_elems=16 * cols), whole)


@pytest.mark.parametrize("fid", ["int3-row", "int5-row-sym", "int4-g32", "int2-g128-sym"])
def test_row_groups_with_rows_that_end_mid_byte(fid: str) -> None:
    rows, cols = 29, 97  # 97 * 3 bits per row: rows start mid-byte; chunks hold multiples of 8 rows
    w, h = _data(rows, cols, seed=3)
    whole = quantize_weight(w, fid, hessian=h, max_elems=None)
    got = quantize_weight(w, fid, hessian=h, max_elems=10 * cols)
    _same(got, whole)
    assert torch.equal(dequantize(got), dequantize(whole))


def test_row_chunks_are_multiples_of_eight_rows() -> None:
    assert row_chunks(100, 10, None) == [slice(0, 100)]
    assert row_chunks(100, 10, 1000) == [slice(0, 100)]
    assert row_chunks(100, 10, 170) == [slice(a, min(a + 16, 100)) for a in range(0, 100, 16)]
    assert row_chunks(100, 1000, 5) == [slice(a, min(a + 8, 100)) for a in range(0, 100, 8)]  # at least 8 rows
    with pytest.raises(ValueError):
        row_chunks(10, 10, 0)


def test_concat_rows_refuses_misaligned_and_mixed_parts() -> None:
    w, _ = _data(10, 97)
    fmt = get_format("int3-row")
    a, b = fmt.encode(*_codes(fmt, w[:3]), (3, 97)), fmt.encode(*_codes(fmt, w[3:]), (7, 97))
    with pytest.raises(FormatError, match="byte boundary"):
        fmt.concat_rows([a, b])
    q8 = quantize_weight(w[:, :96], "q8_0")
    q4 = quantize_weight(w[:, :96], "q4_0")
    with pytest.raises(FormatError, match="share format"):
        get_format("q8_0").concat_rows([q8, q4])
    with pytest.raises(FormatError, match="share format"):
        get_format("fp16").concat_rows([get_format("fp16").store(w), get_format("fp16").store(w[:, :5])])
    with pytest.raises(FormatError, match="nothing"):
        fmt.concat_rows([])
    g32 = get_format("int4-g32")
    bad = quantize_weight(w[:, :96], g32)
    broken = type(bad)(bad.format, bad.shape, bad.dtype, {"weight_packed": bad.parts["weight_packed"]})
    with pytest.raises(FormatError, match="parts"):
        g32.concat_rows([bad, broken])


def _codes(fmt, w):
    grid = fmt.fit(w)
    return grid.snap(w)[0], grid


def test_per_element_importance_is_not_split() -> None:
    w, _ = _data(40, 64)
    imp = torch.rand(40, 64, generator=torch.Generator().manual_seed(1))
    chunks = list(quantize_chunks(w, "q4_0", importance=imp, method="rtn", max_elems=8 * 64))
    assert len(chunks) == 1
    _same(chunks[0][1], quantize_weight(w, "q4_0", importance=imp, method="rtn", max_elems=None))
