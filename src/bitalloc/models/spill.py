"""Model weights in one memory-mapped scratch ("spill") file, resident one block at a time.

A low-memory load (:func:`bitalloc.models.sources.load_model` with ``low_memory=True``) builds the model
without weights, then makes every parameter a view into ONE ``MAP_SHARED`` mapping of a scratch file (each
tensor page-aligned), filled tensor by tensor from the source.  The file is unlinked right after it is
opened, so nothing is left behind even after ``kill -9``; its blocks are reserved up front
(``posix_fallocate``), so a full disk is one :class:`InputError` instead of a SIGBUS later.

Residency: :func:`release` drops the resident pages of a module's parameters (``madvise(MADV_DONTNEED)``).
On a shared file mapping that only unmaps the pages from this process: the data stays in the file (and in
the page cache), in-place writes such as ``ModelView.set_weight`` persist, and the next read faults the
pages back in.  :func:`install_release_hooks` releases every spilled weight before each decoder block's
forward, and the block's own after its forward (and after its backward when gradients flow through its
input); the embedding, final norm and lm_head likewise, so a forward pass holds one block's weights at a
time, even when a consumer read other weights in between without releasing them.  Everything here is a no-op for ordinary models.
"""
from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from bitalloc.errors import InputError

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
_ATTR = "_bitalloc_spill"  # set on every module that owns spilled parameters


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


class SpillFile:
    """A scratch file of named tensors, mapped ``MAP_SHARED`` and unlinked at once.

    ``layout`` lists ``(name, shape, dtype)``; :meth:`tensor` returns the writable view of one entry.
    The mapping lives as long as any view of it does.
    """

    def __init__(self, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 directory: str | os.PathLike[str] | None = None) -> None:
        self._entries: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in layout:
            if name in self._entries:
                raise ValueError(f"duplicate spill tensor {name!r}")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self._entries[name] = (offset, tuple(int(d) for d in shape), dtype)
            offset += _round_up(nbytes)
        self.size = max(offset, PAGE)
        self.directory = Path(directory if directory is not None else tempfile.gettempdir())
        self._mm = self._map(self.size, self.directory)
        self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)  # views keep the mapping alive
        self.base = self._buf.data_ptr()

    @staticmethod
    def _map(size: int, directory: Path) -> mmap.mmap:
        try:
            fd, path = tempfile.mkstemp(prefix="bitalloc-spill-", suffix=".tmp", dir=directory)
        except OSError as e:
            raise InputError(f"cannot create the weight spill file in {directory}: {e.strerror or e}; "
                             "give a writable directory with enough space (spill_dir)") from e
        try:
            os.unlink(path)  # gone from the directory at once: nothing left behind, even after kill -9
            try:
                os.posix_fallocate(fd, 0, size)  # reserve the blocks now: no SIGBUS on a full disk later
            except OSError as e:
                raise InputError(
                    f"cannot reserve {size / 2**20:.0f} MiB for the weight spill file in {directory}: "
                    f"{e.strerror or e}; free space there or choose another directory (spill_dir)"
                ) from e
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def __deepcopy__(self, memo: dict) -> SpillFile:
        return self  # a deep copy of a model copies its tensors out of the file; the file itself is shared

    def names(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> torch.Tensor:
        """The writable view of ``name`` inside the mapping."""
        offset, shape, dtype = self._entries[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return self._buf[offset: offset + nbytes].view(dtype).reshape(shape)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s bytes lie inside this mapping."""
        ptr = t.data_ptr()
        return t.device.type == "cpu" and self.base <= ptr and ptr + t.numel() * t.element_size() <= self.base + self.size

    def release_tensor(self, t: torch.Tensor) -> None:
        """Drop the resident pages under ``t`` (a no-op for a tensor outside the mapping).

        The range is widened to whole pages: on a shared file mapping this never loses data.
        """
        if not self.holds(t) or t.numel() == 0:
            return
        start = t.data_ptr() - self.base
        end = start + t.numel() * t.element_size()
        lo, hi = start - start % PAGE, min(_round_up(end), self.size)
        self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def release_all(self) -> None:
        self._mm.madvise(mmap.MADV_DONTNEED, 0, self.size)


def attach(model: nn.Module, spill: SpillFile) -> None:
    """Mark every module that owns a parameter inside ``spill`` (what :func:`release` looks for)."""
    for m in model.modules():
        if any(spill.holds(p) for p in m.parameters(recurse=False)):
            object.__setattr__(m, _ATTR, spill)


def _spill_of(module: nn.Module) -> SpillFile | None:
    return module.__dict__.get(_ATTR)


def is_spilled(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` lives in a spill file."""
    return any(_spill_of(m) is not None for m in model.modules())


def release(module: nn.Module) -> None:
    """Drop the resident pages of every spilled parameter of ``module`` (recursively); a no-op otherwise."""
    for m in module.modules():
        spill = _spill_of(m)
        if spill is not None:
            for p in m.parameters(recurse=False):
                spill.release_tensor(p)


def release_rows(model: nn.Module, name: str, rows: slice) -> None:
    """Drop the resident pages of rows ``rows`` of the spilled parameter ``name`` (a no-op unless spilled).

    For consumers that read a big tensor in row blocks (measurement, quantization of the embedding), so at
    most one block of its pages is resident; the next read faults them back from the page cache."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    spill = _spill_of(module)
    if spill is not None:
        spill.release_tensor(module.get_parameter(leaf)[rows])


def release_parameter(model: nn.Module, name: str) -> None:
    """Drop the resident pages of the parameter ``name`` of ``model`` (a no-op unless it is spilled)."""
    release_rows(model, name, slice(None))


def released_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()``, each parameter released once the consumer asks for the next one."""
    owners = {id(p): s for m in model.modules() if (s := _spill_of(m)) is not None
              for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        yield name, p
        spill = owners.get(id(p))
        if spill is not None:
            spill.release_tensor(p)


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def _release_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    release(module)
    x = _input_tensor(args, kwargs)
    if x is not None and torch.is_grad_enabled() and x.requires_grad:
        # the gradient of the input is complete only after the backward through the whole module
        x.register_hook(lambda _g, m=module: release(m))


def release_targets(model: nn.Module, blocks: str) -> list[nn.Module]:
    """The modules released after use: each decoder block of ``blocks`` (a ModuleList path), then every
    other module that directly owns spilled parameters (embedding, final norm, lm_head)."""
    block_list = model.get_submodule(blocks)
    inside = {id(m) for blk in block_list for m in blk.modules()}
    return list(block_list) + [m for m in model.modules() if id(m) not in inside and _spill_of(m) is not None]


def _release_files(spills: tuple[SpillFile, ...], module: nn.Module, args: tuple) -> None:
    for spill in spills:
        spill.release_all()


def install_release_hooks(model: nn.Module, blocks: str) -> list[Any]:
    """Hooks on each of :func:`release_targets`: before its forward every spilled weight is released (so
    weights that a consumer read without releasing, e.g. while measuring a block, go when the next module
    runs), and after its forward (and backward) its own weights are.  Only the running module's weights
    are ever resident; releasing never loses data, the next read faults pages back from the page cache."""
    spills = tuple({id(s): s for m in model.modules() if (s := _spill_of(m)) is not None}.values())
    handles = []
    for m in release_targets(model, blocks):
        handles.append(m.register_forward_pre_hook(functools.partial(_release_files, spills)))
        handles.append(m.register_forward_hook(_release_hook, with_kwargs=True))
    return handles


def spill_directory(model: nn.Module) -> Path | None:
    """The directory of ``model``'s spill file (None for an ordinary model)."""
    for m in model.modules():
        spill = _spill_of(m)
        if spill is not None:
            return spill.directory
    return None


def scratch_tensor(shape: Sequence[int], dtype: torch.dtype,
                   directory: str | os.PathLike[str] | None) -> tuple[torch.Tensor, SpillFile]:
    """A new zero-filled tensor in its own spill file, and the file (to release pages of the tensor with).

    For large intermediates (the hidden states of every calibration window) that are read and written one
    slice at a time: released slices leave memory and are read back from the page cache when touched."""
    spill = SpillFile([("t", tuple(int(d) for d in shape), dtype)], directory)
    return spill.tensor("t"), spill


def spill_parameters(model: nn.Module, names: Iterable[str], dtype: torch.dtype,
                     directory: str | os.PathLike[str] | None = None) -> SpillFile:
    """Replace the parameters ``names`` of ``model`` (typically on the meta device) by zero-filled views
    into a new spill file of ``dtype``; returns the file (the caller fills ``spill.tensor(name)``)."""
    names = list(names)
    shapes = [tuple(model.get_parameter(n).shape) for n in names]
    spill = SpillFile([(n, s, dtype) for n, s in zip(names, shapes)], directory)
    for n in names:
        owner, _, leaf = n.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._parameters[leaf] = nn.Parameter(spill.tensor(n), requires_grad=False)
    attach(model, spill)
    log.debug("spill file: %d tensors, %.1f MiB in %s", len(names), spill.size / 2**20, spill.directory)
    return spill


__all__ = [
    "PAGE", "SpillFile", "attach", "install_release_hooks", "is_spilled", "release", "release_parameter",
    "release_rows", "release_targets", "released_parameters", "scratch_tensor", "spill_directory", "spill_parameters",
]
