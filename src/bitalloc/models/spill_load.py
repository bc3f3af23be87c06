"""Low-memory loading: a model built without weights, then filled tensor by tensor into a spill file.

The source is read through bitalloc's strict readers, one tensor at a time: safetensors as zero-copy views
(cast while copying), GGUF raw blocks decoded by bitalloc's own GGUF formats (gguf-py only for block
types bitalloc lacks), renamed by :mod:`bitalloc.export.gguf_names` with the q/k rows put back in HF order
exactly as transformers' GGUF loader does, so the values equal a whole ``from_pretrained`` load.  Each
tensor is checked for NaN/Inf as it is copied and released right after (see :mod:`bitalloc.models.spill`).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import InputError
from bitalloc.export.gguf_names import gguf_to_hf, rope_head_count, to_hf_rows
from bitalloc.formats import get_format
from bitalloc.formats.base import QTensor
from bitalloc.formats.gguf import GGUF_TYPES
from bitalloc.io.gguf import GGUFFile
from bitalloc.io.safetensors import SafetensorsFile, check_finite
from bitalloc.models.archs import arch_for
from bitalloc.models.experts import fused_rows, fused_source, unfuse_experts
from bitalloc.memory import release_free_memory
from bitalloc.models.spill import PAGE, attach, install_release_hooks, spill_parameters

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None, use_errno=True)

_LOW_MEMORY_GGUF_ARCHS = ("llama", "qwen2")  # where transformers' GGUF loader and gguf_names agree
_FLOAT_GGUF = ("F32", "F16", "BF16", "F64")
_DECODE_ELEMENTS = 1 << 20  # rows of a quantized tensor are decoded in chunks of about this many values


def _empty_model(config: Any, dtype: torch.dtype) -> Any:
    """The model with its parameters on the meta device (no weight memory); buffers stay real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model)  # MoE: per-expert linears (on the meta device too)
    return model


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
    model = _empty_model(config, dtype)
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
    """Rows ``r0:r1`` of a GGUF tensor as float32, decoded by bitalloc's own GGUF formats."""
    info = g.info(name)
    if info.type.name in _FLOAT_GGUF:
        return g.get(name)[r0:r1].to(torch.float32)
    fid = info.type.name.lower()
    if fid not in GGUF_TYPES or len(info.shape) != 2:
        return g.dequantize(name)[r0:r1]  # other block types: gguf-py's decoder
    fmt = get_format(fid)
    rows, cols = info.shape
    raw = torch.from_numpy(g.raw(name)).reshape(rows, fmt.row_bytes(cols))[r0:r1]
    return fmt.decode(QTensor(fid, (r1 - r0, cols), "float32", {"weight_packed": raw}))


def _fill_gguf(path: Path, g: Any, spill: Any, names: list[str], arch: str) -> None:
    """Decode every GGUF tensor the model has into the spill file, in HF names and HF q/k row order."""
    want, done = set(names), set()
    meta = g.metadata
    for gname, info in g.tensors.items():
        try:
            hf = gguf_to_hf(gname, arch)
        except InputError:
            log.debug("%s: tensor %s is not a model parameter; skipped", path, gname)
            continue
        if hf not in want:
            continue
        rows = info.shape[0]
        heads = rope_head_count(hf, arch, meta) if arch == "llama" else None
        if heads is not None:  # the converter's q/k row permutation, undone as transformers does
            _store(spill, hf, slice(None), to_hf_rows(_gguf_rows(g, gname, 0, rows), heads), str(path))
        else:
            step = max(1, _DECODE_ELEMENTS // max(1, info.numel // rows))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                _store(spill, hf, slice(r0, r1), _gguf_rows(g, gname, r0, r1), str(path))
        raw = g.raw(gname)
        _drop_source_pages(raw.ctypes.data, raw.nbytes)
        done.add(hf)
    if want - done:
        raise InputError(f"{path} has no tensor for {sorted(want - done)[:3]} ({len(want - done)} missing)")


def load_gguf_spilled(path: Path, dtype: torch.dtype, spill_dir: Any = None) -> Any:
    """The model of a GGUF with spilled weights (None for an architecture only a whole load supports)."""
    from transformers import AutoConfig

    with GGUFFile(path) as g:
        arch = str(g.metadata.get("general.architecture"))
    if arch not in _LOW_MEMORY_GGUF_ARCHS:
        log.warning("low-memory loading of %s GGUFs is not supported; loading %s whole", arch, path)
        return None
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InputError(f"cannot load the GGUF {path}: {e}") from e
    model = _empty_model(config, dtype)
    names = _stored_names(model)
    spill = spill_parameters(model, names, dtype, spill_dir)
    with GGUFFile(path) as g:
        _fill_gguf(path, g, spill, names, arch)
    _finish_spilled(model, spill)
    return model


__all__ = ["load_gguf_spilled", "load_hf_spilled"]
