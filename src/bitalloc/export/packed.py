"""The packed safetensors directory: one self-describing ``model.safetensors`` plus ``bitalloc.json``.

Tensor ``X.weight`` stored in a grid format becomes ``X.weight_packed``, ``X.weight_scale`` and
``X.weight_zero`` (the parts of its :class:`~bitalloc.formats.QTensor`); a pass-through tensor (fp16 norms,
biases, kept tensors) keeps its own name.  ``bitalloc.json`` lists every tensor's format id, shape, dtype and
parts, the plan, the total bytes and bpw; the HF config and tokenizer sit beside them; ``manifest.json``
holds the SHA-256 of every stored tensor and of every other file.  The directory is written under a temporary
sibling name (:func:`bitalloc.io.atomic.atomic_write_dir`), re-read and compared tensor by tensor and file by
file, then renamed into place: the output is either absent or complete.  The bytes are a pure function of the
inputs (sorted tensors, sorted JSON, no timestamps), so a resumed job writes an identical directory.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import InputError
from ..formats import QTensor, get_format
from ..io.atomic import atomic_write_dir, compare_digests, manifest, tensor_digest
from ..io.paths import check_overlap, check_replaceable
from ..io.safetensors import SafetensorsFile, write_safetensors_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bitalloc.json"
MANIFEST_FILE = "manifest.json"


def part_key(name: str, part: str) -> str:
    """On-disk name of ``part`` of tensor ``name``: ``a.b.weight`` + ``weight_scale`` -> ``a.b.weight_scale``;
    a bias keeps its own stem (``a.b.bias`` + ``weight`` -> ``a.b.bias``)."""
    prefix, _, stem = name.rpartition(".")
    if not part.startswith("weight"):
        raise InputError(f"unexpected part name {part!r} of {name}")
    key = stem + part[len("weight"):]
    return f"{prefix}.{key}" if prefix else key


def _flatten(qtensors: Mapping[str, QTensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, q in sorted(qtensors.items()):
        fmt = get_format(q.format)
        if q.nbytes() != fmt.nbytes(tuple(q.shape)):
            raise InputError(f"{name}: stored parts take {q.nbytes()} B, format {q.format} says {fmt.nbytes(q.shape)}")
        parts = {}
        for part, t in q.parts.items():
            key = part_key(name, part)
            if key in tensors:
                raise InputError(f"two tensors would be stored as {key!r}")
            tensors[key] = t.detach().contiguous().cpu()
            parts[part] = key
        meta[name] = {"format": q.format, "shape": list(q.shape), "dtype": q.dtype, "parts": parts,
                      "bytes": q.nbytes()}
    return tensors, meta


def flat_digests(qtensors: Mapping[str, QTensor]) -> dict[str, str]:
    """SHA-256 of every stored part (by on-disk name), as ``manifest.json`` lists them under ``tensors``."""
    tensors, _ = _flatten(qtensors)
    return {k: tensor_digest(t) for k, t in sorted(tensors.items())}


def verify_packed(path: str | os.PathLike, tensors: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check a packed directory against its ``manifest.json`` (every file, every tensor re-hashed) and, when
    given, against the expected tensor digests; returns the manifest.  InputError names what differs."""
    p = Path(path)
    try:
        man = json.loads((p / MANIFEST_FILE).read_text())
        files, stored = dict(man["files"]), dict(man["tensors"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{p}: {MANIFEST_FILE} is missing or malformed ({e})") from e
    actual = manifest(p)
    actual.pop(MANIFEST_FILE, None)
    compare_digests(files, actual, f"{p}")
    with SafetensorsFile(p / WEIGHTS_FILE) as sf:
        compare_digests(stored, {n: tensor_digest(sf.get(n)) for n in sf.keys()}, str(p / WEIGHTS_FILE))
    if tensors is not None:
        compare_digests(dict(tensors), stored, f"{p} (against the quantized tensors)")
    return man


def save_packed(
    out_dir: str | os.PathLike,
    model: nn.Module,
    view: Any,
    qtensors: Mapping[str, QTensor],
    plan: Any,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Write the packed directory and return its ``bitalloc.json`` content (after re-reading and checking it).

    ``inputs`` (and the folder the model was loaded from, ``model.config._name_or_path``): refused as ``out_dir``,
    as its parent or inside it (:func:`bitalloc.io.paths.check_overlap`), so no input is ever replaced."""
    out = Path(out_dir)
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    inputs = [*inputs, *([source] if source and Path(source).exists() else [])]
    check_overlap([("output directory", out)], [("input", p) for p in inputs])  # before any work
    if out.exists() and not overwrite:
        raise InputError(f"output directory {out} already exists (choose another path or allow overwriting)")
    if out.is_dir() and not out.is_symlink():
        check_replaceable(out, "output directory")  # never a folder of other files
    expected = {n for n, _ in model.named_parameters()}
    if set(qtensors) != expected:
        missing = sorted(expected - set(qtensors))[:3]
        extra = sorted(set(qtensors) - expected)[:3]
        raise InputError(f"the quantized tensors do not cover the model: missing {missing}, unknown {extra}")
    tensors, meta = _flatten(qtensors)
    nbytes = sum(m["bytes"] for m in meta.values())
    nparams = sum(p.numel() for p in model.parameters())
    plan_json = json.loads(plan.to_json()) if hasattr(plan, "to_json") else plan
    if plan_json is not None and hasattr(plan, "total_bytes") and plan.total_bytes != nbytes:
        raise InputError(f"stored tensors take {nbytes} B but the plan accounts {plan.total_bytes} B")
    info = {
        "format_version": FORMAT_VERSION,
        "kind": "bitalloc.packed",
        "bytes": nbytes,
        "bpw": 8.0 * nbytes / nparams,
        "total_params": nparams,
        "tied": bool(getattr(model.config, "tie_word_embeddings", False)),
        "tensors": meta,
        "plan": plan_json,
    }
    meta_text = json.dumps(info, indent=1, sort_keys=True) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)

    def verify(tmp: Path) -> None:
        if json.loads((tmp / META_FILE).read_text()) != json.loads(meta_text):
            raise InputError(f"verification of {META_FILE} failed")
        verify_packed(tmp, digests)

    with atomic_write_dir(out, overwrite=overwrite, inputs=inputs, verify=verify) as tmp:
        # re-read and compared tensor by tensor before its own rename
        digests = write_safetensors_atomic(tmp / WEIGHTS_FILE, tensors, {"format": "bitalloc-packed"}, manifest=False)
        (tmp / META_FILE).write_text(meta_text)
        model.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = manifest(tmp)
        man = {"version": 1, "kind": "bitalloc.manifest", "tensors": digests, "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    log.info("wrote %s: %d tensors, %d B (%.4f bpw), verified", out, len(meta), nbytes, info["bpw"])
    return info


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, QTensor]]:
    """``(bitalloc.json, {tensor: QTensor})`` of a packed directory (InputError when it is not one)."""
    p = Path(path)
    meta_path, weights = p / META_FILE, p / WEIGHTS_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise InputError(f"{p} is not a bitalloc packed directory (needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        info = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {meta_path}: {e}") from e
    if info.get("kind") != "bitalloc.packed" or info.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{meta_path} is not a version-{FORMAT_VERSION} bitalloc packed description")
    try:
        stored = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for broken files
        raise InputError(f"cannot read {weights}: {e}") from e
    out: dict[str, QTensor] = {}
    try:
        for name, m in info["tensors"].items():
            parts = {part: stored[key] for part, key in m["parts"].items()}
            out[name] = QTensor(format=m["format"], shape=tuple(m["shape"]), dtype=m["dtype"], parts=parts)
    except (KeyError, TypeError) as e:
        raise InputError(f"{p}: {META_FILE} does not match {WEIGHTS_FILE} ({e})") from e
    return info, out
