"""Sequential quantization of tiny random models by a plan."""
from __future__ import annotations

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.formats import get_format
from bitalloc.models.view import ModelView
from bitalloc.quantize import quantize_model, restore, snapshot, uniform_assignments
from bitalloc.rounding import dequantize


def _logit_mse(model, ref_logits, windows):
    with torch.no_grad():
        return float((model(windows).logits - ref_logits).pow(2).mean())


def test_every_tensor_is_stored_and_the_model_holds_the_dequantized_values(tiny_model, windows):
    view = ModelView(tiny_model)
    q = quantize_model(tiny_model, view, uniform_assignments(tiny_model, "int4-g32"), windows, "rtn", progress=False)
    params = dict(tiny_model.named_parameters())
    assert set(q) == set(params)
    for name, qt in q.items():
        want = "int4-g32" if name in {r.name for r in view.quantizable()} else "fp16"
        assert qt.format == want
        assert qt.nbytes() == get_format(want).nbytes(qt.shape)
        torch.testing.assert_close(params[name].detach(), dequantize(qt).reshape(params[name].shape), rtol=0, atol=0)


def test_gptq_beats_rtn_on_the_calibration_windows(llama_model, windows):
    with torch.no_grad():
        ref = llama_model(windows).logits
    saved = snapshot(llama_model)
    plan = uniform_assignments(llama_model, "int3-g32")
    quantize_model(llama_model, None, plan, windows, "rtn", progress=False)
    err_rtn = _logit_mse(llama_model, ref, windows)
    restore(llama_model, saved)
    quantize_model(llama_model, None, plan, windows, "gptq", progress=False)
    err_gptq = _logit_mse(llama_model, ref, windows)
    assert 0 < err_gptq < err_rtn


def test_int8_is_nearly_lossless(qwen2_model, windows):
    with torch.no_grad():
        ref = qwen2_model(windows).logits
    quantize_model(qwen2_model, None, uniform_assignments(qwen2_model, "int8-g32"), windows, "gptq", progress=False)
    assert _logit_mse(qwen2_model, ref, windows) < 1e-4 * float(ref.pow(2).mean())


def test_plan_that_does_not_match_the_model_is_refused(llama_model, windows):
    plan = uniform_assignments(llama_model, "int4-g32")
    plan.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(InputError, match="missing"):
        quantize_model(llama_model, None, plan, windows, "rtn", progress=False)
    with pytest.raises(InputError, match="method"):
        quantize_model(llama_model, None, uniform_assignments(llama_model, "int4-g32"), windows, "xyz")



@pytest.mark.parametrize("arch, fid", [("llama_model", "int3-row"), ("qwen2_model", "q4_0")])
def test_row_chunked_quantization_is_byte_identical(monkeypatch, request, windows, arch, fid):
    """Every tensor (the embedding included) in blocks of 8 rows: the same bytes and the same model."""
    import copy

    import bitalloc.rounding as rounding

    tiny_model = request.getfixturevalue(arch)
    other = copy.deepcopy(tiny_model)
    plan = uniform_assignments(tiny_model, fid)
    whole = quantize_model(tiny_model, None, plan, windows, "gptq", progress=False)
    monkeypatch.setattr(rounding, "ROW_CHUNK_ELEMS", 8 * 64)
    cls = type(get_format(fid))
    joined: list[int] = []
    concat = cls.concat_rows
    monkeypatch.setattr(cls, "concat_rows", lambda self, parts: joined.append(len(parts)) or concat(self, parts))
    chunked = quantize_model(other, None, plan, windows, "gptq", progress=False)
    assert max(joined) == 256 // 8  # the 256-row embedding went through 32 blocks
    assert set(whole) == set(chunked)
    for name, q in whole.items():
        c = chunked[name]
        assert (c.format, c.shape) == (q.format, q.shape)
        for k, t in q.parts.items():
            assert torch.equal(c.parts[k], t), (name, k)
    for (n, a), (_, b) in zip(tiny_model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n


def test_spilled_model_quantizes_identically_one_row_block_resident(monkeypatch, tmp_path, windows):
    """A low-memory (spilled) model gives the same bytes; each row block of a big tensor is released."""
    import bitalloc.quantize as qz
    import bitalloc.rounding as rounding
    from bitalloc.models.sources import load_model
    from tests.conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "m")
    ref, _ = load_model(tmp_path / "m")
    low, _ = load_model(tmp_path / "m", low_memory=True, spill_dir=tmp_path)
    plan = uniform_assignments(ref, "int4-g32")
    monkeypatch.setattr(rounding, "ROW_CHUNK_ELEMS", 64 * 64)
    whole = quantize_model(ref, None, plan, windows, "gptq", progress=False)
    released: list[tuple[str, slice]] = []
    real = qz.release_rows
    monkeypatch.setattr(qz, "release_rows", lambda m, n, rows: released.append((n, rows)) or real(m, n, rows))
    low_q = quantize_model(low, None, plan, windows, "gptq", progress=False)
    for name, q in whole.items():
        for k, t in q.parts.items():
            assert torch.equal(low_q[name].parts[k], t), (name, k)
    emb = ref.get_parameter("model.embed_tokens.weight")
    want = [slice(a, min(a + 64, emb.shape[0])) for a in range(0, emb.shape[0], 64)]
    assert [r for n, r in released if n == "model.embed_tokens.weight"] == want
    for (n, a), (_, b) in zip(ref.named_parameters(), low.named_parameters()):
        assert torch.equal(a, b), n


def test_originals_are_the_source_s_own_weights_only_when_they_are_equal_bit_for_bit():
    """``originals``: a source holding the model's exact values serves them without a copy and restores the model
    exactly; a source that differs anywhere (one value, or only a zero's sign) gives a snapshot instead."""
    from bitalloc.quantize import originals
    from tests.conftest import tiny_llama

    model, same = tiny_llama(seed=3), tiny_llama(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = originals(model, same)
    theirs = dict(same.named_parameters())
    assert got.keys() == before.keys()
    assert all(t.data_ptr() == theirs[n].data_ptr() for n, t in got.items())  # no copy
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    restore(model, got)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    for change in ("value", "sign"):
        other = tiny_llama(seed=3)
        w = dict(other.named_parameters())["model.layers.0.mlp.down_proj.weight"]
        m = dict(model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
        with torch.no_grad():
            if change == "value":
                w[0, 0] += 1.0
            else:
                m[0, 0], w[0, 0] = 0.0, -0.0
        got = originals(model, other)
        assert all(t.data_ptr() != dict(other.named_parameters())[n].data_ptr() for n, t in got.items())
        assert all(torch.equal(got[n], p) for n, p in model.named_parameters())
    assert originals(model).keys() == before.keys()  # no source: a snapshot
    mine = dict(model.named_parameters())
    got = originals(model, model)  # the same memory would be overwritten with the model: a snapshot
    assert all(t.data_ptr() != mine[n].data_ptr() and torch.equal(t, mine[n]) for n, t in got.items())


def test_gptq_row_blocks_may_be_as_large_as_a_share_of_the_hessian(monkeypatch, request, windows):
    """A weight rounded with a Hessian is cut into blocks of up to cols² ÷ HESSIAN_BLOCK_SHARE elements (fewer GPTQ
    column loops; the factorisation holds that much memory anyway), one without into ROW_CHUNK_ELEMS; the bytes
    are those of small blocks."""
    import copy

    import bitalloc.quantize as qz
    import bitalloc.rounding as rounding

    assert rounding.round_block_elems(5376) == 5376 * 5376 // rounding.HESSIAN_BLOCK_SHARE > rounding.ROW_CHUNK_ELEMS
    assert rounding.round_block_elems(2048) == rounding.round_block_elems(5376, False) == rounding.ROW_CHUNK_ELEMS
    model = request.getfixturevalue("llama_model")
    other = copy.deepcopy(model)
    plan = uniform_assignments(model, "int4-g32")
    monkeypatch.setattr(rounding, "ROW_CHUNK_ELEMS", 8 * 64)
    small = quantize_model(model, None, plan, windows, "gptq", progress=False)
    monkeypatch.setattr(rounding, "HESSIAN_BLOCK_SHARE", 1)
    seen: list[tuple[int, int, bool, int]] = []
    real = qz.quantize_chunks

    def spy(w, fmt, *, hessian=None, method="gptq", max_elems=None):
        seen.append((int(w.shape[0]), int(w.shape[1]), hessian is not None, max_elems))
        return real(w, fmt, hessian=hessian, method=method, max_elems=max_elems)

    monkeypatch.setattr(qz, "quantize_chunks", spy)
    large = quantize_model(other, None, plan, windows, "gptq", progress=False)
    assert seen and all(m == max(8 * 64, c * c if h else 0) for _r, c, h, m in seen)
    assert any(m > 8 * 64 and r * c > m for r, c, _h, m in seen)  # some weight still cut, into larger blocks
    for name, q in small.items():
        for k, t in q.parts.items():
            assert torch.equal(large[name].parts[k], t), (name, k)
