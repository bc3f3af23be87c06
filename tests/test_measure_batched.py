"""measure_tensor with every grid format rounded together (batched) against one format at a time."""
from __future__ import annotations

import pytest
import torch

from bitalloc.measure import measure_tensor
from bitalloc.rounding import GPTQ_REFITS, dequantize, quantize_weight
from bitalloc.formats.refit import layer_output_error
from bitalloc.stats import LinearStats, LookupStats, TensorStats
from bitalloc.timing import StageTimer

INT = ["int4-g128", "int4-g128-sym", "int3-row", "int3-row-sym", "int4-g32", "int8-row-sym"]
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
#: the largest relative difference of an error between the batched and the per-format path these tests allow
REL = 1e-6
#: the same where GPTQ's float32 error feedback gives the batched path's errors (dead input columns included):
#: int8's small error on this Hessian differs most, by about 4e-6
REL_FEEDBACK = 1e-5


def _stats(rows: int, cols: int, seed: int, dead: int = 0, noise: bool = True) -> tuple[torch.Tensor, TensorStats]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    x = torch.randn(2 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    x = x + 0.6 * x.roll(1, 1)
    x[:, :dead] = 0
    act = {"q8_0": torch.rand(rows, generator=g, dtype=torch.float64)} if noise else {}
    return w, TensorStats((LinearStats(x.T @ x / (2 * cols), 100, torch.rand(rows, generator=g), act),))


def _compare(a, b, tol: float = REL) -> float:
    assert [(r.tensor, r.format, r.bytes) for r in a] == [(r.tensor, r.format, r.bytes) for r in b]
    worst = 0.0
    for x, y in zip(a, b):
        for u, v in ((x.output_error, y.output_error), (x.fisher_error, y.fisher_error)):
            assert (u is None) == (v is None)
            if u is not None:
                rel = abs(u - v) / max(abs(v), 1e-30)
                assert rel <= tol, (x.format, u, v)
                worst = max(worst, rel)
    return worst


@pytest.mark.parametrize("fmts,cols", [(INT, 320), (LEGACY, 256), (KQUANTS, 512),
                                       (["int4-g32", "q4_k", "iq4_nl", "int3-row-sym", "fp16", "q8_0"], 256)])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_batched_rows_equal_per_format_rows(fmts: list[str], cols: int, method: str) -> None:
    w, st = _stats(24, cols, 0, dead=4)
    old = measure_tensor("t", w, st, fmts, method, batched=False)
    new = measure_tensor("t", w, st, fmts, method)
    assert [r.format for r in new] == [f for f in fmts if not (f.endswith("_k") and cols % 256)]
    _compare(new, old, REL_FEEDBACK if method == "gptq" else REL)


def test_batched_in_small_stacks_and_row_blocks_equals_per_format() -> None:
    """Few rows per stack (stack_elems) and row blocks (max_elems) change nothing beyond float rounding; a
    tied embedding's lookup role and Fisher terms are summed per block."""
    g = torch.Generator().manual_seed(1)
    w, st = _stats(40, 256, 1, noise=False)
    freq = torch.rand(40, generator=g)
    st = TensorStats((LookupStats(freq / freq.sum(), 50, torch.rand(256, generator=g)),) + st.roles)
    fmts = ["q4_0", "int4-g64", "q6_k", "bf16"]
    old = measure_tensor("emb", w, st, fmts, batched=False)
    _compare(measure_tensor("emb", w, st, fmts, stack_elems=3 * 8 * 256), old)  # 8 rows per stack
    _compare(measure_tensor("emb", w, st, fmts, max_elems=16 * 256), old)


def test_batched_with_unfactorisable_hessian_and_no_hessian() -> None:
    w, st = _stats(16, 256, 2, noise=False)
    h = st.roles[0].hessian.clone()
    h[0, 1] = h[1, 0] = 1e6
    bad = TensorStats((LinearStats(h, 10, st.roles[0].grad_sq),))
    _compare(measure_tensor("t", w, bad, LEGACY[:3]), measure_tensor("t", w, bad, LEGACY[:3], batched=False))
    freq = torch.rand(16)
    lookup = TensorStats((LookupStats(freq, 10),))  # no Hessian: RTN
    _compare(measure_tensor("e", w, lookup, INT[:3]), measure_tensor("e", w, lookup, INT[:3], batched=False))


def test_timer_gets_the_stages() -> None:
    w, st = _stats(16, 256, 3)
    timer = StageTimer()
    measure_tensor("t", w, st, ["q4_1", "q4_k", "fp16"], timer=timer)
    assert {"measure.factor", "measure.fit", "measure.gptq", "measure.refit", "measure.errors",
            "measure.store"} <= set(timer.seconds)
    assert timer.calls["measure.factor"] == 1  # the Hessian factorised once, for every format
    assert timer.calls["measure.gptq"] == GPTQ_REFITS  # first rounding, then one per refit round but the last
    rtn = StageTimer()
    measure_tensor("t", w, st, ["q4_1"], method="rtn", timer=rtn)
    assert "measure.rtn" in rtn.seconds and "measure.gptq" not in rtn.seconds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_and_quantize_weight_with_cuda_tensors() -> None:
    w, st = _stats(32, 512, 4, dead=2)
    fmts = ["q4_k", "q4_0", "iq4_nl", "int4-g128", "fp16"]
    cpu = measure_tensor("t", w, st, fmts)
    dev = torch.device("cuda")
    role = st.roles[0]
    st_d = TensorStats((LinearStats(role.hessian.to(dev), role.ntokens, role.grad_sq.to(dev),
                                    {k: v.to(dev) for k, v in role.act_noise.items()}),))
    timer = StageTimer(device=dev)
    got = measure_tensor("t", w.to(dev), st_d, fmts, timer=timer)
    for a, b in zip(got, cpu):
        assert a.format == b.format and a.bytes == b.bytes
        assert a.output_error == pytest.approx(b.output_error, rel=0.02)
    h = role.hessian
    for fid in ["q4_k", "q5_1", "int3-g64-sym"]:
        q = quantize_weight(w.to(dev), fid, hessian=h.to(dev))
        assert all(t.device.type == "cpu" for t in q.parts.values())  # encode builds the bytes on the CPU
        ref = quantize_weight(w, fid, hessian=h)
        e_dev = layer_output_error(w, dequantize(q), h)
        e_cpu = layer_output_error(w, dequantize(ref), h)
        assert e_dev == pytest.approx(e_cpu, rel=0.02)


def test_grid_elems_lets_the_stack_alone_bound_the_row_blocks():
    """The pipeline passes ``grid_elems`` = the stack's bound: fewer, larger row blocks (one GPTQ column loop each)
    than ``max_elems`` would cut, and the same rows up to float summation order."""
    w, st = _stats(64, 256, 4)
    fmts = ["int4-g32", "int3-g128", "q4_0"]
    small, big = StageTimer(), StageTimer()
    cut = measure_tensor("t", w, st, fmts, max_elems=8 * 256, timer=small)
    whole = measure_tensor("t", w, st, fmts, max_elems=8 * 256, grid_elems=1 << 20, stack_elems=3 * 32 * 256,
                           timer=big)
    assert small.calls["measure.factor"] == big.calls["measure.factor"] == 1
    assert small.calls["measure.fit"] == 8 and big.calls["measure.fit"] == 2  # row blocks of 8 rows, of 32
    _compare(whole, cut)
