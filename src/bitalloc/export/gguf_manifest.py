"""The GGUF output's manifest and the verified write (:func:`write_prepared`).

Beside ``OUT.gguf`` lies ``OUT.gguf.manifest.json`` (the packed export's conventions)::

    {"version": 1, "kind": "bitalloc.manifest",
     "files": {"OUT.gguf": <SHA-256 of the whole file>},
     "tensors": {<GGUF tensor name>: <SHA-256 of its raw data bytes as stored, padding excluded>}}

Every digest is computed from the bytes about to be written, before anything is written
(:func:`prepare_gguf`).  The manifest is written first (atomically), then the GGUF (atomically, re-read and
compared tensor by tensor by :func:`bitalloc.export.gguf.write_gguf`), then the final file is read once more and
checked against the manifest (:func:`verify_gguf_manifest`).  So whenever ``OUT.gguf`` exists its manifest is
complete; a kill between the two renames leaves a manifest without a GGUF, which the rerun replaces.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError, output_exists
from ..io.atomic import atomic_write, compare_digests, file_digest
from ..io.gguf import GGUFFile
from ..io.paths import check_overlap
from .gguf import GGUFTemplate, GGUFTensor, WrittenGGUF, choose_file_type, gguf_layout, to_gguf_tensor, write_gguf

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"

def manifest_path(out: str | os.PathLike[str]) -> Path:
    """``OUT.gguf.manifest.json`` beside ``OUT.gguf``."""
    p = Path(out)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def raw_digest(data: np.ndarray | memoryview | bytes) -> str:
    """SHA-256 of a tensor's raw bytes as stored in the GGUF (what ``GGUFReader`` calls its ``data``)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).hexdigest()


@dataclass(frozen=True, eq=False)
class PreparedGGUF:
    """A GGUF ready to write: tensors as raw blocks in file order, its file type, size and manifest."""

    items: dict[str, GGUFTensor]
    file_type: int
    file_size: int
    manifest: dict[str, Any]

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data, padding excluded (what a bits-per-weight budget counts)."""
        return sum(g.data.nbytes for g in self.items.values())


def prepare_gguf(out_name: str, template: GGUFTemplate, tensors: Mapping[str, Any]) -> PreparedGGUF:
    """Convert ``tensors`` (GGUF name -> QTensor / tensor / GGUFTensor) and compute the manifest of the file
    :func:`~bitalloc.export.gguf.write_gguf` will write (template tensor order, then extras)."""
    known = [n for n, _, _ in template.tensors]
    missing = [n for n in known if n not in tensors]
    if missing:
        raise InputError(f"tensors missing for the GGUF export: {', '.join(missing[:8])}")
    order = known + [n for n in tensors if n not in set(known)]
    items = {n: to_gguf_tensor(n, tensors[n], template) for n in order}
    entries = [(g.name, g.shape, g.ggml_type) for g in items.values()]
    ftype = choose_file_type(entries)
    layout = gguf_layout(template, entries, ftype)
    h = hashlib.sha256(layout.header)
    align = template.alignment
    for g in items.values():
        h.update(memoryview(g.data))
        h.update(b"\0" * (-g.data.nbytes % align))
    man = {"version": 1, "kind": "bitalloc.manifest", "files": {out_name: h.hexdigest()},
           "tensors": {n: raw_digest(g.data) for n, g in sorted(items.items())}}
    return PreparedGGUF(items, ftype, layout.file_size, man)


def _manifest_text(man: Mapping[str, Any]) -> bytes:
    return (json.dumps(man, indent=1, sort_keys=True) + "\n").encode()


def read_gguf_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    path = manifest_path(out)
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(man["files"], dict) or not isinstance(man["tensors"], dict):
            raise TypeError("files and tensors must be objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is missing or malformed ({e})") from e
    return man


def verify_gguf_manifest(out: str | os.PathLike[str], expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Re-read ``out``: its SHA-256 and every tensor's raw-bytes SHA-256 must match the manifest beside it
    (and the manifest must equal ``expected`` when given); returns the manifest.  InputError names what differs."""
    p = Path(out)
    man = read_gguf_manifest(p)
    if expected is not None and dict(man) != dict(expected):
        raise InputError(f"{manifest_path(p)} is not the manifest this job meant to write")
    compare_digests(man["files"], {p.name: file_digest(p)}, str(p))
    try:
        f = GGUFFile(p)
    except InputError as e:
        raise InputError(f"{p} does not parse ({e})") from None
    with f:
        compare_digests(man["tensors"], {n: raw_digest(f.raw(n)) for n in f.tensors}, str(p))
    return man


def write_prepared(out: str | os.PathLike[str], template: GGUFTemplate, prep: PreparedGGUF, *,
                   overwrite: bool = False) -> WrittenGGUF:
    """Write the manifest, then the GGUF (verified by write_gguf), then check the final file against it."""
    out = Path(out)
    mpath = manifest_path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise output_exists(out)
    check_overlap([("output", out), ("manifest", mpath)], [("input", template.path)])  # before the manifest
    if mpath.is_dir():
        raise InputError(f"{mpath} is a directory; the manifest cannot be written")
    with atomic_write(mpath, overwrite=True, inputs=[template.path]) as f:  # describes the file written next
        f.write(_manifest_text(prep.manifest))
    try:
        written = write_gguf(out, template, prep.items, file_type=prep.file_type, overwrite=overwrite)
        verify_gguf_manifest(out, prep.manifest)
    except BaseException:
        if not out.exists():
            mpath.unlink(missing_ok=True)
        raise
    log.info("verified %s against %s", out, mpath)
    return written


def write_gguf_verified(out: str | os.PathLike[str], template: GGUFTemplate, tensors: Mapping[str, Any], *,
                        overwrite: bool = False) -> WrittenGGUF:
    """:func:`~bitalloc.export.gguf.write_gguf` plus the manifest beside it, the final file checked against it."""
    prep = prepare_gguf(Path(out).name, template, tensors)
    return write_prepared(out, template, prep, overwrite=overwrite)


__all__ = ["MANIFEST_SUFFIX", "PreparedGGUF", "manifest_path", "prepare_gguf", "raw_digest", "read_gguf_manifest",
           "verify_gguf_manifest", "write_gguf_verified", "write_prepared"]
