"""Double-quantized integer formats ``int{b}-g{G}-dq[S]``: ids, exact bytes, round trips, refine, refusals (concat,
GPTQ and batched measurement: ``test_superscale.py``)."""
from __future__ import annotations

import math

import pytest
import torch

from bitalloc.errors import NumericsError
from bitalloc.formats import FormatError, get_format
from bitalloc.formats.base import Grid
from bitalloc.formats.int_dq import IntDQFormat, parse_int_dq
from bitalloc.formats.packing import pack_bits
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.formats.refit import layer_output_error, row_errors
from bitalloc.rounding.rtn import rtn_round
from tests.rounding.test_gptq import correlated

FMTS = ["int4-g32-dq", "int3-g16-dq", "int5-g32-dq", "int2-g64-dq", "int4-g32-dq8", "int6-g16-dq4", "int3-g64-dq7"]
ODD = [(1, 1), (3, 40), (7, 577), (5, 33), (2, 64), (9, 1536)]


def _w(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# --- ids ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,canonical,fields", [
    ("int4-g32-dq", "int4-g32-dq", (4, 32, 6)), ("INT4-G32-DQ6", "int4-g32-dq", (4, 32, 6)),
    ("int3-g16-dq8", "int3-g16-dq8", (3, 16, 8)), ("int5-g64-dq4", "int5-g64-dq4", (5, 64, 4)),
])
def test_ids(text: str, canonical: str, fields: tuple[int, int, int]) -> None:
    fmt = get_format(text)
    assert isinstance(fmt, IntDQFormat) and fmt.id == canonical and (fmt.bits, fmt.group, fmt.sbits) == fields
    assert get_format(fmt.id) == fmt


@pytest.mark.parametrize("bad", ["int4-g32-dq9", "int4-g128-dq", "int8-g32-dq", "int4-g32-dqx", "int4-row-dq",
                                 "int4-g32-dq-sym", "int1-g32-dq", "int4-g32-dq3"])
def test_bad_ids_are_one_line(bad: str) -> None:
    with pytest.raises(FormatError) as exc:
        get_format(bad)
    assert "\n" not in str(exc.value)


def test_other_ids_pass_through() -> None:
    assert parse_int_dq("int4-g128") is None and parse_int_dq("q4_k") is None
    assert get_format("int4-g128").id == "int4-g128"  # the int family still parses its own ids
    with pytest.raises(FormatError):
        IntDQFormat(4, 32, True)  # type: ignore[arg-type]


# --- bytes -------------------------------------------------------------------------------------------
def test_nbytes_hand_computed() -> None:
    f = get_format("int4-g32-dq")
    assert f.nbytes((3, 40)) == 3 * 32 + 3 * 2 + 3 * 2 + 3 * 4
    # 576 columns: 18 groups: 288 B codes, 14 + 14 B sub-scales (108 bits each), 4 B d/dmin per row
    assert f.nbytes((576, 576)) == 576 * (288 + 14 + 14 + 4)
    assert get_format("int3-g16-dq8").nbytes((2, 17)) == 2 * (2 * 16 * 3 // 8 + 2 + 2 + 4)
    assert f.bpw((576, 576)) <= 4.5 and f.bpw((576, 1536)) <= 4.5 and f.bpw((192, 576)) <= 4.5


@pytest.mark.parametrize("fid", FMTS)
@pytest.mark.parametrize("shape", ODD, ids=str)
def test_round_trip_exact_bytes(fid: str, shape: tuple[int, int]) -> None:
    fmt = get_format(fid)
    w = _w(*shape, seed=shape[1])
    grid = fmt.fit(w)
    codes, values = rtn_round(w, grid)
    q = fmt.encode(codes, grid, shape)
    assert q.nbytes() == fmt.nbytes(shape) == sum(t.numel() * t.element_size() for t in q.parts.values())
    assert set(q.parts) == {"weight_packed", "weight_scale", "weight_zero", "weight_super"}
    out = fmt.decode(q)
    assert torch.equal(out, values) and torch.equal(out, grid.values(codes))
    # the stored parts follow the documented layout
    ng = -(-shape[1] // fmt.group)
    assert torch.equal(q.parts["weight_scale"][0], pack_bits(grid.extra["sc"][0], fmt.sbits))
    assert torch.equal(q.parts["weight_zero"][-1], pack_bits(grid.extra["m"][-1], fmt.sbits))
    assert torch.equal(q.parts["weight_super"][:, 0].float(), grid.extra["d"])
    full = torch.zeros(shape[0], ng * fmt.group, dtype=torch.int64)
    full[:, :shape[1]] = codes
    assert torch.equal(q.parts["weight_packed"].reshape(-1), pack_bits(full, fmt.bits))
    if shape[1] >= 32:
        rel = float(((w - out) ** 2).sum() / (w ** 2).sum())
        assert rel < 4.0 ** -(fmt.bits - 1.5)


def test_encode_decode_validate() -> None:
    fmt = get_format("int4-g32-dq")
    w = _w(4, 70)
    grid = fmt.fit(w)
    codes, _ = rtn_round(w, grid)
    with pytest.raises(FormatError, match="do not match"):
        fmt.encode(codes[:, :69], grid, (4, 70))
    with pytest.raises(FormatError, match="codes outside"):
        fmt.encode(codes + 16, grid, (4, 70))
    with pytest.raises(FormatError, match="disagree"):
        fmt.encode(codes, Grid(grid.scale * 1.01, grid.offset, grid.levels, 32, dict(grid.extra)), (4, 70))
    with pytest.raises(FormatError, match="lacks"):
        fmt.encode(codes, Grid(grid.scale, grid.offset, grid.levels, 32), (4, 70))
    with pytest.raises(FormatError, match="fp16"):
        fmt.encode(codes, Grid(grid.scale, grid.offset, grid.levels, 32, {**grid.extra, "d": grid.extra["d"] + 1e-5}),
                   (4, 70))
    with pytest.raises(FormatError, match="outside"):
        fmt.encode(codes, Grid(grid.scale, grid.offset, grid.levels, 32, {**grid.extra, "sc": grid.extra["sc"] + 64}),
                   (4, 70))
    q = fmt.encode(codes, grid, (4, 70))
    with pytest.raises(FormatError, match="cannot decode"):
        get_format("int4-g32-dq8").decode(q)
    short = dict(q.parts, weight_scale=q.parts["weight_scale"][:, :-1])
    with pytest.raises(FormatError, match="stores"):
        fmt.decode(type(q)(q.format, q.shape, q.dtype, short))
    sup = q.parts["weight_super"].clone()
    sup[0, 0] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        fmt.decode(type(q)(q.format, q.shape, q.dtype, dict(q.parts, weight_super=sup)))


def test_nan_weights_and_bad_shapes_refused() -> None:
    fmt = get_format("int4-g32-dq")
    w = _w(3, 64)
    w[1, 5] = float("nan")
    with pytest.raises(NumericsError):
        fmt.fit(w)
    with pytest.raises(NumericsError):
        quantize_weight(w, fmt, method="rtn")
    for shape in [(4,), (2, 3, 4), (0, 32)]:
        with pytest.raises(FormatError):
            fmt.nbytes(shape)
    with pytest.raises(FormatError, match="importance"):
        fmt.fit(_w(3, 64), torch.ones(63))
    with pytest.raises(NumericsError, match="importance"):
        fmt.fit(_w(3, 64), -torch.ones(64))


def test_edge_values_never_nan() -> None:
    fmt = get_format("int4-g32-dq")
    w = torch.zeros(5, 80)
    w[1] = 3.0                              # constant positive row: offsets are <= 0, values stay close
    w[2, :40], w[2, 40:] = 1e4, -1e4        # large values: fp16 super-scales, no inf
    w[3] = torch.linspace(-1e-9, 1e-9, 80)  # below fp16 resolution
    w[4, 5] = 7.0                           # a spike in a zero row
    q = quantize_weight(w, fmt, method="rtn")
    out = fmt.decode(q)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[0], torch.zeros(80))
    assert float((out[1] - 3.0).abs().max()) < 0.1
    assert float((out[2] - w[2]).abs().max()) < 1e4 * 0.05


# --- fit quality ---------------------------------------------------------------------------------
def _sqnr(w: torch.Tensor, r: torch.Tensor) -> float:
    return 10 * math.log10(float((w.double() ** 2).sum() / ((w - r).double() ** 2).sum()))


def test_quality_and_importance() -> None:
    w = _w(64, 576, seed=3)
    fmt = get_format("int4-g32-dq")
    s = _sqnr(w, dequantize(quantize_weight(w, fmt, method="rtn")))
    assert s > 22.8  # measured 23.1 dB on N(0, 1); int4-g64 gets 21.6, iq4_nl 22.7
    assert s > _sqnr(w, dequantize(quantize_weight(w, "int4-g64", method="rtn")))
    assert _sqnr(w, dequantize(quantize_weight(w, "int4-g32-dq8", method="rtn"))) > s - 0.05
    imp = torch.ones(576)
    imp[:64] = 100.0
    grid = fmt.fit(w, imp)
    err_w = ((rtn_round(w, grid)[1] - w)[:, :64] ** 2).sum()
    err_u = ((rtn_round(w, fmt.fit(w))[1] - w)[:, :64] ** 2).sum()
    assert float(err_w) < float(err_u)


# --- refine -----------------------------------------------------------------------------------------
def test_refine_integer_moves_beat_the_super_scale_refit_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hessian-guided moves of the integer scales/mins lower the error below refitting d/dmin alone
    (measured: 64.4 vs 67.2 here, plain GPTQ 68.8), with padded last groups (200 columns)."""
    import bitalloc.formats.int_dq as int_dq
    from bitalloc.rounding import gptq_refit
    from bitalloc.rounding.gptq import gptq_round

    fmt = get_format("int4-g32-dq")
    _x, h = correlated(4096, 200, seed=3)
    w = _w(64, 200, seed=1)
    grid = fmt.fit(w, torch.diagonal(h))
    plain = layer_output_error(w, gptq_round(w, h, grid)[1], h)
    errs = {}
    for steps in (0, 2):
        monkeypatch.setattr(int_dq, "REFINE_STEPS", steps)
        codes, g = gptq_refit(w, h, grid, fmt)
        errs[steps] = layer_output_error(w, g.values(codes), h)
        assert torch.equal(fmt.decode(fmt.encode(codes, g, tuple(w.shape))), g.values(codes))
    assert errs[2] < 0.98 * errs[0] < plain


def _refine_by_explicit_errors(fmt: IntDQFormat, w, codes, grid, h) -> Grid:
    """The refine evaluated the slow way: every candidate's error from its decoded values, each least-squares
    fit and move gradient from its own products with H (what :meth:`IntDQFormat.refine` computes by algebra)."""
    from bitalloc.formats.gguf_common import fp16r
    from bitalloc.formats.int_dq import REFINE_STEPS, _solve_normal

    d, dmin, sc, mn = (grid.extra[k] for k in ("d", "dmin", "sc", "m"))
    h64 = ((h + h.T) * 0.5).double()
    z, w64 = grid.levels.double()[codes], w.double()
    g = torch.arange(w.shape[1]) // fmt.group
    best = [d, dmin, sc, mn, row_errors(w, grid.values(codes), h)]
    for step in range(1 + REFINE_STEPS):
        c_sc, c_mn = sc, mn
        if step:
            v = best[0].double()[:, None] * best[2][:, g].double() * z - best[1].double()[:, None] * best[3][:, g]
            c_sc, c_mn = fmt._move_ints((w64 - v) @ h64, z, h64, *best[:4])
        a, b = c_sc[:, g].double() * z, -c_mn[:, g].double()
        ha, hb = a @ h64, b @ h64
        d2, m2 = _solve_normal((a * ha).sum(1), (b * ha).sum(1), (b * hb).sum(1), (w64 * ha).sum(1),
                               (w64 * hb).sum(1), best[0].double(), best[1].double())
        d2, m2 = fp16r(d2.float()), fp16r(m2.float())
        err = row_errors(w, fmt._grid(d2, m2, c_sc, c_mn).values(codes), h)
        take = err < best[4]
        if not bool(take.any()):
            break
        t1 = take[:, None]
        best = [torch.where(take, d2, best[0]), torch.where(take, m2, best[1]), torch.where(t1, c_sc, best[2]),
                torch.where(t1, c_mn, best[3]), torch.where(take, err, best[4])]
    return fmt._grid(*best[:4])


@pytest.mark.parametrize("fid, rows, cols", [("int4-g32-dq", 48, 200), ("int3-g64-dq", 40, 256),
                                             ("int2-g16-dq5", 24, 100)])
def test_refine_equals_the_explicit_evaluation(fid: str, rows: int, cols: int) -> None:
    """The algebraic refine (errors from the normal-equation sums, b·H from group sums of H) picks exactly
    the grid that evaluating every candidate explicitly picks (padded last groups, a dead column)."""
    from bitalloc.rounding.gptq import gptq_round

    fmt = get_format(fid)
    x, h = correlated(2048, cols, seed=5)
    h[:, 3] = 0
    h[3, :] = 0
    w = _w(rows, cols, seed=4)
    grid = fmt.fit(w, torch.diagonal(h))
    codes, _ = gptq_round(w, h, grid)
    got, want = fmt.refine(w, codes, grid, h), _refine_by_explicit_errors(fmt, w, codes, grid, h)
    assert got is not grid
    for k in ("d", "dmin", "sc", "m"):
        assert torch.equal(got.extra[k], want.extra[k]), k
