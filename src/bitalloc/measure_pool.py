"""The measurement of one decoder block's tensors spread over worker processes (the CPU placement's ``workers``),
and the quantization's rounding of a sequential group of tensors (:meth:`MeasurePool.quantize_tensors`).

Every tensor of a block is measured from its own weight and statistics (:func:`bitalloc.measure.measure_tensor`),
independently of the others, and the column loops of GPTQ and the grid fits are many small tensor operations, so on
a CPU one process with every thread keeps the cores only partly busy (on 2 cores, two 1-thread processes measured
1.6 times as many tensors per second as one 2-thread process).  :class:`MeasurePool` runs ``workers`` processes of
``threads`` torch threads each; a block's tensors are handed out largest first and their rows collected in the
block's own order, so the table, and every kept rounding, is what measuring them one after the other gives (each
tensor's arithmetic is the same; ``tests/test_measure_pool.py`` checks the table and the roundings byte for byte).

The processes are fresh interpreters (``python -c``: no forked OpenMP state, and nothing of the calling script is
run again, guarded by ``if __name__ == "__main__"`` or not) started once per measurement and stopped with it; their
entry point is :func:`bitalloc.cli.worker.main`.  They take requests on stdin and answer on stdout, ignore Ctrl-C
(the main process stops them), leave when their stdin closes (the main process is gone, even after ``kill -9``), and
their ``measure.*`` clocks are added to the run's :class:`~bitalloc.timing.StageTimer` (summed over workers:
seconds of work, not of wall time).  Tensors cross the process boundary as the bytes of their values
(:func:`pack`: pickle protocol 5 buffers, written from the tensor's own memory and received into the one buffer
the worker's tensor then uses), never as shared-memory handles, so no model storage is moved into shared memory
and no file descriptor is held per tensor; neither side keeps a serialised copy beside the tensors.  A worker
that dies (killed, out of memory) ends the measurement with one line; a resumed job continues from its last
measured block.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pickle
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

import torch

from .errors import BitallocError
from .formats import QTensor, get_format
from .measure import MeasureRow, check_finite, grid_block_elems, grid_chunks, grid_formats, measure_tensor, rows_of
from .placement import Placement
from .rounding import ROW_CHUNK_ELEMS, Method, quantize_chunks, round_block_elems, row_chunks
from .stats import TensorStats
from .timing import StageTimer

#: ``keep(tensor, format id, QTensor)``: receives every rounding the workers made
Keep = Callable[[str, str, QTensor], None]

log = logging.getLogger(__name__)

class WorkerError(BitallocError, RuntimeError):
    """A measurement worker process stopped without an answer (killed, or out of memory)."""


@dataclasses.dataclass(frozen=True)
class _Ref:
    """Where a tensor stood in a packed object: its index in the packed tensors."""

    key: int


#: ``(skeleton, tensors)``: the object without its tensors, and each tensor as ``(dtype, shape, raw bytes)``
Packed = tuple[Any, list[tuple[torch.dtype, tuple[int, ...], Any]]]


def _map_leaves(obj: Any, leaf: type, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with every instance of ``leaf`` in it (in dataclasses, tuples, lists, dicts) replaced by ``fn`` of it."""
    if isinstance(obj, leaf):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_leaves(getattr(obj, f.name), leaf, fn)
                                          for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_leaves(v, leaf, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, leaf, fn) for k, v in obj.items()}
    return obj


def pack(obj: Any) -> Packed:
    """``obj`` as ``(skeleton, tensors)``: the skeleton holds no tensor; each tensor travels as its dtype, shape
    and values' bytes, a :class:`pickle.PickleBuffer` over the tensor's own memory (a contiguous copy only for a
    non-contiguous tensor: a row range of a weight is sent without one, and a view never carries its whole
    storage along).  Pickled with protocol 5 (:data:`PROTOCOL`) the bytes go to the pipe straight from that memory
    and arrive in one buffer, which :func:`unpack` turns into the tensor without another copy."""
    tensors: list[tuple[torch.dtype, tuple[int, ...], Any]] = []

    def ref(t: torch.Tensor) -> _Ref:
        t = t.detach().cpu().contiguous()
        raw = pickle.PickleBuffer(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        tensors.append((t.dtype, tuple(t.shape), raw))
        return _Ref(len(tensors) - 1)

    return _map_leaves(obj, torch.Tensor, ref), tensors


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: Any) -> torch.Tensor:
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def unpack(packed: Packed) -> Any:
    """The object :func:`pack` was given, its tensors over the received buffers (no copy; unpickled, a
    :class:`pickle.PickleBuffer` over the memory of a contiguous original: the same memory)."""
    skeleton, tensors = packed
    return _map_leaves(skeleton, _Ref, lambda r: _tensor(*tensors[r.key]))


#: pickle protocol of requests and answers: 5 writes a :class:`pickle.PickleBuffer` without copying it
PROTOCOL = 5


def serve_requests() -> None:
    """A worker process's loop (after :func:`bitalloc.cli.worker.main` set its threads, signals and logging):
    ``(function, packed arguments)`` requests from stdin answered on stdout, ``(True, packed result)`` or
    ``(False, exception)``, until stdin closes (the main process finished, or is gone).  The request's buffers
    become the arguments' tensors (one copy of the inputs in the worker, no more)."""
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the answer pipe
    while True:
        try:
            fn, packed = pickle.load(requests)
        except EOFError:
            return
        try:
            args = unpack(packed)
            del packed
            result = pack(_TASKS[fn](*args))
            del args
        except Exception as e:  # noqa: BLE001 - handed back to the main process, which raises it
            try:
                data = pickle.dumps((False, e), protocol=PROTOCOL)
            except Exception as e2:  # noqa: BLE001 - an exception that does not pickle
                data = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e} ({e2})")), protocol=PROTOCOL)
            answers.write(data)
        else:  # the results' buffers written straight from the tensors' memory
            pickle.dump((True, result), answers, protocol=PROTOCOL)
            del result
        answers.flush()


def _measure_rows(name: str, w: torch.Tensor, stats: TensorStats, formats: Sequence[str], method: str,
                  placement: Placement, block_elems: int, keep: bool) -> tuple[Any, dict, dict]:
    """In a worker: the :func:`~bitalloc.measure.grid_chunks` of one weight's rows ``w`` with their statistics;
    returns ``(chunks, {stage: seconds}, {stage: calls})``."""
    timer = StageTimer()
    chunks = list(grid_chunks(name, w, stats, [get_format(f) for f in formats], method, block_elems, placement,
                              timer, keep))
    return chunks, timer.seconds, timer.calls


def _task_args(name: str, w: torch.Tensor, stats: TensorStats, rows: slice, formats: list[str], method: str,
               placement: Placement, block_elems: int, keep: bool) -> tuple:
    """The arguments of :func:`_measure_rows` for rows ``rows`` of ``w`` (views: read, for a spilled weight, only
    as they are sent)."""
    return name, w[rows], rows_of(stats, rows), formats, method, placement, block_elems, keep


def _quantize_rows(w: torch.Tensor, fmt_id: str, hessian: torch.Tensor | None, method: Method, max_elems: int
                   ) -> list[QTensor]:
    """In a worker: :func:`~bitalloc.rounding.quantize_chunks` of one weight's rows ``w`` (one factorisation of
    ``hessian``), the QTensor of each row block in order."""
    return [q for _rows, q in quantize_chunks(w, fmt_id, hessian=hessian, method=method, max_elems=max_elems)]


def _rows_args(w: torch.Tensor, rows: slice, *rest: Any) -> tuple:
    """``(w[rows], *rest)``: a task's arguments, its rows a view read only as they are sent."""
    return (w[rows], *rest)


#: what a worker may be asked to run, by name
_TASKS: dict[str, Callable[..., Any]] = {"measure_rows": _measure_rows, "quantize_rows": _quantize_rows}

#: a queued task: its future, the function's name, what makes its arguments, what to call once they are sent
_Task = tuple[Future, str, Callable[[], tuple], "Callable[[], None] | None"]


class _Worker:
    """One worker process and the thread that feeds it tasks from the pool's queue, one at a time."""

    def __init__(self, threads: int, tasks: "queue.Queue[_Task | None]") -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        level = logging.getLogger().getEffectiveLevel()
        self.proc = subprocess.Popen([sys.executable, "-c", f"from bitalloc.cli.worker import main; main({threads}, "
                                      f"{level})"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.tasks = tasks
        self.thread = threading.Thread(target=self._feed, daemon=True, name=f"measure-worker-{self.proc.pid}")
        self.thread.start()

    def _feed(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        while (item := self.tasks.get()) is not None:
            future, fn, make_args, sent = item
            if not future.set_running_or_notify_cancel():
                continue
            try:  # made only now: at most one task's inputs per worker are read at a time
                args = pack(make_args())
            except Exception as e:  # noqa: BLE001 - raised where the result is awaited
                future.set_exception(e)
                continue
            try:
                pickle.dump((fn, args), self.proc.stdin, protocol=PROTOCOL)
                self.proc.stdin.flush()
                del args  # not held while the worker computes
                if sent is not None:
                    try:
                        sent()
                    except Exception:  # noqa: BLE001 - only memory is at stake, not the result
                        log.debug("releasing the rows sent to worker %d failed", self.proc.pid, exc_info=True)
                ok, value = pickle.load(self.proc.stdout)
                if ok:
                    value = unpack(value)
            except (EOFError, OSError, ValueError, pickle.UnpicklingError):  # gone, or closed by __exit__
                future.set_exception(BrokenProcessPool(f"worker {self.proc.pid} exited with {self.proc.poll()}"))
                return  # this worker is gone; the others take the remaining tasks
            (future.set_result if ok else future.set_exception)(value)

    def close(self, kill: bool) -> None:
        if kill:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self.proc.wait()


class MeasurePool:
    """``workers`` processes of ``threads`` torch threads each, measuring tensors (a context manager)."""

    def __init__(self, workers: int, threads: int) -> None:
        if workers < 2 or threads < 1:
            raise ValueError(f"a measurement pool needs at least 2 workers of 1 thread, got {workers} x {threads}")
        self.workers, self.threads = workers, threads
        self._workers: list[_Worker] = []

    def __enter__(self) -> "MeasurePool":
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._workers = [_Worker(self.threads, self._tasks) for _ in range(self.workers)]
        log.info("measuring in %d worker processes of %d thread(s)", self.workers, self.threads)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        workers, self._workers = self._workers, []
        for _ in workers:
            self._tasks.put(None)
        for w in workers:  # interrupted or failed: stop them now, not after their current task
            w.close(kill=exc_type is not None)
        for w in workers:
            w.thread.join(timeout=5)
        while not self._tasks.empty():
            item = self._tasks.get_nowait()
            if item is not None:
                item[0].cancel()

    def _submit(self, fn: str, make_args: Callable[[], tuple], sent: Callable[[], None] | None = None) -> Future:
        """Queue ``fn(*make_args())`` for the next free worker (the arguments are made when it takes the task);
        ``sent()`` once they are written to it."""
        future: Future = Future()
        self._tasks.put((future, fn, make_args, sent))
        return future

    def measure_block(self, items: Sequence[tuple[str, torch.Tensor, TensorStats, Sequence[str]]], method: str,
                      placement: Placement, *, keep: Keep | None = None, timer: StageTimer | None = None,
                      release: Callable[[str, slice], None] | None = None) -> list[list[MeasureRow]]:
        """:func:`~bitalloc.measure.measure_tensor` of every ``(name, weight, statistics, formats)``, in ``items``'
        order, the grid formats' row blocks rounded by the workers: a tensor with more work than its share, or more
        elements than the placement's ``task_elems`` and its Hessian's, is cut into ranges of whole row blocks,
        handed out largest first.  ``keep(name, format id, QTensor)`` receives the roundings; ``timer`` gets the
        workers' clocks; ``release(name, rows)`` is called for rows of a weight this process has read and no
        longer needs (after the finite check, once sent to a worker: a spilled weight drops those pages)."""
        if not self._workers:
            raise RuntimeError("MeasurePool used outside its with-block")
        one = dataclasses.replace(placement, workers=1)
        plans = []
        for name, w, stats, formats in items:
            # named here, before any worker sees it
            check_finite(name, w, ROW_CHUNK_ELEMS, (lambda _rows: None) if release is None
                         else functools.partial(release, name))
            fmts = grid_formats(formats, tuple(w.shape)) if w.dim() == 2 else []
            elems = grid_block_elems(len(fmts), one.stack_elems, one.stack_elems)  # only the stack bounds a block
            blocks = row_chunks(int(w.shape[0]), int(w.shape[1]), elems) if fmts else []
            # a task's rows need not be smaller than the Hessian it holds anyway (cutting them further would only
            # repeat its factorisation)
            cap = max(one.task_elems, int(w.shape[-1]) ** 2) if w.dim() == 2 else w.numel()
            plans.append((fmts, elems, blocks, w.numel() * len(fmts), -(-w.numel() // max(cap, 1))))
        futures: dict[tuple[int, int], Future] = {}
        for i, k, rows in self._tasks_of([(blocks, work, least) for _f, _e, blocks, work, least in plans]):
            name, w, stats, _formats = items[i]
            futures[(i, k)] = self._submit("measure_rows", functools.partial(
                _task_args, name, w, stats, rows, [f.id for f in plans[i][0]], method, one, plans[i][1],
                keep is not None), None if release is None else functools.partial(release, name, rows))
        out = []
        for i, (name, w, stats, formats) in enumerate(items):
            parts = sorted(k for j, k in futures if j == i)

            def source(fmts: Sequence[Any], elems: int, i: int = i, parts: list[int] = parts) -> Iterator[Any]:
                if [f.id for f in fmts] != [f.id for f in plans[i][0]] or elems != plans[i][1]:
                    raise RuntimeError("the measurement's grid formats or row blocks differ from the pool's")
                for k in parts:
                    chunks, seconds, calls = self._result(futures[(i, k)], items[i][0])
                    if timer is not None:
                        for stage, sec in seconds.items():
                            timer.add(stage, sec, calls.get(stage, 0))
                    yield from chunks

            out.append(measure_tensor(name, w, stats, formats, method, placement=one, grid_elems=one.stack_elems,
                                      timer=timer,
                                      keep=None if keep is None else functools.partial(keep, name),
                                      grid_source=source, checked=True,
                                      release=None if release is None else functools.partial(release, name)))
        return out

    def quantize_tensors(self, items: Sequence[tuple[str, torch.Tensor, str, torch.Tensor | None]], method: Method,
                         placement: Placement, *, max_elems: int | None = None,
                         release: Callable[[str, slice], None] | None = None
                         ) -> dict[str, list[tuple[slice, QTensor]]]:
        """:func:`~bitalloc.rounding.quantize_chunks` of every ``(name, weight, grid format id, Hessian)`` by the
        workers: ``{name: [(rows, QTensor)]}``, a QTensor per row block of ``max_elems`` elements (default: each
        weight's :func:`~bitalloc.rounding.round_block_elems`, as :func:`bitalloc.quantize` cuts it), in order (the
        blocks ``quantize_chunks`` of the whole weight gives, rows being rounded independently).  A weight is cut
        into ranges of whole row blocks as :meth:`measure_block` cuts it (its share of the work, ``task_elems``),
        handed out largest first; each range factorises the Hessian once.  ``method`` travels to the workers (a
        registered name, or a :class:`~bitalloc.rounding.Rounder` they can unpickle).  ``release(name, rows)`` once
        rows are sent."""
        if not self._workers:
            raise RuntimeError("MeasurePool used outside its with-block")
        plans = []
        elems = []
        for name, w, fmt_id, hessian in items:
            if w.dim() != 2:
                raise ValueError(f"{name}: the workers quantize 2-D weights, got shape {tuple(w.shape)}")
            rows, cols = (int(d) for d in w.shape)
            elems.append(round_block_elems(cols, hessian is not None) if max_elems is None else max_elems)
            blocks = row_chunks(rows, cols, elems[-1])
            least = -(-w.numel() // max(placement.task_elems, cols * cols if hessian is not None else 1))
            plans.append((blocks, w.numel(), least))
        futures: dict[tuple[int, int], tuple[slice, Future]] = {}
        for i, k, rows in self._tasks_of(plans):
            name, w, fmt_id, hessian = items[i]
            futures[(i, k)] = rows, self._submit("quantize_rows", functools.partial(
                _rows_args, w, rows, fmt_id, hessian, method, elems[i]),
                None if release is None else functools.partial(release, name, rows))
        out: dict[str, list[tuple[slice, QTensor]]] = {}
        for i, (name, w, _fmt, _h) in enumerate(items):
            got: list[tuple[slice, QTensor]] = []
            for k in sorted(k for j, k in futures if j == i):
                rows, future = futures[(i, k)]
                parts_q = self._result(future, name)
                starts = row_chunks(rows.stop - rows.start, int(w.shape[1]), elems[i])
                if len(starts) != len(parts_q):
                    raise RuntimeError(f"{name}: a worker returned {len(parts_q)} row blocks for {len(starts)}")
                got += [(slice(rows.start + sl.start, rows.start + sl.stop), q) for sl, q in zip(starts, parts_q)]
            out[name] = got
        return out

    def _tasks_of(self, plans: Sequence[tuple[list[slice], float, int]]) -> list[tuple[int, int, slice]]:
        """``(item, part, rows)`` of every task, largest first, for each item's ``(row blocks, work, least parts)``:
        an item with more work than its share of the workers', or needing at least ``least`` parts, is cut into
        that many ranges of consecutive row blocks, as even as whole blocks allow."""
        share = max(1.0, sum(p[1] for p in plans) / self.workers)
        tasks = []
        for i, (blocks, work, least) in enumerate(plans):
            parts = min(len(blocks), max(1, round(work / share), least))
            for k in range(parts):
                bs = blocks[len(blocks) * k // parts: len(blocks) * (k + 1) // parts]
                tasks.append((i, k, slice(bs[0].start, bs[-1].stop), work / parts))
        return [(i, k, rows) for i, k, rows, _work in sorted(tasks, key=lambda t: -t[3])]

    @staticmethod
    def _result(future: Future, name: str) -> Any:
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise WorkerError(f"a measurement worker stopped while measuring {name} ({e}: killed, or out of "
                              "memory?); rerun (a job resumes at its last measured block), with --threads 1 to "
                              "measure in one process") from None


__all__ = ["MeasurePool", "WorkerError", "pack", "unpack"]
