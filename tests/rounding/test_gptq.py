"""GPTQ onto a fixed grid: better than RTN on correlated inputs, robust to degenerate Hessians."""
from __future__ import annotations

import logging

import pytest
import torch

from bitalloc.errors import InputError, NumericsError
from bitalloc.formats.base import Grid
from bitalloc.rounding.gptq import _try_factor, gptq_round, inverse_cholesky_upper, prepare_hessian
from bitalloc.formats.refit import layer_output_error


def minmax_grid(w: torch.Tensor, bits: int, group: int) -> Grid:
    """Asymmetric per-group min-max grid, scale and offset stored as fp16 (independent of formats/int.py)."""
    rows, cols = w.shape
    ngroups = -(-cols // group)
    pad = torch.nn.functional.pad(w, (0, ngroups * group - cols), value=float("nan")).view(rows, ngroups, group)
    lo = torch.nan_to_num(pad, nan=float("inf")).amin(-1).clamp_max(0)
    hi = torch.nan_to_num(pad, nan=float("-inf")).amax(-1).clamp_min(0)
    scale = ((hi - lo) / (2**bits - 1)).half().float()
    return Grid(scale=scale, offset=lo.half().float(), levels=torch.arange(2**bits, dtype=torch.float32),
                group_size=group)


def correlated(n_tokens: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with a strongly non-diagonal covariance (low-rank shared factors + outlier features)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    mix += 2.0 * torch.randn(cols, 4, generator=g) @ torch.randn(4, cols, generator=g) / cols**0.5
    x = torch.randn(n_tokens, cols, generator=g) @ mix
    x[:, :3] *= 8.0
    return x, x.T @ x / n_tokens


def weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def check_valid(w: torch.Tensor, grid: Grid, codes: torch.Tensor, values: torch.Tensor) -> None:
    assert codes.dtype == torch.int64 and values.dtype == torch.float32
    assert codes.shape == w.shape == values.shape
    assert int(codes.min()) >= 0 and int(codes.max()) < grid.levels.numel()
    assert torch.equal(values, grid.values(codes))
    assert bool(torch.isfinite(values).all())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("group", [16, 64])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, act_order: bool, group: int) -> None:
    _, h = correlated(512, 64)
    w = weight(24, 64)
    grid = minmax_grid(w, bits, group)
    codes, values = gptq_round(w, h, grid, block_size=16, act_order=act_order)
    check_valid(w, grid, codes, values)
    _, rtn = grid.snap(w)
    err_gptq, err_rtn = layer_output_error(w, values, h), layer_output_error(w, rtn, h)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_identity_hessian_equals_rtn() -> None:
    """With uncorrelated unit inputs nothing can be gained: GPTQ must reduce to nearest rounding."""
    w = weight(8, 40)
    grid = minmax_grid(w, 3, 8)
    codes, _ = gptq_round(w, torch.eye(40), grid, block_size=16, percdamp=0.0)
    assert torch.equal(codes, grid.snap(w)[0])


def test_layer_output_error_matches_outputs() -> None:
    x, h = correlated(300, 20)
    w, w_hat = weight(5, 20), weight(5, 20, seed=7)
    direct = float(((x.double() @ (w_hat - w).double().T) ** 2).sum(1).mean())
    assert layer_output_error(w, w_hat, h) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("block_size,cols", [(16, 50), (128, 37), (1, 12)])
def test_block_size_not_dividing_cols(block_size: int, cols: int) -> None:
    _, h = correlated(256, cols)
    w = weight(6, cols)
    grid = minmax_grid(w, 4, 8)
    codes, values = gptq_round(w, h, grid, block_size=block_size)
    check_valid(w, grid, codes, values)
    assert layer_output_error(w, values, h) < layer_output_error(w, grid.snap(w)[1], h)


def test_block_size_does_not_change_result_much() -> None:
    """Lazy block updates are an exact reordering of the same arithmetic: results agree across block sizes."""
    _, h = correlated(256, 48)
    w = weight(10, 48)
    grid = minmax_grid(w, 4, 16)
    c1, _ = gptq_round(w, h, grid, block_size=1)
    c2, _ = gptq_round(w, h, grid, block_size=13)
    c3, _ = gptq_round(w, h, grid, block_size=128)
    assert (c1 != c2).float().mean() < 0.01 and (c1 != c3).float().mean() < 0.01


def test_rank_deficient_hessian() -> None:
    x, _ = correlated(10, 48)  # 10 tokens, 48 columns: rank <= 10
    h = x.T @ x / 10
    assert int(torch.linalg.matrix_rank(h, rtol=1e-5)) <= 10
    w = weight(12, 48)
    grid = minmax_grid(w, 3, 16)
    codes, values = gptq_round(w, h, grid)
    check_valid(w, grid, codes, values)
    assert layer_output_error(w, values, h) < layer_output_error(w, grid.snap(w)[1], h)


def test_non_pd_hessian_raises_damping(caplog: pytest.LogCaptureFixture) -> None:
    _, h = correlated(256, 32)
    vals, vecs = torch.linalg.eigh(h.double())
    vals[0] = -5.0 * float(vals.mean())  # a clearly negative eigenvalue
    bad = (vecs * vals) @ vecs.T
    hp, _ = prepare_hessian(bad)
    factor = inverse_cholesky_upper(hp, percdamp=0.01)
    assert factor is not None and factor[1] > 0.01 * float(torch.diagonal(hp).mean()) * 9
    w = weight(8, 32)
    grid = minmax_grid(w, 4, 8)
    with caplog.at_level(logging.INFO, logger="bitalloc.rounding.gptq"):
        codes, values = gptq_round(w, bad.float(), grid)
    assert any("retrying" in r.message for r in caplog.records)
    check_valid(w, grid, codes, values)


def test_float32_factorisation_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide layers factorise in float32 (retrying in float64): same quality, still finite when indefinite."""
    import bitalloc.rounding.gptq as gptq

    _, h = correlated(256, 48)
    w = weight(10, 48)
    grid = minmax_grid(w, 3, 16)
    c64, _ = gptq_round(w, h, grid)
    monkeypatch.setattr(gptq, "FLOAT64_MAX_COLS", 8)
    c32, v32 = gptq_round(w, h, grid)
    check_valid(w, grid, c32, v32)
    assert (c32 != c64).float().mean() < 0.02
    bad = h - 3.0 * float(torch.diagonal(h).mean()) * torch.eye(48)  # indefinite, some diagonals negative
    codes, values = gptq_round(w, bad, grid)
    check_valid(w, grid, codes, values)


def test_unfactorisable_falls_back_to_rtn(caplog: pytest.LogCaptureFixture) -> None:
    h = torch.eye(16)
    h[0, 1] = h[1, 0] = 50.0  # indefinite; no damping allowed to fix it
    w = weight(4, 16)
    grid = minmax_grid(w, 4, 8)
    with caplog.at_level(logging.WARNING, logger="bitalloc.rounding.gptq"):
        codes, values = gptq_round(w, h, grid, percdamp=0.0, max_damp_tries=0)
    assert any("RTN" in r.message for r in caplog.records)
    assert torch.equal(codes, grid.snap(w)[0])
    check_valid(w, grid, codes, values)


def test_dead_input_column_keeps_weight_and_rounds_to_nearest() -> None:
    x, _ = correlated(256, 32)
    x[:, [5, 20]] = 0.0
    h = x.T @ x / 256
    w = weight(10, 32) + 0.3
    grid = minmax_grid(w, 3, 8)
    codes, values = gptq_round(w, h, grid, block_size=8)
    check_valid(w, grid, codes, values)
    nearest, _ = grid.snap(w)
    assert torch.equal(codes[:, [5, 20]], nearest[:, [5, 20]])
    assert bool((values[:, [5, 20]] != 0).any())  # not zeroed
    assert layer_output_error(w, values, h) < layer_output_error(w, grid.snap(w)[1], h)


def test_all_zero_hessian() -> None:
    w = weight(6, 24)
    grid = minmax_grid(w, 4, 8)
    codes, values = gptq_round(w, torch.zeros(24, 24), grid)
    check_valid(w, grid, codes, values)
    assert torch.equal(codes, grid.snap(w)[0])


def test_all_zero_weights() -> None:
    w = torch.zeros(5, 20)
    grid = minmax_grid(w, 4, 8)  # zero scales
    _, h = correlated(100, 20)
    codes, values = gptq_round(w, h, grid)
    check_valid(w, grid, codes, values)
    assert bool((values == 0).all())


@pytest.mark.parametrize("what", ["weight", "hessian"])
def test_non_finite_input_raises(what: str) -> None:
    w, h = weight(4, 8), torch.eye(8)
    if what == "weight":
        w[1, 2] = float("nan")
    else:
        h[3, 3] = float("inf")
    with pytest.raises(NumericsError, match={"weight": "weight", "hessian": "Hessian"}[what]):
        gptq_round(w, h, minmax_grid(weight(4, 8), 4, 8))


def test_shape_mismatch_raises() -> None:
    w = weight(4, 8)
    with pytest.raises(InputError, match="Hessian shape"):
        gptq_round(w, torch.eye(7), minmax_grid(w, 4, 8))


def test_input_not_modified() -> None:
    _, h = correlated(128, 16)
    w = weight(4, 16)
    w0, h0 = w.clone(), h.clone()
    gptq_round(w, h, minmax_grid(w, 4, 8))
    assert torch.equal(w, w0) and torch.equal(h, h0)


@pytest.mark.parametrize("fmt_id", ["int4-g32", "int3-g32", "int3-row"])
def test_quantize_weight_gptq_beats_rtn(fmt_id: str) -> None:
    from bitalloc.rounding import dequantize, quantize_weight

    _, h = correlated(512, 64)
    w = weight(32, 64)
    q_gptq = quantize_weight(w, fmt_id, hessian=h, method="gptq")
    q_rtn = quantize_weight(w, fmt_id, hessian=h, method="rtn")
    w_gptq, w_rtn = dequantize(q_gptq), dequantize(q_rtn)
    assert bool(torch.isfinite(w_gptq).all())
    assert layer_output_error(w, w_gptq, h) < 0.9 * layer_output_error(w, w_rtn, h)


def test_inverse_cholesky_damps_the_diagonal_exactly_like_adding_lambda_identity():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 24, generator=g, dtype=torch.float64)
    h, _ = prepare_hessian(x.T @ x / 64)
    u, lam = inverse_cholesky_upper(h, percdamp=0.05)
    lower = torch.linalg.cholesky(h + lam * torch.eye(24, dtype=torch.float64))
    want = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    assert torch.equal(u, want)


def test_the_factorisation_overwrites_only_its_own_scratch_copy():
    """The factors are computed in one scratch copy of the damped Hessian (no three more n x n matrices): the
    same values as out-of-place, the caller's Hessian untouched, also after failed tries."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(40, 96, generator=g)
    h = x.T @ x / 40  # rank 40 < 96 in float32: the first tries may fail and be damped further
    h0 = h.clone()
    u, lam = inverse_cholesky_upper(h, percdamp=1e-9)
    assert torch.equal(h, h0)
    lower = torch.linalg.cholesky(h0 + lam * torch.eye(96))
    assert torch.equal(u, torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True))
    scratch = h0 + lam * torch.eye(96)
    assert _try_factor(scratch).data_ptr() == scratch.data_ptr()
