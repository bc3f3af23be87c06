"""Sparse outliers over a grid format (``BASE+oK``): ids, exact bytes, decode against the base's decode,
never worse than the base, GPTQ (and the refit of the stored values), batched measurement, row concatenation, the GGUF refusal, the packed directory."""
from __future__ import annotations

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.formats import FormatError, QTensor, get_format
from bitalloc.formats.outliers import INDEX, KS, VALUES, OutlierFormat
from bitalloc.measure import measure_tensor
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.formats.refit import row_errors
from bitalloc.stats import LinearStats, TensorStats

BASES = ["int3-g128", "int4-g32-sym", "int2-row", "q4_0", "q4_1", "iq4_nl", "q3_k", "mix4-g32"]


def _data(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    spikes = torch.rand(rows, cols, generator=g) < 0.01
    w = torch.where(spikes, 8 * torch.randn(rows, cols, generator=g), w)  # a few large weights per row
    x = torch.randn(2 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    x = x + 0.5 * x.roll(1, 1)
    return w, x.T @ x / (2 * cols)


def test_ids_and_refusals() -> None:
    f = get_format("INT3-G128+O4")
    assert isinstance(f, OutlierFormat) and f.id == "int3-g128+o4" and f.base.id == "int3-g128"
    assert get_format("int4-g128-asym+o2").id == "int4-g128+o2"
    for bad in ("int3-g128+o3", "int3-g128+o0", "int3-g128+o32", "fp16+o4", "int3-g128+o4+o4", "int3-g128+x4",
                "nosuch+o4", "int3-g128+"):
        with pytest.raises(FormatError) as err:
            get_format(bad)
        assert "\n" not in str(err.value)
    assert KS == (1, 2, 4, 8, 16)


def test_exact_bytes() -> None:
    f = get_format("int3-g128+o4")
    assert f.nbytes((3, 200)) == get_format("int3-g128").nbytes((3, 200)) + 3 * 4 * (2 + 2)
    big = OutlierFormat(get_format("int4-row-sym"), 2)
    assert big.nbytes((2, 70000)) == get_format("int4-row-sym").nbytes((2, 70000)) + 2 * 2 * (2 + 4)
    with pytest.raises(FormatError):
        get_format("int4-row+o16").nbytes((2, 8))  # fewer columns than outliers per row
    with pytest.raises(FormatError):
        get_format("q4_0+o2").nbytes((2, 48))  # the base's own shape rule


@pytest.mark.parametrize("base", BASES)
def test_round_trip_bytes_and_decode(base: str) -> None:
    fid = f"{base}+o4"
    fmt = get_format(fid)
    w, h = _data(8, 256, seed=1)
    q = quantize_weight(w, fmt, hessian=h, method="rtn")
    assert q.nbytes() == fmt.nbytes(tuple(w.shape))
    assert q.parts[VALUES].dtype == torch.float16 and q.parts[INDEX].dtype == torch.uint16
    assert tuple(q.parts[INDEX].shape) == (8, 4)
    # independent decode: the base's own parts through the base format, then the listed positions overwritten
    base_q = QTensor(base, q.shape, q.dtype, {k: v for k, v in q.parts.items() if k not in (VALUES, INDEX)})
    want = get_format(base).decode(base_q).clone()
    for r in range(8):
        for j in range(4):
            want[r, int(q.parts[INDEX][r, j])] = float(q.parts[VALUES][r, j])
    assert torch.equal(dequantize(q), want)
    grid = fmt.fit(w, torch.diagonal(h))
    codes, values = grid.snap(w)
    assert torch.equal(fmt.decode(fmt.encode(codes, grid, tuple(w.shape))), values)
    # the stored values are the original weights (in fp16)
    idx = q.parts[INDEX].to(torch.int64)
    assert torch.equal(q.parts[VALUES].float(), w.gather(1, idx).half().float())


@pytest.mark.parametrize("base", BASES)
def test_never_worse_than_the_base_on_weighted_error(base: str) -> None:
    w, h = _data(12, 256, seed=2)
    imp = torch.diagonal(h)
    prev = None
    for k in (0, 1, 4, 16):
        fid = base if k == 0 else f"{base}+o{k}"
        err = float((((w - dequantize(quantize_weight(w, fid, importance=imp, method="rtn"))) ** 2) * imp).sum())
        if prev is not None:
            assert err <= prev * (1 + 1e-6), (fid, err, prev)
        prev = err
    assert err < 0.9 * float((((w - dequantize(quantize_weight(w, base, importance=imp, method="rtn"))) ** 2)
                              * imp).sum())


@pytest.mark.parametrize("base", ["int3-g128", "q4_1", "mix4-g32", "q3_k"])
def test_gptq(base: str) -> None:
    w, h = _data(16, 256, seed=3)
    fmt = get_format(f"{base}+o4")
    e_base = float(row_errors(w, dequantize(quantize_weight(w, base, hessian=h)), h).sum())
    e_rtn = float(row_errors(w, dequantize(quantize_weight(w, fmt, hessian=h, method="rtn")), h).sum())
    q = quantize_weight(w, fmt, hessian=h, method="gptq")
    assert q.nbytes() == fmt.nbytes(tuple(w.shape))
    e = float(row_errors(w, dequantize(q), h).sum())
    assert e < e_rtn and e < e_base


def test_refit_of_the_stored_values_is_the_least_squares_optimum() -> None:
    from bitalloc.formats.outliers import refit_exact
    from bitalloc.rounding import gptq_round

    w, h = _data(6, 128, seed=7)
    fmt = get_format("int3-g32+o4")
    grid = fmt.fit(w, torch.diagonal(h))
    codes, values = gptq_round(w, h, grid)
    new = refit_exact(w, codes, grid, h)
    before, after = row_errors(w, values, h), row_errors(w, new.values(codes), h)
    assert bool((after <= before).all()) and float(after.sum()) < float(before.sum())
    assert torch.equal(new.exact_mask, grid.exact_mask)
    hd = h.double()
    for r in range(6):  # x = -(AᵀHA)⁻¹ AᵀH b with A the selector of the stored columns, b the rest of δ
        pos = torch.nonzero(grid.exact_mask[r]).reshape(-1)
        b = (values[r] - w[r]).double()
        b[pos] = 0
        a = torch.zeros(128, len(pos), dtype=torch.float64)
        a[pos, torch.arange(len(pos))] = 1
        x = -torch.linalg.solve(a.T @ hd @ a, a.T @ hd @ b)
        want = (w[r, pos].double() + x).float().half().float()
        if after[r] < before[r]:
            got = new.exact_values[r, pos]
            assert bool(((got - want).abs() <= 1e-3 * want.abs() + 1e-6).all()), (r, got, want)


def test_batched_measurement_equals_one_format_at_a_time() -> None:
    w, h = _data(24, 256, seed=4)
    stats = TensorStats(roles=(LinearStats(h, 100, torch.rand(24), {}),))
    fids = ["int3-g128", "int3-g128+o2", "q4_0+o8", "mix3-g64+o1", "q4_k+o4", "iq4_nl"]
    a = {r.format: r for r in measure_tensor("t", w, stats, fids, batched=True)}
    b = {r.format: r for r in measure_tensor("t", w, stats, fids, batched=False)}
    for f in fids:
        assert a[f].bytes == b[f].bytes == get_format(f).nbytes((24, 256))
        assert a[f].output_error == pytest.approx(b[f].output_error, rel=1e-6)
        assert a[f].fisher_error == pytest.approx(b[f].fisher_error, rel=1e-6)
    assert a["int3-g128+o2"].output_error < a["int3-g128"].output_error


@pytest.mark.parametrize("fid", ["int3-g128+o2", "q4_k+o1", "mix4-g64+o4", "int3-row+o1"])
def test_row_chunks_concatenate_to_the_same_bytes(fid: str) -> None:
    w, h = _data(40, 256, seed=5)
    whole = quantize_weight(w, fid, hessian=h)
    parts = quantize_weight(w, fid, hessian=h, max_elems=8 * 256)
    assert set(whole.parts) == set(parts.parts)
    for name in whole.parts:
        assert torch.equal(whole.parts[name], parts.parts[name]), name


def test_bad_stored_parts_are_refused() -> None:
    fmt = get_format("int4-g32+o2")
    w, _ = _data(4, 64, seed=6)
    q = quantize_weight(w, fmt, method="rtn")
    idx = q.parts[INDEX].clone()
    idx[0] = torch.tensor([5, 5], dtype=torch.uint16)
    for parts in ({k: v for k, v in q.parts.items() if k != VALUES}, {**q.parts, INDEX: idx},
                  {**q.parts, INDEX: q.parts[INDEX].to(torch.int32)}):
        with pytest.raises(FormatError):
            fmt.decode(QTensor(q.format, q.shape, q.dtype, parts))
    grid = get_format("int4-g32").fit(w)
    with pytest.raises(FormatError):  # a base grid without outliers
        fmt.encode(grid.snap(w)[0], grid, (4, 64))


def test_the_gguf_target_refuses_outliers_and_mixtures_in_one_line() -> None:
    from bitalloc.targets.gguf import gguf_formats

    for fid in ("q4_0+o2", "q4_k+o1", "mix4-g32"):
        with pytest.raises(InputError) as err:
            gguf_formats(f"q4_0,{fid}")
        assert "not a GGUF block type" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fid", ["int4-g32+o2", "mix4-g32", "q4_0+o1"])
def test_packed_directory_saves_and_loads_them(fid: str, llama_model, tmp_path) -> None:
    from bitalloc.api import load
    from bitalloc.export.packed import read_packed, save_packed
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import plan_for_assignments
    from bitalloc.quantize import quantize_model, uniform_assignments

    from conftest import token_ids

    view = ModelView(llama_model)
    plan = plan_for_assignments(view, uniform_assignments(llama_model, fid, view), f"uniform {fid}")
    q = quantize_model(llama_model, view, plan, token_ids(2), "gptq", progress=False)
    assert any(t.format == fid for t in q.values())
    save_packed(tmp_path / "o", llama_model, view, q, plan, None)
    _info, back = read_packed(tmp_path / "o")
    for name, t in q.items():
        assert back[name].format == t.format and set(back[name].parts) == set(t.parts)
        for part in t.parts:
            assert torch.equal(back[name].parts[part], t.parts[part])
    m2 = load(tmp_path / "o")
    ids = token_ids(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, llama_model(ids).logits, rtol=0, atol=0)


def test_the_allocator_weighs_outliers_and_mixtures_end_to_end(tmp_path) -> None:
    """Measured, planned, quantized and written like any format; the plan's bytes are the stored bytes."""
    from bitalloc.api import load
    from bitalloc.export.packed import save_packed
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import make_plan, measure_model
    from bitalloc.quantize import quantize_model

    from conftest import tiny_llama, token_ids

    model = tiny_llama()
    fids = ["int3-g32", "int3-g32+o2", "int3-g32+o8", "mix3-g32", "mix4-g32", "fp16"]
    m = measure_model(model, None, token_ids(4), fids, "gptq", progress=False)
    by = {}
    for row in m.rows:
        by.setdefault(row.tensor, {})[row.format] = row
    total = {f: sum(r[f].output_error for r in by.values() if f in r) for f in ("int3-g32", "int3-g32+o2",
                                                                              "int3-g32+o8")}
    # (GPTQ on another grid is not monotone tensor by tensor, but the outliers pay off overall)
    assert total["int3-g32+o8"] < total["int3-g32+o2"] < total["int3-g32"]
    plan = make_plan(m, "4.2bpw")
    view = ModelView(model)
    q = quantize_model(model, view, plan, token_ids(4), "gptq", progress=False)
    chosen = {e.format for e in plan.entries}
    assert chosen & {"int3-g32+o2", "int3-g32+o8", "mix3-g32", "mix4-g32"}  # the new formats are competitive
    for e in plan.entries:
        assert q[e.tensor].format == e.format and q[e.tensor].nbytes() == e.bytes
    save_packed(tmp_path / "o", model, view, q, plan, None)
    m2 = load(tmp_path / "o")
    ids = token_ids(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_rotated_outliers_round_trip_in_the_rotated_domain() -> None:
    """``had-BASE+oK`` is the rotation of BASE+oK (outliers of W·R), not outliers over a rotated base that would
    be fitted to the unrotated weight: its error is close to the plain outlier format's."""
    from bitalloc.formats.rotated import RotatedFormat
    from bitalloc.rounding import dequantize, quantize_weight

    fmt = get_format("had-int3-g128+o4")
    assert isinstance(fmt, RotatedFormat) and fmt.base.id == "int3-g128+o4"
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rel = {f: float(((w - dequantize(quantize_weight(w, f, method="rtn"))) ** 2).sum() / (w ** 2).sum())
           for f in ("int3-g128+o4", "had-int3-g128+o4")}
    assert rel["had-int3-g128+o4"] < 1.5 * rel["int3-g128+o4"]


def test_outliers_over_double_scaled_ints_are_refused_in_one_line() -> None:
    with pytest.raises(FormatError, match="not supported"):
        get_format("int4-g32-dq+o2")
