from __future__ import annotations

import copy
import math

import pytest
import torch

from bitalloc.errors import InputError, NumericsError
from bitalloc.evaluate import EvalResult, evaluate


def _hand(cand, ref, windows):
    """Straightforward float64 computation over the scored half of each window."""
    with torch.no_grad():
        lc = torch.log_softmax(cand(input_ids=windows).logits.double(), -1)
        lr = torch.log_softmax(ref(input_ids=windows).logits.double(), -1)
    ctx = windows.shape[1]
    first = ctx // 2
    lc, lr = lc[:, first:ctx - 1], lr[:, first:ctx - 1]
    t = windows[:, first + 1:].unsqueeze(-1)
    nll = -lc.gather(-1, t).mean().item()
    ref_nll = -lr.gather(-1, t).mean().item()
    kld = (lr.exp() * (lr - lc)).sum(-1).mean().item()
    top1 = (lc.argmax(-1) == lr.argmax(-1)).double().mean().item()
    return math.exp(nll), math.exp(ref_nll), kld, top1, t.numel()


def test_identical_models(tiny_model, windows):
    res = evaluate(tiny_model, tiny_model, windows, batch_size=3)
    assert res.kld == 0.0 and res.top1 == 1.0 and res.ppl == res.ref_ppl
    ppl, _, _, _, n = _hand(tiny_model, tiny_model, windows)
    assert res.ntokens == n == 4 * 15 and res.ctx == 32
    assert res.ppl == pytest.approx(ppl, rel=1e-9)
    assert 100 < res.ppl < 1000  # random tiny model over vocab 256: roughly uniform


def test_perturbed_model_matches_hand_computation(llama_model, windows):
    cand = copy.deepcopy(llama_model)
    with torch.no_grad():
        for p in cand.model.layers.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn_like(p))
    res = evaluate(cand, llama_model, windows, batch_size=2)
    ppl, ref_ppl, kld, top1, n = _hand(cand, llama_model, windows)
    assert res.kld > 1e-4
    assert res.kld == pytest.approx(kld, rel=1e-6)
    assert res.ppl == pytest.approx(ppl, rel=1e-9) and res.ref_ppl == pytest.approx(ref_ppl, rel=1e-9)
    assert res.top1 == pytest.approx(top1) and res.top1 < 1.0
    assert res.ntokens == n


def test_callables_full_and_half_logits(llama_model, windows):
    def full(batch):
        return llama_model(input_ids=batch).logits

    def half(batch):
        return llama_model(input_ids=batch).logits[:, batch.shape[1] // 2:]

    a = evaluate(full, llama_model, windows)
    b = evaluate(half, full, windows, batch_size=4)
    assert a.kld == pytest.approx(0.0, abs=1e-12) and b.kld == pytest.approx(0.0, abs=1e-12)
    assert a.top1 == b.top1 == 1.0
    assert a.ppl == pytest.approx(b.ppl, rel=1e-7)


def test_kld_is_asymmetric_and_order_matters(llama_model, windows):
    uniform = lambda batch: torch.zeros(batch.shape[0], batch.shape[1], 256)  # noqa: E731
    a = evaluate(uniform, llama_model, windows)
    b = evaluate(llama_model, uniform, windows)
    assert a.ppl == pytest.approx(256.0, rel=1e-9)
    assert b.ref_ppl == pytest.approx(256.0, rel=1e-9)
    assert a.kld > 0 and b.kld > 0 and a.kld != pytest.approx(b.kld)


def test_errors(llama_model, windows):
    with pytest.raises(InputError, match="int64"):
        evaluate(llama_model, llama_model, windows.float())
    with pytest.raises(InputError, match="at least"):
        evaluate(llama_model, llama_model, windows[:, :2])
    with pytest.raises(InputError, match="shape"):
        evaluate(lambda b: torch.zeros(b.shape[0], 5, 256), llama_model, windows)
    with pytest.raises(InputError, match="vocab"):
        evaluate(lambda b: torch.zeros(b.shape[0], b.shape[1], 100), llama_model, windows)
    with pytest.raises(NumericsError, match="candidate"):
        evaluate(lambda b: torch.full((b.shape[0], b.shape[1], 256), float("nan")), llama_model, windows)


def test_result_validation_and_dict():
    r = EvalResult(ppl=2.0, ref_ppl=1.5, kld=0.1, top1=0.9, ntokens=10, ctx=512)
    assert r.to_dict() == {"ppl": 2.0, "ref_ppl": 1.5, "kld": 0.1, "top1": 0.9, "ntokens": 10, "ctx": 512}
    with pytest.raises(ValueError):
        EvalResult(ppl=2.0, ref_ppl=1.5, kld=0.1, top1=1.5, ntokens=10, ctx=512)
    with pytest.raises(ValueError):
        EvalResult(ppl=2.0, ref_ppl=1.5, kld=-1.0, top1=0.5, ntokens=10, ctx=512)
