"""A strict, memory-mapped safetensors reader and an atomic, verified writer.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section.  Everything
in the header is validated before any tensor is touched: the header length (at most 100 MB and within the
file), the JSON (an object, no duplicate keys), dtypes, shapes (non-negative ints whose byte size matches
the span), offsets (in range, non-overlapping, covering the data section exactly) and ``__metadata__``
(str -> str).  Tensors are views of a private (copy-on-write) memory map: ``get`` reads nothing up front.
"""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from .mapped import MappedFile
from .paths import open_regular
from ..errors import InputError, NumericsError
from .atomic import PathLike, atomic_write, compare_digests, tensor_bytes, tensor_digest, write_manifest

MAX_HEADER_BYTES = 100_000_000
_MAX_BYTES = 2**63 - 1
METADATA_KEY = "__metadata__"
MANIFEST_SUFFIX = ".manifest.json"

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(name: str, entry: Any, data_len: int, bad: Any) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {name!r}: entry must be an object with exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise bad(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r:.80}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"tensor {name!r}: data_offsets must be two integers, got {offsets!r:.80}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the data section of {data_len} bytes")
    nbytes = DTYPES[dtype].itemsize
    for d in shape:  # product with an overflow bound at every step
        nbytes *= d
        if nbytes > _MAX_BYTES:
            raise bad(f"tensor {name!r}: shape {shape} overflows (more than 2**63 bytes)")
    if nbytes != end - begin:
        raise bad(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_coverage(infos: Iterable[TensorInfo], data_len: int, bad: Any) -> None:
    pos, prev = 0, None
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin < pos:
            raise bad(f"tensors {prev!r} and {info.name!r} overlap (bytes {info.begin}..{pos})")
        if info.begin > pos:
            raise bad(f"gap of {info.begin - pos} unused bytes before tensor {info.name!r} at offset {pos}")
        pos, prev = info.end, info.name
    if pos != data_len:
        raise bad(f"{data_len - pos} trailing bytes after the last tensor")


class SafetensorsFile(MappedFile):
    """A validated safetensors file.  ``get(name)`` returns a tensor backed by the memory map."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            with open_regular(self.path, "safetensors file") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise self._bad(f"file is {size} bytes, too short for a header")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES:
                    raise self._bad(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
                if n > size - 8:
                    raise self._bad(f"header length {n} is larger than the file ({size} bytes)")
                raw = f.read(n)
                self._data_start = 8 + n
                self._infos, self._metadata = self._parse_header(raw, size - 8 - n)
                if size > 0:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    def _bad(self, what: str) -> InputError:
        return InputError(f"invalid safetensors file {self.path}: {what}")

    def _parse_header(self, raw: bytes, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError as exc:
            raise self._bad(f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except (ValueError, RecursionError) as exc:
            raise self._bad(f"header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._bad(f"header must be a JSON object, got {type(header).__name__}")
        metadata = header.pop(METADATA_KEY, {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._bad("__metadata__ must be an object mapping strings to strings")
        infos = {name: _parse_entry(name, e, data_len, self._bad) for name, e in header.items()}
        _check_coverage(infos.values(), data_len, self._bad)
        return infos, metadata

    # -------------------------------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise InputError(f"{self.path} has no tensor {name!r}") from None

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, a view of the memory map (copy-on-write: writes never reach the file)."""
        info = self.info(name)
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        if self._mm is None:
            raise InputError(f"{self.path} is closed")
        # numpy holds a buffer export on the map, so close() cannot unmap memory a tensor still uses
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=self._data_start + info.begin)
        return torch.from_numpy(raw).view(dtype).reshape(info.shape)



def check_finite(t: torch.Tensor, name: str, *, chunk: int = 1 << 24) -> None:
    """Raise NumericsError naming ``name`` if ``t`` holds NaN or Inf (checked in chunks: bounded memory)."""
    if not (t.is_floating_point() or t.is_complex()):
        return
    flat = t.reshape(-1)
    nan = inf = 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i : i + chunk]
        if part.dtype.itemsize == 1:  # float8: widen for the checks
            part = part.float()
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    if nan or inf:
        raise NumericsError(f"tensor {name} has {nan} NaN and {inf} Inf values (of {flat.numel()})")


# ----------------------------------------------------------------------------------------------- writer
def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InputError("safetensors metadata must map strings to strings")
        header[METADATA_KEY] = dict(sorted(metadata.items()))
    order = sorted(tensors)
    pos = 0
    for name in order:
        t = tensors[name]
        if not isinstance(name, str) or name == METADATA_KEY:
            raise InputError(f"invalid tensor name {name!r}")
        if t.dtype not in DTYPE_NAMES:
            raise InputError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
    return raw, order


def verify_safetensors(
    path: PathLike, expected: Mapping[str, str], metadata: Mapping[str, str] | None = None
) -> None:
    """Re-read ``path`` and check every tensor against ``expected`` digests (from :func:`tensor_digest`)."""
    with SafetensorsFile(path) as sf:
        compare_digests(expected, {n: tensor_digest(sf.get(n)) for n in sf.keys()}, str(path))
        if metadata is not None and sf.metadata() != dict(metadata):
            raise InputError(f"{path}: metadata read back differs from what was written")


def write_safetensors_atomic(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    manifest: bool = True,
) -> dict[str, str]:
    """Write ``tensors`` to ``path`` atomically, re-read and verify them before the rename, and (with
    ``manifest``) write ``<path>.manifest.json`` of per-tensor SHA-256 digests.  Returns the digests."""
    raw, order = _header(tensors, metadata)
    digests = {name: tensor_digest(tensors[name]) for name in order}
    with atomic_write(
        path, overwrite=overwrite, inputs=inputs,
        verify=lambda tmp: verify_safetensors(tmp, digests, metadata or {}),
    ) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            if tensors[name].numel():
                f.write(tensor_bytes(tensors[name]))
    if manifest:
        write_manifest(manifest_path(path), digests, overwrite=True)
    return digests


def manifest_path(path: PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def iter_tensors(path: PathLike, *, finite: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time (memory-mapped); with ``finite`` check each for NaN/Inf."""
    with SafetensorsFile(path) as sf:
        for name in sf.keys():
            t = sf.get(name)
            if finite:
                check_finite(t, f"{name} in {path}")
            yield name, t


__all__ = [
    "DTYPES", "MAX_HEADER_BYTES", "SafetensorsFile", "TensorInfo", "check_finite", "iter_tensors",
    "manifest_path", "verify_safetensors", "write_safetensors_atomic",
]
