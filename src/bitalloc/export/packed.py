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

import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from ..checked import Checker, one_line, read_json, short
from ..errors import InputError
from ..formats import QTensor, get_format
from ..io.atomic import atomic_write_dir, compare_digests, manifest, tensor_digest
from ..io.paths import check_new_dir
from ..io.safetensors import SafetensorsFile, write_safetensors_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bitalloc.json"
MANIFEST_FILE = "manifest.json"
#: The original dtypes a stored tensor may name.
DTYPES = ("float32", "float16", "bfloat16", "float64")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def read_packed_manifest(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """``{"files": {name: sha256}, "tensors": {key: sha256}}`` of a packed directory's ``manifest.json``."""
    p = Path(path)
    source = f"{p / MANIFEST_FILE}"
    if not (p / MANIFEST_FILE).is_file():
        raise InputError(f"{p}: {MANIFEST_FILE} is missing, so the directory cannot be verified "
                         f"(read it unverified with verify=False / --no-verify)")
    c = Checker(source)
    man = c.obj(read_json(p / MANIFEST_FILE, "manifest"), "")
    if man.get("kind") != "bitalloc.manifest" or man.get("version") != 1:
        raise c.fail("", "not a version-1 bitalloc.manifest")
    out = {k: c.str_map(c.key(man, k), k) for k in ("files", "tensors")}
    for k, digests in out.items():
        bad = [n for n, h in digests.items() if not _SHA256.fullmatch(h)]
        if bad:
            raise c.fail(f"{k}[{short(bad[0])}]", f"not a SHA-256 digest: {short(digests[bad[0]])}")
    return out


def verify_packed(path: str | os.PathLike, tensors: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check a packed directory against its ``manifest.json`` (every file, every tensor re-hashed) and, when
    given, against the expected tensor digests; returns the manifest.  InputError names what differs."""
    p = Path(path)
    man = read_packed_manifest(p)
    _verify_files(p, man["files"])
    with SafetensorsFile(p / WEIGHTS_FILE) as sf:
        compare_digests(man["tensors"], {n: tensor_digest(sf.get(n)) for n in sf.keys()}, str(p / WEIGHTS_FILE))
    if tensors is not None:
        compare_digests(dict(tensors), man["tensors"], f"{p} (against the quantized tensors)")
    return man


def _verify_files(p: Path, files: Mapping[str, str]) -> None:
    """Every file of the directory (but the manifest) re-hashed: a flipped bit, a missing or extra file."""
    actual = manifest(p)
    actual.pop(MANIFEST_FILE, None)
    compare_digests(files, actual, f"{p}")


def save_config(model: nn.Module, folder: Path) -> None:
    """``model``'s HF config as ``folder/config.json``, naming its class in ``architectures`` when the config does
    not (as ``save_pretrained`` of the model does): runtimes such as vLLM pick the model class from it, and a
    model built from a config or loaded from a GGUF has none (vLLM then took Gemma2Model, without its head)."""
    cfg = model.config
    if not getattr(cfg, "architectures", None):
        cfg = copy.deepcopy(cfg)
        cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(str(folder))


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
    check_new_dir(out, inputs, overwrite)  # before any work
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
        save_config(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = manifest(tmp)
        man = {"version": 1, "kind": "bitalloc.manifest", "tensors": digests, "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    log.info("wrote %s: %d tensors, %d B (%.4f bpw), verified", out, len(meta), nbytes, info["bpw"])
    return info


def read_packed(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, QTensor]]:
    """``(bitalloc.json, {tensor: QTensor})`` of a packed directory, validated strictly (InputError naming the
    file and entry): with ``verify`` every file and stored tensor is first checked against ``manifest.json``;
    always, ``bitalloc.json`` must be well-formed (known format ids that store their shapes, parts that exist
    and take exactly the format's bytes, every stored tensor described once, consistent totals)."""
    p = Path(path)
    meta_path, weights = p / META_FILE, p / WEIGHTS_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise InputError(f"{p} is not a bitalloc packed directory (needs {META_FILE} and {WEIGHTS_FILE})")
    man = read_packed_manifest(p) if verify else None
    if man is not None:
        _verify_files(p, man["files"])  # before anything is parsed: a flipped bit is named as such
    c = Checker(str(meta_path))
    info = c.obj(read_json(meta_path, "packed description"), "")
    if info.get("kind") != "bitalloc.packed" or info.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{meta_path} is not a version-{FORMAT_VERSION} bitalloc packed description")
    try:
        stored = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for broken files
        raise InputError(f"cannot read {weights}: {one_line(e)}") from None
    if man is not None:
        compare_digests(man["tensors"], {k: tensor_digest(t) for k, t in stored.items()}, str(weights))
    out: dict[str, QTensor] = {}
    used: set[str] = set()
    for name, m in c.obj(c.key(info, "tensors"), "tensors").items():
        out[name] = _qtensor(c, name, m, stored, used)
    unused = sorted(set(stored) - used)
    if unused:
        raise c.fail("tensors", f"{WEIGHTS_FILE} holds tensors no entry describes: {short(unused[:3], 200)}")
    nbytes = c.count(c.key(info, "bytes"), "bytes")
    total = c.count(c.key(info, "total_params"), "total_params", 1)
    if nbytes != sum(q.nbytes() for q in out.values()):
        raise c.fail("bytes", f"{nbytes}, but the tensors take {sum(q.nbytes() for q in out.values())} B")
    bpw = c.real(c.key(info, "bpw"), "bpw")
    if abs(bpw - 8.0 * nbytes / total) > 1e-6 * max(1.0, bpw):
        raise c.fail("bpw", f"{bpw} disagrees with bytes and total_params ({8.0 * nbytes / total:.6f})")
    if not isinstance(info.get("tied", False), bool):
        raise c.fail("tied", f"expected true or false, got {short(info.get('tied'))}")
    return info, out


def _qtensor(c: Checker, name: str, v: Any, stored: Mapping[str, torch.Tensor], used: set[str]) -> QTensor:
    """One ``bitalloc.json`` tensor entry as a QTensor over the stored parts (each part used once)."""
    where = f"tensors[{short(name)}]"
    c.string(name, where)
    m = c.obj(v, where)
    shape = c.shape(c.key(m, "shape", where), f"{where}.shape")
    fmt = c.format_for(c.key(m, "format", where), f"{where}.format", shape)
    dtype = c.choice(c.key(m, "dtype", where), f"{where}.dtype", DTYPES)
    parts: dict[str, torch.Tensor] = {}
    for part, key in c.obj(c.key(m, "parts", where), f"{where}.parts").items():
        if not part.startswith("weight") or not isinstance(key, str) or key not in stored:
            raise c.fail(f"{where}.parts[{short(part)}]", f"no stored tensor {short(key)} in {WEIGHTS_FILE}")
        if key in used:
            raise c.fail(f"{where}.parts[{short(part)}]", f"stored tensor {short(key)} is described twice")
        used.add(key)
        parts[part] = stored[key]
    q = QTensor(format=fmt.id, shape=shape, dtype=dtype, parts=parts)
    nbytes = c.count(c.key(m, "bytes", where), f"{where}.bytes")
    if not q.nbytes() == nbytes == fmt.nbytes(shape):
        raise c.fail(where, f"{fmt.id} {list(shape)} takes exactly {fmt.nbytes(shape)} B; the entry says "
                            f"{nbytes} B and its parts hold {q.nbytes()} B")
    return q
