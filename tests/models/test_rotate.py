"""Folded rotations (models/rotate.py): function-preserving on every qualifying architecture, refused elsewhere."""
from __future__ import annotations

import copy

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.formats.rotated import Rotation
from bitalloc.models.rescale import _LAYER_STRIDE
from bitalloc.models.rotate import check_rotation, rotate_, rotate_residual_, rotate_vo_
from tests.conftest import tiny_arch, tiny_llama, token_ids
from tests.moe_tiny import tiny_moe

MOE = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
VO_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text") + MOE
RESIDUAL_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _tiny(arch: str) -> torch.nn.Module:
    return tiny_moe(arch) if arch in MOE else tiny_arch(arch)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_same_function(before: torch.Tensor, after: torch.Tensor) -> None:
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel < 1e-4, rel


def _changed(ref: dict, model: torch.nn.Module) -> set[str]:
    sd = model.state_dict()
    return {k for k in ref if k in sd and not torch.equal(ref[k], sd[k])}


@pytest.mark.parametrize("arch", VO_ARCHS)
def test_vo_rotation_preserves_fp32_logits(arch: str) -> None:
    model, ids = _tiny(arch), token_ids(2)
    before, ref = _logits(model, ids), copy.deepcopy(model.state_dict())
    rotate_vo_(model, seed=1)
    _assert_same_function(before, _logits(model, ids))
    changed = _changed(ref, model)
    assert changed and all(k.endswith(("v_proj.weight", "v_proj.bias", "o_proj.weight")) for k in changed), changed
    assert any(k.endswith("o_proj.weight") for k in changed)


@pytest.mark.parametrize("arch", RESIDUAL_ARCHS)
def test_residual_rotation_preserves_fp32_logits(arch: str) -> None:
    model, ids = _tiny(arch), token_ids(2)
    before = _logits(model, ids)
    rotate_residual_(model, seed=2, untie=True)
    _assert_same_function(before, _logits(model, ids))
    for name, p in model.named_parameters():  # every norm folded into the linears it feeds
        if "norm" in name and "self_attn" not in name:
            assert torch.equal(p, torch.ones_like(p)), name


def _tiny_llama_wide(hidden: int, heads: int, kv: int, tie: bool = False) -> torch.nn.Module:
    """A tiny Llama whose hidden width / head_dim are not powers of two (Paley factors in the rotations)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _randomize_norms_

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=tie,
                      initializer_range=0.05)
    model = LlamaForCausalLM(cfg).float().eval()
    _randomize_norms_(model, 3)
    return model


@pytest.mark.parametrize("mode", ["vo", "residual"])
def test_rotations_of_non_power_of_two_widths(mode: str) -> None:
    model, ids = _tiny_llama_wide(96, 4, 2), token_ids(2)  # hidden 96 = 12·8, head_dim 24 = 12·2
    assert Rotation.build(96).full and Rotation.build(24).full
    before = _logits(model, ids)
    rotate_(model, mode, seed=5)
    _assert_same_function(before, _logits(model, ids))


def test_vo_rotation_is_per_kv_head_orthogonal_and_seeded() -> None:
    model = tiny_llama()
    old = copy.deepcopy(model)
    rotate_vo_(model, seed=4)
    hd, n_kv, n_heads = 16, 2, 4
    for i in range(2):
        att, att0 = model.model.layers[i].self_attn, old.model.layers[i].self_attn
        q = Rotation.build(hd, 4 * _LAYER_STRIDE + i).matrix()
        wv, wv0 = (a.v_proj.weight.double().reshape(n_kv, hd, -1) for a in (att, att0))
        torch.testing.assert_close(wv, q.T @ wv0, rtol=0, atol=1e-6)
        wo, wo0 = (a.o_proj.weight.double().reshape(-1, n_heads, hd) for a in (att, att0))
        torch.testing.assert_close(wo, wo0 @ q, rtol=0, atol=1e-6)
        # what attention multiplies, W_o,h · W_v,kv(h), is unchanged (4 query heads share 2 KV heads)
        for h in range(n_heads):
            torch.testing.assert_close(wo[:, h] @ wv[h // 2], wo0[:, h] @ wv0[h // 2], rtol=0, atol=1e-6)
    a, b = tiny_llama(), tiny_llama()
    rotate_vo_(a, seed=4)
    rotate_vo_(b, seed=5)
    k = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(a.state_dict()[k], model.state_dict()[k]) and not torch.equal(a.state_dict()[k],
                                                                                    b.state_dict()[k])


def test_residual_rotation_keeps_a_tie_when_the_final_norm_is_uniform() -> None:
    model, ids = tiny_llama(tie=True), token_ids(2)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.3)
    before = _logits(model, ids)
    rotate_residual_(model, seed=0)
    _assert_same_function(before, _logits(model, ids))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.norm.weight, torch.full_like(model.model.norm.weight, 1.3))


def test_residual_rotation_unties_only_when_asked() -> None:
    model = tiny_llama(tie=True)
    ref = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match="untie"):
        rotate_residual_(model)
    assert not _changed(ref, model)
    rotate_residual_(model, untie=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False


@pytest.mark.parametrize("arch, mode, why", [
    ("gemma2", "residual", "post_attention_layernorm"),
    ("gemma3_text", "residual", "post_attention_layernorm"),
    ("qwen3_moe", "residual", "router"),
    ("olmoe", "residual", "router"),
    ("phi3", "vo", "fused"),
])
def test_refused_architectures_get_one_line_and_an_untouched_model(arch: str, mode: str, why: str) -> None:
    model = _tiny(arch)
    ref = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=why) as e:
        rotate_(model, mode, untie=True)
    assert "\n" not in str(e.value)
    assert not _changed(ref, model)


def _meta(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every parameter on the meta device (shapes and tying kept): what the CLI's precheck sees."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(model.config))


@pytest.mark.parametrize("arch, mode, why", [
    ("gemma2", "residual", "post_attention_layernorm"),
    ("qwen3_moe", "residual", "router"),
    ("phi3", "vo", "fused"),
])
def test_check_rotation_refuses_from_shapes_alone(arch: str, mode: str, why: str) -> None:
    with pytest.raises(InputError, match=why):
        check_rotation(_meta(_tiny(arch)), (mode,), untie=mode == "residual")


@pytest.mark.parametrize("arch", RESIDUAL_ARCHS)
def test_check_rotation_passes_every_rotatable_meta_model(arch: str) -> None:
    meta = _meta(_tiny(arch))
    assert next(meta.parameters()).is_meta
    check_rotation(meta, ("residual", "vo") if arch != "phi3" else ("residual",), untie=True)


def test_a_non_uniform_final_norm_is_refused_once_its_values_are_known() -> None:
    """The one refusal that needs values: the meta precheck lets it through, the loaded model refuses it."""
    model = tiny_llama(tie=True)
    with torch.no_grad():
        model.model.norm.weight[0] = 2.0
    check_rotation(_meta(model), ("residual",))
    with pytest.raises(InputError, match="final norm"):
        check_rotation(model, ("residual",))
    check_rotation(model, ("residual",), untie=True)


def test_layernorm_is_refused() -> None:
    model = tiny_llama(tie=False)
    block = model.model.layers[1]
    block.input_layernorm = torch.nn.LayerNorm(64, bias=False)  # mean subtraction: does not commute with Q
    ref = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match="does not commute"):
        rotate_residual_(model)
    assert not _changed(ref, model)
    block.input_layernorm = torch.nn.LayerNorm(64)
    with pytest.raises(InputError, match="bias"):
        rotate_residual_(model)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(InputError, match="unknown rotation"):
        rotate_(tiny_llama(), "updown")
