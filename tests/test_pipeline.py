"""The whole pipeline on tiny random Llama and Qwen2: measure -> allocate -> quantize -> save -> load -> eval."""
from __future__ import annotations

import math

import pytest
import torch

from bitalloc import load
from bitalloc.budget import Budget
from bitalloc.errors import BudgetError, InputError
from bitalloc.evaluate import evaluate
from bitalloc.export.packed import save_packed
from bitalloc.measure import Measurement
from bitalloc.models.view import ModelView
from bitalloc.pipeline import (best_uniform, check_measurement, fused_constraints, make_plan, measure_model,
                               uniform_plan)
from bitalloc.quantize import quantize_model, snapshot

from conftest import tiny_llama, tiny_qwen2, token_ids

FORMATS = ["int2-g32", "int4-g32", "int8-g32"]
_CACHE: dict[str, Measurement] = {}


def _measured(arch: str) -> tuple[torch.nn.Module, Measurement]:
    model = tiny_llama() if arch == "llama" else tiny_qwen2()
    if arch not in _CACHE:
        _CACHE[arch] = measure_model(model, None, token_ids(4), FORMATS, "rtn", progress=False)
    return model, _CACHE[arch]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_measure_allocate_quantize_save_load_evaluate(arch, tmp_path):
    model, m = _measured(arch)
    ref = tiny_llama() if arch == "llama" else tiny_qwen2()
    view = ModelView(model)
    assert {t.name for t in m.tensors} == {r.name for r in view.quantizable()}
    assert m.total_params == view.total_params and m.fixed_bytes == view.fixed_bytes
    assert all(r.fisher_error is not None for r in m.rows)
    plan = make_plan(m, "4.5bpw")
    budget = Budget.parse("4.5bpw").resolve(m.total_params)
    assert plan.total_bytes <= budget
    q = quantize_model(model, view, plan, token_ids(4), "gptq", progress=False)
    info = save_packed(tmp_path / "out", model, view, q, plan, None)
    assert info["bytes"] == plan.total_bytes <= budget  # the saved file's accounting, to the byte
    stored = sum(qt.nbytes() for qt in q.values())
    assert stored == info["bytes"]
    loaded = load(tmp_path / "out")
    w = token_ids(2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(w).logits, model(w).logits, rtol=0, atol=0)
    r = evaluate(loaded, ref, w)
    assert math.isfinite(r.kld) and r.kld > 0 and 0 <= r.top1 <= 1


def test_allocated_error_is_never_above_the_best_uniform_that_fits():
    _, m = _measured("llama")
    for b in ("3.5bpw", "4.5bpw", "6bpw"):
        u = best_uniform(m, b)
        p = make_plan(m, b)
        assert u.total_bytes <= Budget.parse(b).resolve(m.total_params)
        assert p.error <= u.error * (1 + 1e-9)
    with pytest.raises(BudgetError):
        best_uniform(m, "1bpw")


def test_uniform_plan_and_fused_constraint():
    model, m = _measured("qwen2")
    u = uniform_plan(m, "int4-g32")
    assert set(u.assignments.values()) == {"int4-g32"}
    assert u.total_bytes == sum(r.bytes for r in m.rows if r.format == "int4-g32") + m.fixed_bytes
    p = make_plan(m, "4bpw", fused_constraints(ModelView(model)))
    a = p.assignments
    for b in range(2):
        pre = f"model.layers.{b}."
        assert len({a[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"}) == 1
        assert a[pre + "mlp.gate_proj.weight"] == a[pre + "mlp.up_proj.weight"]


def test_measurement_round_trip_and_fingerprint(tmp_path):
    model, m = _measured("llama")
    m.save(tmp_path / "t.json")
    m2 = Measurement.load(tmp_path / "t.json")
    assert m2.rows == m.rows and m2.fingerprint == m.fingerprint
    check_measurement(m2, model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    with pytest.raises(InputError, match="different model"):
        check_measurement(m2, model)


def test_measuring_does_not_change_the_model():
    model = tiny_llama()
    before = snapshot(model)
    measure_model(model, None, token_ids(2), ["int4-g32"], "gptq", fisher=False, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.slow
def test_real_model_one_budget_beats_uniform_rtn():
    """Rescaled SmolLM2-135M at 4.25 bpw: allocated KLD finite and below the best uniform RTN at the same bytes."""
    import copy

    from bitalloc.data import default_calibration_files, default_eval_files, read_texts, token_windows
    from bitalloc.models.rescale import load_reference
    from bitalloc.pipeline import CachedReference
    from bitalloc.quantize import restore

    model, tok = load_reference(rescaled=True)
    reference = copy.deepcopy(model)
    view = ModelView(model)
    calib = token_windows(tok, read_texts(default_calibration_files()), 256, 8)
    evals = token_windows(tok, read_texts(default_eval_files()), 512, 4)
    m = measure_model(model, view, calib, ["int3-g64", "int4-g64", "int4-g128", "int6-g128"], "rtn",
                      fisher_windows=calib[:2], progress=False)
    budget = "4.25bpw"
    uni, plan = best_uniform(m, budget), make_plan(m, budget)
    assert plan.total_bytes <= Budget.parse(budget).resolve(m.total_params)
    ref = CachedReference(reference)
    saved = snapshot(model)
    quantize_model(model, view, uni, calib, "rtn", progress=False)
    kld_uniform = evaluate(model, ref, evals).kld
    restore(model, saved)
    quantize_model(model, view, plan, calib, "rtn", progress=False)
    kld_alloc = evaluate(model, ref, evals).kld
    assert math.isfinite(kld_alloc) and 0 < kld_alloc < kld_uniform


def test_uniform_baseline_is_chosen_by_measured_kld_among_fitting_candidates():
    from bitalloc.sweep import Point, best_measured_uniform

    def pt(label, nbytes, kld, method="rtn", kind="uniform"):
        return Point(kind, "4bpw", method, label, nbytes, 4.0, 0.0, 1.0, 1.0, kld, 1.0, 0.0)

    points = [pt("int3-g32", 100, 0.5), pt("int4-g128", 106, 0.2), pt("int4-g64", 113, 0.1),
              pt("int4-g128", 106, 0.05, method="gptq"), pt("allocated", 110, 0.01, kind="allocated")]
    assert best_measured_uniform(points, 110, "rtn").label == "int4-g128"  # int4-g64 does not fit
    assert best_measured_uniform(points, 120, "rtn").label == "int4-g64"
    assert best_measured_uniform(points, 110, "gptq").kld == 0.05
    with pytest.raises(ValueError):
        best_measured_uniform(points, 50, "rtn")


def test_measuring_extra_formats_later_and_merging_equals_measuring_them_at_once():
    model = tiny_llama()
    windows = token_ids(3)
    whole = measure_model(model, None, windows, ["int2-g32", "int4-g32", "int3-row"], "gptq", progress=False)
    first = measure_model(model, None, windows, ["int2-g32", "int4-g32"], "gptq", progress=False)
    later = measure_model(model, None, windows, ["int3-row", "int4-g32"], "gptq", progress=False)
    merged = first.merge(later)
    assert merged.rows == whole.rows  # same cells, same numbers (each format measured with fp inputs)
    assert merged.subset(["int4-g32", "int2-g32"]).rows == first.rows
    assert merged.fingerprint["formats"].split(",") == ["int2-g32", "int4-g32", "int3-row"]
    with pytest.raises(InputError, match="not measured"):
        first.subset(["int3-row"])
    other_calib = measure_model(model, None, token_ids(2), ["int3-row"], "gptq", progress=False)
    with pytest.raises(InputError, match="calibration differs"):
        first.merge(other_calib)
    rtn = measure_model(model, None, windows, ["int3-row"], "rtn", progress=False)
    with pytest.raises(InputError, match="method differs"):
        first.merge(rtn)


def test_gguf_rows_carry_the_runtime_activation_noise_and_int_rows_do_not():
    """measure_model computes the activation noise the candidate formats' runtimes need (llama.cpp's Q8_0 for
    q8_0), so a GGUF row costs more than the weight rounding alone; int rows are unchanged by it."""
    from bitalloc.calibrate import stream_blocks
    from bitalloc.measure import measure_tensor

    model, ids = tiny_llama(), token_ids(2)
    m = measure_model(model, None, ids, ["q8_0", "int8-g32"], "rtn", fisher=False, progress=False)
    weight_only = {}
    for block in stream_blocks(model, None, ids, progress=False):
        for name, st in block.items():
            for r in measure_tensor(name, model.get_parameter(name).detach(), st, ["q8_0", "int8-g32"], "rtn"):
                weight_only[(name, r.format)] = r.output_error
    for r in m.rows:
        if r.format == "int8-g32":
            assert r.output_error == pytest.approx(weight_only[(r.tensor, r.format)], rel=1e-9)
        else:  # Q8_0 activations: 8 bits per value, as coarse as the q8_0 weight itself
            assert r.output_error > 1.2 * weight_only[(r.tensor, r.format)], r.tensor
