"""Where the work of a stage runs: one :class:`Placement` (device, offload, chunk sizes, memory release),
owned by the block runner and handed to every stage (calibration forwards, Hessians, Fisher pass, GPTQ,
measurement, evaluation) instead of constants and release calls spread over them.

* :func:`resolve_device` — ``auto | cpu | cuda | cuda:N`` to a ``torch.device`` (one-line InputError when the
  device does not exist here).
* :class:`Placement` — the policy.  The default (``Placement()``) is today's CPU behaviour exactly: nothing
  moves, the chunk sizes are the former module constants, freed heap is trimmed after every block.
* :class:`Residency` — a model's weights during one stage under a placement.  On the CPU it does nothing
  (unless asked to offload: then each block runs on a working copy, same values).  On an
  accelerator the model's *trunk* (every parameter and buffer outside the decoder blocks: embedding, final
  norm, lm_head, rotary tables) moves to the device for the stage; the blocks move with it, or, when
  ``offload`` is set, stay in CPU memory (or the memory-mapped spill file of a low-memory load) and move to
  the device one at a time, for its forward or while the runner holds it.  Leaving the stage puts every weight
  back in its own CPU storage (the spill file's views stay the parameters' storage); a stage that changes weights
  (quantization writes the dequantized weights in place) asks for ``write_back``: the device values are then
  copied into that storage as they leave.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import InputError
from .formats.base import QTensor
from .memory import release_free_memory
from .models.spill import release

log = logging.getLogger(__name__)

CPU = torch.device("cpu")

#: positions (windows x ctx) per block forward on the CPU: bounds one forward's activations
MAX_POSITIONS = 1024
#: positions whose logits exist at once in the Fisher head pass (for one vocabulary slice), on the CPU
HEAD_CHUNK = 256
#: rows of the lm_head weight (vocabulary entries) in one slice of the Fisher head pass, on the CPU
VOCAB_CHUNK = 4096
#: most elements of the formats x rows x cols stack that the measurement rounds at once, on the CPU (~32 MiB
#: float32 per stacked tensor)
STACK_ELEMS = 1 << 23
#: most elements of one weight that a measurement worker receives in one task, unless its Hessian (cols x cols,
#: which the task holds anyway) has more (a larger tensor is cut into ranges of rows): bounds a worker's copy of its
#: rows (~64 MiB float32)
TASK_ELEMS = 1 << 24
#: an accelerator takes larger chunks (fewer, bigger kernels; fewer, longer GPTQ column loops); its memory holds
#: them easily
DEVICE_CHUNKS = {"max_positions": 4096, "head_chunk": 1024, "vocab_chunk": 16384, "stack_elems": 1 << 26}
#: offload the blocks when the weights would take more than this share of the device's free memory
OFFLOAD_SHARE = 0.5
#: on the CPU, a model of at least this many parameters is measured in worker processes (:mod:`bitalloc.measure_pool`;
#: a smaller one is measured before the workers would have started)
PARALLEL_MIN_PARAMS = 20_000_000
#: at most this many measurement workers
MAX_WORKERS = 8
#: the workers together may take at most this share of the memory available when the run starts
WORKER_MEMORY_SHARE = 0.5


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``;
    InputError for anything else or for a CUDA device this machine does not have."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else CPU
    if text == "cpu":
        return CPU
    kind, sep, index = text.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        raise InputError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"device {spec!r} is not available: this machine (torch {torch.__version__}) has no usable "
                         "CUDA device; use --device cpu or auto")
    count = torch.cuda.device_count()
    n = int(index) if sep else torch.cuda.current_device()
    if n >= count:
        raise InputError(f"device {spec!r} does not exist: this machine has {count} CUDA device(s), cuda:0.."
                         f"cuda:{count - 1}")
    return torch.device("cuda", n)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@dataclass(frozen=True)
class Placement:
    """The placement policy of a run: ``device`` where stages compute; ``offload``: on an accelerator, the
    decoder blocks stay in CPU memory (or the spill file) and move to the device one at a time (else the whole
    model moves for each stage); the chunk sizes that bound one step's memory (``stack_elems``: the measurement's
    stack of every candidate format's rows); ``release_memory``: give freed heap back to the OS after each block
    and each measured piece of a tensor (glibc ``malloc_trim``; only host memory gains from it); ``workers``:
    processes measuring a block's tensors side by side, and rounding the quantization's GPTQ groups,
    ``worker_threads`` torch threads each (1: in this process; :mod:`bitalloc.measure_pool`), each task at most
    ``task_elems`` elements of a weight."""

    device: torch.device = CPU
    offload: bool = False
    max_positions: int = MAX_POSITIONS
    head_chunk: int = HEAD_CHUNK
    vocab_chunk: int = VOCAB_CHUNK
    stack_elems: int = STACK_ELEMS
    release_memory: bool = True
    workers: int = 1
    worker_threads: int = 1
    task_elems: int = TASK_ELEMS

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):
            object.__setattr__(self, "device", resolve_device(self.device))
        for name in ("max_positions", "head_chunk", "vocab_chunk", "stack_elems", "workers", "worker_threads",
                     "task_elems"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def for_device(cls, device: str | torch.device | None = "auto", *, model: nn.Module | None = None,
                   offload: bool | None = None) -> "Placement":
        """The policy for ``device``: the CPU defaults there, with :func:`cpu_workers` measurement workers for
        ``model``; on an accelerator larger chunks, and ``offload`` (when not given) when ``model``'s weights exceed
        :data:`OFFLOAD_SHARE` of the device's free memory."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        if dev.type == "cpu":
            workers = 1 if model is None else cpu_workers(model, torch.get_num_threads())
            return cls() if workers == 1 else cls(workers=workers, worker_threads=torch.get_num_threads() // workers)
        if offload is None:
            offload = False
            if model is not None and dev.type == "cuda":
                free, _total = torch.cuda.mem_get_info(dev)
                offload = model_bytes(model) > OFFLOAD_SHARE * free
        return cls(device=dev, offload=bool(offload), release_memory=bool(offload), **DEVICE_CHUNKS)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def states_device(self) -> torch.device:
        """Where the hidden states of every calibration window live: the device, or CPU memory when offloading."""
        return CPU if self.offload else self.device

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device (``t`` itself when it is there already)."""
        return t.to(self.device)

    def release(self) -> None:
        """Hand freed heap back to the OS (after a block, or a measured piece of a tensor), when the policy asks
        for it."""
        if self.release_memory:
            release_free_memory()

    def residency(self, model: nn.Module, blocks: Sequence[nn.Module] = (), *, write_back: bool = False) -> "Residency":
        """The weights of ``model`` on this placement for one stage (a context manager; see :class:`Residency`)."""
        return Residency(self, model, tuple(blocks), write_back=write_back)


def _available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_workers(model: nn.Module, threads: int, available: int | None = None) -> int:
    """How many processes measure ``model``'s tensors on a CPU of ``threads`` threads: one per thread (at most
    :data:`MAX_WORKERS`) for a model of :data:`PARALLEL_MIN_PARAMS` parameters or more, as many as fit in
    :data:`WORKER_MEMORY_SHARE` of ``available`` memory (default: this machine's now), each holding the largest
    tensor's weight (twice: received and unpacked), its float64 Hessian and a rounding stack."""
    if threads < 2:
        return 1
    seen: dict[int, torch.Tensor] = {p.data_ptr(): p for p in model.parameters() if p.device.type != "meta"}
    if sum(p.numel() for p in seen.values()) < PARALLEL_MIN_PARAMS:
        return 1
    mats = [p for p in seen.values() if p.dim() == 2]
    if not mats:
        return 1
    per_worker = max(16 * p.numel() + 24 * int(p.shape[1]) ** 2 for p in mats) + 16 * STACK_ELEMS
    avail = _available_memory() if available is None else available
    fit = threads if avail is None else int(WORKER_MEMORY_SHARE * avail) // per_worker
    return max(1, min(threads, MAX_WORKERS, fit))


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` in CPU memory (``t`` itself when it is there): what checkpoints and outputs are written from."""
    return t if t.device.type == "cpu" else t.cpu()


def qtensor_cpu(q: QTensor) -> QTensor:
    """``q`` with its parts in CPU memory (``q`` itself when they are there): what outputs are written from."""
    if all(t.device.type == "cpu" for t in q.parts.values()):
        return q
    return replace(q, parts={k: cpu_copy(t) for k, t in q.parts.items()})


@dataclass
class _Moved:
    tensor: torch.Tensor  # the parameter or buffer object (its ``.data`` is swapped)
    home: torch.Tensor  # its own CPU storage (a spill-file view for a low-memory model)


@dataclass
class Residency:
    """One stage's weights under ``placement`` (see the module docstring); a context manager.

    ``hold(module)`` keeps an offloaded block on the device across several forwards (the runner's current
    block) until ``drop(module)``; ``write_back``: the floating-point tensors are copied back to their CPU
    storage when they leave the device (a version counter would miss writes through ``.data``)."""

    placement: Placement
    model: nn.Module
    blocks: tuple[nn.Module, ...]
    write_back: bool = False
    _moved: dict[int, _Moved] = field(default_factory=dict)
    _shared: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    _held: set[int] = field(default_factory=set)
    _hooks: list[Any] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether weights move: on an accelerator, or when offloading (on the CPU: a block's working copy in
        ordinary memory while it runs, the same values; what the CPU tests exercise the offload path with)."""
        return not self.placement.on_cpu or self.placement.offload

    def __enter__(self) -> "Residency":
        if not self.active:
            return self
        if self.placement.offload and not self.blocks:
            raise InputError("offloading needs the model's decoder blocks")
        try:
            self._enter()
        except BaseException:  # out of device memory half-way: every weight goes home before the error leaves
            self.close()
            raise
        log.debug("residency on %s: %d tensors moved%s", self.placement.device, len(self._moved),
                  ", blocks offloaded" if self.placement.offload else "")
        return self

    def _enter(self) -> None:
        inside = {id(t) for b in self.blocks for t in _tensors(b)}
        if not self.placement.offload:
            for b in self.blocks:  # block by block: a spilled model's pages are released after each copy
                self._move_in(_tensors(b), b)
        for mod in self.model.modules():  # the trunk (and, without blocks given, everything), module by module
            own = [t for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
                   if t is not None and t.device.type != "meta"]
            if self.placement.offload:
                own = [t for t in own if id(t) not in inside]
            self._move_in(own, mod)
        if self.placement.offload:
            for b in self.blocks:
                self._hooks.append(b.register_forward_pre_hook(self._pre))
                self._hooks.append(b.register_forward_hook(self._post))

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._held.clear()
        for b in self.blocks:  # block by block, then the rest (a spilled model's pages released after each)
            self._move_out([self._moved[id(t)] for t in _tensors(b) if id(t) in self._moved], b)
        if self._moved:
            self._move_out(list(self._moved.values()), self.model)

    # ---------------------------------------------------------------------------- offloaded blocks
    def hold(self, module: nn.Module) -> None:
        """Keep ``module`` (an offloaded block) on the device until :meth:`drop` (a no-op otherwise)."""
        if self.active and self.placement.offload and id(module) not in self._held:
            self._held.add(id(module))
            self._move_in(_tensors(module), module)

    def drop(self, module: nn.Module) -> None:
        """Send a held block back to CPU memory (changed tensors copied back with ``write_back``)."""
        if id(module) in self._held:
            self._held.discard(id(module))
            self._move_out([self._moved[id(t)] for t in _tensors(module) if id(t) in self._moved], module)

    @contextmanager
    def holding(self, module: nn.Module) -> Iterator[None]:
        """:meth:`hold` for a ``with`` body (forward and backward of one block)."""
        held = id(module) in self._held
        self.hold(module)
        try:
            yield
        finally:
            if not held:
                self.drop(module)

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if id(module) not in self._held:
            self._move_in(_tensors(module), module)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if id(module) not in self._held:
            self._move_out([self._moved[id(t)] for t in _tensors(module) if id(t) in self._moved], module)

    # ------------------------------------------------------------------------------------- moving
    def _move_in(self, tensors: list[torch.Tensor], owner: nn.Module) -> None:
        todo = [t for t in tensors if id(t) not in self._moved]
        for t in todo:
            home = t.data
            key = _key(home)  # two objects sharing storage: one copy
            if key not in self._shared:
                self._shared[key] = home.to(self.placement.device, copy=True)
            self._moved[id(t)] = _Moved(t, home)
        if todo:
            release(owner)  # a spilled weight's pages, read for the copy, leave host memory
            for t in todo:
                t.data = self._shared[_key(self._moved[id(t)].home)]

    def _move_out(self, moved: list[_Moved], owner: nn.Module) -> None:
        with torch.no_grad():
            for m in moved:
                if self.write_back and m.tensor.is_floating_point():
                    m.home.copy_(m.tensor.data)
                m.tensor.data = m.home
                self._moved.pop(id(m.tensor), None)
                self._shared.pop(_key(m.home), None)
        release(owner)


def _key(home: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
    return home.data_ptr(), home.dtype, tuple(home.shape)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` (recursively), each object once."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t is not None and t.device.type != "meta":
            seen.setdefault(id(t), t)
    return list(seen.values())


__all__ = ["CPU", "DEVICE_CHUNKS", "HEAD_CHUNK", "MAX_POSITIONS", "MAX_WORKERS", "OFFLOAD_SHARE", "PARALLEL_MIN_PARAMS",
           "Placement", "Residency", "STACK_ELEMS", "VOCAB_CHUNK", "cpu_copy", "cpu_workers", "model_bytes",
           "qtensor_cpu", "resolve_device"]
