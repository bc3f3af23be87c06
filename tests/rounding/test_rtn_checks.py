"""The one-pass input checks of the scale search equal the isfinite/negative scans they replace."""
from __future__ import annotations

import pytest
import torch

from bitalloc.rounding.rtn import all_finite, finite_non_negative


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1e-30, 3e38])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 33), (513, 128)])
def test_one_pass_checks_equal_the_scans(bad: float, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(shape, generator=g)
    n = base.numel()
    for pos in sorted({0, min(1, n - 1), n // 2, max(n - 17, 0), n - 1}):  # SIMD lanes and scalar tails
        t = base.clone()
        t.view(-1)[pos] = bad
        for x in (t, t.t(), t[:, :1].expand(shape)):  # contiguous, transposed, stride-0
            assert all_finite(x) == bool(torch.isfinite(x).all())
            assert finite_non_negative(x) == (bool(torch.isfinite(x).all()) and not bool((x < 0).any()))
    assert all_finite(base) and finite_non_negative(base)
    assert all_finite(torch.empty(0, 3)) and finite_non_negative(torch.empty(0, 3))
