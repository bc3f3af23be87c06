"""Coordinate descent on nested codes (it never raises the joint objective, keeps exact elements, stays nested) and
refit depths (exact int formats, never worse than the lattice for the same codes)."""
from __future__ import annotations

import pytest
import torch

from bitalloc.nest.codes import depth_grid, nested_codes, nested_grid, pick_outliers
from bitalloc.nest.descent import descend_codes, relative_weights
from bitalloc.errors import InputError
from bitalloc.nest.refit import IDENTITY, default_refit, fit_lattice, fit_refit, refit_codes, refit_depth_grid

GROUP, DEPTH = 32, 5
DEPTHS = list(range(2, DEPTH + 1))


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 96, generator=g)
    x = torch.randn(256, 96, generator=g) * torch.linspace(0.1, 4, 96)
    x[:, 7] *= 20  # one massive input channel, as in real LLMs
    return w, x.T @ x / 256


def _joint(w: torch.Tensor, h: torch.Tensor, vals: dict[int, torch.Tensor], lam: dict[int, float]) -> float:
    h64 = h.double()
    return sum(lam[k] * float((((v - w).double() @ h64) * (v - w).double()).sum()) for k, v in vals.items())


def _values(step, low, leaf: torch.Tensor, exact=None) -> dict[int, torch.Tensor]:  # noqa: ANN001
    out = {}
    for k in DEPTHS:
        v = depth_grid(step, low, DEPTH, k, GROUP).values(leaf >> (DEPTH - k))
        out[k] = v if exact is None else torch.where(exact[0], exact[1], v)
    return out


def _scales(step, low):  # noqa: ANN001, ANN202
    grids = [depth_grid(step, low, DEPTH, k, GROUP) for k in DEPTHS]
    return torch.stack([g.scale for g in grids]), torch.stack([g.offset for g in grids])


def test_descent_never_raises_the_joint_error_and_lowers_it() -> None:
    w, h = _problem()
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    start = nested_codes(w, step, low, GROUP, DEPTH, h, passes=0)[DEPTH]
    lam = relative_weights(w, h, _values(step, low, start))
    dk, zk = _scales(step, low)
    before = _joint(w, h, _values(step, low, start), lam)
    after = [before]
    for passes in (1, 2, 3):
        leaf = descend_codes(w, h, start, dk, zk, DEPTHS, DEPTH, lam, GROUP, passes, block_size=32)
        assert leaf.dtype == torch.int64 and int(leaf.min()) >= 0 and int(leaf.max()) < 1 << DEPTH
        after.append(_joint(w, h, _values(step, low, leaf), lam))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(after, after[1:]))  # each pass keeps or lowers it
    assert after[-1] < 0.97 * before  # and the descent does something on this problem
    assert torch.equal(descend_codes(w, h, start, dk, zk, DEPTHS, DEPTH, lam, GROUP, 0), start)
    # blocks change only when the gradient is refreshed, not the result
    one = descend_codes(w, h, start, dk, zk, DEPTHS, DEPTH, lam, GROUP, 1, block_size=96)
    other = descend_codes(w, h, start, dk, zk, DEPTHS, DEPTH, lam, GROUP, 1, block_size=7)
    assert (one != other).float().mean() < 0.01


def test_nested_codes_with_descent_stay_nested_and_beat_the_joint_rounding() -> None:
    w, h = _problem(1)
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    plain = nested_codes(w, step, low, GROUP, DEPTH, h, passes=0)
    desc = nested_codes(w, step, low, GROUP, DEPTH, h, passes=2)
    for k in DEPTHS:
        assert torch.equal(desc[k], desc[DEPTH] >> (DEPTH - k))
    lam = relative_weights(w, h, _values(step, low, plain[DEPTH]))
    assert _joint(w, h, _values(step, low, desc[DEPTH]), lam) < _joint(w, h, _values(step, low, plain[DEPTH]), lam)


def test_one_weighed_depth_descends_on_that_depth_only() -> None:
    w, h = _problem(2)
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    only = {k: float(k == 3) for k in DEPTHS}
    plain = nested_codes(w, step, low, GROUP, DEPTH, h, only, passes=0)
    desc = nested_codes(w, step, low, GROUP, DEPTH, h, only, passes=2)
    err = [_joint(w, h, {3: _values(step, low, c[DEPTH])[3]}, {3: 1.0}) for c in (plain, desc)]
    assert err[1] <= err[0] * (1 + 1e-6)


def test_exact_elements_keep_their_codes() -> None:
    w, h = _problem(3)
    exact = pick_outliers(w, 2, torch.diagonal(h))
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    start = nested_codes(w, step, low, GROUP, DEPTH, h, exact=exact, passes=0)[DEPTH]
    lam = relative_weights(w, h, _values(step, low, start, exact))
    dk, zk = _scales(step, low)
    leaf = descend_codes(w, h, start, dk, zk, DEPTHS, DEPTH, lam, GROUP, 2, exact=exact)
    assert torch.equal(leaf[exact[0]], start[exact[0]])
    assert not torch.equal(leaf, start)
    assert _joint(w, h, _values(step, low, leaf, exact), lam) <= _joint(w, h, _values(step, low, start, exact), lam)


def test_refit_grids_are_exact_int_formats_and_identity_is_the_lattice() -> None:
    from bitalloc.formats import get_format
    from bitalloc.rounding import dequantize

    w, h = _problem(4)
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    leaf = nested_codes(w, step, low, GROUP, DEPTH, h, passes=0)[DEPTH]
    g = torch.Generator().manual_seed(0)
    for k in (2, 3):
        mu = torch.randint(1, 256, step.shape, generator=g, dtype=torch.uint8)
        tau = torch.randint(0, 256, step.shape, generator=g, dtype=torch.uint8)
        grid = refit_depth_grid(step, low, DEPTH, k, GROUP, mu, tau)
        q = get_format(f"int{k}-g{GROUP}").encode(leaf >> (DEPTH - k), grid, tuple(w.shape))  # fp16 scale and zero
        assert torch.equal(dequantize(q), grid.values(leaf >> (DEPTH - k)))
        ident = torch.full(step.shape, IDENTITY, dtype=torch.uint8)
        lat, same = depth_grid(step, low, DEPTH, k, GROUP), refit_depth_grid(step, low, DEPTH, k, GROUP, ident, ident)
        assert torch.equal(lat.scale, same.scale) and torch.equal(lat.offset, same.offset)


def test_fit_refit_is_never_worse_than_the_lattice_row_by_row() -> None:
    w, h = _problem(5)
    exact = pick_outliers(w, 2, torch.diagonal(h))
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    for ex in (None, exact):
        leaf = nested_codes(w, step, low, GROUP, DEPTH, h, exact=ex)[DEPTH]
        for k in (2, 3):
            codes = leaf >> (DEPTH - k)
            mu, tau = fit_refit(w, h, codes, step, low, DEPTH, k, GROUP, ex)
            errs = []
            for grid in (depth_grid(step, low, DEPTH, k, GROUP), refit_depth_grid(step, low, DEPTH, k, GROUP, mu, tau)):
                v = grid.values(codes)
                v = v if ex is None else torch.where(ex[0], ex[1], v)
                errs.append((((v - w) @ h) * (v - w)).sum(1))
            assert bool((errs[1] <= errs[0]).all()) and float(errs[1].sum()) < 0.9 * float(errs[0].sum())


def test_refit_codes_stay_nested_and_default_refit_counts() -> None:
    w, h = _problem(6)
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    leaf = nested_codes(w, step, low, GROUP, DEPTH, h)[DEPTH]
    new, st, lw, corr = refit_codes(w, h, leaf, step, low, GROUP, DEPTH, [2, 3], DEPTHS)
    assert sorted(corr) == [2, 3] and new.dtype == torch.int64 and int(new.max()) < 1 << DEPTH
    assert st.shape == step.shape and lw.shape == low.shape and not torch.equal(st, step)
    assert all(m.dtype == torch.uint8 and m.shape == step.shape for pair in corr.values() for m in pair)
    assert (default_refit(64, 6), default_refit(32, 6), default_refit(128, 6), default_refit(64, 2)) == (3, 1, 4, 0)


@pytest.mark.parametrize("group", [GROUP, 64])  # 96 columns: 64 pads the last group
def test_fit_lattice_is_fp16_and_never_worse_row_by_row(group: int) -> None:
    w, h = _problem(7)
    exact = pick_outliers(w, 2, torch.diagonal(h))
    step, low = nested_grid(w, group, DEPTH, torch.diagonal(h), free=[2, 3])
    lam = {4: 1.0, 5: 3.0}
    for ex in (None, exact):
        leaf = nested_codes(w, step, low, group, DEPTH, h, exact=ex)[DEPTH]
        st, lw = fit_lattice(w, h, leaf, step, low, DEPTH, group, lam, ex)
        assert torch.equal(st, st.half().float()) and torch.equal(lw, lw.half().float()) and bool((st > 0).all())
        errs = []
        for s_, l_ in ((step, low), (st, lw)):
            tot = torch.zeros(w.shape[0], dtype=torch.float64)
            for k, a in lam.items():
                v = depth_grid(s_, l_, DEPTH, k, group).values(leaf >> (DEPTH - k))
                e = (v if ex is None else torch.where(ex[0], ex[1], v)) - w
                tot += a * ((e @ h) * e).sum(1).double()
            errs.append(tot)
        assert bool((errs[1] <= errs[0]).all()) and float(errs[1].sum()) < 0.99 * float(errs[0].sum())
    assert fit_lattice(w, h, leaf, step, low, DEPTH, group, {}, None) == (step, low)


def test_nested_grid_refuses_depths_it_does_not_offer() -> None:
    w, h = _problem(8)
    with pytest.raises(InputError, match="free depths"):
        nested_grid(w, GROUP, DEPTH, torch.diagonal(h), free=[DEPTH + 1])


def test_relative_weights_count_each_depth_relative_to_its_own_error_times_the_emphasis() -> None:
    w, h = _problem(9)
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    vals = _values(step, low, nested_codes(w, step, low, GROUP, DEPTH, h)[DEPTH])
    errs = {k: float((((v - w) @ h) * (v - w)).sum()) for k, v in vals.items()}
    plain, deep = relative_weights(w, h, vals, emphasis=1.0), relative_weights(w, h, vals, emphasis=2.0)
    for k in DEPTHS:
        assert abs(plain[k] * errs[k] - 1) < 1e-4 and abs(deep[k] / plain[k] - 2.0 ** k) < 1e-3 * 2.0 ** k
    assert relative_weights(w, h, {3: w.clone()}, emphasis=2.0) == {3: 8.0}  # no error: counts 1


def test_free_depths_count_their_bins_with_their_best_scale_and_zero() -> None:
    """nested_grid's ``free`` depths (refit depths) are scored with the least-squares scale and zero of their bins:
    never a larger error than the lattice's own values for the same bins."""
    from bitalloc.nest.codes import _padded_groups, _rtn_error

    w, h = _problem(10)
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    g = _padded_groups(w, GROUP)
    gi = _padded_groups(torch.diagonal(h).reshape(1, -1).expand_as(w), GROUP)
    for k in DEPTHS:
        lat, free = _rtn_error(g, gi, step, low, DEPTH, k), _rtn_error(g, gi, step, low, DEPTH, k, True)
        assert bool((free <= lat * (1 + 1e-4) + 1e-9).all())
    assert float(_rtn_error(g, gi, step, low, DEPTH, 2, True).sum()) < 0.9 * float(_rtn_error(g, gi, step, low,
                                                                                                DEPTH, 2).sum())
