"""The BitStack baseline (bench/bitstack.py) on tiny tensors and the tiny Llama/Qwen2: the decomposition
converges, bytes are exact, a budget's model fits it, the stack is a prefix order, everything is deterministic."""
from __future__ import annotations

import pytest
import torch

from bench import bitstack as bs
from bitalloc.errors import BudgetError
from bitalloc.models.view import ModelView
from tests.conftest import tiny_llama, tiny_qwen2, token_ids


def _weight(rows: int = 48, cols: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05, 0.5 + torch.rand(cols, generator=g)


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (7, 13)])
def test_signs_pack_and_unpack(shape: tuple[int, int]) -> None:
    x = torch.randn(shape)
    packed = bs.pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-x.numel() // 8)
    assert torch.equal(bs.unpack_signs(packed, shape), torch.where(x < 0, -1.0, 1.0))


def test_error_falls_as_blocks_are_added() -> None:
    w, s = _weight()
    st = bs.decompose("w", w, s, n_blocks=6, rank=4)
    s16 = s.half().float()
    errs = [float(((w - st.weight(k)) * s16).pow(2).sum()) for k in range(7)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] == pytest.approx(st.residual_sq[0], rel=1e-4)
    assert errs[-1] == pytest.approx(st.residual_sq[-1], rel=1e-3, abs=1e-6)
    assert errs[-1] < 0.2 * errs[1]


def test_bytes_are_exact() -> None:
    w, s = _weight(7, 13)
    st = bs.decompose("w", w, s, n_blocks=3, rank=16)  # rank capped at min(rows, cols) = 7
    blk = bs.block_bytes((7, 13), 16)
    assert blk == 12 + 2 * 7 * (7 + 13)
    assert [b.nbytes for b in st.blocks] == [blk] * 3
    assert st.nbytes(0) == 0 and st.nbytes(2) == 2 * 13 + 2 * blk
    stored = 2 * st.scale.numel() + sum(b.signs.numel() + 2 * (b.u.numel() + b.v.numel()) for b in st.blocks)
    assert st.scale.dtype == st.blocks[0].u.dtype == torch.float16 and st.nbytes(3) == stored


def _stacks(model: torch.nn.Module, embedding: str = "stack") -> tuple[ModelView, dict[str, bs.WeightStack]]:
    view = ModelView(model)
    return view, bs.decompose_model(view, token_ids(4), n_blocks=4, rank=4, embedding=embedding)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_budget_fits_exactly_and_orders_are_prefixes(make) -> None:
    view, stacks = _stacks(make())
    assert list(stacks) == [r.name for r in view.quantizable()]
    order = bs.global_order(stacks, bs.proxy_scores(stacks))
    assert order[: len(stacks)] == [(n, 1) for n in stacks] and len(order) == 4 * len(stacks)
    other = bs.other_bytes(view, "stack")
    assert other == view.fixed_bytes
    base = bs.base_bytes(stacks, other)
    with pytest.raises(BudgetError):
        bs.select(stacks, order, other, base - 1)
    top = other + sum(s.nbytes(4) for s in stacks.values())
    prev = None
    for budget in [base, base + 1000, base + 5000, (base + top) // 2, top - 1, top, top + 10]:
        sel = bs.select(stacks, order, other, budget)
        assert sel.bytes == other + sum(stacks[n].nbytes(k) for n, k in sel.counts.items()) <= budget
        if sel.prefix < len(order):  # the next block of the stack does not fit
            n, k = order[sel.prefix]
            assert sel.bytes + stacks[n].nbytes(k) - stacks[n].nbytes(k - 1) > budget
        assert sel.counts == {n: sum(1 for m, _ in order[: sel.prefix] if m == n) for n in stacks}
        if prev is not None:
            assert sel.prefix >= prev.prefix and all(sel.counts[n] >= prev.counts[n] for n in stacks)
        prev = sel
    assert prev.bytes == top and all(c == 4 for c in prev.counts.values())


def test_assembled_model_runs_and_improves_with_bytes() -> None:
    model = tiny_llama()
    view, stacks = _stacks(model)
    fp = {n: view.get_weight(n).clone() for n in stacks}
    order = bs.global_order(stacks, bs.proxy_scores(stacks))
    other = bs.other_bytes(view, "stack")
    errs = []
    for budget in [bs.base_bytes(stacks, other), other + sum(s.nbytes(4) for s in stacks.values())]:
        weights = bs.assemble(stacks, bs.select(stacks, order, other, budget).counts)
        errs.append(sum(float((weights[n] - fp[n]).pow(2).sum()) for n in stacks))
        for n, w in weights.items():
            view.set_weight(n, w)
        assert torch.isfinite(model(input_ids=token_ids(1)).logits).all()
    assert errs[1] < errs[0]


def test_fp16_embedding_is_counted_and_not_stacked() -> None:
    view, stacks = _stacks(tiny_llama(), embedding="fp16")
    emb = view.ref(view.layout.embedding_name)
    assert emb.name not in stacks and len(stacks) == len(view.quantizable()) - 1
    assert bs.other_bytes(view, "fp16") == view.fixed_bytes + 2 * emb.numel


def test_deterministic_including_the_perplexity_sort() -> None:
    runs = []
    for _ in range(2):
        model = tiny_llama()
        view, stacks = _stacks(model)
        order = bs.global_order(stacks, bs.ppl_scores(view, stacks, token_ids(2, seed=3)), levels=3)
        runs.append((stacks, order))
    (s1, o1), (s2, o2) = runs
    assert o1 == o2 and len(o1) == 3 * len(s1)
    for n in s1:
        assert torch.equal(s1[n].scale, s2[n].scale)
        for a, b in zip(s1[n].blocks, s2[n].blocks):
            assert torch.equal(a.signs, b.signs) and torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
