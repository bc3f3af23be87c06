"""Golden tests of the float formats against independent decoders: torch's float8 dtype, compressed-tensors'
NVFP4/MXFP4 compressors and its dequantize, and the OCP MX scale rule."""
from __future__ import annotations

import math

import pytest
import torch

from bitalloc.formats import QTensor, get_format
from bitalloc.formats.fp_common import E2M1, E4M3FN, MiniFloat
from bitalloc.rounding import quantize_weight

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import kE2M1ToFloat, unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam  # noqa: E402

NV = preset_name_to_scheme("NVFP4A16", ["Linear"])
MX = preset_name_to_scheme("MXFP4A16", ["Linear"])


def _w(rows=48, cols=256, seed=0, laplace=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if laplace:
        w = torch.distributions.Laplace(0.0, 1.0).sample((rows, cols)) * 0.02
    return w * torch.logspace(-2, 1, rows).unsqueeze(1)  # rows of very different magnitudes


def test_e2m1_levels_and_codes_match_compressed_tensors():
    mags = tuple(float(v) for v in kE2M1ToFloat)
    assert E2M1.magnitudes == mags
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 8)
    theirs = unpack_fp4_from_uint8(packed, 1, 16, dtype=torch.float32).reshape(-1)
    ours = E2M1.levels[E2M1.code_to_level[codes.long()]]
    assert torch.equal(ours, theirs)  # -0 compares equal to 0
    assert torch.equal(E2M1.code_to_level[E2M1.level_to_code], torch.arange(15))


def test_e4m3fn_levels_are_torch_float8():
    allv = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    finite = allv[~torch.isnan(allv)]
    assert torch.equal(E4M3FN.levels, torch.unique(finite))
    codes = E4M3FN.level_to_code
    assert torch.equal(codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32), E4M3FN.levels)


@pytest.mark.parametrize("e,m,top", [(2, 3, 7.5), (3, 2, 28.0), (1, 1, 3.0), (2, 2, 7.0), (3, 1, 24.0)])
def test_ocp_minifloat_maxima(e, m, top):
    mf = MiniFloat(e, m)
    assert mf.max == top and len(mf.levels) == 2 ** (e + m + 1) - 1
    bias = 2 ** (e - 1) - 1
    assert mf.magnitudes[1] == 2.0 ** (1 - bias) / 2 ** m  # smallest subnormal


def test_fp8_decode_is_torch_cast_times_scale():
    w = _w()
    q = quantize_weight(w, "fp8", method="rtn")
    stored, scale = q.parts["weight_packed"], q.parts["weight_scale"]
    assert stored.dtype == torch.float8_e4m3fn and scale.shape == (w.shape[0], 1)
    d = get_format("fp8").decode(q)
    assert torch.equal(d, stored.to(torch.float32) * scale)
    torch_cast = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(torch_cast.view(torch.uint8), stored.view(torch.uint8))


def _ct_fp32(comp, parts, rows, cols, args):
    """compressed-tensors' dequantize in float32 (its decompress ends in bfloat16)."""
    x = unpack_fp4_from_uint8(parts["weight_packed"], rows, cols, dtype=torch.float32)
    return dequantize(x_q=x, scale=comp._decompress_scale(parts["weight_scale"], torch.float32), args=args,
                      global_scale=parts.get("weight_global_scale"), dtype=torch.float32)


@pytest.mark.parametrize("fid,comp,scheme", [("nvfp4", NVFP4PackedCompressor, NV), ("mxfp4", MXFP4PackedCompressor, MX)])
@pytest.mark.parametrize("laplace", [False, True])
def test_decode_equals_compressed_tensors(fid, comp, scheme, laplace):
    w = _w(laplace=laplace)
    imp = torch.rand(w.shape[1]) + 0.1
    q = quantize_weight(w, fid, method="rtn", importance=imp)
    ours = get_format(fid).decode(q)
    rows, cols = w.shape
    assert torch.equal(ours, _ct_fp32(comp, q.parts, rows, cols, scheme.weights))
    theirs = comp.decompress(dict(q.parts), scheme)["weight"]
    assert torch.equal(ours.to(theirs.dtype), theirs)


def test_decode_of_compressed_tensors_nvfp4_bytes():
    """compressed-tensors quantizes and packs with its own (non power-of-two) global scale; we decode it."""
    w = _w(seed=3)
    rows, cols = w.shape
    g = generate_gparam(w.min(), w.max())
    groups = w.reshape(rows, -1, 16)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), NV.weights, global_scale=g)
    sd = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": g}, NV)
    parts = {k: sd[k] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
    q = QTensor("nvfp4", (rows, cols), "float32", parts)
    assert torch.equal(get_format("nvfp4").decode(q), _ct_fp32(NVFP4PackedCompressor, parts, rows, cols, NV.weights))


def test_decode_of_compressed_tensors_mxfp4_bytes():
    w = _w(seed=4)
    rows, cols = w.shape
    groups = w.reshape(rows, -1, 32)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), MX.weights)
    sd = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, MX)
    parts = {k: sd[k] for k in ("weight_packed", "weight_scale")}
    assert parts["weight_scale"].dtype == torch.uint8
    q = QTensor("mxfp4", (rows, cols), "float32", parts)
    assert torch.equal(get_format("mxfp4").decode(q), _ct_fp32(MXFP4PackedCompressor, parts, rows, cols, MX.weights))


def test_mxfp4_scale_is_ocp_exponent_or_neighbour():
    w = _w(seed=5)
    grid = get_format("mxfp4").fit(w)
    amax = w.reshape(w.shape[0], -1, 32).abs().amax(-1)
    ocp = torch.floor(torch.log2(amax)) - 2  # OCP MX: floor(log2 amax) - emax(E2M1)
    got = torch.log2(grid.scale)
    assert bool(((got - ocp).abs() <= 1).all())
    assert bool((got == ocp).float().mean() > 0.3)


def test_nvfp4_global_scale_is_power_of_two_below_ct_rule():
    w = _w(seed=6)
    q = quantize_weight(w, "nvfp4", method="rtn")
    g = float(q.parts["weight_global_scale"][0])
    assert math.frexp(g)[0] == 0.5
    ct_g = float(generate_gparam(w.min(), w.max()))
    assert ct_g / 4 < g <= ct_g / 2
    assert float(q.parts["weight_scale"].to(torch.float32).max()) <= 448
