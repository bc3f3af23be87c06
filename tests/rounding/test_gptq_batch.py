"""Batched GPTQ over formats (stacked rows, one factorisation) against one format at a time."""
from __future__ import annotations

import logging

import pytest
import torch

from bitalloc.formats import get_format
from bitalloc.formats.base import Grid
from bitalloc.rounding import gptq_refit, gptq_refit_many, gptq_round, gptq_round_many
from bitalloc.rounding.gptq import gptq_factor
from bitalloc.formats.refit import row_errors
from bitalloc.rounding.stacked import StackedGrid

SETS = {
    "int": ["int4-g128", "int4-g128-sym", "int3-row", "int3-row-sym", "int4-g32", "int2-g64"],
    "legacy": ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"],
    "kquants": ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"],
    "mixed": ["int4-g32", "q4_k", "iq4_nl", "int3-row-sym", "q8_0", "int5-g128"],
}


def _data(rows: int, cols: int, seed: int, dead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    x = torch.randn(2 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    x = x + 0.6 * x.roll(1, 1)
    x[:, cols // 3: cols // 3 + dead] = 0
    return w, x.T @ x / (2 * cols)


def _fit(fids: list[str], w: torch.Tensor, h: torch.Tensor) -> tuple[list, list[Grid]]:
    fmts = [get_format(f) for f in fids]
    imp = torch.diagonal(h).clamp_min(0)
    return fmts, [f.fit(w, imp) for f in fmts]


def _close(w: torch.Tensor, h: torch.Tensor, got: tuple[torch.Tensor, Grid], want: tuple[torch.Tensor, Grid]) -> float:
    """Relative difference of the layer-output errors; the codes must agree almost everywhere."""
    (c1, g1), (c2, g2) = got, want
    assert c1.shape == c2.shape and c1.dtype == torch.int64
    assert float((c1 != c2).float().mean()) <= 1e-3
    e1 = float(row_errors(w, g1.values(c1), h).sum())
    e2 = float(row_errors(w, g2.values(c2), h).sum())
    rel = abs(e1 - e2) / max(e2, 1e-30)
    assert rel <= 1e-6, (e1, e2)
    return rel


@pytest.mark.parametrize("name", list(SETS))
def test_refit_many_equals_each_format_alone(name: str) -> None:
    w, h = _data(24, 512, 0, dead=5)
    fmts, grids = _fit(SETS[name], w, h)
    many = gptq_refit_many(w, h, grids, fmts)
    assert len(many) == len(fmts)
    for fmt, grid, got in zip(fmts, grids, many):
        _close(w, h, got, gptq_refit(w, h, grid, fmt))
        assert got[1] is not grid or fmt.refine(w, got[0], grid, h) is grid  # refit formats got a new grid


def test_one_grid_is_bit_identical_and_many_grids_match_round_by_round() -> None:
    w, h = _data(16, 256, 1, dead=3)
    fmts, grids = _fit(SETS["mixed"], w, h)
    many = gptq_round_many(w, h, grids, block_size=64)
    for grid, (codes, values) in zip(grids, many):
        c1, v1 = gptq_round(w, h, grid, block_size=64)
        assert float((codes != c1).float().mean()) <= 1e-3
        assert torch.equal(values, grid.values(codes))
        c_alone, v_alone = gptq_round_many(w, h, [grid], block_size=64)[0]
        assert torch.equal(c_alone, c1) and torch.equal(v_alone, v1)


def test_nearest_level_is_exactly_snap_at_ties_and_out_of_range() -> None:
    """The closed form for integer codebooks and the padded search agree with Grid.snap element for element."""
    rows = 7
    fids = ["int3-row-sym", "int4-row", "iq4_nl", "q8_0", "int2-row-sym"]
    levels = [get_format(f).levels for f in fids]
    ones, zeros = torch.ones(rows, 1), torch.zeros(rows, 1)
    grids = [Grid(ones, zeros, lv, 1) for lv in levels]
    sg = StackedGrid.of(grids, torch.device("cpu"))
    ks = torch.arange(-140, 140, dtype=torch.float32)
    probe = torch.cat([ks, ks + 0.5, torch.nextafter(ks + 0.5, ks + 1), torch.nextafter(ks + 0.5, ks),
                       torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-30]), torch.randn(64) * 50])
    for u in probe.split(rows):
        u = torch.cat([u, u.new_zeros(rows - u.numel())])
        stacked = torch.stack([u[:, None]] * len(grids)).reshape(-1)  # every grid sees the same values
        codes = torch.empty(len(grids) * rows, dtype=torch.int64)
        vals = sg.nearest(stacked, codes)
        for j, f in enumerate(sg.index):
            want_c, want_v = grids[f].snap(u[:, None], torch.zeros(1, dtype=torch.long))
            assert torch.equal(codes[j * rows:(j + 1) * rows], want_c[:, 0]), (fids[f], u)
            assert torch.equal(vals[j * rows:(j + 1) * rows], want_v[:, 0]), (fids[f], u)


def test_hessian_that_needs_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    w, h = _data(16, 256, 2)
    h = h - 0.05 * float(torch.diagonal(h).mean()) * torch.eye(256)  # indefinite: damping is raised
    fmts, grids = _fit(["q4_1", "int4-g64-sym", "q3_k"], w, h)
    with caplog.at_level(logging.INFO, logger="bitalloc.rounding.gptq"):
        many = gptq_refit_many(w, h, grids, fmts)
    assert any("retrying" in r.message for r in caplog.records)
    for fmt, grid, got in zip(fmts, grids, many):
        _close(w, h, got, gptq_refit(w, h, grid, fmt))


def test_unfactorisable_hessian_rounds_every_format_to_nearest(caplog: pytest.LogCaptureFixture) -> None:
    w, h = _data(16, 256, 3)
    h[0, 1] = h[1, 0] = 1e6
    fmts, grids = _fit(["q4_0", "int3-g32", "iq4_nl"], w, h)
    with caplog.at_level(logging.WARNING):
        many = gptq_round_many(w, h, grids)
    assert sum("RTN" in r.message for r in caplog.records) == 1  # one factorisation for every format
    for grid, (codes, values) in zip(grids, many):
        assert torch.equal(codes, grid.snap(w)[0]) and torch.equal(values, grid.snap(w)[1])


def test_dead_columns_keep_their_nearest_rounding() -> None:
    w, h = _data(16, 256, 4, dead=9)
    dead = torch.diagonal(h) <= 0
    assert int(dead.sum()) == 9
    fmts, grids = _fit(["int4-g32", "q5_0", "q6_k"], w, h)
    for grid, (codes, _) in zip(grids, gptq_round_many(w, h, grids)):
        # a dead column neither receives error feedback nor passes it on: it is rounded to nearest
        assert torch.equal(codes[:, dead], grid.snap(w)[0][:, dead])


def test_factor_is_reused_and_inputs_are_checked() -> None:
    w, h = _data(8, 64, 5)
    fmts, grids = _fit(["int4-g32", "int3-row"], w, h)
    factor = gptq_factor(h)
    a = gptq_round_many(w, factor, grids)
    b = gptq_round_many(w, h, grids)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert gptq_round_many(w, h, []) == []
    with pytest.raises(ValueError, match="grids but"):
        gptq_refit_many(w, h, grids, fmts[:1])
    from bitalloc.errors import InputError
    with pytest.raises(InputError, match="grid has"):
        gptq_round_many(w[:4], h, grids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_gptq_on_cuda_matches_cpu() -> None:
    w, h = _data(64, 512, 6, dead=4)
    fmts, grids = _fit(SETS["mixed"], w, h)
    cpu = gptq_refit_many(w, h, grids, fmts)
    dev = torch.device("cuda")
    fmts_d, grids_d = _fit(SETS["mixed"], w.to(dev), h.to(dev))
    assert all(g.scale.device.type == "cuda" and g.levels.device.type == "cuda" for g in grids_d)
    got = gptq_refit_many(w.to(dev), h.to(dev), grids_d, fmts_d)
    for fmt, (c1, g1), (c2, g2) in zip(fmts, got, cpu):
        # GPTQ's error feedback carries any early difference in float rounding (fp16 scale ties in the fit,
        # reduction order) into later columns, so codes differ in places; the error they give must not
        assert c1.device.type == "cuda" and g1.scale.device.type == "cuda"
        e1 = float(row_errors(w, g1.to("cpu").values(c1.cpu()), h).sum())
        e2 = float(row_errors(w, g2.values(c2), h).sum())
        assert abs(e1 - e2) <= 0.03 * e2, (fmt.id, e1, e2)
