"""Write GGUF files with per-tensor llama.cpp types, keeping every metadata key of a template GGUF.

The file layout is computed once (:func:`gguf_layout`) and used both to predict the exact file size before
anything is quantized (:func:`gguf_file_size`: a budget given as a file size becomes a tensor-bytes budget)
and to write.  Layout: ``"GGUF"``, version, tensor count, KV count; the KV pairs (copied byte for byte
from the template, except ``general.file_type``); one info record per tensor (name, dims with the
fastest-varying first, ggml type, data offset); zero padding to the alignment; each tensor's data padded
to the alignment (as gguf-py and llama.cpp write it).

Writing goes to a temporary file beside the destination (:func:`bitalloc.io.atomic.atomic_write`), is
re-read with the strict reader :class:`bitalloc.io.gguf.GGUFFile` and compared tensor by tensor (type,
shape, bytes) and key by key (raw bytes), and only then renamed onto the destination.  (gguf-py's
``GGUFReader`` takes ~20 s per SmolLM2 file on a loaded machine; the tests re-read with it independently.)
"""
from __future__ import annotations

import functools
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from ..errors import InputError
from ..formats.base import QTensor, get_format
from ..io.atomic import atomic_write
from ..io.gguf import GGUFFile
from ..models.gguf_map import GGUFNames, gguf_file_names, to_gguf_rows

log = logging.getLogger(__name__)

T = GGMLQuantizationType
FILE_TYPE_KEY = "general.file_type"
_FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
_KEEP_TO_GGML = {"fp32": T.F32, "fp16": T.F16, "bf16": T.BF16}
_FTYPE_OF = {
    T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q5_1: LlamaFileType.MOSTLY_Q5_1, T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    T.Q4_1: LlamaFileType.MOSTLY_Q4_1, T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL,
    T.Q6_K: LlamaFileType.MOSTLY_Q6_K, T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, T.Q2_K: LlamaFileType.MOSTLY_Q2_K,
}


def ggml_nbytes(shape: Sequence[int], ggml_type: GGMLQuantizationType) -> int:
    """Exact bytes of a tensor of numpy ``shape`` (last dim contiguous) in ``ggml_type``."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    if not shape or shape[-1] % block:
        raise InputError(f"{ggml_type.name} needs rows divisible by {block}, got shape {tuple(shape)}")
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor as it goes into the file: numpy-order ``shape`` (rows, cols), type and raw bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    data: np.ndarray  # uint8, C-contiguous, exactly ggml_nbytes(shape, ggml_type) bytes

    def __post_init__(self) -> None:
        want = ggml_nbytes(self.shape, self.ggml_type)
        if self.data.dtype != np.uint8 or self.data.nbytes != want or not self.data.flags.c_contiguous:
            raise InputError(
                f"{self.name}: {self.ggml_type.name} {self.shape} needs {want} contiguous uint8 bytes, "
                f"got {self.data.dtype} x {self.data.nbytes}"
            )


@dataclass(frozen=True)
class GGUFTemplate:
    """What a GGUF file contributes to an export: its KV pairs (raw bytes), metadata and tensor list."""

    path: Path
    version: int
    alignment: int
    kv: tuple[tuple[str, bytes], ...]  # (key, serialized key+type+value) in file order
    metadata: dict[str, Any]  # scalar values only (strings, numbers, bools)
    tensors: tuple[tuple[str, tuple[int, ...], GGMLQuantizationType], ...]  # name, numpy shape, type

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    @functools.cached_property
    def names(self) -> GGUFNames:
        """HF <-> GGUF names of this file's model, from the architecture map (no weights read)."""
        return gguf_file_names(self.metadata, {n: s for n, s, _ in self.tensors})


_FIXED_SIZE = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
               GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4,
               GGUFValueType.FLOAT32: 4, GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8,
               GGUFValueType.FLOAT64: 8}


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    """Position after a value of ``vtype`` at ``pos`` (the file was validated by GGUFFile first)."""
    if vtype in _FIXED_SIZE:
        return pos + _FIXED_SIZE[GGUFValueType(vtype)]
    if vtype == GGUFValueType.STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    etype, n = struct.unpack_from("<IQ", buf, pos)  # an array
    pos += 12
    if etype in _FIXED_SIZE:
        return pos + n * _FIXED_SIZE[GGUFValueType(etype)]
    for _ in range(n):
        pos = _skip_value(buf, pos, etype)
    return pos


def _kv_ranges(buf: bytes, n_kv: int) -> list[tuple[str, bytes]]:
    """Each KV pair's key and serialized bytes, in file order (the header starts at 0)."""
    pos, out = 24, []
    for _ in range(n_kv):
        start = pos
        klen = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8: pos + 8 + klen].decode("utf-8")
        pos = _skip_value(buf, pos + 8 + klen + 4, struct.unpack_from("<I", buf, pos + 8 + klen)[0])
        out.append((key, buf[start:pos]))
    return out


def read_template(path: str | os.PathLike[str]) -> GGUFTemplate:
    """Metadata and tensor list of a GGUF, validated by :class:`bitalloc.io.gguf.GGUFFile`."""
    p = Path(path)
    with GGUFFile(p) as f:
        with open(p, "rb") as fh:
            head = fh.read(f.data_start)
        kv = _kv_ranges(head, len(f.fields))
        meta = {k: fld.value for k, fld in f.fields.items() if fld.type != GGUFValueType.ARRAY}
        tensors = tuple((t.name, t.shape, GGMLQuantizationType(t.type)) for t in f.tensors.values())
        if [k for k, _ in kv] != list(f.fields):
            raise InputError(f"{p}: metadata keys could not be located")
        return GGUFTemplate(p, int(f.version), int(f.alignment), tuple(kv), meta, tensors)


def _kv_uint32(key: str, value: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<II", GGUFValueType.UINT32, value)


def choose_file_type(entries: Iterable[tuple[str, tuple[int, ...], GGMLQuantizationType]]) -> int:
    """``general.file_type``: the llama.cpp ftype of the type holding most matrix parameters."""
    counts: dict[GGMLQuantizationType, int] = {}
    for _name, shape, typ in entries:
        if len(shape) >= 2:
            counts[typ] = counts.get(typ, 0) + math.prod(shape)
    if not counts:
        return int(LlamaFileType.ALL_F32)
    top = max(counts, key=lambda t: counts[t])
    return int(_FTYPE_OF.get(top, LlamaFileType.GUESSED))


@dataclass(frozen=True)
class Layout:
    header: bytes  # everything before the first tensor's data, padding included
    offsets: tuple[int, ...]  # data offsets relative to the data section
    file_size: int


def gguf_layout(
    template: GGUFTemplate,
    entries: Sequence[tuple[str, tuple[int, ...], GGMLQuantizationType]],
    file_type: int | None = None,
) -> Layout:
    """Bytes before the data, each tensor's offset and the exact file size for ``entries``."""
    ftype = choose_file_type(entries) if file_type is None else int(file_type)
    kv = [(k, _kv_uint32(k, ftype) if k == FILE_TYPE_KEY else raw) for k, raw in template.kv]
    if all(k != FILE_TYPE_KEY for k, _ in kv):
        kv.append((FILE_TYPE_KEY, _kv_uint32(FILE_TYPE_KEY, ftype)))
    parts = [b"GGUF", struct.pack("<IQQ", template.version, len(entries), len(kv))]
    parts += [raw for _, raw in kv]
    offsets: list[int] = []
    pos = 0
    for name, shape, typ in entries:
        nm = name.encode()
        dims = tuple(reversed(shape))
        parts.append(struct.pack("<Q", len(nm)) + nm + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, typ, pos))
        offsets.append(pos)
        pos += _pad(ggml_nbytes(shape, typ), template.alignment)
    head = b"".join(parts)
    head += b"\0" * (_pad(len(head), template.alignment) - len(head))
    return Layout(head, tuple(offsets), len(head) + pos)


TensorLike = GGUFTensor | QTensor | torch.Tensor


def to_gguf_tensor(name: str, value: TensorLike, template: GGUFTemplate) -> GGUFTensor:
    """Raw bytes of ``value`` under GGUF name ``name``, rows in GGUF order (q/k rotary permutation).

    A :class:`QTensor` of a GGUF block format is stored as its blocks; one of ``fp32/fp16/bf16`` as that
    float type; a plain tensor as F32.  ``value`` is in HF layout unless it is already a GGUFTensor.
    """
    if isinstance(value, GGUFTensor):
        return value
    hf = template.names.to_hf(name)
    n_heads = None if hf is None else template.names.rope_heads(hf, template.metadata)
    if isinstance(value, QTensor):
        fmt = get_format(value.format)
        if value.format in _KEEP_TO_GGML:
            typ = _KEEP_TO_GGML[value.format]
            t = _shifted(template, hf, fmt.decode(value)).to(_FLOAT_TYPES[typ])
        elif hasattr(fmt, "gguf_type"):
            typ = GGMLQuantizationType(int(fmt.gguf_type))
            t = value.parts["weight_packed"]
            if t.dtype != torch.uint8 or t.dim() != 2 or t.shape[0] != value.shape[0]:
                raise InputError(f"{name}: {value.format} weight_packed must be uint8 (rows, row_bytes)")
        else:
            raise InputError(f"{name}: format {value.format!r} has no GGUF type (use a GGUF block type or fp16)")
        shape = tuple(int(d) for d in value.shape)
    elif isinstance(value, torch.Tensor):
        typ, t, shape = T.F32, _shifted(template, hf, value.detach().to(torch.float32)), tuple(value.shape)
    else:
        raise InputError(f"{name}: cannot store a {type(value).__name__} in a GGUF file")
    t = to_gguf_rows(t.detach().cpu().contiguous(), n_heads)
    shape = tuple(int(d) for d in shape)
    raw = t.contiguous().view(torch.uint8).numpy().reshape(-1)
    return GGUFTensor(name, shape, typ, np.ascontiguousarray(raw))


def stacked(name: str, values: Sequence[TensorLike]) -> TensorLike:
    """The value of GGUF tensor ``name`` from its members (:meth:`GGUFNames.members`): one value as it is; the
    experts of one MoE layer and projection as llama.cpp's 3-D tensor ``(experts, rows, cols)``: float
    tensors stacked, or QTensors of ONE GGUF type with their block rows concatenated (expert-major, as the
    converter's ``torch.stack`` lays them out)."""
    if len(values) == 1:
        return values[0]
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.detach().to(torch.float32) for v in values])
    if not all(isinstance(v, QTensor) for v in values):
        raise InputError(f"{name}: cannot stack {sorted({type(v).__name__ for v in values})}")
    fids = sorted({v.format for v in values})  # type: ignore[union-attr]
    if len(fids) != 1:
        raise InputError(f"{name}: its experts have the formats {fids}; llama.cpp stores one type per stacked "
                         "tensor (allocate with the map's expert tie constraints)")
    fmt = get_format(fids[0])
    if not hasattr(fmt, "gguf_type"):
        raise InputError(f"{name}: format {fids[0]!r} has no GGUF type")
    rows, cols = (int(d) for d in values[0].shape)  # type: ignore[union-attr]
    raw = torch.cat([v.parts["weight_packed"] for v in values])  # type: ignore[union-attr]
    return GGUFTensor(name, (len(values), rows, cols), GGMLQuantizationType(int(fmt.gguf_type)),
                      np.ascontiguousarray(raw.numpy()).reshape(-1))


def _shifted(template: GGUFTemplate, hf: str | None, t: torch.Tensor) -> torch.Tensor:
    """A float value as llama.cpp's converter stores it (Gemma's norms: ``1 + w``)."""
    shift = 0.0 if hf is None else template.names.norm_shift(hf)
    return t + shift if shift else t


def _ordered(template: GGUFTemplate, names: Iterable[str]) -> list[str]:
    """Template tensor order first, then any extra names in their given order; all template tensors required."""
    names = list(names)
    have = set(names)
    missing = [n for n, _, _ in template.tensors if n not in have]
    if missing:
        raise InputError(f"tensors missing for the GGUF export: {', '.join(missing[:8])}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    known = {n for n, _, _ in template.tensors}
    return [n for n, _, _ in template.tensors] + [n for n in names if n not in known]


def gguf_file_size(
    template_gguf: str | os.PathLike[str] | GGUFTemplate,
    tensors: Mapping[str, tuple[Sequence[int], GGMLQuantizationType | int]],
    file_type: int | None = None,
) -> int:
    """Exact size of the GGUF :func:`write_gguf` would write for these (numpy shape, ggml type) pairs."""
    tpl = template_gguf if isinstance(template_gguf, GGUFTemplate) else read_template(template_gguf)
    entries = [(n, tuple(int(d) for d in tensors[n][0]), GGMLQuantizationType(int(tensors[n][1])))
               for n in _ordered(tpl, tensors)]
    return gguf_layout(tpl, entries, file_type).file_size


@dataclass(frozen=True)
class WrittenGGUF:
    path: Path
    file_size: int
    n_tensors: int
    file_type: int


def write_gguf(
    out_path: str | os.PathLike[str],
    template_gguf: str | os.PathLike[str] | GGUFTemplate,
    tensors: Mapping[str, TensorLike],
    *,
    file_type: int | None = None,
    overwrite: bool = False,
) -> WrittenGGUF:
    """Write ``tensors`` (GGUF name -> value) with the template's metadata; verify, then rename into place."""
    tpl = template_gguf if isinstance(template_gguf, GGUFTemplate) else read_template(template_gguf)
    out = Path(out_path)
    items = [to_gguf_tensor(n, tensors[n], tpl) for n in _ordered(tpl, tensors)]
    entries = [(g.name, g.shape, g.ggml_type) for g in items]
    ftype = choose_file_type(entries) if file_type is None else int(file_type)
    layout = gguf_layout(tpl, entries, ftype)

    def verify(tmp: Path) -> None:
        verify_gguf(tmp, tpl, items, ftype, layout.file_size)

    with atomic_write(out, overwrite=overwrite, inputs=[tpl.path], verify=verify) as f:
        f.write(layout.header)
        for g in items:
            f.write(memoryview(g.data))
            f.write(b"\0" * (_pad(g.data.nbytes, tpl.alignment) - g.data.nbytes))
    log.info("wrote %s: %d tensors, %d bytes", out, len(items), layout.file_size)
    return WrittenGGUF(out, layout.file_size, len(items), ftype)


def verify_gguf(path: str | os.PathLike[str], template: GGUFTemplate, items: Sequence[GGUFTensor],
                file_type: int, file_size: int) -> None:
    """Re-read ``path`` (strict reader) and compare size, every KV pair and each tensor's type, shape, bytes."""
    size = os.path.getsize(path)
    if size != file_size:
        raise OSError(f"{path}: wrote {size} bytes, expected {file_size}")
    try:
        f = GGUFFile(path)
    except InputError as exc:
        raise OSError(f"{path}: the written file does not parse ({exc})") from None
    with f:
        with open(path, "rb") as fh:
            got_kv = dict(_kv_ranges(fh.read(f.data_start), len(f.fields)))
        for key, raw in template.kv:
            if key not in got_kv:
                raise OSError(f"{path}: metadata key {key!r} lost")
            if key != FILE_TYPE_KEY and got_kv[key] != raw:
                raise OSError(f"{path}: metadata key {key!r} differs after writing")
        if f.fields[FILE_TYPE_KEY].value != file_type:
            raise OSError(f"{path}: {FILE_TYPE_KEY} differs after writing")
        if list(f.tensors) != [g.name for g in items]:
            raise OSError(f"{path}: tensor list differs after writing")
        for g in items:
            info = f.tensors[g.name]
            if info.type != g.ggml_type or info.shape != g.shape:
                raise OSError(f"{path}: tensor {g.name} header differs after writing")
            if not np.array_equal(f.raw(g.name), g.data):
                raise OSError(f"{path}: tensor {g.name} data differs after writing")


def export_f32_gguf(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    template_gguf: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> WrittenGGUF:
    """Every tensor of ``model`` (HF names) as F32 in a GGUF with the template's metadata.

    An ``lm_head`` that is not the tied embedding is written as ``output.weight`` even when the template
    has none (llama.cpp uses it when present).  Runtime tensors of the template (``rope_freqs``) are kept.
    """
    tpl = read_template(template_gguf)
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    tensors: dict[str, Any] = {}
    with GGUFFile(tpl.path) as f:
        for name, _shape, _typ in tpl.tensors:
            members = tpl.names.members(name)
            if not members:
                tensors[name] = runtime_tensor(f, name)
                continue
            for hf in members:
                if hf not in sd:
                    raise InputError(f"model has no tensor {hf!r} (GGUF {name})")
            tensors[name] = stacked(name, [sd[m] for m in members])
    head, emb = sd.get("lm_head.weight"), sd.get(tpl.names.to_hf("token_embd.weight") or "")
    if "output.weight" not in tensors and head is not None and not (emb is not None and torch.equal(head, emb)):
        tensors["output.weight"] = head
    return write_gguf(out, tpl, tensors, file_type=int(LlamaFileType.ALL_F32), overwrite=overwrite)


def runtime_tensor(f: GGUFFile, name: str) -> GGUFTensor:
    """A tensor of an open GGUF that is not a model parameter (``rope_freqs``), kept byte for byte."""
    info = f.tensors[name]
    return GGUFTensor(name, tuple(int(d) for d in info.shape), GGMLQuantizationType(int(info.type)),
                      np.array(f.raw(name), dtype=np.uint8))  # a copy: the map closes with the file
