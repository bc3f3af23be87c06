"""Calibration statistics on tiny random models: block streaming, Hessians, Fisher gradients, NaN reports."""
from __future__ import annotations

import pytest
import torch

from bitalloc.calibrate import BlockRunner, fisher_pass, layout_of, stream_blocks
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


def _fisher_reference(model, windows):
    """E[g²] of every linear output, the logits and the embedding output: one plain full backward per window."""
    lay = layout_of(model)
    outs: dict[tuple[str, str], torch.Tensor] = {}
    mods = {(lay.tensor_name(b, lin), "linear"): lay.linear(b, lin) for b in range(len(lay.blocks))
            for lin in lay.spec.linears}
    mods[(lay.lm_head_name, "linear")] = lay.lm_head

    def keep(key):
        def hook(_m, _i, out):
            out.retain_grad()
            outs[key] = out
        return hook

    hs = [m.register_forward_hook(keep(k)) for k, m in mods.items()]
    sums: dict[tuple[str, str], torch.Tensor] = {}
    with torch.enable_grad():
        for i in range(len(windows)):
            ids = windows[i : i + 1]
            emb = lay.embedding(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits
            ll = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).sum()
            ll.backward()
            grads = {k: o.grad for k, o in outs.items()}
            grads[(lay.embedding_name, "lookup")] = emb.grad
            for k, gr in grads.items():
                sq = gr.pow(2).reshape(-1, gr.shape[-1]).sum(0)
                sums[k] = sums[k] + sq if k in sums else sq
    for h in hs:
        h.remove()
    return {k: v / windows.numel() for k, v in sums.items()}


@pytest.mark.parametrize("batch_size, head_chunk", [(2, 128), (3, 5)])
def test_fisher_matches_plain_autograd_for_every_tensor(tiny_model, windows, batch_size, head_chunk):
    model = tiny_model
    g = fisher_pass(model, None, windows, batch_size=batch_size, progress=False, head_chunk=head_chunk)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were computed
    assert all(p.requires_grad for p in model.parameters())  # requires_grad flags restored
    ref = _fisher_reference(model, windows)
    assert set(g) == set(ref)
    lay = layout_of(model)
    assert len(g) == len(lay.blocks) * len(lay.spec.linears) + 2
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-4, atol=1e-12, msg=lambda m: f"{k}: {m}")
    assert g[("model.embed_tokens.weight", "lookup")].shape == (64,)


def test_fisher_recomputes_each_block_once_and_never_builds_full_logits(llama_model, windows):
    """Every linear runs once without and once with autograd per batch; lm_head sees chunks of positions."""
    lay = layout_of(llama_model)
    calls = {"grad": 0, "nograd": 0}
    head_rows: list[int] = []

    def count(_m, _i, out):
        calls["grad" if out.requires_grad else "nograd"] += 1

    def head(_m, args, _out):
        head_rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

    h1 = lay.linear(1, "mlp.down_proj").register_forward_hook(count)
    h2 = lay.lm_head.register_forward_hook(head)
    fisher_pass(llama_model, None, windows, batch_size=2, progress=False, head_chunk=7)
    h1.remove(), h2.remove()
    assert calls == {"grad": 2, "nograd": 2}  # 4 windows in 2 batches
    assert max(head_rows) == 7 and sum(head_rows) == windows.shape[0] * (windows.shape[1] - 1)
    with pytest.raises(InputError, match="head_chunk"):
        fisher_pass(llama_model, None, windows, head_chunk=0)


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
