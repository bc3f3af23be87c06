"""Batched GPTQ over formats (stacked rows, one factorisation) against one format at a time."""
from __future__ import annotations

import logging

import pytest
import torch

from bitalloc.formats import get_format
from bitalloc.formats.base import Grid
from bitalloc.rounding import (gptq_refit, gptq_refit_many, gptq_refit_many_measured, gptq_round, gptq_round_many,
                               gptq_round_many_measured)
from bitalloc.rounding import gptq as gptq_module
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


# --- the layer-output error read off GPTQ's feedback ---------------------------------------------
def _direct(w: torch.Tensor, values: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = (values - w).to(torch.float64)
    return ((d @ h.to(torch.float64)) * d).sum(1)


@pytest.mark.parametrize("fids", [SETS["int"], SETS["legacy"], ["int3-g128+o4", "mix4-g32", "int4-g32"]])
@pytest.mark.parametrize("act_order", [True, False])
def test_feedback_gives_each_rows_layer_output_error(fids, act_order):
    """Σ_j e_j² − λ‖ΔW_r‖² equals (ΔW H ΔWᵀ)_rr computed from the values, for plain grids, mixtures and exactly
    stored outliers; the codes and values are gptq_round_many's.  The feedback is float32 and this Hessian's
    condition number is ~1e6: the totals agree to 1e-5 (q8_0's small error without act-order differs most), single
    rows to 1e-4."""
    w, h = _data(24, 256, 11)
    _fmts, grids = _fit(fids, w, h)
    factor = gptq_factor(h, act_order=act_order)
    got = gptq_round_many_measured(w, factor, grids)
    for (codes, values, err), (c2, v2) in zip(got, gptq_round_many(w, factor, grids)):
        assert torch.equal(codes, c2) and torch.equal(values, v2)
        want = _direct(w, values, h)
        assert err is not None and err.dtype == torch.float64
        assert float(err.sum()) == pytest.approx(float(want.sum()), rel=1e-5)
        assert float(((err - want).abs() / want).max()) < 1e-4, float(((err - want).abs() / want).max())


def test_feedback_error_with_a_float32_factor(monkeypatch):
    """Past FLOAT64_MAX_COLS the factor is made in float32: the error still matches to float32 rounding."""
    monkeypatch.setattr(gptq_module, "FLOAT64_MAX_COLS", 64)
    w, h = _data(16, 256, 12)
    _fmts, grids = _fit(["int4-g128", "int2-g64", "int8-row-sym"], w, h)
    for _c, values, err in gptq_round_many_measured(w, h, grids):
        assert float(err.sum()) == pytest.approx(float(_direct(w, values, h).sum()), rel=1e-5)


def test_feedback_error_with_dead_input_columns():
    """Dead input columns whose Hessian rows are exactly zero (inputs that are always 0) are decoupled and left
    out of the feedback sums: the error still equals the direct form."""
    w, h = _data(16, 256, 13, dead=3)
    _fmts, grids = _fit(["int4-g128", "q4_1"], w, h)
    factor = gptq_factor(h)
    assert factor.dead is not None and int(factor.dead.sum()) == 3 and not factor.decoupled
    for _c, values, err in gptq_round_many_measured(w, factor, grids):
        assert err is not None
        assert float(err.sum()) == pytest.approx(float(_direct(w, values, h).sum()), rel=1e-5)


def test_feedback_error_is_none_where_the_identity_does_not_hold(caplog):
    """A dead column the Hessian still couples to others (H_jj = 0 with off-diagonal terms: decoupled, the factor
    is not that of H) and an unfactorisable Hessian (RTN) give None; the measurement then computes the error
    from ΔW."""
    w, h = _data(16, 256, 13)
    coupled = h.clone()
    coupled[5, 5] = 0.0
    _fmts, grids = _fit(["int4-g128"], w, h)
    assert gptq_factor(coupled).decoupled
    assert gptq_round_many_measured(w, coupled, grids)[0][2] is None
    w, h = _data(16, 256, 14)
    bad = h.clone()
    bad[0, 1] = bad[1, 0] = 1e6
    with caplog.at_level(logging.WARNING):
        assert gptq_round_many_measured(w, bad, grids)[0][2] is None


@pytest.mark.parametrize("dead", [0, 3])
def test_refit_errors_are_the_feedback_plus_the_refits_change(dead):
    """A format that refits its scales to the codes (q4_0, q4_1, nf4) gets its error from GPTQ's feedback plus
    the change its refit reports (Format.refine_measured); it equals the direct form of the returned codes and
    grid.  The rounding alone (gptq_refit_many) gives the same codes and grids."""
    w, h = _data(16, 256, 14, dead=dead)
    fmts, grids = _fit(["q4_0", "q4_1", "nf4", "int4-g32"], w, h)
    got = gptq_refit_many_measured(w, h, grids, fmts)
    for (c, g, e), (a, b) in zip(got, gptq_refit_many(w, h, grids, fmts)):
        assert e is not None
        assert float(e.sum()) == pytest.approx(float(_direct(w, g.values(c), h).sum()), rel=1e-5)
        assert torch.equal(a, c) and torch.equal(b.values(a), g.values(c))


def test_refine_measured_reports_each_rows_change():
    """refine_measured's change (refit_grid's, and the -dq formats' own) is that of each row's direct
    error, 0 for the rows it left alone, and the grid is refine's."""
    w, h = _data(12, 256, 15)
    for fid in ["q4_1", "q5_0", "nf4", "mix4-g32", "int4-g32-dq", "mix4-g32-dq"]:
        fmt = get_format(fid)
        grid = fmt.fit(w, torch.diagonal(h).clamp_min(0))
        codes = gptq_round_many(w, h, [grid])[0][0]
        refined, change = fmt.refine_measured(w, codes, grid, h)
        before = _direct(w, grid.values(codes), h)
        assert change is not None and change.dtype == torch.float64 and bool((change <= 0).all())
        assert bool((change < 0).any())
        want = _direct(w, refined.values(codes), h) - before
        # the change is exact in float64; the values decode in float32 (nf4's float32 scales differ most, ~1e-7)
        assert torch.allclose(change, want, rtol=1e-5, atol=1e-6 * float(before.max())), fid
        kept = (refined.scale == grid.scale).all(1) & (refined.offset == grid.offset).all(1)
        assert bool((change[kept] == 0).all())
        assert torch.equal(fmt.refine(w, codes, grid, h).scale, refined.scale)


def test_each_row_keeps_its_best_round():
    """GPTQ with refits keeps, row by row, the round whose codes and refit grid give the smallest error: never
    worse than either round's row, and each row's codes and scales are one round's."""
    w, h = _data(32, 256, 16)
    factor = gptq_factor(h)
    for fid in ["q4_0", "q4_1", "iq4_nl"]:
        fmt = get_format(fid)
        grid = fmt.fit(w, torch.diagonal(h).clamp_min(0))
        rounds = []
        g = grid
        for _ in range(2):
            c = gptq_round_many(w, factor, [g])[0][0]
            g = fmt.refine(w, c, g, h)
            rounds.append((c, g, _direct(w, g.values(c), h)))
        (codes, best, _err), = gptq_refit_many_measured(w, h, [grid], [fmt], rounds=2)
        mine = _direct(w, best.values(codes), h)
        assert torch.allclose(mine, torch.minimum(rounds[0][2], rounds[1][2]), rtol=1e-5, atol=0.0), fid
        assert float(mine.sum()) < min(float(r[2].sum()) for r in rounds)  # the choice gains on both rounds here
        for r in range(32):
            assert any(torch.equal(codes[r], c[r]) and torch.equal(best.scale[r], gg.scale[r]) and
                       torch.equal(best.offset[r], gg.offset[r]) for c, gg, _ in rounds), (fid, r)


def test_measurement_takes_gptqs_errors_instead_of_the_quadratic_form(monkeypatch):
    """A format GPTQ's feedback measured costs no ΔW·H product for its linear role, a refit one (q4_0) neither
    (its refit reports the change), and the rows match the per-format path's."""
    from bitalloc import measure as measure_module
    from bitalloc.measure import measure_tensor
    from bitalloc.stats import LinearStats, TensorStats

    w, h = _data(32, 256, 15)
    st = TensorStats((LinearStats(h, 512, torch.rand(32)),))
    calls: list[bool] = []
    real = measure_module._row_quad
    monkeypatch.setattr(measure_module, "_row_quad", lambda dw, hh, col_w=None: calls.append(hh is not None)
                        or real(dw, hh, col_w))
    fast = measure_tensor("t", w, st, ["int4-g32", "int3-g128"], "gptq")
    refit = measure_tensor("t", w, st, ["q4_0"], "gptq")
    assert calls == []
    monkeypatch.setattr(measure_module, "_row_quad", real)
    for a, b in zip(fast + refit, measure_tensor("t", w, st, ["int4-g32", "int3-g128", "q4_0"], "gptq",
                                                 batched=False)):
        assert a.output_error == pytest.approx(b.output_error, rel=1e-6)
        assert a.fisher_error == pytest.approx(b.fisher_error, rel=1e-6)


def test_the_rounding_alone_keeps_no_sums_in_the_column_loop(monkeypatch):
    """gptq_round_many and a single refit round (gptq_refit_many, rounds=1) ask the column loop for no feedback
    sums; the measured variants, and refits over several rounds (each row chooses its round by them), do, with
    the same codes."""
    seen: list[bool] = []
    real = gptq_module.stacked_codes
    monkeypatch.setattr(gptq_module, "stacked_codes", lambda *a, feedback_sq=False, **k: seen.append(feedback_sq) or
                        real(*a, feedback_sq=feedback_sq, **k))
    w, h = _data(16, 128, 16)
    fmts, grids = _fit(["int4-g32", "q4_0"], w, h)
    alone = gptq_round_many(w, h, grids)
    refit = gptq_refit_many(w, h, grids, fmts, rounds=1)
    assert seen and not any(seen)
    seen.clear()
    measured = gptq_round_many_measured(w, h, grids)
    refit_measured = gptq_refit_many_measured(w, h, grids, fmts, rounds=1)
    assert seen and all(seen)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(alone + refit, measured + refit_measured))
    seen.clear()
    gptq_refit_many(w, h, grids, fmts, rounds=2)
    assert seen and all(seen)


def test_stacked_codes_overwrites_its_input_only_when_asked():
    """The column loop works on a clone of the stack unless the caller hands over its own copy (``overwrite``, what
    gptq_round_many does to hold one stack fewer); the int32 codes are the same either way."""
    from bitalloc.rounding.stacked import stacked_codes

    w, h = _data(8, 128, 17)
    _fmts, grids = _fit(["int4-g32", "q4_0"], w, h)
    factor = gptq_factor(h)
    sg = StackedGrid.of(grids, w.device)
    stack = w[:, factor.order].repeat(2, 1)
    before = stack.clone()
    kept = stacked_codes(stack, factor.upper, sg, factor.order, 32)
    assert torch.equal(stack, before) and kept[0].dtype == torch.int32
    mine = stacked_codes(stack, factor.upper, sg, factor.order, 32, overwrite=True)
    assert torch.equal(kept[0], mine[0]) and torch.equal(kept[1], mine[1]) and not torch.equal(stack, before)
