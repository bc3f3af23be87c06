"""llama.cpp activation quantization (Q8_0 / Q8_K) and the hooks that apply it to a torch model."""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from bitalloc.errors import InputError
from bitalloc.export.llamacpp_emulation import (activation_roundtrip, linear_types_from_gguf, llamacpp_matmuls,
                                                q8_0_roundtrip, q8_k_roundtrip)
from tests.conftest import tiny_llama


def _q8_k_scalar(block: list[float]) -> list[float]:
    """Q8_K's rule written out element by element (float32 arithmetic via numpy scalars)."""
    f = np.float32
    m = max(block, key=abs)
    if m == 0:
        return [0.0] * len(block)
    iscale = f(-127.0) / f(m)
    q = [min(127, round(float(iscale * f(v)))) for v in block]  # Python round: half to even, like rint
    d = f(1.0) / iscale
    return [float(f(v) * d) for v in q]


def _q8_0_x86_scalar(block: list[float]) -> list[float]:
    """x86 Q8_0's rule element by element in float32: multiplier 127/amax, rint, scale fp16(amax/127)."""
    f = np.float32
    amax = max(abs(f(v)) for v in block)
    if amax == 0:
        return [0.0] * len(block)
    mult, d = f(127.0) / amax, np.float16(amax / f(127.0)).astype(np.float32)
    return [float(f(round(float(f(v) * mult))) * d) for v in block]  # Python round: half to even


def test_q8_0_matches_x86_rule_and_gguf_py_away_from_ties() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g) * torch.rand(5, 1, generator=g) * 10
    x[1, :32] = 0.0  # an all-zero block
    out = q8_0_roundtrip(x)
    for r in range(5):
        for b in range(3):
            assert out[r, b * 32:(b + 1) * 32].tolist() == _q8_0_x86_scalar(x[r, b * 32:(b + 1) * 32].tolist())
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)  # the portable rule: same away from ties
    assert torch.equal(out, torch.from_numpy(np.asarray(ref, dtype=np.float32)).reshape(x.shape))
    assert torch.equal(out[1, :32], torch.zeros(32))
    assert not torch.equal(out, x)


def test_q8_0_rounds_half_to_even_like_avx() -> None:
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 127.0, 2.5, -2.5, 3.5  # amax = 127: multiplier 1, ties at ±2.5 and 3.5
    out = q8_0_roundtrip(x)
    assert out[1].item() == 2.0 and out[2].item() == -2.0 and out[3].item() == 4.0


def test_q8_k_matches_scalar_rule() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 512, generator=g) * 3
    x[0, 7] = -50.0  # negative extreme: d > 0
    x[2, 300] = 40.0  # positive extreme: d < 0
    x[1, 256:] = 0.0
    out = q8_k_roundtrip(x)
    for r in range(3):
        for b in range(2):
            blk = x[r, b * 256:(b + 1) * 256].tolist()
            assert out[r, b * 256:(b + 1) * 256].tolist() == _q8_k_scalar(blk), (r, b)
    assert out[0, 7].item() == pytest.approx(-50.0, rel=1e-6)
    err = (out - x).abs().amax().item()
    assert 0 < err <= 50.0 / 127 * 0.5 * (1 + 1e-5)


def test_block_length_errors_and_type_table() -> None:
    with pytest.raises(InputError):
        q8_0_roundtrip(torch.ones(2, 48))
    with pytest.raises(InputError):
        q8_k_roundtrip(torch.ones(2, 128))
    assert activation_roundtrip("Q4_1") is q8_0_roundtrip
    assert activation_roundtrip("iq4_nl") is q8_0_roundtrip
    assert activation_roundtrip("q3_k") is q8_k_roundtrip
    assert activation_roundtrip("f32") is None and activation_roundtrip("f16") is None
    with pytest.raises(InputError):
        activation_roundtrip("iq2_xxs")


def test_hooks_quantize_inputs_and_are_removed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8), nn.Linear(8, 4))
    x = torch.randn(3, 256)
    plain = model(x)
    with llamacpp_matmuls(model, {"0": "q4_k", "2": "q5_1", "3": "f32"}) as n:
        emu = model(x)
    assert n == 2
    h = torch.relu(model[0](q8_k_roundtrip(x)))
    expect = model[3](model[2](q8_0_roundtrip(h)))
    assert torch.equal(emu, expect)
    assert not torch.equal(emu, plain)
    assert torch.equal(model(x), plain)  # hooks gone
    with pytest.raises(InputError):
        with llamacpp_matmuls(model, {"1": "q8_0"}):
            pass


def test_linear_types_from_gguf(tmp_path: Path) -> None:
    from tests.export.test_gguf_export import write_tiny_gguf

    model = tiny_llama()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, model)
    types = linear_types_from_gguf(path, model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(types) == linears and "lm_head" in types
    assert set(types.values()) == {"f32"}
    with llamacpp_matmuls(model, types) as n:
        assert n == 0
    with torch.no_grad():
        assert math.isfinite(float(model(torch.tensor([[1, 2, 3]])).logits.sum()))
