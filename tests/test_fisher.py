"""The Fisher pass on tiny random models: equal to one plain full backward, with bounded working sets
(checkpointed block inputs, position x vocabulary slices of the head, weight slices released after use)."""
from __future__ import annotations

import pytest
import torch

import bitalloc.fisher as fisher_mod
from bitalloc.calibrate import layout_of
from bitalloc.errors import InputError
from bitalloc.fisher import fisher_pass

from tests.conftest import tiny_llama


def _fisher_reference(model, windows, cap=None):
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
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
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


def _assert_matches(got, ref, model):
    lay = layout_of(model)
    assert set(got) == set(ref)
    assert len(got) == len(lay.blocks) * len(lay.spec.linears) + 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-12, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("batch_size, head_chunk, vocab_chunk", [(2, 128, 4096), (3, 5, 7), (4, 31, 256)])
def test_fisher_matches_plain_autograd_for_every_tensor(tiny_model, windows, batch_size, head_chunk, vocab_chunk):
    model = tiny_model
    g = fisher_pass(model, None, windows, batch_size=batch_size, progress=False, head_chunk=head_chunk,
                    vocab_chunk=vocab_chunk)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were computed
    assert all(p.requires_grad for p in model.parameters())  # requires_grad flags restored
    _assert_matches(g, _fisher_reference(model, windows), model)
    assert g[("model.embed_tokens.weight", "lookup")].shape == (64,)
    assert g[(layout_of(model).lm_head_name, "linear")].shape == (256,)


@pytest.mark.parametrize("layers", [3, 5, 10])
def test_checkpointed_segments_match_plain_autograd(windows, layers):
    """ceil(sqrt(n)) blocks per segment, the last one shorter (5 -> 3 + 2, 10 -> 4 + 4 + 2)."""
    model = tiny_llama()
    from transformers import LlamaForCausalLM

    cfg = model.config
    cfg.num_hidden_layers = layers
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).float().eval()
    g = fisher_pass(model, None, windows[:2], batch_size=2, progress=False, head_chunk=16, vocab_chunk=100)
    _assert_matches(g, _fisher_reference(model, windows[:2]), model)


def test_softcapped_logits_match_plain_autograd(llama_model, windows):
    llama_model.config.final_logit_softcapping = 0.5  # small: the cap changes the gradients a lot
    g = fisher_pass(llama_model, None, windows, batch_size=2, progress=False, head_chunk=9, vocab_chunk=50)
    ref = _fisher_reference(llama_model, windows, cap=0.5)
    _assert_matches(g, ref, llama_model)
    llama_model.config.final_logit_softcapping = None
    plain = fisher_pass(llama_model, None, windows, batch_size=2, progress=False)
    assert not torch.allclose(plain[("model.embed_tokens.weight", "linear")], ref[("model.embed_tokens.weight", "linear")])


def test_block_runs_and_head_slices_are_bounded(llama_model, windows, monkeypatch):
    """Per batch each block runs once with autograd and at most twice without; the head never calls lm_head
    (no full logits): its logits come in head_chunk x vocab_chunk slices, each weight slice released after use."""
    lay = layout_of(llama_model)
    calls = {"grad": 0, "nograd": 0}
    shapes: list[tuple[int, int]] = []
    released: list[slice] = []
    head_calls: list[int] = []

    def count(_m, _i, out):
        calls["grad" if out.requires_grad else "nograd"] += 1

    real_logits = fisher_mod.head_logits

    def logits(h, w, bias, cap):
        shapes.append((h.shape[0], w.shape[0]))
        return real_logits(h, w, bias, cap)

    monkeypatch.setattr(fisher_mod, "head_logits", logits)
    monkeypatch.setattr(fisher_mod, "release_rows", lambda _m, name, rows: released.append((name, rows)))
    h1 = lay.linear(0, "mlp.down_proj").register_forward_hook(count)
    h2 = lay.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    fisher_pass(llama_model, None, windows, batch_size=2, progress=False, head_chunk=7, vocab_chunk=100)
    h1.remove(), h2.remove()
    assert calls == {"grad": 2, "nograd": 4}  # 4 windows in 2 batches; block 0 is re-run from its checkpoint
    assert not head_calls
    positions = windows.shape[0] * (windows.shape[1] - 1)
    assert max(r for r, _ in shapes) == 7 and max(v for _, v in shapes) == 100
    assert sum(r * v for r, v in shapes) == 2 * positions * 256  # two passes over the vocabulary
    assert {name for name, _ in released} == {"model.embed_tokens.weight"}
    assert [(s.start, s.stop) for _, s in released[:3]] == [(0, 100), (100, 200), (200, 256)]
    assert len(released) == len(shapes)


def test_bad_chunks_are_input_errors(llama_model, windows):
    with pytest.raises(InputError, match="head_chunk"):
        fisher_pass(llama_model, None, windows, head_chunk=0)
    with pytest.raises(InputError, match="vocab_chunk"):
        fisher_pass(llama_model, None, windows, vocab_chunk=0)
