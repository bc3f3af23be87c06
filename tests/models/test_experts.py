"""MoE experts as per-expert linears: equivalence, the expanded table, routed weighted Hessians, Fisher, loading."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from bitalloc.calibrate import BlockRunner, fisher_pass
from bitalloc.errors import InputError
from bitalloc.models.archs import arch_for
from bitalloc.models.experts import (ExpertMLP, expert_stacks, fuse_experts, fuse_tensors, split_fused,
                                     unfuse_experts)
from bitalloc.models.sources import load_model
from bitalloc.models.view import ModelView

from moe_tiny import MOE_ARCHS, block_expert, tiny_moe

IDS = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfused_model_computes_the_fused_logits_and_fuses_back(arch):
    model = tiny_moe(arch, unfuse=False)
    with torch.no_grad():
        ref = model(IDS).logits
    assert unfuse_experts(model) == 2 and unfuse_experts(model) == 0  # idempotent
    assert isinstance(model.model.layers[1].mlp.experts[3], ExpertMLP)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    assert fuse_experts(model) == 2
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_split_and_fuse_tensors_are_inverse_and_bad_shapes_are_one_input_error():
    gu, dn = torch.randn(3, 10, 8), torch.randn(3, 8, 5)
    parts = split_fused(gu, dn)
    assert torch.equal(parts[1]["gate_proj"], gu[1, :5]) and torch.equal(parts[1]["up_proj"], gu[1, 5:])
    g2, d2 = fuse_tensors(parts)
    assert torch.equal(g2, gu) and torch.equal(d2, dn)
    with pytest.raises(InputError):
        split_fused(gu, torch.randn(3, 8, 4))


def test_the_table_repeats_the_expert_groups_for_every_expert_in_order():
    model = tiny_moe("qwen2_moe")
    spec = arch_for(model.config)
    assert spec.groups[:4] == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                               ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                               ("mlp.shared_expert.down_proj",))
    assert spec.groups[4:8] == (("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"), ("mlp.experts.0.down_proj",),
                                ("mlp.experts.1.gate_proj", "mlp.experts.1.up_proj"), ("mlp.experts.1.down_proj",))
    assert len(spec.groups) == 4 + 2 * 4 and ("mlp.experts.3.gate_proj", "mlp.experts.3.up_proj") in spec.tie_groups
    view = ModelView(model)
    names = {r.name for r in view.quantizable()}
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in names
    fixed = {f.name for f in view.fixed()}  # router and shared-expert gate are fixed fp16 tensors
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"} <= fixed
    stacks = expert_stacks(view)
    assert len(stacks) == 2 * 3 and stacks[1][:2] == (0, "up_proj")
    assert stacks[1][2] == tuple(f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(4))


def test_dense_layers_among_moe_layers_are_refused_in_one_line():
    model = tiny_moe("qwen2_moe", unfuse=False, mlp_only_layers=[1])
    with pytest.raises(InputError, match="dense MLP layers"):
        ModelView(model)


def _routing(model, layer: int):
    """Per token of every window: the MLP input, and per expert the routing weight (0 when not routed)."""
    got = {}
    mlp = model.model.layers[layer].mlp

    def pre(_m, args):
        got["x"] = args[0].detach().reshape(-1, args[0].shape[-1])

    def gate(_m, _a, out):
        w = torch.zeros(out[2].shape[0], 4)
        w.scatter_(1, out[2], out[1].float())
        got["p"] = w

    h1 = mlp.register_forward_pre_hook(pre)
    h2 = mlp.gate.register_forward_hook(gate)
    with torch.no_grad():
        model(IDS)
    h1.remove(), h2.remove()
    return got["x"].float(), got["p"]


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_routed_hessians_weight_each_token_by_its_squared_routing_weight(arch):
    model = tiny_moe(arch)
    x, p = _routing(model, 0)
    runner = BlockRunner(model, IDS, batch_size=2)  # two batches: sums over batches
    hs = runner.collect()
    n = IDS.numel()
    for e in range(4):
        ex = model.model.layers[0].mlp.experts[e]
        routed = p[:, e] > 0
        xe, pe = x[routed], p[routed, e]
        want = (xe * pe[:, None] ** 2).T @ xe / n
        torch.testing.assert_close(hs[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            a = ex.act_fn(ex.gate_proj(xe)) * ex.up_proj(xe)
        want_d = (a * pe[:, None] ** 2).T @ a / n
        torch.testing.assert_close(hs[f"model.layers.0.mlp.experts.{e}.down_proj.weight"], want_d, rtol=1e-5,
                                   atol=1e-6)
        assert runner.tokens[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] == int(routed.sum())
    assert runner.tokens["model.layers.0.self_attn.q_proj.weight"] == n
    assert sum(int((p[:, e] > 0).sum()) for e in range(4)) == 2 * n  # top-2


def test_fisher_of_an_expert_divides_out_the_routing_weight_and_averages_over_its_tokens():
    model = tiny_moe("qwen3_moe")
    fisher = fisher_pass(model, None, IDS, batch_size=3, progress=False)
    # brute force: autograd through the whole model, the output of expert 1's down_proj in layer 1
    ex = model.model.layers[1].mlp.experts[1]
    keep = {}

    def hook(mod, _a, out):
        keep["y"], keep["p"] = out, ex.routing_weight

    h = ex.down_proj.register_forward_hook(hook)
    emb = model.model.embed_tokens(IDS).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    h.remove()
    ll = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, IDS[:, 1:, None]).sum()
    (g,) = torch.autograd.grad(ll, keep["y"])
    want = ((g / keep["p"][:, None]) ** 2).sum(0) / g.shape[0]
    torch.testing.assert_close(fisher[("model.layers.1.mlp.experts.1.down_proj.weight", "linear")], want,
                               rtol=1e-4, atol=1e-9)


def test_an_expert_no_token_reaches_gets_zero_statistics_a_warning_and_a_format(caplog):
    from bitalloc.pipeline import make_plan, measure_model
    from bitalloc.quantize import quantize_model

    model = tiny_moe("qwen2_moe")
    block_expert(model, banned=2, layer=0)
    runner = BlockRunner(model, IDS)
    hs = runner.collect()
    dead = "model.layers.0.mlp.experts.2.gate_proj.weight"
    assert torch.count_nonzero(hs[dead]) == 0 and runner.tokens[dead] == 0
    fisher = fisher_pass(model, None, IDS, progress=False)
    assert torch.count_nonzero(fisher[(dead, "linear")]) == 0
    with caplog.at_level(logging.WARNING, logger="bitalloc.measure"):
        m = measure_model(model, None, IDS, ["int2-g32", "int4-g32", "q4_0"], "gptq", progress=False)
    assert f"{dead} received no calibration tokens" in caplog.text
    rows = m.rows_for(dead)
    assert {r.format for r in rows} == {"int2-g32", "int4-g32", "q4_0"}
    assert all(r.output_error == 0.0 for r in rows)
    plan = make_plan(m, "4bpw")
    assert plan.assignments[dead] == "int2-g32"  # the cheapest
    q = quantize_model(model, None, plan, IDS, "gptq", progress=False)
    assert torch.isfinite(model.get_parameter(dead)).all() and q[dead].format == "int2-g32"


def test_low_memory_and_whole_loads_unfuse_per_expert_and_fused_checkpoints(tmp_path):
    model = tiny_moe("qwen2_moe", unfuse=False)
    with torch.no_grad():
        ref = model(IDS).logits
    model.save_pretrained(tmp_path / "hf")  # transformers writes one tensor per expert projection
    for low in (False, True):
        loaded, _ = load_model(tmp_path / "hf", low_memory=low)
        assert isinstance(loaded.model.layers[0].mlp.experts[0], ExpertMLP)
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    # a checkpoint in transformers' in-memory layout: fused (E, 2I, H) / (E, H, I) tensors
    fused = tmp_path / "fused"
    fused.mkdir()
    model.config.save_pretrained(fused)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(fused / "model.safetensors"))
    loaded, _ = load_model(fused, low_memory=True)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in dict(loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-5, atol=1e-5)
