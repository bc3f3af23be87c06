"""Measurement table (JSON, validation) and the error functions against direct formulas."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from bitalloc.errors import InputError, NumericsError
from bitalloc.formats import get_format
from bitalloc.measure import (
    MeasureRow, Measurement, TensorInfo, fisher_error, measure_tensor, output_error,
)
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.stats import LinearStats, LookupStats, TensorStats


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(4 * n, n, generator=g)
    return (x.T @ x / (4 * n)).float()


def test_linear_errors_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(7, 5, generator=g)
    h = _spd(5, g)
    gs = torch.rand(7, generator=g)
    st = TensorStats((LinearStats(h, 100, gs),))
    d, H = dw.double(), h.double()
    M = d @ H @ d.T
    assert output_error(dw, st) == pytest.approx(float(torch.trace(M)), rel=1e-12)
    assert fisher_error(dw, st) == pytest.approx(0.5 * float((gs.double() * torch.diagonal(M)).sum()), rel=1e-12)
    assert fisher_error(dw, TensorStats((LinearStats(h, 100),))) is None


def test_tied_embedding_two_roles():
    g = torch.Generator().manual_seed(1)
    V, D = 11, 6
    dw = torch.randn(V, D, generator=g)
    freq = torch.rand(V, generator=g)
    freq /= freq.sum()
    h = _spd(D, g)
    g_lin, g_look = torch.rand(V, generator=g), torch.rand(D, generator=g)
    st = TensorStats((LookupStats(freq, 50, g_look), LinearStats(h, 50, g_lin)))
    d = dw.double()
    lookup_out = sum(float(freq[v]) * float(d[v] @ d[v]) for v in range(V))
    lookup_fi = 0.5 * sum(float(freq[v]) * float((g_look.double() * d[v] ** 2).sum()) for v in range(V))
    M = d @ h.double() @ d.T
    lin_out = float(torch.trace(M))
    lin_fi = 0.5 * float((g_lin.double() * torch.diagonal(M)).sum())
    assert output_error(dw, st) == pytest.approx(lookup_out + lin_out, rel=1e-12)
    assert fisher_error(dw, st) == pytest.approx(lookup_fi + lin_fi, rel=1e-12)
    # one role without grad_sq -> no Fisher error at all
    assert fisher_error(dw, TensorStats((LookupStats(freq, 50), LinearStats(h, 50, g_lin)))) is None


def test_error_functions_chunk_rows_and_reject_bad_input(monkeypatch):
    import bitalloc.measure as me

    g = torch.Generator().manual_seed(2)
    dw, h = torch.randn(37, 8, generator=g), _spd(8, g)
    st = TensorStats((LinearStats(h, 1, torch.rand(37, generator=g)),))
    whole = (output_error(dw, st), fisher_error(dw, st))
    monkeypatch.setattr(me, "_CHUNK_ELEMS", 24)  # 3 rows per chunk
    assert (output_error(dw, st), fisher_error(dw, st)) == pytest.approx(whole, rel=1e-12)
    with pytest.raises(InputError, match="hessian"):
        output_error(dw, TensorStats((LinearStats(_spd(7, g), 1),)))
    with pytest.raises(InputError, match="grad_sq"):
        fisher_error(dw, TensorStats((LinearStats(h, 1, torch.rand(8)),)))
    with pytest.raises(NumericsError):
        output_error(dw * float("nan"), st)


def test_measure_tensor_rtn():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g)
    h = _spd(64, g)
    st = TensorStats((LinearStats(h, 10, torch.rand(8, generator=g)),))
    fmts = ["int2-g32", "int4-g32", "int8-row", "fp16", "q4_k"]  # q4_k cannot store 64 columns: skipped
    rows = measure_tensor("w", w, st, fmts, method="rtn")
    assert [r.format for r in rows] == ["int2-g32", "int4-g32", "int8-row", "fp16"]
    for r in rows:
        fmt = get_format(r.format)
        assert r.bytes == fmt.nbytes((8, 64))
        dw = dequantize(quantize_weight(w, fmt, hessian=h, method="rtn")) - w
        assert r.output_error == pytest.approx(float(torch.trace(dw.double() @ h.double() @ dw.double().T)))
        assert r.fisher_error is not None and r.fisher_error >= 0
    errs = [r.output_error for r in rows]
    assert errs == sorted(errs, reverse=True) and errs[-1] > 0  # fp16 error is tiny but real


def _tied_embedding(seed: int, V: int = 75, D: int = 64) -> tuple[torch.Tensor, torch.Tensor, TensorStats]:
    """A (V, D) weight, its raw token counts and the stats of a tied embedding (lookup + linear, Fisher on both)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g)
    freq = torch.rand(V, generator=g)
    st = TensorStats((LookupStats(freq / freq.sum(), 9, torch.rand(D, generator=g)),
                      LinearStats(_spd(D, g), 9, torch.rand(V, generator=g))))
    return w, freq, st


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_measure_tensor_in_row_chunks_equals_whole(method, batched, monkeypatch):
    """A tied embedding (lookup + linear roles, Fisher on both) measured in 5 row blocks: the same table."""
    import bitalloc.measure as me

    w, freq, st = _tied_embedding(4)
    D = w.shape[1]
    fmts = ["int3-row", "int4-g32", "q4_0", "iq4_nl", "fp16"]
    whole = measure_tensor("emb", w, st, fmts, method=method, max_elems=None, batched=batched)
    blocks: list[int] = []
    chunks = me.quantize_chunks
    monkeypatch.setattr(me, "quantize_chunks", lambda *a, **k: [blocks.append(1) or c for c in chunks(*a, **k)])
    parts = measure_tensor("emb", w, st, fmts, method=method, max_elems=16 * D, batched=batched)
    # rows 0-16-32-48-64-75; batched, only the pass-through fp16 goes through quantize_chunks
    assert len(blocks) == 5 * (1 if batched else len(fmts))
    assert [(r.format, r.bytes) for r in parts] == [(r.format, r.bytes) for r in whole]
    for a, b in zip(parts, whole):
        assert a.output_error == pytest.approx(b.output_error, rel=1e-9, abs=0)
        assert a.fisher_error == pytest.approx(b.fisher_error, rel=1e-9, abs=0)
    assert measure_tensor("emb", w, TensorStats(st.roles[:1] + (LinearStats(st.roles[1].hessian, 9),)), fmts[:1],
                          max_elems=16 * D)[0].fisher_error is None
    with pytest.raises(InputError, match="token_freq"):
        measure_tensor("emb", w, TensorStats((LookupStats(freq[:-1], 9),)), fmts, max_elems=16 * D)
    with pytest.raises(NumericsError, match="emb"):
        measure_tensor("emb", torch.cat([w[:-1], torch.full((1, D), math.inf)]), st, fmts, max_elems=16 * D)


def _table() -> Measurement:
    tensors = (TensorInfo("emb", (10, 64), 640, ("lookup", "linear")), TensorInfo("q", (4, 64), 256, group="qkv"))
    rows = (MeasureRow("q", "fp16", 512, 0.0, 0.0), MeasureRow("emb", "int4-g32", 400, 1.5, None),  # exact bytes
            MeasureRow("emb", "fp16", 1280, 1e-7, None), MeasureRow("q", "int4-g32", 160, 0.25, 0.125))
    return Measurement(tensors, rows, fixed_bytes=8, total_params=1000, fingerprint={"model": "abc", "calib": "d"})


def test_measurement_json_round_trip(tmp_path):
    m = _table()
    assert [r.format for r in m.rows_for("emb")] == ["int4-g32", "fp16"]  # canonical order: bytes
    assert m.formats() == ["int4-g32", "fp16"] and m.objectives == ("output",)
    p = tmp_path / "m.json"
    m.save(p)
    text = p.read_text()
    assert json.loads(text)["format_version"] == 1 and text.count("\n") > 8  # one row per line
    back = Measurement.load(p)
    assert back.tensors == m.tensors and back.rows == m.rows and back.fingerprint == m.fingerprint
    assert (back.fixed_bytes, back.total_params) == (8, 1000) and back.to_json() == text


@pytest.mark.parametrize(
    "mutate, err, msg",
    [
        (lambda t, r: (t, r + (MeasureRow("q", "fp16", 32, 0.0),)), InputError, "duplicate row"),
        (lambda t, r: (t, r + (MeasureRow("zz", "fp16", 32, 0.0),)), InputError, "unknown tensor"),
        (lambda t, r: (t, r + (MeasureRow("q", "int8-row", -1, 0.0),)), InputError, "negative"),
        (lambda t, r: (t, r + (MeasureRow("q", "int8-row", 20, math.nan),)), NumericsError, "output_error"),
        (lambda t, r: (t, r + (MeasureRow("q", "int8-row", 20, 1.0, math.inf),)), NumericsError, "fisher"),
        (lambda t, r: (t, r + (MeasureRow("q", "int8-row", 20, -1.0),)), InputError, "negative"),
        (lambda t, r: (t + (t[0],), r), InputError, "twice"),
    ],
)
def test_measurement_validation(mutate, err, msg):
    m = _table()
    t, r = mutate(m.tensors, m.rows)
    with pytest.raises(err, match=msg):
        Measurement(t, r, 8, 60)


def test_measurement_load_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("[1, 2")
    with pytest.raises(InputError, match="not valid JSON"):
        Measurement.load(p)
    d = json.loads(_table().to_json())
    d["format_version"] = 7
    p.write_text(json.dumps(d))
    with pytest.raises(InputError, match="format_version"):
        Measurement.load(p)
    d["format_version"] = 1
    d["rows"][0] = d["rows"][0][:2]
    p.write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"rows\[0\]: expected 5 items"):
        Measurement.load(p)
    with pytest.raises(InputError, match="numel"):
        TensorInfo("x", (2, 3), 5)


@pytest.mark.parametrize("batched", [True, False])
def test_measure_tensor_releases_each_row_block_after_use_and_changes_nothing(batched):
    """``release(rows)`` is called after every block of rows is read (finite check, the batched grid formats
    or each grid format, each pass-through format), and the table is the one without it."""
    w, _freq, st = _tied_embedding(5)
    V, D = w.shape
    fmts = ["int4-g32", "q4_0", "fp16"]
    plain = measure_tensor("emb", w, st, fmts, max_elems=16 * D, batched=batched)
    released: list[slice] = []
    got = measure_tensor("emb", w, st, fmts, max_elems=16 * D, release=released.append, batched=batched)
    assert got == plain
    blocks = [slice(a, min(a + 16, V)) for a in range(0, V, 16)]
    assert released == blocks * (1 + (2 if batched else len(fmts)))  # the finite check, then the formats


def test_tensor_without_calibration_tokens_is_measured_finite_and_named_in_a_warning(caplog):
    """A MoE expert the router never picks has an all-zero Hessian: no NaN, zero errors, and a warning naming it."""
    w = torch.randn(8, 64)
    st = TensorStats((LinearStats(torch.zeros(64, 64), 0, torch.zeros(8)),))
    with caplog.at_level(logging.WARNING, logger="bitalloc.measure"):
        rows = measure_tensor("layers.0.experts.3.w1", w, st, ["int2-g32", "int4-g32"], "gptq")
    assert [r.format for r in rows] == ["int2-g32", "int4-g32"]
    assert all(r.output_error == 0.0 and r.fisher_error == 0.0 for r in rows)
    assert "layers.0.experts.3.w1 received no calibration tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bitalloc.measure"):
        measure_tensor("q", w, TensorStats((LinearStats(torch.eye(64), 5, torch.ones(8)),)), ["int4-g32"], "gptq")
    assert "no calibration tokens" not in caplog.text


def test_formats_with_a_runtime_activation_rounding_add_its_noise():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 256, generator=g)
    h, gs = _spd(256, g), torch.rand(8, generator=g)
    noise = {"q8_0": torch.rand(8, generator=g, dtype=torch.float64), "q8_k": torch.rand(8, generator=g, dtype=torch.float64)}
    with_noise = TensorStats((LinearStats(h, 10, gs, noise),))
    plain = TensorStats((LinearStats(h, 10, gs),))
    fmts = ["q8_0", "q4_k", "int4-g32"]
    got = {r.format: r for r in measure_tensor("w", w, with_noise, fmts, method="rtn")}
    base = {r.format: r for r in measure_tensor("w", w, plain, fmts, method="rtn")}
    for fmt, rounding in (("q8_0", "q8_0"), ("q4_k", "q8_k")):
        a = noise[rounding]
        assert got[fmt].output_error == pytest.approx(base[fmt].output_error + float(a.sum()), rel=1e-12)
        assert got[fmt].fisher_error == pytest.approx(base[fmt].fisher_error + 0.5 * float(gs.double() @ a), rel=1e-12)
    assert got["int4-g32"] == base["int4-g32"]  # the int formats' runtime multiplies float activations
    # row-chunked measurement slices the noise with the rows
    chunked = {r.format: r for r in measure_tensor("w", w, with_noise, fmts, method="rtn", max_elems=3 * 256)}
    for fmt in fmts:
        assert chunked[fmt].output_error == pytest.approx(got[fmt].output_error, rel=1e-9)
        assert chunked[fmt].fisher_error == pytest.approx(got[fmt].fisher_error, rel=1e-9)
    bad = TensorStats((LinearStats(h, 10, gs, {"q8_0": torch.rand(5, dtype=torch.float64)}),))
    with pytest.raises(InputError, match="q8_0 activation noise of shape"):
        measure_tensor("w", w, bad, ["q8_0"], method="rtn")
