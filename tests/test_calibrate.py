"""Calibration statistics on tiny random models: block streaming, Hessians, NaN reports (Fisher: test_fisher.py)."""
from __future__ import annotations

import pytest
import torch

from bitalloc.calibrate import BlockRunner, layout_of, stream_blocks
from bitalloc.errors import InputError, NumericsError
from bitalloc.stats import LinearStats, LookupStats


def test_block_streaming_reproduces_the_model(tiny_model, windows):
    runner = BlockRunner(tiny_model, windows, batch_size=3)
    while not runner.done:
        runner.advance()
    lay = runner.layout
    got = lay.lm_head(lay.final_norm(runner.hidden))
    want = tiny_model(windows).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hessians_equal_mean_outer_products_and_groups_share_one(tiny_model, windows):
    lay = layout_of(tiny_model)
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(_m, args):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    hs = [lay.linear(1, lin).register_forward_pre_hook(grab(lin)) for lin in ("self_attn.q_proj", "mlp.down_proj")]
    tiny_model(windows)
    for h in hs:
        h.remove()
    stats = list(stream_blocks(tiny_model, None, windows, batch_size=3, progress=False))
    assert len(stats) == len(lay.blocks) + 1
    b1 = stats[1]
    for lin in ("self_attn.q_proj", "mlp.down_proj"):
        x = seen[lin]
        h = b1[lay.tensor_name(1, lin)].hessian
        torch.testing.assert_close(h, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    q, k, v = (b1[lay.tensor_name(1, f"self_attn.{p}_proj")].hessian for p in "qkv")
    assert q is k is v
    assert b1[lay.tensor_name(1, "self_attn.o_proj")].hessian is not q


def test_head_roles_tied_and_untied(llama_model, qwen2_model, windows):
    head = list(stream_blocks(llama_model, None, windows, progress=False))[-1]
    (name,) = head
    roles = head[name].roles
    assert name == "model.embed_tokens.weight"
    assert isinstance(roles[0], LookupStats) and isinstance(roles[1], LinearStats)
    assert float(roles[0].token_freq.sum()) == pytest.approx(1.0)
    assert int(roles[0].token_freq.argmax()) == int(torch.bincount(windows.reshape(-1)).argmax())
    head = list(stream_blocks(qwen2_model, None, windows, progress=False))[-1]
    assert set(head) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert roles[1].hessian.shape == (64, 64)


def test_nan_in_weights_is_reported_with_the_tensor_name(llama_model, windows):
    with torch.no_grad():
        llama_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericsError, match="model.layers.1.mlp.down_proj"):
        list(stream_blocks(llama_model, None, windows, progress=False))


def test_collect_with_advance_equals_advance_and_leaves_old_states_alone(tiny_model, windows):
    a = BlockRunner(tiny_model, windows, batch_size=3)
    b = BlockRunner(tiny_model, windows, batch_size=3)
    while not a.done:
        old = a.hidden
        kept = old.clone()
        a.collect(advance=True)
        b.advance()
        assert torch.equal(a.hidden, b.hidden) and a.block == b.block
        assert torch.equal(old, kept)  # a consumer holding the previous states (resume) still sees them


@pytest.mark.parametrize("max_positions, per_batch", [(64, 2), (10, 1)])
def test_batches_are_capped_by_positions_with_the_same_statistics(tiny_model, windows, max_positions, per_batch):
    wide = BlockRunner(tiny_model, windows, batch_size=8)
    narrow = BlockRunner(tiny_model, windows, batch_size=8, max_positions=max_positions)
    assert len(wide.batches) == 1
    assert [s.stop - s.start for s in narrow.batches] == [per_batch] * (len(windows) // per_batch)
    while not wide.done:
        hw, hn = wide.collect(advance=True), narrow.collect(advance=True)
        assert set(hw) == set(hn)
        for name in hw:
            torch.testing.assert_close(hn[name], hw[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(narrow.hidden, wide.hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(narrow.head_hessian(), wide.head_hessian(), rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="max_positions"):
        BlockRunner(tiny_model, windows, max_positions=0)


def test_spilled_model_keeps_hidden_states_in_released_scratch_files(tmp_path, windows):
    """A low-memory model's hidden states live in scratch spill files, none of their pages resident between
    batches, with the same values as in memory; older states stay valid for a consumer that holds them."""
    from bitalloc.models.sources import load_model
    from tests.conftest import tiny_llama
    from tests.models.test_spill import _resident

    tiny_llama().save_pretrained(tmp_path / "m")
    spilled, _ = load_model(tmp_path / "m", low_memory=True, spill_dir=tmp_path)
    whole, _ = load_model(tmp_path / "m")
    a = BlockRunner(spilled, windows, batch_size=3)
    b = BlockRunner(whole, windows, batch_size=3)
    assert a._files and a._files[0].holds(a.hidden) and a._files[0].directory == tmp_path
    assert not b._files
    held = a.hidden
    kept = held.clone()
    while not a.done:
        ha, hb = a.collect(advance=True), b.collect(advance=True)
        for name in hb:
            torch.testing.assert_close(ha[name], hb[name], rtol=0, atol=0)
        assert _resident(a._files[0]) == 0
        assert torch.equal(a.hidden, b.hidden)
    torch.testing.assert_close(a.head_hessian(), b.head_hessian(), rtol=0, atol=0)
    assert _resident(a._files[0]) == 0
    assert torch.equal(held, kept)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bitalloc-spill-")]  # unlinked at once


def _inputs(model, names):
    """The input activations (tokens, in) of the named modules in one plain forward."""
    seen: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())

    def grab(name):
        def hook(_m, args):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    hs = [mods[n].register_forward_pre_hook(grab(n)) for n in names]
    return seen, hs


@pytest.mark.parametrize("gram", [False, True], ids=["per-batch-products", "gram-matrix"])
def test_activation_noise_of_block_linears_and_the_tied_head(llama_model, windows, gram, monkeypatch):
    from bitalloc.activations import activation_noise, get_rounding

    # both ways the runner may take to the noise (it picks the cheaper by the shapes and the token count)
    monkeypatch.setattr("bitalloc.calibrate.runner.gram_pays", lambda *_: gram)

    lay = layout_of(llama_model)
    names = ["model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    seen, hs = _inputs(llama_model, names)
    llama_model(windows)
    for h in hs:
        h.remove()
    stats = list(stream_blocks(llama_model, None, windows, batch_size=3, progress=False, roundings=["q8_0", "q8_k"]))
    q8_0 = get_rounding("q8_0")
    for name in names[:2]:
        role = [s for b in stats for n, s in b.items() if n == f"{name}.weight"][0].roles[0]
        assert set(role.act_noise) == {"q8_0"}  # 64 / 128 columns: Q8_K (256) cannot round them
        x, w = seen[name], llama_model.get_parameter(f"{name}.weight")
        torch.testing.assert_close(role.act_noise["q8_0"], activation_noise(x, w, q8_0) / x.shape[0], rtol=1e-4, atol=1e-10)
    lookup, linear = stats[-1][lay.embedding_name].roles
    x = seen["lm_head"]
    torch.testing.assert_close(linear.act_noise["q8_0"], activation_noise(x, lay.embedding.weight, q8_0) / x.shape[0],
                               rtol=1e-4, atol=1e-10)
    assert isinstance(lookup, LookupStats) and isinstance(linear, LinearStats)
    plain = list(stream_blocks(llama_model, None, windows, batch_size=3, progress=False))
    assert all(r.act_noise == {} for b in plain for s in b.values() for r in s.roles if isinstance(r, LinearStats))


def test_q8_k_noise_where_the_input_width_is_a_multiple_of_256():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).float().eval()
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    block = next(stream_blocks(model, None, windows, progress=False, roundings=["q8_k"]))
    have = {n for n, s in block.items() if "q8_k" in s.roles[0].act_noise}
    assert have == {"model.layers.0.mlp.down_proj.weight"}
    assert (block["model.layers.0.mlp.down_proj.weight"].roles[0].act_noise["q8_k"] > 0).all()
