"""A strict GGUF reader (little-endian, versions 2 and 3) that is safe on hostile bytes.

Every count and length is checked against the bytes that remain *before* anything is allocated: tensor
and key counts against the smallest size their records could take, string and array lengths against the
rest of the file, nesting depth, tensor ranks (1..4), positive dims with an overflow-checked product,
known ggml types (block and type sizes from ``gguf.GGML_QUANT_SIZES``), rows divisible by the block size,
data offsets aligned to ``general.alignment`` (a power of two), in range and non-overlapping, no duplicate
keys or tensor names.  Any byte string either parses or raises :class:`InputError`.

Tensor data is never read up front: ``raw(name)`` is a view of a private memory map.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .mapped import MappedFile
from .paths import open_regular
from ..errors import InputError
from .atomic import PathLike

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_DEPTH = 3  # arrays of arrays of arrays
_MAX_BYTES = 2**63 - 1
_MIN_KV = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_SCALAR = {  # value type -> (struct code, numpy dtype)
    GGUFValueType.UINT8: ("<B", "<u1"), GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.FLOAT64: ("<d", "<f8"),
    GGUFValueType.BOOL: ("<B", "<u1"),
}
_TORCH = {
    GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16, GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8, GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32, GGMLQuantizationType.I64: torch.int64,
}


@dataclass(frozen=True)
class GGUFField:
    """A metadata key: its value type, the element type for arrays (else None) and the Python value."""

    key: str
    type: GGUFValueType
    value: Any
    elem_type: GGUFValueType | None = None


@dataclass(frozen=True)
class GGUFTensorInfo:
    """``dims`` as stored (ne0 first: the contiguous dim); ``shape`` is the torch order (reversed)."""

    name: str
    dims: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: memoryview, bad: Any) -> None:
        self.buf, self.pos, self.bad = buf, 0, bad

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.bad(f"{what} needs {n} bytes at offset {self.pos} but only {self.left} remain (truncated?)")

    def scalar(self, code: str, what: str) -> Any:
        size = struct.calcsize(code)
        self.need(size, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, *, strict: bool = True) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8", errors="strict" if strict else "surrogateescape")
        except UnicodeDecodeError as exc:
            raise self.bad(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _value_type(raw: int, cur: _Cursor, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cur.bad(f"{what}: unknown value type {raw}") from None


def _min_size(t: GGUFValueType) -> int:
    if t == GGUFValueType.STRING:
        return 8
    if t == GGUFValueType.ARRAY:
        return 12
    return struct.calcsize(_SCALAR[t][0])


def _read_value(cur: _Cursor, t: GGUFValueType, what: str, depth: int) -> tuple[Any, GGUFValueType | None]:
    if t == GGUFValueType.STRING:
        return cur.string(what, strict=False), None
    if t == GGUFValueType.ARRAY:
        if depth >= MAX_DEPTH:
            raise cur.bad(f"{what}: arrays nested deeper than {MAX_DEPTH}")
        et = _value_type(cur.u32(f"{what} element type"), cur, what)
        n = cur.u64(f"{what} length")
        if n * _min_size(et) > cur.left:
            raise cur.bad(f"{what}: array of {n} {et.name} elements cannot fit in the {cur.left} bytes left")
        if et in _SCALAR:
            size = _min_size(et)
            arr = np.frombuffer(cur.buf, dtype=_SCALAR[et][1], count=n, offset=cur.pos)
            cur.pos += n * size
            if et == GGUFValueType.BOOL and n and int(arr.max()) > 1:
                raise cur.bad(f"{what}: boolean array holds a value other than 0/1")
            return (arr.astype(bool) if et == GGUFValueType.BOOL else arr).tolist(), et
        return [_read_value(cur, et, f"{what}[{i}]", depth + 1)[0] for i in range(n)], et
    v = cur.scalar(_SCALAR[t][0], what)
    if t == GGUFValueType.BOOL:
        if v > 1:
            raise cur.bad(f"{what}: boolean value {v}")
        v = bool(v)
    return v, None


class GGUFFile(MappedFile):
    """A validated GGUF file: ``fields``/``metadata``, ``tensors`` (infos) and lazy tensor data."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            with open_regular(self.path, "GGUF file") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise self._bad(f"file is {size} bytes, too short for a GGUF header")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            with memoryview(self._mm) as buf:
                self._parse(buf)
        except BaseException:
            self.close()
            raise

    def _bad(self, what: str) -> InputError:
        return InputError(f"invalid GGUF file {self.path}: {what}")

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf, self._bad)
        if bytes(buf[:4]) != MAGIC:
            raise self._bad(f"bad magic {bytes(buf[:4])!r}, expected {MAGIC!r}")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file?)" if swapped in VERSIONS else ""
            raise self._bad(f"unsupported version {self.version}{hint}; supported: {VERSIONS}")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("key count")
        for n, what in ((n_tensors, "tensor count"), (n_kv, "key count")):
            if n >= 2**63:
                raise self._bad(f"{what} is negative ({n - 2**64})")
        if n_tensors * _MIN_TENSOR + n_kv * _MIN_KV > cur.left:
            raise self._bad(f"{n_tensors} tensors and {n_kv} keys cannot fit in a file of {len(buf)} bytes")
        self.fields: dict[str, GGUFField] = {}
        for i in range(n_kv):
            key = cur.string(f"key #{i}")
            if key in self.fields:
                raise self._bad(f"duplicate key {key!r}")
            t = _value_type(cur.u32(f"type of {key!r}"), cur, f"key {key!r}")
            value, et = _read_value(cur, t, f"value of {key!r}", 0)
            self.fields[key] = GGUFField(key, t, value, et)
        self.alignment = self._alignment()
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        self.data_start = -cur.pos % self.alignment + cur.pos
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for info in infos:
            if info.name in self.tensors:
                raise self._bad(f"duplicate tensor name {info.name!r}")
            self.tensors[info.name] = info
        self._check_layout(len(buf))

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        a = field.value
        if field.type != GGUFValueType.UINT32 or a <= 0 or a & (a - 1):
            raise self._bad(f"general.alignment must be a power of two (uint32), got {a!r}")
        return a

    def _tensor_info(self, cur: _Cursor, i: int) -> GGUFTensorInfo:
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._bad(f"tensor {name!r} has {n_dims} dimensions (allowed: 1..{MAX_DIMS})")
        dims = tuple(cur.u64(f"dims of tensor {name!r}") for _ in range(n_dims))
        raw_type = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        try:
            gtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[gtype]
        except (ValueError, KeyError):
            raise self._bad(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        numel = 1
        for d in dims:
            if not 1 <= d < 2**63:
                raise self._bad(f"tensor {name!r} has dims {list(dims)}: each must be positive")
            numel *= d
            if numel > _MAX_BYTES:
                raise self._bad(f"tensor {name!r}: dims {list(dims)} overflow (product over 2**63)")
        if dims[0] % block:
            raise self._bad(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {gtype.name} block size {block}")
        nbytes = numel // block * type_size
        if nbytes > _MAX_BYTES:
            raise self._bad(f"tensor {name!r}: size of dims {list(dims)} overflows")
        return GGUFTensorInfo(name, dims, gtype, offset, nbytes)

    def _check_layout(self, size: int) -> None:
        data_len = size - self.data_start
        if self.tensors and data_len < 0:
            raise self._bad(f"data section starts at {self.data_start}, past the end of the file ({size} bytes)")
        end, prev = 0, None
        for info in sorted(self.tensors.values(), key=lambda t: (t.offset, t.nbytes)):
            if info.offset % self.alignment:
                raise self._bad(f"tensor {info.name!r}: offset {info.offset} is not a multiple of the alignment {self.alignment}")
            if info.offset + info.nbytes > data_len:
                raise self._bad(
                    f"tensor {info.name!r}: bytes {info.offset}..{info.offset + info.nbytes} of the data section "
                    f"are past the end of the file (data section is {data_len} bytes)"
                )
            if info.offset < end:
                raise self._bad(f"tensors {prev!r} and {info.name!r} overlap")
            end, prev = info.offset + info.nbytes, info.name

    # -------------------------------------------------------------------------------------- access
    @property
    def metadata(self) -> dict[str, Any]:
        return {k: f.value for k, f in self.fields.items()}

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.path} has no tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (uint8), a copy-on-write view of the memory map."""
        info = self.info(name)
        if self._mm is None:
            raise InputError(f"{self.path} is closed")
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=self.data_start + info.offset)

    def get(self, name: str) -> torch.Tensor:
        """An unquantized tensor (F32/F16/BF16/F64/I8..I64) in torch order, backed by the memory map."""
        info = self.info(name)
        if info.type not in _TORCH:
            raise InputError(f"tensor {name!r} in {self.path} is {info.type.name}; use dequantize()")
        raw = torch.from_numpy(self.raw(name))
        return raw.view(_TORCH[info.type]).reshape(info.shape)

    def dequantize(self, name: str) -> torch.Tensor:
        """Any tensor as float32 in torch order (one tensor's worth of memory)."""
        info = self.info(name)
        if info.type in _TORCH:
            return self.get(name).to(torch.float32)
        from gguf.quants import dequantize

        try:
            values = dequantize(self.raw(name), info.type)
        except NotImplementedError as exc:
            raise InputError(f"tensor {name!r} in {self.path}: cannot decode {info.type.name}") from exc
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)



__all__ = ["GGUFField", "GGUFFile", "GGUFTensorInfo", "MAX_DIMS", "MAX_DEPTH"]
