"""The compressed-tensors target through the staged job (budget resolved once, allocator restricted, resumed
output recognised) and, slow, on the rescaled SmolLM2: transformers' logits equal ``bitalloc.load``'s."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bitalloc.budget import Budget
from bitalloc.errors import InputError
from bitalloc.jobs.config import RunConfig
from bitalloc.jobs.run import run_export
from bitalloc.targets.compressed_tensors import CompressedTensorsTarget
from tests.test_resume import make_hf_dir

pytest.importorskip("compressed_tensors")


def test_job_budget_restriction_and_resume(tmp_path):
    hf = make_hf_dir(tmp_path / "m" / "model")
    config = RunConfig(model=hf, calib_texts=(hf.parent / "calib.txt",), windows=2, ctx=16, job_dir=tmp_path / "job",
                       formats=("int2-g32-sym", "int4-g32-sym", "int4-g128-sym", "int8-row-sym", "fp16"),
                       method="rtn", fisher=False, progress=False, budgets=(Budget.parse("6bpw"),), keep_job=True,
                       output="compressed-tensors")
    res = run_export(config, CompressedTensorsTarget(tmp_path / "out", config.formats))
    cap, plan = res.capacity, res.plan
    assert cap is not None and plan is not None and cap.unit == "weights"
    info = res.written.info
    fmts = {e.tensor: e.format for e in plan.entries}
    assert fmts["model.embed_tokens.weight"] == "fp16" and "int4-g128-sym" not in fmts.values()
    grid = sum(1 for f in fmts.values() if f != "fp16")
    assert info["bytes"] == plan.total_bytes + 16 * grid <= cap.limit == Budget.parse("6bpw").resolve(
        info["total_params"])
    # the allocator got the limit less the fixed tensors and 16 B per linear (its weight_shape): the written bytes
    assert plan.budget_bytes == cap.limit - 16 * (len(fmts) - 1) and plan.total_bytes <= plan.budget_bytes
    again = run_export(config, CompressedTensorsTarget(tmp_path / "out", config.formats))  # recognised
    assert again.written.info == info
    other = dataclasses.replace(config, budgets=(Budget.parse("7bpw"),), job_dir=tmp_path / "job2")
    with pytest.raises(InputError, match="already exists"):
        run_export(other, CompressedTensorsTarget(tmp_path / "out"))


@pytest.mark.slow
def test_rescaled_smollm2_transformers_equals_bitalloc_load(tmp_path):
    from transformers import AutoModelForCausalLM

    from bitalloc import load
    from bitalloc.data import default_eval_files, text_windows
    from bitalloc.models.rescale import load_reference
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import plan_for_assignments
    from bitalloc.quantize import quantize_model

    model, tok = load_reference(rescaled=True)
    view = ModelView(model)
    mix = ("int4-g64-sym", "int3-g32-sym", "int8-row-sym", "int4-g32-sym", "int2-g64-sym", "int5-g64-sym")
    a = {r.name: "fp16" if r.kind == "embedding" else mix[i % len(mix)] for i, r in enumerate(view.quantizable())}
    plan = plan_for_assignments(view, a, "mix")
    windows = text_windows(tok, default_eval_files(), 512, 4)
    q = quantize_model(model, view, plan, windows[:2], "rtn", progress=False)
    target = CompressedTensorsTarget(tmp_path / "ct")
    prepared = target.prepare(model, view, plan, q, {}, tok)
    from bitalloc.targets.base import Capacity

    target.write_verified(prepared, Capacity("x", prepared.sizes["weights"], 0, 0, "weights"), overwrite=False)
    ours = load(tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(ours(w[None]).logits[0, 256:].double(), -1)
            lq = torch.log_softmax(hf(w[None]).logits[0, 256:].double(), -1)
            kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            n += lp.shape[0]
    info = json.loads((tmp_path / "ct" / "bitalloc.json").read_text())
    print(f"SmolLM2 rescaled, compressed-tensors {info['bytes']} B ({info['bpw']:.4f} bpw): KLD {kl / n:.3e}, "
          f"top-1 {agree / n:.4f} over {n} tokens")
    assert agree == n and kl / n < 1e-6
