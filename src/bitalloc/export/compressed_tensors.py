"""A compressed-tensors checkpoint (what transformers and vLLM load): written from bitalloc's quantized tensors
and read back.

The folder holds ``config.json`` (the model's HF config plus ``quantization_config``, written by the library's
``ModelCompressor.update_config``: one config group per bitalloc format, named by its id, whose ``targets`` are
the exact module names; every other linear in ``ignore``), ``model.safetensors`` (each quantized module's
``weight_packed`` / ``weight_scale`` / ``weight_shape`` as the library's compressor makes them from bitalloc's
decoded grid and scales -- the packed codes are checked to be bitalloc's; every other tensor as the plan stores
it: fp16/bf16/fp32), the tokenizer files, ``bitalloc.json`` (kind ``bitalloc.compressed-tensors``: each tensor's
bitalloc format, bytes, bpw, plan) and ``manifest.json`` (SHA-256 of every tensor and file, as a packed
directory's).  The mapping of formats is the table in :mod:`bitalloc.export.ct_schemes`.

Reading (:func:`read_compressed_tensors`) verifies the manifest, reads the safetensors with bitalloc's strict
reader, checks ``config.json``'s ``quantization_config`` through the library's own models and every tensor's
dtype and shape, and decompresses each module with the library (scales in float32, so ``scale * q`` is exact):
the weights equal bitalloc's decode bit for bit; the writer re-reads its temporary folder this way before the
rename.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping

import torch

from ..checked import Checker, one_line, read_json, short
from ..errors import InputError, NumericsError
from ..formats import QTensor, get_format
from ..io.atomic import atomic_write_dir, compare_digests, manifest, tensor_digest
from ..io.paths import check_new_dir
from ..io.safetensors import SafetensorsFile, write_safetensors_atomic
from .ct_schemes import SCHEMES, ct_bytes, require_library, scheme_for
from .packed import MANIFEST_FILE, META_FILE, WEIGHTS_FILE, read_packed_manifest

log = logging.getLogger(__name__)

KIND = "bitalloc.compressed-tensors"
FORMAT_VERSION = 1
_PASS_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _module_of(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or not module:
        raise InputError(f"{name}: only the weight of a linear module can be quantized in compressed-tensors")
    return module


def convert(qtensors: Mapping[str, QTensor], linears: Collection[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors to store, the library's QuantizationConfig)`` of ``qtensors``; ``linears``: the nn.Linear
    module names of the model transformers builds from the config (the only modules that may be quantized)."""
    require_library()
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    state: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    for name, q in sorted(qtensors.items()):
        fmt = get_format(q.format)
        scheme = scheme_for(fmt)
        if scheme is None:
            state[name] = q.parts["weight"].contiguous()
            continue
        module = _module_of(name)
        if module not in linears:
            raise InputError(f"{name}: {fmt.id} cannot be written as compressed-tensors: {module} is not a linear "
                             f"module transformers builds (store it as fp16, bf16 or fp32)")
        if not scheme.fits(fmt, tuple(q.shape)):
            raise InputError(f"{name}: compressed-tensors cannot store {fmt.id} for shape {list(q.shape)}")
        parts = scheme.to_library(q)
        if {k: (t.dtype, tuple(t.shape)) for k, t in parts.items()} != scheme.layout(fmt, tuple(q.shape)) or \
                sum(t.numel() * t.element_size() for t in parts.values()) != ct_bytes(fmt, tuple(q.shape)):
            raise InputError(f"{name}: the library's {scheme.compressor} layout of {fmt.id} is not the expected "
                             f"one ({ct_bytes(fmt, tuple(q.shape))} B)")
        for k, t in parts.items():
            if f"{module}.{k}" in state:
                raise InputError(f"two tensors would be stored as {module}.{k}")
            state[f"{module}.{k}"] = t.contiguous()
        groups.setdefault(fmt.id, []).append(module)
    config_groups = {fid: QuantizationScheme(targets=sorted(mods), weights=scheme_for(fid).args(get_format(fid)),
                                             format=scheme_for(fid).compressor)
                     for fid, mods in sorted(groups.items())}
    compressors = sorted({g.format for g in config_groups.values()})
    targeted = {m for mods in groups.values() for m in mods}
    qc = QuantizationConfig(config_groups=config_groups, quantization_status="compressed",
                            format=compressors[0] if len(compressors) == 1 else "mixed-precision",
                            ignore=sorted(set(linears) - targeted))
    return state, qc


def save_compressed_tensors(
    out_dir: str | os.PathLike,
    qtensors: Mapping[str, QTensor],
    *,
    linears: Collection[str],
    write_base: Callable[[Path], None],
    total_params: int,
    tied: bool,
    plan: Any,
    limit: int | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Write the folder (see the module) and return its ``bitalloc.json``; ``write_base(tmp)`` writes the HF
    ``config.json`` and the tokenizer files into the temporary folder.  The stored tensors must take at most
    ``limit`` bytes (BudgetError, nothing written).  The folder is re-read and compared before the rename."""
    from compressed_tensors.compressors import ModelCompressor

    from ..targets.base import check_size

    out = Path(out_dir)
    inputs = list(inputs)
    check_new_dir(out, inputs, overwrite)
    state, qc = convert(qtensors, linears)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    check_size(out, nbytes, limit, "weights")
    info = {"format_version": FORMAT_VERSION, "kind": KIND, "bytes": nbytes, "bpw": 8.0 * nbytes / total_params,
            "total_params": total_params, "tied": tied, "plan": plan,
            "formats": {n: q.format for n, q in sorted(qtensors.items())},
            "shapes": {n: list(q.shape) for n, q in sorted(qtensors.items())}}
    meta_text = json.dumps(info, indent=1, sort_keys=True) + "\n"
    expected = {n: get_format(q.format).decode(q) for n, q in qtensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)

    def verify(tmp: Path) -> None:
        if json.loads((tmp / META_FILE).read_text()) != json.loads(meta_text):
            raise InputError(f"verification of {META_FILE} failed")
        _, weights = read_compressed_tensors(tmp, verify=True, digests=digests)
        for n, w in expected.items():
            if not torch.equal(weights[n], w.reshape(weights[n].shape)):
                raise InputError(f"verification of {out}: {n} decompresses to other values than bitalloc's decode")

    with atomic_write_dir(out, overwrite=overwrite, inputs=inputs, verify=verify) as tmp:
        digests = write_safetensors_atomic(tmp / WEIGHTS_FILE, state, {"format": "pt"}, manifest=False)
        write_base(tmp)
        ModelCompressor(quantization_config=qc).update_config(str(tmp))  # the library's own config layout
        (tmp / META_FILE).write_text(meta_text)
        man = {"version": 1, "kind": "bitalloc.manifest", "tensors": digests, "files": manifest(tmp)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    log.info("wrote %s: %d tensors, %d B (%.4f bpw) as compressed-tensors, verified", out, len(qtensors), nbytes,
             info["bpw"])
    return info


def expected_digests(qtensors: Mapping[str, QTensor], linears: Collection[str]) -> dict[str, str]:
    """SHA-256 of every tensor the folder will store (``manifest.json``'s ``tensors``)."""
    state, _ = convert(qtensors, linears)
    return {k: tensor_digest(t) for k, t in sorted(state.items())}


def verify_compressed_tensors(path: str | os.PathLike, tensors: Mapping[str, str] | None = None) -> None:
    """Every file and stored tensor against ``manifest.json`` (and ``tensors``, when given); InputError."""
    p = Path(path)
    man = read_packed_manifest(p)
    actual = manifest(p)
    actual.pop(MANIFEST_FILE, None)
    compare_digests(man["files"], actual, f"{p}")
    with SafetensorsFile(p / WEIGHTS_FILE) as sf:
        compare_digests(man["tensors"], {n: tensor_digest(sf.get(n)) for n in sf.keys()}, str(p / WEIGHTS_FILE))
    if tensors is not None:
        compare_digests(dict(tensors), man["tensors"], f"{p} (against the quantized tensors)")


def is_compressed_tensors_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``bitalloc.json`` of kind ``bitalloc.compressed-tensors``."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return False
    d = read_json(meta, "description")
    return isinstance(d, dict) and d.get("kind") == KIND


def _quantization_config(p: Path) -> tuple[dict[str, Any], Any]:
    """``(config.json, the library's QuantizationConfig)`` of the folder, checked (InputError, one line)."""
    require_library()
    from compressed_tensors.quantization import QuantizationConfig

    source = f"{p / 'config.json'}"
    c = Checker(source)
    cfg = c.obj(read_json(p / "config.json", "config"), "")
    qd = c.obj(c.key(cfg, "quantization_config"), "quantization_config")
    if qd.get("quant_method") != "compressed-tensors" or qd.get("quantization_status") != "compressed":
        raise c.fail("quantization_config", "not a compressed compressed-tensors checkpoint")
    try:
        qc = QuantizationConfig.model_validate({k: v for k, v in qd.items()
                                                if k not in ("quant_method", "version", "sparsity_config",
                                                             "transform_config")})
    except Exception as e:  # pydantic's ValidationError: the library's own checks
        raise c.fail("quantization_config", one_line(e)[:300]) from None
    return cfg, qc


def read_compressed_tensors(path: str | os.PathLike, *, verify: bool = True,
                            digests: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(bitalloc.json, {parameter: float32 weight})`` of a folder this module wrote, every value checked (see the
    module); ``verify``: the manifest first (``digests``: also against these tensor digests)."""
    p = Path(path)
    if not (p / META_FILE).is_file() or not (p / WEIGHTS_FILE).is_file() or not (p / "config.json").is_file():
        raise InputError(f"{p} is not a bitalloc compressed-tensors folder (needs {META_FILE}, {WEIGHTS_FILE}, "
                         "config.json)")
    if verify:
        verify_compressed_tensors(p, digests)
    c = Checker(str(p / META_FILE))
    info = c.obj(read_json(p / META_FILE, "description"), "")
    if info.get("kind") != KIND or info.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{p / META_FILE} is not a version-{FORMAT_VERSION} {KIND} description")
    formats = c.str_map(c.key(info, "formats"), "formats")
    shapes = c.obj(c.key(info, "shapes"), "shapes")
    if set(shapes) != set(formats):
        raise c.fail("shapes", "does not describe the same tensors as formats")
    total = c.count(c.key(info, "total_params"), "total_params", 1)
    nbytes = c.count(c.key(info, "bytes"), "bytes")
    if not isinstance(info.get("tied"), bool):
        raise c.fail("tied", f"expected true or false, got {short(info.get('tied'))}")
    _, qc = _quantization_config(p)
    out: dict[str, torch.Tensor] = {}
    with SafetensorsFile(p / WEIGHTS_FILE) as sf:
        used: set[str] = set()
        stored = sum(sf.info(k).nbytes for k in sf.keys())
        for gname, group in sorted(qc.config_groups.items()):
            fmt, scheme = _group_format(p, gname, group)
            for module in group.targets:
                name = f"{module}.weight"
                if name in out or formats.get(name) != fmt.id:
                    raise InputError(f"{p}: config group {short(gname)} targets {short(module)}, which "
                                     f"{META_FILE} does not describe as {fmt.id} (or another group targets too)")
                out[name] = _decompress(p, sf, module, fmt, scheme, used,
                                        c.shape(shapes[name], f"shapes[{short(name)}]"))
        for name, fid in formats.items():
            if name in out:
                continue
            if fid not in _PASS_DTYPES or name not in sf or sf.get(name).dtype != _PASS_DTYPES[fid]:
                raise InputError(f"{p}: {name} ({short(fid)}) is not stored as a {fid} tensor nor targeted by a "
                                 "config group")
            used.add(name)
            out[name] = sf.get(name).to(torch.float32)
        unused = sorted(set(sf.keys()) - used)
        if unused:
            raise InputError(f"{p / WEIGHTS_FILE} holds tensors {META_FILE} does not describe: {short(unused[:3])}")
    if stored != nbytes:
        raise c.fail("bytes", f"{nbytes}, but the stored tensors take {stored} B")
    if abs(c.real(c.key(info, "bpw"), "bpw") - 8.0 * nbytes / total) > 1e-6 * max(1.0, 8.0 * nbytes / total):
        raise c.fail("bpw", "disagrees with bytes and total_params")
    return info, out


def _group_format(p: Path, gname: str, group: Any) -> tuple[Any, Any]:
    """The bitalloc format and table row of one config group (InputError when it is none bitalloc writes)."""
    if group.weights is None or group.input_activations is not None or group.output_activations is not None:
        raise InputError(f"{p}: config group {short(gname)} is not weight-only quantization")
    if any(t.startswith("re:") for t in group.targets):
        raise InputError(f"{p}: config group {short(gname)} targets a pattern, not module names")
    for scheme in SCHEMES:
        try:
            fmt = scheme.format_of(group.weights)
        except Exception:  # FormatError, or values bitalloc has no format for
            continue
        if group.format == scheme.compressor and scheme_for(fmt) is scheme and fmt.id == gname:
            return fmt, scheme
    raise InputError(f"{p}: config group {short(gname)} ({group.format}, {group.weights.type} "
                     f"{group.weights.num_bits} bits, {group.weights.strategy}) is no bitalloc format")


def _declared_shape(p: Path, module: str, stored: torch.Tensor | None, described: Any) -> tuple[int, int]:
    """The weight's shape: ``weight_shape`` where the library stores one (it must agree with ``bitalloc.json``)."""
    if len(described) != 2:
        raise InputError(f"{p}: {module}.weight is described as {short(list(described))}, not 2-D")
    if stored is not None and (stored.dtype != torch.int64 or tuple(stored.shape) != (2,)):
        raise InputError(f"{p}: {module}.weight_shape is not 2 int64 values")
    if stored is not None and stored.tolist() != list(described):
        raise InputError(f"{p}: {module}.weight_shape {short(stored.tolist())} disagrees with {META_FILE} "
                         f"({short(list(described))})")
    return int(described[0]), int(described[1])


def _decompress(p: Path, sf: SafetensorsFile, module: str, fmt: Any, scheme: Any, used: set[str],
                formats_shape: Any) -> torch.Tensor:
    """One module's weight, decompressed by the library after every stored part's dtype and shape is checked."""
    shp = sf.get(f"{module}.weight_shape") if f"{module}.weight_shape" in sf else None
    shape = _declared_shape(p, module, shp, formats_shape)
    try:
        fmt.check_shape(shape)
    except Exception as e:
        raise InputError(f"{p}: {module}: {one_line(e)}") from None
    if not scheme.fits(fmt, shape):
        raise InputError(f"{p}: {module}: compressed-tensors does not store {fmt.id} for shape {list(shape)}")
    parts = {}
    for local, (dt, want) in scheme.layout(fmt, shape).items():
        key = f"{module}.{local}"
        if key not in sf or sf.get(key).dtype != dt or tuple(sf.get(key).shape) != want:
            raise InputError(f"{p}: {key} is missing or not {dt} {list(want)}")
        parts[local] = sf.get(key).clone()
        used.add(key)
    w = scheme.from_library(fmt, parts)
    if tuple(w.shape) != shape or not torch.isfinite(w).all():
        raise NumericsError(f"{p}: {module} decompresses to NaN/Inf or another shape")
    return w


__all__ = ["KIND", "convert", "expected_digests", "is_compressed_tensors_dir", "read_compressed_tensors",
           "save_compressed_tensors", "verify_compressed_tensors"]
