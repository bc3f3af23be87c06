"""Least-squares refit of group scales/offsets to fixed codes (formats/refit.py) and GPTQ with refits."""
from __future__ import annotations

import pytest
import torch

from bitalloc.formats import get_format
from bitalloc.formats import refit as refit_mod
from bitalloc.formats.base import Grid
from bitalloc.formats.gguf_common import fp16r
from bitalloc.formats.refit import group_lstsq, layer_output_error, refit_grid, row_errors
from bitalloc.rounding import GPTQ_REFITS, dequantize, gptq_refit, quantize_weight
from bitalloc.rounding.gptq import gptq_round

from tests.rounding.test_gptq import correlated, weight


def brute_lstsq(w, z, group, h, offset: bool):
    """The same least squares with an explicit design matrix per row (independent of the einsum path)."""
    rows, cols = w.shape
    nb = cols // group
    s_out, o_out = torch.empty(rows, nb, dtype=torch.float64), torch.empty(rows, nb, dtype=torch.float64)
    h = h.to(torch.float64)
    for r in range(rows):
        cols_a = []
        for b in range(nb):
            c = torch.zeros(cols, dtype=torch.float64)
            c[b * group:(b + 1) * group] = z[r, b * group:(b + 1) * group].to(torch.float64)
            cols_a.append(c)
        if offset:
            for b in range(nb):
                c = torch.zeros(cols, dtype=torch.float64)
                c[b * group:(b + 1) * group] = 1.0
                cols_a.append(c)
        a = torch.stack(cols_a, 1)
        x = torch.linalg.solve(a.T @ h @ a, a.T @ h @ w[r].to(torch.float64))
        s_out[r] = x[:nb]
        if offset:
            o_out[r] = x[nb:]
    return s_out, (o_out if offset else None)


def fitted(fmt_id: str, rows: int, cols: int, tokens: int):
    """A format, a weight, a correlated Hessian and the format's grid fitted with its diagonal."""
    fmt = get_format(fmt_id)
    w = weight(rows, cols)
    _, h = correlated(tokens, cols)
    return fmt, w, h, fmt.fit(w, torch.diagonal(h))


@pytest.mark.parametrize("offset", [False, True])
def test_group_lstsq_matches_explicit_design_matrix(offset: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refit_mod, "RIDGE", 0.0)
    w = weight(5, 48)
    _, h = correlated(400, 48)
    z = torch.randint(-8, 8, (5, 48)).float()
    s0 = torch.ones(5, 3)
    s, o = group_lstsq(w, z, 16, h, s0, torch.zeros(5, 3) if offset else None)
    bs, bo = brute_lstsq(w, z, 16, h, offset)
    assert torch.allclose(s, bs, rtol=1e-6, atol=1e-9)
    if offset:
        assert torch.allclose(o, bo, rtol=1e-6, atol=1e-9)
    else:
        assert o is None


def test_group_lstsq_of_several_code_sets_minimises_their_weighted_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Codes sharing one scale and offset per group (a nest's depths on one lattice): the weighted sum of their
    errors, against an explicit design matrix; one code set with weight 1 is the plain least squares, bit for bit."""
    monkeypatch.setattr(refit_mod, "RIDGE", 0.0)
    rows, cols, group = 4, 48, 16
    w = weight(rows, cols)
    _, h = correlated(400, cols)
    h64 = h.to(torch.float64)
    zs = [torch.randint(0, 4, (rows, cols)).float() * 4 + 1.5, torch.randint(0, 16, (rows, cols)).float() + 0.5]
    lam = [0.3, 2.0]
    s, o = group_lstsq(w, zs, group, h, torch.ones(rows, 3), torch.zeros(rows, 3), weights=lam)
    nb = cols // group
    for r in range(rows):
        lhs, rhs = torch.zeros(2 * nb, 2 * nb, dtype=torch.float64), torch.zeros(2 * nb, dtype=torch.float64)
        for a, z in zip(lam, zs):
            design = torch.zeros(cols, 2 * nb, dtype=torch.float64)
            for b in range(nb):
                design[b * group:(b + 1) * group, b] = z[r, b * group:(b + 1) * group].double()
                design[b * group:(b + 1) * group, nb + b] = 1.0
            lhs += a * design.T @ h64 @ design
            rhs += a * design.T @ h64 @ w[r].double()
        x = torch.linalg.solve(lhs, rhs)
        assert torch.allclose(s[r], x[:nb], rtol=1e-6, atol=1e-9) and torch.allclose(o[r], x[nb:], rtol=1e-6, atol=1e-9)
    one = group_lstsq(w, zs[1], group, h, torch.ones(rows, 3), torch.zeros(rows, 3))
    same = group_lstsq(w, [zs[1]], group, h, torch.ones(rows, 3), torch.zeros(rows, 3), weights=[1.0])
    assert torch.equal(one[0], same[0]) and torch.equal(one[1], same[1])
    with pytest.raises(ValueError, match="weights"):
        group_lstsq(w, zs, group, h, torch.ones(rows, 3), torch.zeros(rows, 3), weights=[1.0])


def test_group_lstsq_batches_equal_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    w = weight(7, 64)
    _, h = correlated(300, 64)
    z = torch.randint(0, 16, (7, 64)).float()
    args = (w, z, 32, h, torch.ones(7, 2), torch.zeros(7, 2))
    whole = group_lstsq(*args)
    monkeypatch.setattr(refit_mod, "BATCH_BYTES", 8 * 2 * 64 * 2)  # two rows per batch
    parts = group_lstsq(*args)
    assert torch.allclose(whole[0], parts[0]) and torch.allclose(whole[1], parts[1])


def test_degenerate_group_keeps_its_values() -> None:
    """A group whose codes are all equal cannot tell scale from offset: the ridge keeps them where they were."""
    w = weight(2, 32)
    _, h = correlated(200, 32)
    z = torch.randint(0, 16, (2, 32)).float()
    z[:, :16] = 3.0
    s0, o0 = torch.full((2, 2), 0.5), torch.full((2, 2), -0.25)
    s, o = group_lstsq(w, z, 16, h, s0, o0)
    assert bool(torch.isfinite(s).all() and torch.isfinite(o).all())
    assert s[:, 0].abs().max() < 10 and o[:, 0].abs().max() < 100


@pytest.mark.parametrize("fmt_id", ["q8_0", "q5_0", "q5_1", "q4_1", "iq4_nl"])
def test_refine_never_worse_per_row_and_encodes(fmt_id: str) -> None:
    fmt, w, h, grid = fitted(fmt_id, 24, 96, 500)
    codes, values = gptq_round(w, h, grid)
    new = fmt.refine(w, codes, grid, h)
    assert new is not grid
    before, after = row_errors(w, values, h), row_errors(w, new.values(codes), h)
    assert bool((after <= before).all())
    assert float(after.sum()) < 0.97 * float(before.sum())  # GPTQ's codes on a diagonal-fitted grid: room to refit
    assert torch.equal(fp16r(new.scale), new.scale) and torch.equal(fp16r(new.offset), new.offset)
    if fmt.spec.symmetric:
        assert bool((new.offset == 0).all())
    q = fmt.encode(codes, new, tuple(w.shape))
    assert torch.equal(dequantize(q), new.values(codes))


def test_refit_grid_keeps_rows_that_would_get_worse() -> None:
    """A rounding that ruins the refit (scales to 0) makes every row keep its old grid."""
    fmt, w, h, grid = fitted("q5_0", 8, 64, 300)
    codes, _ = gptq_round(w, h, grid)
    kept, _ = refit_grid(w, codes, grid, h, offset=False, rnd=torch.zeros_like)
    assert torch.equal(kept.scale, grid.scale) and torch.equal(kept.offset, grid.offset)
    nan, _ = refit_grid(w, codes, grid, h, offset=False, rnd=lambda x: torch.full_like(x, float("nan")))
    assert torch.equal(nan.scale, grid.scale)


def test_refit_grid_quadratic_form_is_the_row_error() -> None:
    """The keep-or-not test uses the least squares' own quadratic form: it equals the row errors of the
    decoded values up to the constant ``wᵀHw`` (no rows × cols × cols product per comparison)."""
    fmt, w, h, grid = fitted("q4_1", 6, 64, 300)
    codes, _ = gptq_round(w, h, grid)
    z = grid.level_values(codes)
    x = torch.cat([grid.scale, grid.offset], 1).to(torch.float64)
    (sl, m, rhs), = refit_mod._normal_equations(w, z, 32, h, True)
    w64, h64 = w.to(torch.float64), h.to(torch.float64)
    const = ((w64 @ h64) * w64).sum(1)
    assert torch.allclose(refit_mod._quad(m, rhs, x) + const, row_errors(w, grid.values(codes), h), rtol=1e-6)


def test_refit_grid_batches_equal_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, w, h, grid = fitted("q5_1", 9, 64, 300)
    codes, _ = gptq_round(w, h, grid)
    whole = fmt.refine(w, codes, grid, h)
    monkeypatch.setattr(refit_mod, "BATCH_BYTES", 8 * 2 * 64 * 2)  # two rows per batch
    parts = fmt.refine(w, codes, grid, h)
    assert torch.equal(whole.scale, parts.scale) and torch.equal(whole.offset, parts.offset)


def test_refit_of_scales_alone_fits_around_fixed_offsets() -> None:
    """``offset=False`` on a grid whose offsets are not 0: the scales are fit to what the offsets leave, and
    no row gets worse."""
    fmt, w, h, grid = fitted("q4_1", 8, 64, 300)
    codes, values = gptq_round(w, h, grid)
    new, _ = refit_grid(w, codes, grid, h, offset=False, rnd=fp16r)
    assert torch.equal(new.offset, grid.offset) and bool((grid.offset != 0).any())
    before, after = row_errors(w, values, h), row_errors(w, new.values(codes), h)
    assert bool((after <= before * (1 + 1e-6)).all()) and float(after.sum()) < float(before.sum())


def test_formats_without_refit_return_the_same_grid() -> None:
    for fmt_id in ("q4_k", "int4-g32"):
        fmt = get_format(fmt_id)
        w = weight(4, 256)
        grid = fmt.fit(w)
        assert fmt.refine(w, torch.zeros(4, 256, dtype=torch.long), grid, torch.eye(256)) is grid


def test_gptq_refit_lowers_the_error_and_quantize_weight_uses_it() -> None:
    fmt, w, h, grid = fitted("q5_1", 16, 128, 600)
    _, plain = gptq_round(w, h, grid)
    codes, g = gptq_refit(w, h, grid, fmt)
    once_codes, once = gptq_refit(w, h, grid, fmt, rounds=1)
    e_plain = layer_output_error(w, plain, h)
    e_once = layer_output_error(w, once.values(once_codes), h)
    e_full = layer_output_error(w, g.values(codes), h)
    assert e_once < e_plain and e_full < e_plain
    assert GPTQ_REFITS >= 1
    q = quantize_weight(w, fmt, hessian=h, method="gptq")
    assert torch.equal(dequantize(q), g.values(codes))


def test_gptq_refit_zero_rounds_is_plain_gptq() -> None:
    fmt, w, h, grid = fitted("q4_0", 8, 64, 300)
    codes, g = gptq_refit(w, h, grid, fmt, rounds=0)
    assert g is grid and torch.equal(codes, gptq_round(w, h, grid)[0])


def test_refit_on_grid_without_offset_column_keeps_offset_tensor() -> None:
    g = Grid(torch.ones(2, 2), torch.zeros(2, 2), torch.arange(-4, 4, dtype=torch.float32), 8)
    w = weight(2, 16)
    codes = torch.randint(0, 8, (2, 16))
    new, _ = refit_grid(w, codes, g, torch.eye(16), offset=False, rnd=lambda x: x)
    assert torch.equal(new.offset, g.offset)


def _systems(n: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n // 2, generator=g, dtype=torch.float64)
    m = a @ a.transpose(1, 2) + torch.eye(n, dtype=torch.float64)
    return m, torch.randn(batch, n, generator=g, dtype=torch.float64), torch.randn(batch, n, generator=g,
                                                                                   dtype=torch.float64)


def test_wide_systems_are_solved_one_at_a_time_narrow_ones_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a batch of systems wider than BATCHED_SOLVE_MAX is never handed to the batched LU (torch 2.13's
    fails there on several threads, or differs from one system's solve depending on the calls before); narrower
    ones are, in one call."""
    from bitalloc.formats import refit

    real = torch.linalg.solve
    calls: list[tuple[int, int]] = []

    def recording(a_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        calls.append((int(a_.shape[0]), int(a_.shape[-1])))
        return real(a_, b_)

    monkeypatch.setattr(refit.torch.linalg, "solve", recording)
    wide = refit.BATCHED_SOLVE_MAX + 1
    m, rhs, x0 = _systems(wide, 3, 0)
    got = refit._solve(m, rhs, x0)
    assert calls == [(1, wide)] * 3
    monkeypatch.setattr(refit.torch.linalg, "solve", real)
    one = [refit._solve(m[i:i + 1], rhs[i:i + 1], x0[i:i + 1]) for i in range(3)]
    assert torch.equal(got, torch.cat(one))
    calls.clear()
    monkeypatch.setattr(refit.torch.linalg, "solve", recording)
    m, rhs, x0 = _systems(refit.BATCHED_SOLVE_MAX, 5, 1)
    refit._solve(m, rhs, x0)
    assert calls == [(5, refit.BATCHED_SOLVE_MAX)]


def test_the_solve_does_not_depend_on_the_solves_before_it() -> None:
    """On two threads, a batch of 160-wide systems solved after other LU calls (each history seen to make torch
    2.13's batched LU fail, or succeed with other values) gives the same bits as one system at a time, with no
    other history; up to BATCHED_SOLVE_MAX the batched call's values are one system's."""
    from bitalloc.formats import refit

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m, rhs, x0 = _systems(160, 4, 2)
        want = torch.cat([refit._solve(m[i:i + 1], rhs[i:i + 1], x0[i:i + 1]) for i in range(4)])
        for warm in (20, 60, 100, 148):
            wm, wr, wx = _systems(warm, 4, 3)
            torch.linalg.solve(wm, wr.unsqueeze(-1))
            assert torch.equal(refit._solve(m, rhs, x0), want), warm
        m, rhs, x0 = _systems(refit.BATCHED_SOLVE_MAX, 64, 4)
        one = torch.cat([refit._solve(m[i:i + 1], rhs[i:i + 1], x0[i:i + 1]) for i in range(64)])
        assert torch.equal(refit._solve(m, rhs, x0), one)
    finally:
        torch.set_num_threads(threads)


def test_pick_rows_mixes_two_grids_row_by_row():
    """Grid.pick_rows takes each row's scales, offsets, set indices, exact elements and per-row extras from one
    grid or the other, and refuses (None) grids that differ in anything not per row."""
    rows, ng, gs = 4, 3, 8
    g = torch.Generator().manual_seed(0)

    def grid(seed_shift: float, extra_const: int = 7) -> Grid:
        s = torch.rand(rows, ng, generator=g) + seed_shift
        return Grid(s, -s, torch.linspace(-1, 1, 5), gs, {"d": torch.rand(rows, generator=g), "k": extra_const},
                    exact_mask=torch.rand(rows, ng * gs, generator=g) < 0.1,
                    exact_values=torch.rand(rows, ng * gs, generator=g))
    a, b = grid(1.0), grid(2.0)
    take = torch.tensor([True, False, False, True])
    mixed = a.pick_rows(take, b)
    assert mixed is not None
    for r in range(rows):
        src = a if take[r] else b
        for x, y in ((mixed.scale, src.scale), (mixed.offset, src.offset), (mixed.extra["d"], src.extra["d"]),
                     (mixed.exact_mask, src.exact_mask), (mixed.exact_values, src.exact_values)):
            assert torch.equal(x[r], y[r])
    assert mixed.extra["k"] == 7
    codes = torch.randint(0, 5, (rows, ng * gs), generator=g)
    want = torch.where(take.unsqueeze(1), a.values(codes), b.values(codes))
    assert torch.equal(mixed.values(codes), want)
    assert a.pick_rows(take, grid(2.0, extra_const=8)) is None  # a non-row extra differs
    other_levels = Grid(b.scale, b.offset, torch.linspace(-2, 2, 5), gs, b.extra, None, b.exact_mask, b.exact_values)
    assert a.pick_rows(take, other_levels) is None
    plain = Grid(b.scale, b.offset, b.levels, gs, b.extra)
    assert a.pick_rows(take, plain) is None  # exact elements on one side only
