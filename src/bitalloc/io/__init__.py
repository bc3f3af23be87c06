"""Hardened readers and atomic, verified writers.

* :class:`SafetensorsFile`, :class:`GGUFFile`: strict memory-mapped readers; any malformed or hostile file
  raises :class:`bitalloc.errors.InputError` before a large allocation.
* :func:`atomic_write`, :func:`atomic_write_dir`: outputs that are either absent or complete.
* :func:`write_safetensors_atomic`: write, re-read, verify, rename, plus a per-tensor SHA-256 manifest.
* :mod:`.paths`: inputs checked without opening them, and outputs that are, lie inside or contain an input refused.
"""
from __future__ import annotations

from .atomic import (
    atomic_write, atomic_write_dir, file_digest, manifest, remove_stale_temps, tensor_digest,
    verify_manifest, write_manifest,
)
from .gguf import GGUFFile, GGUFTensorInfo
from .safetensors import SafetensorsFile, check_finite, iter_tensors, write_safetensors_atomic

__all__ = [
    "GGUFFile", "GGUFTensorInfo", "SafetensorsFile", "atomic_write", "atomic_write_dir", "check_finite",
    "file_digest", "iter_tensors", "manifest", "remove_stale_temps", "tensor_digest", "verify_manifest",
    "write_manifest", "write_safetensors_atomic",
]
