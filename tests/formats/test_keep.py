"""Pass-through formats fp16 / bf16 / fp32."""
from __future__ import annotations

import pytest
import torch

from bitalloc.errors import NumericsError
from bitalloc.formats import FormatError, get_format
from bitalloc.formats.keep import KeepFormat
from bitalloc.rounding import dequantize, quantize_weight


@pytest.mark.parametrize("fid,size,dtype", [("fp16", 2, torch.float16), ("bf16", 2, torch.bfloat16),
                                             ("fp32", 4, torch.float32)])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_store_decode_nbytes(fid: str, size: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    fmt = get_format(fid)
    assert not fmt.is_grid and fmt.id == fid and fmt.bits == 8 * size
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = fmt.store(w)
    assert set(q.parts) == {"weight"} and q.parts["weight"].dtype == dtype
    assert q.shape == shape and q.dtype == "float32" and q.format == fid
    n = w.numel() * size
    assert fmt.nbytes(shape) == n == q.nbytes()
    assert fmt.bpw(shape) == 8 * size
    out = fmt.decode(q)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(out, w.to(dtype).to(torch.float32))


def test_quantize_weight_passes_through() -> None:
    w = torch.randn(4, 6, dtype=torch.bfloat16)
    q = quantize_weight(w, "bf16")
    assert q.dtype == "bfloat16"
    assert torch.equal(dequantize(q), w.float())


def test_fp16_refuses_values_beyond_range() -> None:
    fmt = get_format("fp16")
    fmt.store(torch.tensor([65504.0, -65504.0]))  # the largest fp16 values are fine
    with pytest.raises(FormatError, match="exceeds the fp16 range"):
        fmt.store(torch.tensor([1.0, 65505.0]))
    with pytest.raises(FormatError, match="fp16 range"):
        fmt.store(torch.tensor([[-1e6]]))
    get_format("bf16").store(torch.tensor([1e6]))  # bf16 and fp32 cover it


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fid", ["fp16", "bf16", "fp32"])
def test_nan_inf_rejected(fid: str, bad: float) -> None:
    with pytest.raises(NumericsError, match="NaN/Inf"):
        get_format(fid).store(torch.tensor([0.0, bad]))


def test_bad_inputs() -> None:
    with pytest.raises(FormatError):
        KeepFormat("fp8")
    with pytest.raises(FormatError, match="shape"):
        get_format("fp16").nbytes((0, 3))
    with pytest.raises(FormatError, match="floating-point"):
        get_format("fp16").store(torch.ones(3, dtype=torch.int64))
    q = get_format("fp16").store(torch.ones(3))
    with pytest.raises(FormatError, match="cannot decode"):
        get_format("fp32").decode(q)
    with pytest.raises(FormatError, match="unknown format"):
        get_format("fp12")


def test_registry_ids_are_case_insensitive() -> None:
    assert get_format("FP16") == KeepFormat("fp16")
