"""Low-memory loading: spilled weights equal a whole load, residency is really dropped, nothing left behind."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import gguf
import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.models import spill as sp
from bitalloc.models.sources import default_model_path, load_model
from bitalloc.models.view import ModelView
from bitalloc.pipeline import model_fingerprint
from tests.conftest import tiny_llama, tiny_qwen2, token_ids
from tests.gguf_tiny import add_llama_hparams, finish, gguf_arrays

T = gguf.GGMLQuantizationType


def _resident(spill: sp.SpillFile) -> int:
    """Resident bytes of the spill mapping, from /proc/self/smaps (the mapping that holds its base)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= spill.base < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("spill mapping not found in /proc/self/smaps")


def _spill_of(model: torch.nn.Module) -> sp.SpillFile:
    spills = {id(s): s for m in model.modules() if (s := m.__dict__.get("_bitalloc_spill")) is not None}
    assert len(spills) == 1
    return next(iter(spills.values()))


def write_quantized_gguf(path: Path, model: torch.nn.Module) -> None:
    """A tiny Llama GGUF as llama.cpp lays it out: Q8_0 embedding, Q4_1 linears, F32 norms, permuted q/k."""
    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_hparams(w)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["t", "1", "t1"] + [f"x{i}" for i in range(253)])
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_token_merges(["t 1"])
    for name, a in gguf_arrays(model):
        if a.ndim == 2:
            typ = T.Q8_0 if name == "token_embd.weight" else T.Q4_1
            w.add_tensor(name, gguf.quants.quantize(a, typ), raw_dtype=typ)
        else:
            w.add_tensor(name, a)
    finish(w)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, windows: torch.Tensor) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert na == nb and torch.equal(ba, bb), na
    with torch.no_grad():
        assert torch.equal(a(input_ids=windows).logits, b(input_ids=windows).logits)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_safetensors_low_memory_equals_whole_load(make, tmp_path):
    make().save_pretrained(tmp_path / "m")
    whole, _ = load_model(tmp_path / "m")
    lazy, _ = load_model(tmp_path / "m", low_memory=True, spill_dir=tmp_path)
    assert sp.is_spilled(lazy) and not sp.is_spilled(whole)
    _assert_same(whole, lazy, token_ids())
    assert ModelView(lazy).tied == ModelView(whole).tied
    assert model_fingerprint(lazy) == model_fingerprint(whole)
    assert not lazy.training and not any(p.requires_grad for p in lazy.parameters())


def test_gguf_low_memory_equals_whole_load(tmp_path):
    model = tiny_llama()
    write_quantized_gguf(tmp_path / "t.gguf", model)
    whole, tok_w = load_model(tmp_path / "t.gguf")
    lazy, tok_l = load_model(tmp_path / "t.gguf", low_memory=True, spill_dir=tmp_path)
    assert sp.is_spilled(lazy)
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight
    _assert_same(whole, lazy, token_ids())
    assert tok_l is not None and tok_l.encode("t1") == tok_w.encode("t1")
    # the quantized values really went through the q/k permutation (not just equal by being symmetric)
    q = lazy.model.layers[0].self_attn.q_proj.weight
    assert (q - model.model.layers[0].self_attn.q_proj.weight).abs().max() < 0.05


def test_spill_file_gone_and_errors(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "m")
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    model, _ = load_model(tmp_path / "m", low_memory=True, spill_dir=spill_dir)
    assert list(spill_dir.iterdir()) == []  # unlinked as soon as it was opened
    assert _spill_of(model).directory == spill_dir
    with pytest.raises(InputError, match="cannot create the weight spill file"):
        load_model(tmp_path / "m", low_memory=True, spill_dir=tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot create the weight spill file"):
        load_model(tmp_path / "m", low_memory=True, spill_dir=tmp_path / "file")

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(InputError, match="No space left on device.*spill_dir"):
        load_model(tmp_path / "m", low_memory=True, spill_dir=spill_dir)
    assert list(spill_dir.iterdir()) == []


def test_release_drops_residency_and_keeps_data(tmp_path):
    n = 8 << 20  # 32 MiB of float32
    spill = sp.SpillFile([("a", (n,), torch.float32), ("b", (3, 5), torch.float32)], tmp_path)
    assert spill.size % sp.PAGE == 0
    a, b = spill.tensor("a"), spill.tensor("b")
    a.copy_(torch.arange(n, dtype=torch.float32))
    b.fill_(2.5)
    assert _resident(spill) >= 4 * n
    spill.release_tensor(a)
    assert _resident(spill) < 4 * n // 8
    assert torch.equal(b, torch.full((3, 5), 2.5))  # a neighbour's data survives, released or not
    spill.release_all()
    assert float(a[-1]) == n - 1 and torch.equal(a[:1000], torch.arange(1000, dtype=torch.float32))
    spill.release_tensor(torch.ones(10))  # a tensor outside the mapping: a no-op
    with pytest.raises(ValueError, match="duplicate"):
        sp.SpillFile([("a", (1,), torch.float32), ("a", (1,), torch.float32)], tmp_path)


def test_set_weight_persists_across_release_and_hooks_release_blocks(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", low_memory=True, spill_dir=tmp_path)
    spill = _spill_of(model)
    view = ModelView(model)
    name = "model.layers.1.mlp.down_proj.weight"
    new = torch.randn(view.ref(name).shape)
    view.set_weight(name, new)
    assert _resident(spill) > 0
    sp.release(model)
    assert _resident(spill) == 0
    assert torch.equal(view.get_weight(name), new)  # re-read from the file
    touched = _resident(spill)  # the weight, plus neighbours the kernel maps around a fault (<= 64 KiB)
    sp.release_parameter(model, name)
    assert _resident(spill) < touched
    # a forward pass leaves (almost) nothing resident: every block, the norm and the head are released after
    # use; only pages the kernel maps around the last faults may remain
    bound = spill.size // 4
    with torch.no_grad():
        model(input_ids=token_ids())
    assert _resident(spill) <= bound
    # ... and so does a backward pass through the blocks (released once the block's input gradient exists)
    sp.release(model)
    emb = model.model.embed_tokens(token_ids()).detach().requires_grad_(True)
    out = model(inputs_embeds=emb).logits
    out.sum().backward()
    assert emb.grad is not None and _resident(spill) <= bound
    sp.release(model)
    model_fingerprint(model)  # hashing every weight releases each one after it
    assert _resident(spill) <= bound
    for p in model.parameters():  # without releases everything would be resident
        p.sum()
    assert _resident(spill) > 2 * bound
    # weights read without releasing (e.g. while measuring) go as soon as the next block runs
    with torch.no_grad():
        model(input_ids=token_ids())
    assert _resident(spill) <= bound


def test_release_is_a_noop_on_ordinary_models():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    sp.release(model)
    sp.release_parameter(model, "model.layers.0.mlp.up_proj.weight")
    assert [n for n, _ in sp.released_parameters(model)] == list(before)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.slow
def test_smollm2_gguf_low_memory_identical_logits():
    whole, tok = load_model(default_model_path())
    lazy, _ = load_model(default_model_path(), low_memory=True)
    ids = torch.tensor([tok.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind")])
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, lazy(input_ids=ids).logits)
    assert model_fingerprint(whole) == model_fingerprint(lazy)


def test_release_rows_drops_only_those_rows_and_keeps_data(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Embedding(4096, 1024)  # 16 MiB of float32, 4 KiB per row
    spill = sp.spill_parameters(model, ["weight"], torch.float32, tmp_path)
    w = model.weight
    with torch.no_grad():
        w.copy_(torch.arange(4096, dtype=torch.float32)[:, None].expand(4096, 1024))
    full = _resident(spill)
    assert full >= 4096 * 4096
    sp.release_rows(model, "weight", slice(0, 3072))
    left = _resident(spill)
    assert left <= full // 4 + (64 << 10) and left >= 1024 * 4096 - (64 << 10)  # the last quarter stays
    assert torch.equal(w[:, 0], torch.arange(4096, dtype=torch.float32))  # released rows read back intact
    plain = torch.nn.Embedding(8, 4)
    before = plain.weight.detach().clone()
    sp.release_rows(plain, "weight", slice(0, 8))  # an ordinary parameter: a no-op
    assert torch.equal(plain.weight, before)
