"""The kernel bench's baseline is the same arithmetic as the library's normal equations (so its ratios compare
like with like)."""
from __future__ import annotations

import torch

from bench.measure_kernels import batched_over_groups
from bitalloc.formats.refit import _normal_equations


def test_the_baseline_normal_equations_equal_the_librarys():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g)
    z = torch.randint(-8, 8, (40, 96), generator=g).float()
    x = torch.randn(300, 96, generator=g)
    h = x.T @ x / 300
    for offset in (False, True):
        want = list(_normal_equations(w, z, 32, h, offset))
        got = list(batched_over_groups(w, z, 32, h, offset))
        m0, b0 = torch.cat([m for _, m, _ in want]), torch.cat([b for _, _, b in want])
        m1, b1 = torch.cat([m for _, m, _ in got]), torch.cat([b for _, _, b in got])
        assert m0.shape == (40, 3 * (2 if offset else 1), 3 * (2 if offset else 1))
        torch.testing.assert_close(m1, m0, rtol=1e-12, atol=0)
        torch.testing.assert_close(b1, b0, rtol=1e-12, atol=1e-12)


def test_the_factorisation_baseline_factorises_per_block_with_the_same_bytes(monkeypatch):
    """``PerBlockGPTQ`` (the bench's baseline) factorises once per row block, the library once per weight, and
    both write the same bytes."""
    from bench.measure_kernels import PerBlockGPTQ, _qbytes
    from bitalloc.rounding import methods, quantize_weight
    from bitalloc.rounding.methods import GPTQ
    from tests.rounding.test_methods import _count_factorisations

    calls = _count_factorisations(monkeypatch, methods)
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 64, generator=g), torch.randn(256, 64, generator=g)
    h = x.T @ x / 256
    now = _qbytes(quantize_weight(w, "q4_1", hessian=h, method=GPTQ(), max_elems=16 * 64))
    assert len(calls) == 1
    before = _qbytes(quantize_weight(w, "q4_1", hessian=h, method=PerBlockGPTQ(), max_elems=16 * 64))
    assert len(calls) == 1 + 4 and now == before
