"""Scale/clipping search: never worse than min-max, weighting works, generic codebooks, chunking, edge cases."""
from __future__ import annotations

import pytest
import torch

from bitalloc.errors import NumericsError
from bitalloc.formats import fit, get_format
from bitalloc.formats.fit import affine_error, minmax_affine, round_fp16, search_affine, snap_affine
from bitalloc.rounding.rtn import rtn_round


def _data(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
    lap = -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "laplace":
        return lap
    mask = torch.rand(shape, generator=g) < 0.01  # outlier-heavy: 1% of entries 20x larger
    return torch.where(mask, lap * 20, lap)


def _row_err(w: torch.Tensor, fmt, grid, imp: torch.Tensor | None) -> torch.Tensor:
    _, v = rtn_round(w, grid)
    d = (w - v) ** 2
    return (d if imp is None else d * imp).sum(1)


@pytest.mark.parametrize("kind", ["normal", "laplace", "outliers"])
@pytest.mark.parametrize("fid", ["int2-g32", "int3-row", "int4-g128-sym", "int4-g64", "int8-row", "int3-g32-sym"])
@pytest.mark.parametrize("weighted", [False, True])
def test_search_never_worse_than_minmax_per_row(kind: str, fid: str, weighted: bool) -> None:
    fmt = get_format(fid)
    w = _data(kind, (24, 200))
    imp = torch.rand(200, generator=torch.Generator().manual_seed(1)) ** 4 if weighted else None
    imp_full = None if imp is None else imp.expand(24, 200)
    searched = _row_err(w, fmt, fmt.fit(w, imp), imp_full)
    minmax = _row_err(w, fmt, fmt.fit(w, search=False), imp_full)
    assert bool((searched <= minmax).all())
    assert float(searched.sum()) < float(minmax.sum())  # and it actually helps


def test_weighted_search_lowers_weighted_error() -> None:
    fmt = get_format("int3-g64")
    w = _data("laplace", (32, 256), seed=3)
    imp = torch.ones(256)
    imp[::8] = 100.0  # a few very important input columns
    full = imp.expand(32, 256)
    weighted = _row_err(w, fmt, fmt.fit(w, imp), full).sum()
    unweighted = _row_err(w, fmt, fmt.fit(w), full).sum()
    assert float(weighted) < 0.9 * float(unweighted)


def test_per_element_importance_and_zero_importance() -> None:
    fmt = get_format("int4-g32")
    w = _data("normal", (4, 64))
    imp = torch.rand(4, 64, generator=torch.Generator().manual_seed(2))
    imp[0] = 0  # no information at all: falls back to min-max for that row
    grid = fmt.fit(w, imp)
    mm = fmt.fit(w, search=False)
    assert torch.equal(grid.scale[0], mm.scale[0]) and torch.equal(grid.offset[0], mm.offset[0])


@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_covers_range_without_clipping(symmetric: bool) -> None:
    w = _data("laplace", (50, 40))
    levels = torch.arange(-8, 8).float() if symmetric else torch.arange(16).float()
    s, o = minmax_affine(w, levels, symmetric=symmetric, round_params=None)
    lo = torch.minimum(s * levels[0], s * levels[-1]) + o
    hi = torch.maximum(s * levels[0], s * levels[-1]) + o
    tol = 1e-5 * w.abs().amax(1)
    assert bool((w.amin(1) >= lo - tol).all()) and bool((w.amax(1) <= hi + tol).all())
    if symmetric:
        assert bool((o == 0).all())
        # the smaller of the two orientations: [-8s, 7s] (s > 0) or [-7|s|, 8|s|] (s < 0)
        pos, neg = w.amax(1).clamp_min(0), (-w.amin(1)).clamp_min(0)
        best = torch.minimum(torch.maximum(pos / 7, neg / 8), torch.maximum(pos / 8, neg / 7))
        assert torch.allclose(s.abs(), best)
        assert bool((s.abs() < w.abs().amax(1) / 7).any())  # the longer side is used


def test_generic_codebook_and_no_rounding() -> None:
    # a non-uniform codebook (IQ4_NL-like) takes the searchsorted path
    levels = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]).float()
    w = _data("outliers", (64, 32))
    imp = torch.rand(64, 32, generator=torch.Generator().manual_seed(5))
    for rp in (None, round_fp16):
        mm = minmax_affine(w, levels, symmetric=True, round_params=rp)
        s, o = search_affine(w, levels, imp, symmetric=True, round_params=rp)
        e_s, e_m = affine_error(w, s, o, levels, imp), affine_error(w, *mm, levels, imp)
        assert bool((e_s <= e_m).all()) and float(e_s.sum()) < float(e_m.sum())
    s, o = search_affine(w, levels, symmetric=False)
    assert torch.equal(round_fp16(s, o)[0], s)  # default: stored fp16 values


def test_snap_matches_grid_snap() -> None:
    fmt = get_format("int3-g32")
    w = _data("normal", (5, 96))
    grid = fmt.fit(w)
    codes, values = rtn_round(w, grid)
    c2, v2 = snap_affine(w.reshape(15, 32), grid.scale.reshape(-1), grid.offset.reshape(-1), grid.levels)
    assert torch.equal(c2.reshape(5, 96), codes) and torch.equal(v2.reshape(5, 96), values)


def test_chunking_gives_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _data("laplace", (100, 64))
    imp = torch.rand(64, generator=torch.Generator().manual_seed(7))
    levels = torch.arange(8).float()
    whole = search_affine(w, levels, imp, symmetric=False)
    monkeypatch.setattr(fit, "_CHUNK_ELEMS", 64 * 15)  # 15 rows per chunk, ragged last chunk
    chunked = search_affine(w, levels, imp, symmetric=False)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_huge_and_tiny_values_stay_finite() -> None:
    w = torch.tensor([[1e6, -1e6, 0.0, 5.0], [1e-9, -1e-9, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    for sym in (False, True):
        levels = torch.arange(-8, 8).float() if sym else torch.arange(16).float()
        s, o = search_affine(w, levels, symmetric=sym)
        assert bool(torch.isfinite(s).all() and torch.isfinite(o).all())
        assert float(s.abs().max()) <= fit.FP16_MAX
        assert bool(torch.isfinite(affine_error(w, s, o, levels)).all())


def test_bad_inputs() -> None:
    levels = torch.arange(4).float()
    with pytest.raises(NumericsError):
        search_affine(torch.tensor([[float("inf"), 0.0]]), levels, symmetric=False)
    with pytest.raises(NumericsError):
        search_affine(torch.zeros(2, 3), levels, -torch.ones(3), symmetric=False)
    with pytest.raises(ValueError, match="increasing"):
        search_affine(torch.zeros(2, 3), torch.tensor([1.0, 0.0]), symmetric=False)
    with pytest.raises(ValueError, match="2-D"):
        search_affine(torch.zeros(3), levels, symmetric=False)
    with pytest.raises(ValueError, match="min_ratio"):
        search_affine(torch.zeros(2, 3), levels, symmetric=False, min_ratio=0.0)
