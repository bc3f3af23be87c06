"""The measurement spread over worker processes (``Placement.workers``) gives the table and the kept roundings
that measuring in one process gives, byte for byte; the policy that chooses the workers; and a dead worker or a
failing tensor ends the measurement with one line."""
from __future__ import annotations

import hashlib
import os
import pickle
import signal

import numpy as np
import pytest
import torch

from bitalloc import measure as measure_mod
from bitalloc import rounding
from bitalloc.errors import InputError
from bitalloc.formats import QTensor
from bitalloc.measure_pool import PROTOCOL, MeasurePool, WorkerError, pack, unpack
from bitalloc.measure import measure_tensor
from bitalloc.pipeline import measure_model
from bitalloc.quantize import quantize_model, uniform_assignments
from bitalloc.placement import PARALLEL_MIN_PARAMS, Placement, cpu_workers
from bitalloc.stats import LinearStats, TensorStats
from tests.conftest import tiny_llama, token_ids

FORMATS = ["int2-g32", "int4-g32", "q4_0", "iq4_nl", "int3-row"]


def _digest(q: QTensor) -> str:
    h = hashlib.sha256(repr((q.format, q.shape, q.dtype)).encode())
    for k in sorted(q.parts):
        h.update(k.encode())
        h.update(q.parts[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _measure(placement: Placement, method: str = "gptq"):
    kept: dict[tuple[str, str], str] = {}

    def on_rounded(_b: int, got: dict) -> None:
        kept.update({k: _digest(q) for k, q in got.items()})

    m = measure_model(tiny_llama(), None, token_ids(4), FORMATS, method, progress=False, placement=placement,
                      on_rounded=on_rounded)
    return m, kept


@pytest.mark.parametrize("method,stack", [("gptq", None), ("rtn", None), ("gptq", 4096)])
def test_workers_give_the_same_table_and_roundings(method: str, stack: int | None) -> None:
    """``stack``: a small rounding stack cuts every tensor into row blocks of 8 rows, so the big ones are split
    over both workers, a range of blocks each."""
    chunks = {} if stack is None else {"stack_elems": stack}
    one, kept_one = _measure(Placement(**chunks), method)
    two, kept_two = _measure(Placement(workers=2, worker_threads=1, **chunks), method)
    assert one.rows == two.rows  # every error to the last bit, in the same order
    assert one.fingerprint == two.fingerprint
    assert kept_one and kept_one == kept_two  # every rounding, byte for byte
    assert {t for t, _ in kept_one} == {r.tensor for r in one.rows}


def test_pack_round_trip_keeps_values_dtypes_and_views() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base[1:3, ::2]  # a view of a larger storage travels alone
    st = TensorStats((LinearStats(torch.eye(3), 7, torch.ones(2, dtype=torch.bfloat16), {"q8_0": torch.zeros(2)}),))
    obj = (view, st, {"k": [view.to(torch.bfloat16), torch.zeros(0, 3), torch.tensor(True)]})
    sent = pickle.dumps(pack(obj), protocol=PROTOCOL)
    assert len(sent) < 1024  # not base's whole storage
    w, st2, extra = unpack(pickle.loads(sent))
    assert torch.equal(w, view) and w.dtype == torch.float32 and w.is_contiguous()
    role = st2.roles[0]
    assert isinstance(role, LinearStats) and role.ntokens == 7 and torch.equal(role.hessian, torch.eye(3))
    assert role.grad_sq.dtype == torch.bfloat16 and torch.equal(role.act_noise["q8_0"], torch.zeros(2))
    assert extra["k"][0].dtype == torch.bfloat16 and torch.equal(extra["k"][0], view.to(torch.bfloat16))
    assert extra["k"][1].shape == (0, 3) and extra["k"][2].dtype == torch.bool and bool(extra["k"][2])


def test_pack_sends_a_row_range_from_the_weights_memory_and_unpacks_without_a_copy() -> None:
    """No serialised copy beside the tensors: a contiguous row range is sent from the weight's own memory, and
    the received buffer is the unpacked tensor's memory."""
    w = torch.randn(64, 32)
    rows = w[8:40]
    skeleton, tensors = pack(rows)
    _dtype, _shape, raw = tensors[0]
    assert np.asarray(raw.raw()).ctypes.data == rows.data_ptr()  # no copy on the sending side
    received = pickle.loads(pickle.dumps((skeleton, tensors), protocol=PROTOCOL))
    buf = received[1][0][2]
    assert isinstance(buf, bytearray) and len(buf) == rows.numel() * 4
    got = unpack(received)
    assert torch.equal(got, rows)
    got[0, 0] = 123.0  # the tensor is the received buffer itself
    assert np.frombuffer(buf, dtype=np.float32)[0] == 123.0


def test_policy() -> None:
    small = tiny_llama()
    assert cpu_workers(small, 8) == 1  # finishes before workers would have started
    big = torch.nn.Linear(5000, 5000, bias=False)  # 25M parameters
    assert 5000 * 5000 >= PARALLEL_MIN_PARAMS
    assert cpu_workers(big, 1) == 1
    assert cpu_workers(big, 2, available=1 << 40) == 2
    assert cpu_workers(big, 64, available=1 << 40) == 8  # MAX_WORKERS
    assert cpu_workers(big, 4, available=1 << 30) == 1  # four would not fit in half of 1 GiB
    assert Placement().workers == 1  # the library's default: one process, as before
    with pytest.raises(InputError, match="task_elems must be at least 1"):
        Placement(task_elems=0)
    with pytest.raises(InputError, match="workers must be at least 1"):
        Placement(workers=0)


@pytest.mark.parametrize("rows,cols,task_elems,tasks", [(192, 32, 512, 6), (96, 64, 1024, 2)])
def test_a_large_tensor_is_cut_into_tasks_of_at_most_task_elems_and_its_sent_rows_released(
        monkeypatch, rows: int, cols: int, task_elems: int, tasks: int) -> None:
    """``task_elems`` bounds what one worker receives: a 192 x 32 weight with tasks of at most 512 elements goes out
    in 6 ranges of rows (one per row block of 32 rows; not 16 ranges: a task's rows need not be fewer elements than
    its 32 x 32 Hessian); a 96 x 64 weight, whose Hessian has 4096 elements, in the 2 ranges its share of the work
    gives.  The table and the roundings are those of one process; every row is released after the pool's finite
    check and once sent, and is not finite-checked a second time by ``measure_tensor``."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(256, cols, generator=g)
    st = TensorStats((LinearStats(x.T @ x / 256, 256, torch.rand(rows, generator=g), {}),))
    fmts = ["int4-g32", "q4_0"]
    one_kept: dict = {}
    want = measure_tensor("t", w, st, fmts, "gptq", placement=Placement(stack_elems=2048),
                          keep=lambda f, q: one_kept.update({f: _digest(q)}))
    submitted, released = [], []
    monkeypatch.setattr(measure_mod, "check_finite", lambda *a: pytest.fail("the weight was checked twice"))
    real = MeasurePool._submit
    monkeypatch.setattr(MeasurePool, "_submit", lambda self, *a: submitted.append(a) or real(self, *a))
    kept: dict = {}
    place = Placement(stack_elems=2048, workers=2, worker_threads=1, task_elems=task_elems)
    with MeasurePool(2, 1) as pool:
        got = pool.measure_block([("t", w, st, fmts)], "gptq", place,
                                 keep=lambda _n, f, q: kept.update({f: _digest(q)}),
                                 release=lambda name, sl: released.append((name, sl)))
    assert len(submitted) == tasks
    assert got[0] == want and kept == one_kept
    covered = torch.zeros(rows, dtype=torch.int64)
    for name, sl in released:
        assert name == "t"
        covered[sl] += 1
    assert bool((covered == 2).all())  # checked once, then sent


def test_a_failing_tensor_raises_its_own_error() -> None:
    w = torch.randn(8, 32)
    w[0, 0] = float("nan")
    st = TensorStats((LinearStats(torch.eye(32), 10, None, {}),))
    ok = (torch.randn(8, 32), st)
    with MeasurePool(2, 1) as pool, pytest.raises(Exception, match="NaN or Inf") as info:
        pool.measure_block([("good", *ok, ["int4-g32"]), ("bad", w, st, ["int4-g32"])], "rtn", Placement())
    assert "bad" in str(info.value)


def test_a_dead_worker_ends_the_measurement_in_one_line() -> None:
    st = TensorStats((LinearStats(torch.eye(256), 10, None, {}),))
    with MeasurePool(2, 1) as pool:
        pool.measure_block([("warm", torch.randn(4, 256), st, ["int4-g32"])] * 2, "rtn", Placement())
        os.kill(pool._workers[0].proc.pid, signal.SIGKILL)
        with pytest.raises(WorkerError, match="stopped while measuring .* --threads 1"):
            pool.measure_block([("t", torch.randn(512, 256), st, ["int4-g32", "int3-g32"])] * 4, "gptq",
                               Placement())


SCRIPT = """
import os, sys, torch
from bitalloc.measure_pool import MeasurePool
from bitalloc.placement import Placement
from bitalloc.stats import LinearStats, TensorStats
st = TensorStats((LinearStats(torch.eye(64), 10, None, {}),))
with MeasurePool(2, 1) as pool:  # at the top level of a script without a main guard
    rows = pool.measure_block([("a", torch.randn(16, 64), st, ["int4-g32"]), ("b", torch.randn(8, 64), st,
                               ["int4-g32"])], "rtn", Placement())
    print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
    print(rows[0][0].tensor, rows[1][0].tensor, flush=True)
    if len(sys.argv) > 1:
        os.kill(os.getpid(), 9)  # gone without closing the pool
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_from_a_script_without_main_guard_and_after_kill_9(tmp_path) -> None:
    import subprocess
    import sys
    import time

    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "a b"
    killed = subprocess.run([sys.executable, str(script), "kill"], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9
    pids = [int(p) for p in killed.stdout.splitlines()[0].split()]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)  # the workers saw their input close and left


def _quantize(placement: Placement, method: str) -> dict[str, str]:
    model = tiny_llama()
    names = uniform_assignments(model, "int4-g32")
    fmts = ["int4-g32", "q4_0", "iq4_nl", "int3-row", "fp16"]  # grid formats side by side, and one stored as is
    plan = {n: fmts[i % len(fmts)] for i, n in enumerate(sorted(names))}
    q = quantize_model(model, None, plan, token_ids(4), method, progress=False, placement=placement)
    return {n: _digest(t) for n, t in q.items()}


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_workers_quantize_the_same_bytes(monkeypatch, method: str) -> None:
    """GPTQ: the quantization's groups rounded side by side by two workers, a tensor with more than its share of a
    group's work cut into ranges of row blocks (a small row block makes every tensor several): every stored tensor
    byte for byte as one process rounds it, for a mix of grid formats and one stored as is.  RTN is rounded in this
    process (faster there), to the same bytes, and starts no worker processes (a sweep's RTN point paid their start
    and stop for nothing)."""
    monkeypatch.setattr(rounding, "ROW_CHUNK_ELEMS", 512)
    one = _quantize(Placement(), method)
    submitted: list[tuple] = []
    real = MeasurePool._submit
    monkeypatch.setattr(MeasurePool, "_submit", lambda self, *a: submitted.append(a) or real(self, *a))
    started: list[int] = []
    enter = MeasurePool.__enter__
    monkeypatch.setattr(MeasurePool, "__enter__", lambda self: started.append(self.workers) or enter(self))
    two = _quantize(Placement(workers=2, worker_threads=1, task_elems=1024), method)
    assert one == two
    tasks = [a for a in submitted if a[0] == "quantize_rows"]
    grid = [n for n in one if n.startswith("model.layers.")]
    # GPTQ: a group of one tensor (o_proj, down_proj, the head) is cut over both workers; RTN stays in this process
    assert len(tasks) > len(grid) if method == "gptq" else not tasks
    assert started == ([2] if method == "gptq" else [])


def test_a_method_registered_at_run_time_is_rounded_in_this_process(monkeypatch) -> None:
    """A fresh worker interpreter knows only the methods bitalloc registers itself: one registered at run time (here
    a GPTQ subclass) is rounded in the main process, with the workers' placement, to the same bytes."""
    from bitalloc.rounding import methods, register_rounder

    class CustomGPTQ(methods.GPTQ):
        name = "custom-gptq-test"

    monkeypatch.setattr(methods, "_ROUNDERS", dict(methods._ROUNDERS))
    register_rounder(CustomGPTQ())
    monkeypatch.setattr(rounding, "ROW_CHUNK_ELEMS", 512)
    one = _quantize(Placement(), "custom-gptq-test")
    submitted: list[tuple] = []
    real = MeasurePool._submit
    monkeypatch.setattr(MeasurePool, "_submit", lambda self, *a: submitted.append(a) or real(self, *a))
    started: list[int] = []
    enter = MeasurePool.__enter__
    monkeypatch.setattr(MeasurePool, "__enter__", lambda self: started.append(self.workers) or enter(self))
    assert _quantize(Placement(workers=2, worker_threads=1), "custom-gptq-test") == one == _quantize(Placement(), "gptq")
    assert not submitted and not started


def test_quantize_job_with_workers_writes_the_same_files(tmp_path, monkeypatch) -> None:
    """The CLI's placement (``Placement.for_device``) picks workers for a big model on several threads; with the
    size threshold lowered, a tiny model's ``quantize --reuse-rounding`` (measurement kept and reused) goes through
    the pool and writes the files the one-process run writes, byte for byte; without ``--reuse-rounding`` the
    quantization's rounding goes through a pool of its own, with the same result."""
    import bitalloc.placement as placement
    from bitalloc.cli import main
    from tests.test_resume import assert_same_tree, make_hf_dir, quantize_argv

    model = make_hf_dir(tmp_path / "m")
    assert main(quantize_argv(model, tmp_path / "one", "--reuse-rounding", "--threads", "2")) == 0
    monkeypatch.setattr(placement, "PARALLEL_MIN_PARAMS", 0)
    assert Placement.for_device("cpu", model=torch.nn.Linear(64, 64)).workers == min(torch.get_num_threads(), 8)
    started: list[int] = []
    real = MeasurePool.__enter__

    def spy(self: MeasurePool) -> MeasurePool:
        started.append(self.workers)
        return real(self)

    monkeypatch.setattr(MeasurePool, "__enter__", spy)
    assert main(quantize_argv(model, tmp_path / "two", "--reuse-rounding", "--threads", "2")) == 0
    assert started == [2]
    assert_same_tree(tmp_path / "one", tmp_path / "two")
    monkeypatch.undo()
    assert main(quantize_argv(model, tmp_path / "three", "--threads", "2")) == 0
    monkeypatch.setattr(placement, "PARALLEL_MIN_PARAMS", 0)
    monkeypatch.setattr(MeasurePool, "__enter__", spy)
    started.clear()
    assert main(quantize_argv(model, tmp_path / "four", "--threads", "2")) == 0
    assert started == [2, 2]  # the measurement's pool, then the quantization's
    assert_same_tree(tmp_path / "three", tmp_path / "four")
