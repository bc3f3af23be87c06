"""The placement policy on the CPU: device resolution, today's results with the default (and an explicit CPU)
placement, the residency of weights (moved, offloaded block by block, put back in their own storage), stage
timing, and the rule that only the CLI sets thread counts.  The same stages on CUDA: test_placement_cuda.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from bitalloc.calibrate import BlockRunner, fisher_pass, stream_blocks
from bitalloc.errors import InputError
from bitalloc.evaluate import evaluate
from bitalloc.placement import HEAD_CHUNK, MAX_POSITIONS, STACK_ELEMS, VOCAB_CHUNK, Placement, resolve_device
from bitalloc.quantize import quantize_model, uniform_assignments
from bitalloc.timing import StageTimer

from conftest import tiny_llama, token_ids



def test_resolve_device_names_and_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    for junk in ("tpu", "cuda:x", "cuda:-1", "", "cpu:0", "gpu"):
        with pytest.raises(InputError, match="unknown device"):
            resolve_device(junk)
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        with pytest.raises(InputError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        assert resolve_device("auto") == torch.device("cpu")
        for spec in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(InputError, match="not available"):
                resolve_device(spec)


def test_default_placement_is_todays_cpu_policy():
    p = Placement()
    assert (p.device, p.offload, p.max_positions, p.head_chunk, p.vocab_chunk, p.stack_elems, p.release_memory) == \
        (torch.device("cpu"), False, 1024, 256, 4096, 1 << 23, True)
    assert (MAX_POSITIONS, HEAD_CHUNK, VOCAB_CHUNK, STACK_ELEMS) == (1024, 256, 4096, 1 << 23)
    assert Placement.for_device("cpu") == p
    assert Placement(device="cpu") == p  # a name is resolved
    t = torch.ones(3)
    assert p.to_device(t) is t
    for field in ("max_positions", "head_chunk", "vocab_chunk", "stack_elems"):
        with pytest.raises(InputError, match=field):
            Placement(**{field: 0})


def test_the_measurement_follows_the_placement(monkeypatch):
    """The measurement's stack of candidate rows and its memory release are the placement's (one policy), and
    the table does not depend on the stack size beyond float rounding."""
    import bitalloc.placement as placement_mod
    from bitalloc.measure import measure_tensor
    from bitalloc.rounding.methods import GPTQ
    from bitalloc.stats import LinearStats, TensorStats

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 64, generator=g), torch.randn(256, 64, generator=g)
    st = TensorStats(roles=(LinearStats(x.T @ x / 256, 256, torch.rand(64, generator=g), {}),))
    fmts = ["int2-g32", "int4-g32"]
    stacked, trims = [], []
    real = GPTQ.round_many_measured
    monkeypatch.setattr(GPTQ, "round_many_measured", lambda self, w_, *a, **k: stacked.append(int(w_.shape[0])) or
                        real(self, w_, *a, **k))
    monkeypatch.setattr(placement_mod, "release_free_memory", lambda: trims.append(1))
    whole = measure_tensor("w", w, st, fmts, placement=Placement())
    assert stacked == [64] and trims == [1]  # default stack: every row at once; one trim per piece
    stacked.clear(), trims.clear()
    small = measure_tensor("w", w, st, fmts, placement=Placement(stack_elems=2 * 16 * 64, release_memory=False))
    assert stacked == [16] * 4 and trims == []  # 16 rows per stack of two formats; no trim when not asked
    for a, b in zip(whole, small):
        assert a.format == b.format and a.output_error == pytest.approx(b.output_error, rel=1e-9)


def _qbytes(q):
    return {name: {k: t.clone() for k, t in qt.parts.items()} for name, qt in q.items()}


def test_explicit_cpu_placement_reproduces_the_default_exactly(windows):
    """Hessians, noise, Fisher statistics, quantized bytes and evaluation: identical with ``Placement()``."""
    cpu = Placement()
    a = list(stream_blocks(tiny_llama(), None, windows, progress=False, roundings=["q8_0"]))
    b = list(stream_blocks(tiny_llama(), None, windows, progress=False, roundings=["q8_0"], placement=cpu))
    for sa, sb in zip(a, b, strict=True):
        assert sa.keys() == sb.keys()
        for name in sa:
            for ra, rb in zip(sa[name].roles, sb[name].roles, strict=True):
                if hasattr(ra, "hessian"):
                    assert torch.equal(ra.hessian, rb.hessian)
                    assert ra.act_noise.keys() == rb.act_noise.keys()
                    assert all(torch.equal(ra.act_noise[k], rb.act_noise[k]) for k in ra.act_noise)
                else:
                    assert torch.equal(ra.token_freq, rb.token_freq)
    fa = fisher_pass(tiny_llama(), None, windows[:2], batch_size=2, progress=False)
    fb = fisher_pass(tiny_llama(), None, windows[:2], batch_size=2, progress=False, placement=cpu)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    ma, mb = tiny_llama(), tiny_llama()
    plan = uniform_assignments(ma, "int4-g32")
    qa = _qbytes(quantize_model(ma, None, plan, windows, progress=False))
    qb = _qbytes(quantize_model(mb, None, plan, windows, progress=False, placement=cpu))
    assert qa.keys() == qb.keys()
    assert all(torch.equal(qa[n][k], qb[n][k]) for n in qa for k in qa[n])
    held_out = token_ids(3, seed=7)
    assert evaluate(ma, tiny_llama(), held_out) == evaluate(mb, tiny_llama(), held_out, placement=cpu)


def _chain() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    model.register_buffer("table", torch.arange(4.0))  # trunk: what is not a block
    return model, list(model)


def test_offloaded_blocks_move_one_at_a_time_and_back_to_their_storage():
    """On the CPU, offloading runs each block on a working copy (same values): the moves are observable by
    address; the trunk moves for the whole stage; the blocks' own storage is theirs again afterwards."""
    model, blocks = _chain()
    homes = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    table = model.table.data_ptr()
    seen: list[list[bool]] = []

    def probe(_m, _args):  # during each block's forward: which blocks are moved (not at home)
        seen.append([b.weight.data_ptr() != homes[f"{i}.weight"][0] for i, b in enumerate(blocks)])

    x = torch.randn(2, 8)
    want = model(x)
    with Placement(offload=True).residency(model, blocks) as res:
        for b in blocks:
            b.register_forward_pre_hook(probe)  # after the residency's own: sees the block moved
        assert model.table.data_ptr() != table
        assert torch.equal(model(x), want)
        assert seen[-3:] == [[True, False, False], [False, True, False], [False, False, True]]
        assert all(b.weight.data_ptr() == homes[f"{i}.weight"][0] for i, b in enumerate(blocks))
        with res.holding(blocks[1]):  # held: stays through its forwards (a backward would need it)
            blocks[1](x)
            blocks[1](x)
            assert blocks[1].weight.data_ptr() != homes["1.weight"][0]
        assert blocks[1].weight.data_ptr() == homes["1.weight"][0]
    assert model.table.data_ptr() == table
    for n, p in model.named_parameters():
        assert p.data_ptr() == homes[n][0] and torch.equal(p, homes[n][1])
    assert all(len(b._forward_pre_hooks) == 1 and not b._forward_hooks for b in blocks)  # only the probe is left


def test_writes_on_the_device_go_back_with_write_back_only():
    model, blocks = _chain()
    before = blocks[0].weight.detach().clone()
    with Placement(offload=True).residency(model, blocks) as res:
        with res.holding(blocks[0]), torch.no_grad():
            blocks[0].weight.add_(1.0)
    assert torch.equal(blocks[0].weight, before)  # read-only stage: the copy's change is dropped
    with Placement(offload=True).residency(model, blocks, write_back=True) as res:
        with res.holding(blocks[0]), torch.no_grad():
            blocks[0].weight.add_(1.0)
            model.table.mul_(2)
    assert torch.equal(blocks[0].weight, before + 1) and torch.equal(model.table, 2 * torch.arange(4.0))


def test_the_default_placement_moves_nothing():
    model, blocks = _chain()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with Placement().residency(model, blocks) as res:
        assert not res.active
        assert all(p.data_ptr() == ptrs[n] for n, p in model.named_parameters())
    n_hooks = sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in blocks)
    assert n_hooks == 0  # the offload hooks leave with the residency


def test_offloaded_quantization_of_a_spilled_model_is_byte_identical(tmp_path, windows):
    """The offload path end to end on the CPU (blocks moved in and out, the quantized weights written back into
    the spill file): the same bytes as today's run, and the parameters still live in the spill file."""
    from bitalloc.models.sources import load_model
    from bitalloc.models.spill import _spill_of

    tiny_llama().save_pretrained(tmp_path / "m")
    spilled, _ = load_model(tmp_path / "m", low_memory=True, spill_dir=tmp_path)
    whole, _ = load_model(tmp_path / "m")
    spill = next(s for m in spilled.modules() if (s := _spill_of(m)) is not None)
    plan = uniform_assignments(whole, "int4-g32")
    qa = _qbytes(quantize_model(whole, None, plan, windows, progress=False))
    qb = _qbytes(quantize_model(spilled, None, plan, windows, progress=False, placement=Placement(offload=True)))
    assert all(torch.equal(qa[n][k], qb[n][k]) for n in qa for k in qa[n])
    assert all(spill.holds(p) for p in spilled.parameters())
    for (n, a), b in zip(whole.named_parameters(), spilled.parameters(), strict=True):
        assert torch.equal(a, b), n  # the quantized values reached the spill file
    held_out = token_ids(3, seed=7)
    assert evaluate(whole, tiny_llama(), held_out) == evaluate(spilled, tiny_llama(), held_out,
                                                               placement=Placement(offload=True))


def test_stage_timers_name_each_stage(windows):
    t = StageTimer()
    model = tiny_llama()
    fisher_pass(model, None, windows[:2], batch_size=2, progress=False, timer=t)
    list(stream_blocks(model, None, windows, progress=False, roundings=["q8_0"], timer=t))
    quantize_model(model, None, uniform_assignments(model, "int4-g32"), windows, progress=False, timer=t)
    evaluate(model, tiny_llama(), token_ids(2, seed=3), timer=t)
    for name in ("fisher", "calibrate.forward", "calibrate.hessians", "calibrate.act_noise", "quantize",
                 "quantize.round", "evaluate"):
        assert t.calls.get(name, 0) >= 1, name
    assert t.calls["fisher"] == 1 and t.calls["evaluate"] == 1 and t.calls["quantize"] == 1


def test_runner_hands_out_cpu_states_and_closes(windows):
    with BlockRunner(tiny_llama(), windows, placement=Placement()) as runner:
        assert runner.hidden_cpu() is runner.hidden  # on the CPU: the states themselves, no copy
        runner.advance()


def test_the_library_never_sets_thread_counts():
    """Threads are the CLI's to set, once, at the entry point (``cli/__init__.py``)."""
    src = Path(__file__).resolve().parents[1] / "src" / "bitalloc"
    pattern = re.compile(r"set_num_threads|set_num_interop_threads|OMP_NUM_THREADS|MKL_NUM_THREADS")
    offenders = [str(f.relative_to(src)) for f in src.rglob("*.py")
                 if pattern.search(f.read_text()) and f.relative_to(src).parts[0] != "cli"]
    assert offenders == []
    assert pattern.search((src / "cli" / "__init__.py").read_text())


def test_load_refuses_a_missing_device_before_reading(tmp_path):
    from bitalloc.api import load

    with pytest.raises(InputError, match="unknown device"):
        load(tmp_path / "nothing-here", device="tpu")
