"""The Grid's optional fields: per-group value sets (``set_index``) and exactly stored elements
(``exact_mask``/``exact_values``), in snap, values, the stacked GPTQ loop and the least-squares refit."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bitalloc.formats import FormatError, get_format
from bitalloc.formats.base import Grid
from bitalloc.rounding import gptq_refit_many, gptq_round, gptq_round_many
from bitalloc.rounding.gptq import gptq_factor
from bitalloc.formats.refit import group_lstsq, refit_grid, row_errors

SETS = torch.tensor([[-3.0, -1.0, 0.0, 2.0], [-2.0, -0.5, 0.5, 2.0], [-1.0, 0.0, 1.0, 4.0]])


def _data(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    x = torch.randn(2 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    x = x + 0.5 * x.roll(1, 1)
    return w, x.T @ x / (2 * cols)


def _mix_grid(rows: int, cols: int, gs: int, seed: int, exact: int = 0) -> Grid:
    g = torch.Generator().manual_seed(seed)
    ng = -(-cols // gs)
    scale = (0.3 + torch.rand(rows, ng, generator=g)) * torch.where(torch.rand(rows, ng, generator=g) < 0.3, -1, 1)
    sets = torch.randint(0, 3, (rows, ng), generator=g)
    grid = Grid(scale, 0.1 * torch.randn(rows, ng, generator=g), SETS, gs, set_index=sets)
    return _with_exact(grid, rows, cols, exact, seed) if exact else grid


def _with_exact(grid: Grid, rows: int, cols: int, k: int, seed: int) -> Grid:
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.rand(rows, cols, generator=g).topk(k, dim=1).indices
    mask = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, idx, True)
    vals = torch.where(mask, 3 * torch.randn(rows, cols, generator=g), torch.zeros(rows, cols))
    return dataclasses.replace(grid, exact_mask=mask, exact_values=vals)


def _brute_snap(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element: the nearest level of the group's own set (ties: the lower), stored values win."""
    rows, cols = w.shape
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    vals = torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            gi = c // grid.group_size
            lv = grid.levels[int(grid.set_index[r, gi])] if grid.set_index is not None else grid.levels
            s, o = float(grid.scale[r, gi]), float(grid.offset[r, gi])
            u = 0.0 if s == 0 else (float(w[r, c]) - o) / s
            d = [abs(u - float(v)) for v in lv]
            k = min(range(len(d)), key=lambda i: (d[i], i))
            codes[r, c] = k
            vals[r, c] = s * float(lv[k]) + o
            if grid.exact_mask is not None and bool(grid.exact_mask[r, c]):
                vals[r, c] = float(grid.exact_values[r, c])
    return codes, vals


@pytest.mark.parametrize("exact", [0, 3])
def test_snap_and_values_follow_each_groups_set_and_the_stored_elements(exact: int) -> None:
    rows, cols, gs = 5, 40, 8
    grid = _mix_grid(rows, cols, gs, 0, exact)
    w = 2 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(9))
    codes, values = grid.snap(w)
    want_c, want_v = _brute_snap(w, grid)
    assert float((codes != want_c).float().mean()) <= 0.01  # float ties at midpoints only
    torch.testing.assert_close(values, grid.values(codes), rtol=0, atol=0)
    torch.testing.assert_close(values[codes == want_c], want_v[codes == want_c], rtol=1e-6, atol=1e-6)
    cols_sub = torch.tensor([3, 17, 39])
    c2, v2 = grid.snap(w[:, cols_sub], cols_sub)
    assert torch.equal(c2, codes[:, cols_sub]) and torch.equal(v2, values[:, cols_sub])
    if exact:
        assert torch.equal(values[grid.exact_mask], grid.exact_values[grid.exact_mask])


def test_inconsistent_extensions_are_refused() -> None:
    s = torch.ones(2, 1)
    with pytest.raises(FormatError):
        Grid(s, s * 0, SETS, 8)  # 2-D levels without a set index
    with pytest.raises(FormatError):
        Grid(s, s * 0, SETS[0], 8, set_index=torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(FormatError):
        Grid(s, s * 0, SETS[0], 8, exact_mask=torch.zeros(2, 8, dtype=torch.bool))


def _reference_gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Unblocked GPTQ written from the paper, one column at a time through ``Grid.snap``: independent of the
    stacked loop (same factorisation and order)."""
    f = gptq_factor(h)
    u = f.upper.to(torch.float64)
    order = f.order
    wp = w[:, order].to(torch.float64).clone()
    codes = torch.zeros(w.shape, dtype=torch.int64)
    for i in range(wp.shape[1]):
        col = order[i : i + 1]
        c, v = grid.snap(wp[:, i : i + 1].float(), col)
        codes[:, col] = c
        err = (wp[:, i] - v[:, 0].double()) / u[i, i]
        wp[:, i + 1 :] -= err.unsqueeze(1) * u[i, i + 1 :].unsqueeze(0)
    return codes


@pytest.mark.parametrize("kind", ["mixture", "exact", "both"])
def test_stacked_gptq_matches_an_unblocked_reference(kind: str) -> None:
    rows, cols, gs = 12, 96, 16
    w, h = _data(rows, cols, 1)
    if kind == "exact":
        grid = _with_exact(get_format("int3-g32").fit(w), rows, cols, 4, 2)
    else:
        grid = _mix_grid(rows, cols, gs, 3, exact=4 if kind == "both" else 0)
    codes, values = gptq_round(w, h, grid, block_size=32)
    ref = _reference_gptq(w, h, grid)
    assert float((codes != ref).float().mean()) <= 0.01
    e, e_ref = float(row_errors(w, values, h).sum()), float(row_errors(w, grid.values(ref), h).sum())
    assert abs(e - e_ref) <= 1e-3 * e_ref
    assert torch.equal(values, grid.values(codes))
    # GPTQ beats nearest rounding on the same grid
    assert e < float(row_errors(w, grid.snap(w)[1], h).sum())


def test_stacks_of_plain_and_extended_grids_agree_with_each_alone() -> None:
    rows, cols = 16, 128
    w, h = _data(rows, cols, 4)
    fids = ["int4-g32", "iq4_nl", "mix4-g32", "int3-g64+o2", "q4_0+o4", "mix3-g64+o1"]
    fmts = [get_format(f) for f in fids]
    imp = torch.diagonal(h)
    grids = [f.fit(w, imp) for f in fmts]
    many = gptq_round_many(w, h, grids)
    for grid, (codes, values) in zip(grids, many):
        c1, v1 = gptq_round(w, h, grid)
        assert float((codes != c1).float().mean()) <= 1e-3
        assert torch.equal(values, grid.values(codes))
    refit = gptq_refit_many(w, h, grids, fmts)
    for fmt, grid, (codes, g2) in zip(fmts, grids, refit):
        assert (g2.exact_mask is None) == (grid.exact_mask is None) and (g2.set_index is None) == (grid.set_index is None)
        if grid.exact_mask is not None:
            assert torch.equal(g2.exact_mask, grid.exact_mask)  # (the outlier format refits the stored values)
            assert torch.equal(g2.values(codes)[grid.exact_mask], g2.exact_values[grid.exact_mask])


@pytest.mark.parametrize("with_offset", [False, True])
def test_masked_least_squares_equals_a_dense_solve(with_offset: bool) -> None:
    rows, cols, gs = 3, 24, 8
    nb = cols // gs
    w, h = _data(rows, cols, 5)
    g = torch.Generator().manual_seed(6)
    z = torch.randint(-4, 4, (rows, cols), generator=g).double()
    active = torch.rand(rows, cols, generator=g) > 0.2
    z = torch.where(active, z, torch.zeros_like(z))
    s0, o0 = torch.ones(rows, nb), torch.zeros(rows, nb)
    s, o = group_lstsq(w, z, gs, h, s0, o0 if with_offset else None, active)
    hd = h.double()
    for r in range(rows):
        cols_of = [torch.zeros(cols, dtype=torch.float64) for _ in range(nb * (2 if with_offset else 1))]
        for c in range(cols):
            cols_of[c // gs][c] = z[r, c]
            if with_offset and active[r, c]:
                cols_of[nb + c // gs][c] = 1.0
        a = torch.stack(cols_of, 1)
        x = torch.linalg.solve(a.T @ hd @ a, a.T @ hd @ w[r].double())
        torch.testing.assert_close(s[r], x[:nb], rtol=1e-4, atol=1e-6)
        if with_offset:
            torch.testing.assert_close(o[r], x[nb:], rtol=1e-4, atol=1e-6)


def test_refit_of_an_extended_grid_is_never_worse_and_keeps_its_fields() -> None:
    rows, cols = 8, 64
    w, h = _data(rows, cols, 7)
    for fid in ("mix4-g32", "q4_1+o2", "q4_0+o4", "mix3-g32+o1"):
        fmt = get_format(fid)
        grid = fmt.fit(w, torch.diagonal(h))
        codes, _ = gptq_round(w, h, grid)
        new, _change = refit_grid(w, codes, grid, h, offset=fid.startswith("q4_1"), rnd=lambda t: t.half().float())
        before, after = row_errors(w, grid.values(codes), h), row_errors(w, new.values(codes), h)
        assert bool((after <= before).all()) and float(after.sum()) < float(before.sum()), fid
        assert (new.set_index is None) == (grid.set_index is None) and (new.exact_mask is None) == (grid.exact_mask is None)
