"""Hostile numbers (issue #16, class 6): token ids beyond the model's embedding, logits that overflow, windows
that are not token ids: one InputError/NumericsError line, before any calibration or scoring, never a traceback."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from bitalloc.calibrate import BlockRunner, fisher_pass
from bitalloc.cli import main
from bitalloc.errors import InputError, NumericsError
from bitalloc.evaluate import evaluate

from conftest import TINY_VOCAB, tiny_llama, token_ids

torch.set_num_threads(1)


class _NoForward(torch.nn.Module):
    """Fails the test if run: refusals must come before any forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, *a, **k):
        raise AssertionError("the model ran")


def _scaled(model: torch.nn.Module, name: str, value: float, index: int | None = None) -> torch.nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        p = dict(m.named_parameters())[name]
        if index is None:
            p.mul_(value)
        else:
            p.view(-1)[index] = value
    return m


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


def test_token_ids_beyond_the_embedding_are_refused_before_calibrating(model):
    bad = token_ids(2)
    bad[1, 5] = TINY_VOCAB + 7
    with pytest.raises(InputError, match=rf"token id {TINY_VOCAB + 7} is outside the embedding "
                                         rf"model.embed_tokens.weight of {TINY_VOCAB} rows.*does not match"):
        BlockRunner(model, bad)
    with pytest.raises(InputError, match="outside the embedding"):
        fisher_pass(model, None, bad, progress=False)
    neg = token_ids(2)
    neg[0, 0] = -1
    with pytest.raises(InputError, match="token id -1 is outside"):
        BlockRunner(model, neg)
    with pytest.raises(InputError, match="integer token ids, got float32"):
        BlockRunner(model, token_ids(2).float())


def test_token_ids_beyond_the_vocabulary_are_refused_before_evaluating(model):
    bad = token_ids(2)
    bad[0, -1] = TINY_VOCAB
    with pytest.raises(InputError, match="outside the candidate model's embedding"):
        evaluate(_NoForward(model), _NoForward(model), bad)
    vocab = 32  # logits functions (llama.cpp): the targets are checked against the logits' vocabulary
    fn = lambda b: torch.randn(b.shape[0], b.shape[1], vocab)  # noqa: E731
    with pytest.raises(InputError, match=f"token id {TINY_VOCAB} is outside the models' vocabulary of {vocab} logits"):
        evaluate(fn, fn, bad)


def test_overflowing_candidate_is_one_numerics_error(model):
    w = token_ids(2)
    huge = _scaled(model, "model.norm.weight", 1e30)  # a corrupted scale: finite logits of magnitude 1e30
    with pytest.raises(NumericsError, match=r"the candidate perplexity overflows: mean NLL \S+ nats per token"):
        evaluate(huge, model, w)
    with pytest.raises(NumericsError, match=r"the reference perplexity overflows"):
        evaluate(model, huge, w)
    for name, value, index in (("model.norm.weight", 1e38, None), ("model.layers.0.mlp.down_proj.weight", math.nan, 3)):
        with pytest.raises(NumericsError, match=r"the candidate model produced NaN/Inf logits \(window 0\)"):
            evaluate(_scaled(model, name, value, index), model, w)
    w4 = token_ids(4, vocab=8)

    def fp16(b: torch.Tensor) -> torch.Tensor:  # window 3's logits overflow float16 (inf)
        return torch.stack([torch.full((b.shape[1], 8), 7e4 if torch.equal(r, w4[3]) else 1.0) for r in b]).half()

    with pytest.raises(NumericsError, match=r"candidate model produced NaN/Inf logits \(window 3\)"):
        evaluate(fp16, lambda b: torch.zeros(b.shape[0], b.shape[1], 8), w4)


def test_cli_tokenizer_that_does_not_match_the_model(tmp_path, capsys):
    """A tokenizer of 200 words beside a model with 64 embedding rows: one line, exit 2, nothing written."""
    from test_resume import make_hf_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    good = make_hf_dir(tmp_path / "good")
    small = tmp_path / "small"
    cfg = LlamaConfig.from_pretrained(str(good))
    cfg.vocab_size = 64
    LlamaForCausalLM(cfg).save_pretrained(str(small), safe_serialization=True)
    for f in good.iterdir():
        if "token" in f.name:
            (small / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "m.json"
    capsys.readouterr()
    rc = main(["measure", str(small), "--formats", "int4-g32,int8-g128", "--calib", str(tmp_path / "calib.txt"),
               "--windows", "2", "--ctx", "16", "-q", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: token id ") and "64 rows" in err[0], err
    assert not out.exists() and not out.with_name(out.name + ".job").exists()
