"""Low-memory loading: a model built without weights, then filled tensor by tensor into a spill file.

The source is read through bitalloc's strict readers, one tensor at a time: safetensors as zero-copy views
(cast while copying), GGUF raw blocks decoded by bitalloc's own GGUF formats (gguf-py only for block
types bitalloc lacks), renamed and transformed back to HF by the architecture map
(:mod:`bitalloc.models.gguf_map`: the inverse of llama.cpp's converter, q/k rows back in HF order, Gemma's
``1 + w`` norms back to ``w``), the config rebuilt from the GGUF's metadata by the same map.  Each tensor is
checked for NaN/Inf as it is copied and released right after (see :mod:`bitalloc.models.spill`).
:func:`load_gguf_whole` fills ordinary parameters the same way.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import InputError
from bitalloc.formats import get_format
from bitalloc.formats.base import QTensor
from bitalloc.formats.gguf import GGUF_TYPES
from bitalloc.io.gguf import GGUFFile
from bitalloc.io.safetensors import SafetensorsFile, check_finite
from bitalloc.models.archs import arch_for
from bitalloc.models.gguf_config import apply_rope_factors
from bitalloc.models.gguf_map import GGUFNames
from bitalloc.models.experts import fused_rows
from bitalloc.models.preflight import Source, gguf_model
from bitalloc.memory import release_free_memory
from bitalloc.models.spill import PAGE, attach, install_release_hooks, spill_parameters

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None, use_errno=True)

_FLOAT_GGUF = ("F32", "F16", "BF16", "F64")
_DECODE_ELEMENTS = 1 << 20  # rows of a quantized tensor are decoded in chunks of about this many values


def _finish_spilled(model: Any, spill: Any) -> None:
    """Tie the lm_head to the embedding when the config says so, mark owners, hook residency."""
    spec = arch_for(model.config)
    _tie(model)
    attach(model, spill)
    install_release_hooks(model, spec.blocks)
    spill.release_all()
    release_free_memory()


def _store(spill: Any, name: str, rows: slice, values: torch.Tensor, where: str) -> None:
    dest = spill.tensor(name)[rows]
    if tuple(values.shape) != tuple(dest.shape):
        raise InputError(f"{where}: tensor {name!r} has shape {tuple(values.shape)}, the model expects "
                         f"{tuple(dest.shape)}")
    check_finite(values, f"{name} in {where}")
    dest.copy_(values)
    spill.release_tensor(dest)


def _drop_source_pages(addr: int, nbytes: int) -> None:
    """Unmap the pages wholly inside ``[addr, addr + nbytes)`` of a READ-ONLY source file mapping (the strict
    readers' maps, never written): they are re-read from the file if touched again.  Never call this on
    anonymous memory, where MADV_DONTNEED would zero it."""
    lo, hi = -(-addr // PAGE) * PAGE, (addr + nbytes) // PAGE * PAGE
    if hi > lo:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(mmap.MADV_DONTNEED))


def _gguf_rows(g: Any, name: str, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a GGUF tensor seen as 2-D ``(rows, last dim)`` (a stacked experts tensor's leading dims
    flattened) as float32, decoded by bitalloc's own GGUF formats."""
    info = g.info(name)
    if len(info.shape) == 1:  # a vector: its elements are its rows
        return g.get(name)[r0:r1].to(torch.float32)
    cols = int(info.shape[-1])
    rows = info.numel // cols
    if info.type.name in _FLOAT_GGUF:
        return g.get(name).reshape(rows, cols)[r0:r1].to(torch.float32)
    fid = info.type.name.lower()
    if fid not in GGUF_TYPES:
        return g.dequantize(name).reshape(rows, cols)[r0:r1]  # other block types: gguf-py's decoder
    fmt = get_format(fid)
    raw = torch.from_numpy(g.raw(name)).reshape(rows, fmt.row_bytes(cols))[r0:r1]
    return fmt.decode(QTensor(fid, (r1 - r0, cols), "float32", {"weight_packed": raw}))


class _Params:
    """A fill target over ordinary (resident) parameters: the spill file's interface, nothing to release."""

    def __init__(self, model: Any, names: list[str], dtype: torch.dtype) -> None:
        self._t: dict[str, torch.Tensor] = {}
        for n in names:
            owner, _, leaf = n.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            t = torch.empty(tuple(module._parameters[leaf].shape), dtype=dtype)
            module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
            self._t[n] = t

    def tensor(self, name: str) -> torch.Tensor:
        return self._t[name]

    def release_tensor(self, t: torch.Tensor) -> None:
        pass


def _fill_gguf(path: Path, g: Any, dest: Any, want: list[str], names: GGUFNames) -> None:
    """Decode every GGUF tensor the model has into ``dest``, in HF names, layout and values (stacked experts
    split back into one tensor per expert)."""
    todo, done = set(want), set()
    meta = g.metadata
    for gname, info in g.tensors.items():
        members = names.members(gname)
        if not members:
            log.debug("%s: tensor %s is not a model parameter; skipped", path, gname)
            continue
        if not set(members) <= todo:
            raise InputError(f"{path}: tensor {gname} is not a parameter of this model")
        cols = int(info.shape[-1]) if len(info.shape) > 1 else 1
        per = info.numel // cols // len(members)  # rows of each member (a vector: its elements)
        if len(members) > 1 and (len(info.shape) != 3 or info.shape[0] != len(members)):
            raise InputError(f"{path}: tensor {gname} has shape {tuple(info.shape)}, not {len(members)} stacked experts")
        for e, hf in enumerate(members):
            if names.rope_heads(hf, meta) is not None or names.norm_shift(hf):  # whole tensor: rows move
                _store(dest, hf, slice(None), names.from_gguf_value(hf, _gguf_rows(g, gname, 0, per), meta),
                       str(path))
                continue
            step = max(1, _DECODE_ELEMENTS // max(1, cols))
            for r0 in range(0, per, step):
                r1 = min(per, r0 + step)
                _store(dest, hf, slice(r0, r1), _gguf_rows(g, gname, e * per + r0, e * per + r1), str(path))
        raw = g.raw(gname)
        _drop_source_pages(raw.ctypes.data, raw.nbytes)
        done.update(members)
    if todo - done:
        missing = sorted(todo - done)
        raise InputError(f"{path} has no tensor for {missing[:3]} ({len(missing)} missing)")


def _fill_hf(plan: dict[str, Source], dest: Any) -> None:
    """Copy every planned parameter from its (already header-checked) file into ``dest``, file by file."""
    by_file: dict[Path, list[tuple[str, Source]]] = {}
    for name, src in plan.items():
        by_file.setdefault(src.file, []).append((name, src))
    for f, items in by_file.items():
        with SafetensorsFile(f) as sf:
            for name, src in items:
                t = sf.get(src.tensor)
                values = t if src.expert is None else fused_rows(t, src.expert, str(src.proj))
                _store(dest, name, slice(None), values, str(f))
                if src.expert is None:
                    _drop_source_pages(t.data_ptr(), t.numel() * t.element_size())
            for fname in {s.tensor for _, s in items if s.expert is not None}:
                t = sf.get(fname)
                _drop_source_pages(t.data_ptr(), t.numel() * t.element_size())


def load_hf_spilled(model: Any, plan: dict[str, Source], dtype: torch.dtype, spill_dir: Any = None) -> Any:
    """Fill the meta ``model`` of an HF directory from the checked ``plan`` (:func:`~bitalloc.models.preflight.
    plan_hf`) into a spill file sized by the checked shapes."""
    spill = spill_parameters(model, list(plan), dtype, spill_dir)
    _fill_hf(plan, spill)
    _finish_spilled(model, spill)
    return model


def load_hf_whole(model: Any, plan: dict[str, Source], dtype: torch.dtype) -> Any:
    """Fill the meta ``model`` of an HF directory from the checked ``plan`` into ordinary memory (same values
    as :func:`load_hf_spilled`; never a parameter the files lack: no random initialisation)."""
    _fill_hf(plan, _Params(model, list(plan), dtype))
    _tie(model)
    return model


def _gguf_model(path: Path, g: Any, dtype: torch.dtype) -> tuple[Any, list[str], GGUFNames]:
    """The empty model of an open GGUF once metadata and tensor headers agree (:func:`~bitalloc.models.preflight.
    gguf_model`), Llama 3's RoPE factors applied; its stored names and name map."""
    model, stored, names = gguf_model(path, g, dtype)
    if "rope_freqs.weight" in g.tensors:  # Llama 3's RoPE scaling, as the converter stores it
        factors = g.dequantize("rope_freqs.weight").clone()  # the map closes with the file
        check_finite(factors, f"rope_freqs.weight in {path}")
        if not bool((factors > 0).all()):
            raise InputError(f"{path}: rope_freqs.weight must be positive")
        apply_rope_factors(model, factors)
    return model, stored, names


def _tie(model: Any) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        spec = arch_for(model.config)
        model.get_submodule(spec.lm_head).weight = model.get_submodule(spec.embedding).weight


def load_gguf_spilled(path: Path, dtype: torch.dtype, spill_dir: Any = None) -> Any:
    """The model of a GGUF with spilled weights."""
    with GGUFFile(path) as g:
        model, stored, names = _gguf_model(path, g, dtype)
        spill = spill_parameters(model, stored, dtype, spill_dir)
        _fill_gguf(path, g, spill, stored, names)
    _finish_spilled(model, spill)
    return model


def load_gguf_whole(path: Path, dtype: torch.dtype) -> Any:
    """The model of a GGUF with its weights in ordinary memory (same names, layout and values as spilled)."""
    with GGUFFile(path) as g:
        model, stored, names = _gguf_model(path, g, dtype)
        _fill_gguf(path, g, _Params(model, stored, dtype), stored, names)
    _tie(model)
    return model


__all__ = ["load_gguf_spilled", "load_gguf_whole", "load_hf_spilled", "load_hf_whole"]
