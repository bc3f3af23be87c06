"""bench/activation_noise.py on a tiny Llama: predictions per kind of linear, and the emulated KLD."""
from __future__ import annotations

from torch import nn

from bench.activation_noise import emulated, float_reference, kind_of, predicted
from conftest import tiny_llama, token_ids


def test_predicted_and_emulated_costs_of_the_activation_rounding():
    model, ids = tiny_llama(), token_ids(3)
    pred = predicted(model, ids, fisher_windows=2)
    kinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert set(pred) == {(k, "q8_0") for k in kinds}  # 64/128 columns: no Q8_K
    assert all(v > 0 for v in pred.values())
    ref = float_reference(model, ids)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    none = emulated(model, ids, {}, ref)
    assert none[0] < 1e-9 and none[1] == 1.0
    kld, top1 = emulated(model, ids, {n: "q8_0" for n in linears if kind_of(n) == "down_proj"}, ref)
    assert kld > 1e-9 and 0 < top1 <= 1
    for name in ("model.layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj.weight"):
        assert kind_of(name) == "down_proj"
    assert kind_of("lm_head") == kind_of("model.embed_tokens.weight") == "lm_head"
