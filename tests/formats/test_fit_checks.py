"""The one-pass input checks of the scale search equal the isfinite/negative scans they replace."""
from __future__ import annotations

import pytest
import torch

from bitalloc.formats.fit import all_finite, finite_non_negative


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


@pytest.mark.parametrize("levels", [torch.arange(4).float(), torch.arange(-8, 8).float(), torch.arange(256).float()])
def test_int_search_pieces_equal_the_generic_ones(levels: torch.Tensor) -> None:
    """_IntSearch's error re-check, candidate and refit give the generic functions' exact bits, ties included."""
    from bitalloc.formats.fit import _IntSearch, _candidate, _refit, affine_error

    g = torch.Generator().manual_seed(3)
    n, k = 96, 32
    lo, hi = float(levels[0]), float(levels[-1])
    s = torch.rand(n, generator=g) * 0.1 + 0.01
    s[::7] = -s[::7]
    s[5] = 0.0  # zero scale
    s[6] = 1e-38  # u overflows to ±inf
    o = torch.randn(n, generator=g) * 0.1
    # every level's midpoint hit exactly (u = m + 0.5 for m from lo - 2 to hi + 2), then random values
    mids = torch.arange(lo - 2, hi + 2).float() + 0.5
    u = torch.cat([mids[torch.randint(0, len(mids), (n, k // 2), generator=g)],
                   torch.rand(n, k // 2, generator=g) * (hi - lo + 4) + lo - 2], 1)
    w = u * s.unsqueeze(1) + o.unsqueeze(1)
    w[6] = torch.randn(k, generator=g)
    imp = torch.rand(n, k, generator=g)
    srch = _IntSearch(n, k, lo, hi, True)
    for im in (None, imp):
        ref = affine_error(w, s, o, levels, im)
        got = srch.grid_error(w, s, o, levels, im)
        assert torch.equal(ref.view(torch.int32), got.view(torch.int32))
        e_ref, q_ref = _candidate(w, s, o, levels, im, True)
        e_got = srch.candidate(w, s, o, im, False)
        assert torch.equal(e_ref.view(torch.int32), e_got.view(torch.int32)) and torch.equal(q_ref, srch.q)
        if im is None:
            sw, sy = torch.full_like(s, k), w.sum(1)
        else:
            sw, sy = im.sum(1), (im * w).sum(1)
        for sym in (False, True):
            a = _refit(w, q_ref, im, s, o, sym)
            b = srch.refit(w, im, sw, sy, s, o, sym)
            assert all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))
