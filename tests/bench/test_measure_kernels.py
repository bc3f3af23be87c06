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
