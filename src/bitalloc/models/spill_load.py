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
from bitalloc.models.gguf_config import apply_rope_factors, config_from_gguf
from bitalloc.models.gguf_map import GGUFNames, empty_model, model_names
from bitalloc.models.experts import fused_rows, fused_source, unfuse_experts
from bitalloc.memory import release_free_memory
from bitalloc.models.spill import PAGE, attach, install_release_hooks, spill_parameters

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None, use_errno=True)

_FLOAT_GGUF = ("F32", "F16", "BF16", "F64")
_DECODE_ELEMENTS = 1 << 20  # rows of a quantized tensor are decoded in chunks of about this many values


def _stored_names(model: Any) -> list[str]:
    """Parameters that hold their own data: all but an lm_head tied to the embedding."""
    head = f"{arch_for(model.config).lm_head}.weight"
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return [n for n, _ in model.named_parameters() if not (tied and n == head)]


def _finish_spilled(model: Any, spill: Any) -> None:
    """Tie the lm_head to the embedding when the config says so, mark owners, hook residency."""
    spec = arch_for(model.config)
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_submodule(spec.lm_head).weight = model.get_submodule(spec.embedding).weight
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


def load_hf_spilled(path: Path, config: Any, dtype: torch.dtype, spill_dir: Any = None) -> Any:
    """The model of an HF directory with spilled weights (None when its tensor names differ from the model's)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
    where: dict[str, Path] = {}
    for f in files:  # headers only: the strict reader validates offsets and coverage
        with SafetensorsFile(f) as sf:
            where.update({k: f for k in sf.keys()})
    model = empty_model(config, dtype)
    names = _stored_names(model)
    # a per-expert tensor may also come from a fused (E, 2I, H) / (E, H, I) checkpoint tensor
    fused = {n: src for n in names if n not in where and (src := fused_source(n)) is not None and src[0] in where}
    missing = [n for n in names if n not in where and n not in fused]
    if missing:
        log.warning("%s names its tensors differently from the model (e.g. %r is missing); loading it whole "
                    "in memory instead of low-memory", path, missing[0])
        return None
    spill = spill_parameters(model, names, dtype, spill_dir)
    for f in files:
        with SafetensorsFile(f) as sf:
            for name in names:
                if name in fused and where[fused[name][0]] == f:
                    fname, e, proj = fused[name]
                    _store(spill, name, slice(None), fused_rows(sf.get(fname), e, proj), str(f))
                elif where.get(name) == f:
                    src = sf.get(name)
                    _store(spill, name, slice(None), src, str(f))
                    _drop_source_pages(src.data_ptr(), src.numel() * src.element_size())
            for fname in {v[0] for v in fused.values() if where[v[0]] == f}:
                src = sf.get(fname)
                _drop_source_pages(src.data_ptr(), src.numel() * src.element_size())
    _finish_spilled(model, spill)
    return model


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


def _gguf_model(path: Path, g: Any, dtype: torch.dtype) -> tuple[Any, list[str], GGUFNames]:
    """The empty model of an open GGUF (config from its metadata by the map), its stored names and name map."""
    config = config_from_gguf(g.metadata, {n: tuple(i.shape) for n, i in g.tensors.items()})
    model = empty_model(config, dtype)
    if "rope_freqs.weight" in g.tensors:  # Llama 3's RoPE scaling, as the converter stores it
        factors = g.get("rope_freqs.weight").to(torch.float32).clone()  # the map closes with the file
        check_finite(factors, f"rope_freqs.weight in {path}")
        if not bool((factors > 0).all()):
            raise InputError(f"{path}: rope_freqs.weight must be positive")
        apply_rope_factors(model, factors)
    names = model_names(model)
    return model, _stored_names(model), names


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
    spec = arch_for(model.config)
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_submodule(spec.lm_head).weight = model.get_submodule(spec.embedding).weight
    return model


__all__ = ["load_gguf_spilled", "load_gguf_whole", "load_hf_spilled"]
