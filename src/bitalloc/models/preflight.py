"""The header-only check every model load runs first: the files hold exactly the parameters the config describes.

From the (already value-checked) config the architecture map gives the model's parameters on the meta device:
names, shapes, and which may be absent (an lm_head tied to the embedding).  The tensor headers of the files
(safetensors headers, the shard index, GGUF tensor infos: no tensor data read) must then match it: every
parameter present once, no tensor the model lacks, every shape equal, every dtype floating point.  Block and
expert counts are compared with the tensor names before the meta model is even built, so a config claiming a
million layers costs nothing.  Only then are weights allocated (sized by these checked shapes) and read.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from bitalloc.errors import InputError
from bitalloc.io.safetensors import SafetensorsFile, TensorInfo
from bitalloc.models.archs import arch_for
from bitalloc.checked import read_json
from bitalloc.io.paths import check_input
from bitalloc.models.experts import fused_source

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
_GGUF_FLOAT = ("F32", "F16", "BF16", "F64")
_GGUF_INT = ("I8", "I16", "I32", "I64")


@dataclass(frozen=True)
class Source:
    """Where one model parameter's values are: a tensor of a file, or expert ``expert``'s ``proj`` inside a
    fused experts tensor."""

    file: Path
    tensor: str
    expert: int | None = None
    proj: str | None = None


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Every InputError raised inside names ``path`` (messages from the config builders do not know it)."""
    try:
        yield
    except InputError as e:
        if str(path) in str(e):
            raise
        raise InputError(f"{path}: {e}") from e


def stored_names(model: Any) -> list[str]:
    """Parameters that hold their own data: all but an lm_head tied to the embedding."""
    head = f"{arch_for(model.config).lm_head}.weight"
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return [n for n, _ in model.named_parameters() if not (tied and n == head)]


# ------------------------------------------------------------------------------------ HF directories
def checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of an HF directory: those of ``model.safetensors.index.json`` (plain file names in
    the directory, each a regular file) when there is one, else every ``*.safetensors``; and the index's map."""
    index = path / INDEX
    if not (index.exists() or index.is_symlink()):
        files = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors"))
        for f in files:
            check_input(f, "weights file", "file")
        return files, None
    data = read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"shard index {index} has no weight_map object of tensor names to files")
    files: dict[str, Path] = {}
    for name, fname in weight_map.items():
        if (not isinstance(fname, str) or not fname.endswith(".safetensors") or "/" in fname or "\\" in fname
                or fname.startswith(".") or "\x00" in fname):
            raise InputError(f"shard index {index}: tensor {name!r:.80} points at {fname!r:.80}, which is not the "
                             f"name of a .safetensors file in {path}")
        files.setdefault(fname, path / fname)
    for f in files.values():
        check_input(f, f"shard (listed in {INDEX})", "file")
    return sorted(files.values()), weight_map


def read_headers(files: list[Path], weight_map: Mapping[str, str] | None) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor header of ``files`` by name (strict reader: nothing but headers read); a tensor in two
    files, or not where the shard index says, is refused."""
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for f in files:
        with SafetensorsFile(f) as sf:
            for n in sf.keys():
                if n in out:
                    raise InputError(f"tensor {n!r} is stored twice: in {out[n][0]} and in {f}")
                if weight_map is not None and weight_map.get(n) != f.name:
                    raise InputError(f"{f} holds tensor {n!r}, which {INDEX} places in {weight_map.get(n)!r}")
                out[n] = (f, sf.info(n))
    for n, fname in (weight_map or {}).items():
        if n not in out:
            raise InputError(f"{INDEX} lists tensor {n!r:.80} in {fname}, which does not hold it")
    return out


def _counts_error(where: str, what: str, claimed: Any, found: str) -> InputError:
    return InputError(f"{where}: the metadata says {what} = {claimed}, but the tensors hold {found}")


def check_hf_counts(config: Any, headers: Mapping[str, tuple[Path, TensorInfo]], where: str) -> None:
    """Bound the layers and experts of the config by the tensor headers before a model is built from it: each
    block holds at least one tensor, each expert of each block one (or a fused tensor's leading dimension), so
    a config claiming a million layers costs nothing; the exact match is :func:`plan_hf`'s."""
    spec = arch_for(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    if layers > len(headers):
        raise _counts_error(where, "num_hidden_layers", layers, f"only {len(headers)} tensors")
    if spec.experts is not None:
        n = int(getattr(text, spec.experts.count, 0) or 0)
        stacked = max((i.shape[0] for _, i in headers.values() if len(i.shape) == 3), default=0)
        if n > stacked and n * layers > len(headers):
            raise _counts_error(where, spec.experts.count, n, f"only {len(headers)} tensors for {layers} layers")


def checkpoint_renamer(model: Any) -> Callable[[str], str]:
    """Checkpoint tensor name -> the model's parameter name, by transformers' own conversion table for the
    model (legacy prefixes such as Gemma 3's ``language_model.model``, Mixtral's ``block_sparse_moe`` and
    ``w1/w3/w2`` experts, named here as bitalloc's per-expert ``gate_proj/up_proj/down_proj``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)
    except Exception:  # an older transformers without the table: names are taken as they are
        return lambda key: key
    experts: list[tuple[re.Pattern[str], str]] = []
    renames = []
    for t in transforms:
        if not isinstance(t, WeightConverter):
            renames.append(t)
            continue
        target = t.target_patterns[0]
        projs = ("gate_proj", "up_proj") if target.endswith("gate_up_proj") else \
            ("down_proj",) if target.endswith("down_proj") else ()
        if len(projs) == len(t.source_patterns):
            for src, proj in zip(t.source_patterns, projs):
                if src.startswith(".experts.*.") and src.endswith(".weight"):
                    experts.append((re.compile(re.escape(src).replace(r"\*", r"(\d+)") + "$"), proj))

    def rename(key: str) -> str:
        for t in renames:
            key = t.rename_source_key(key)[0]
        for rx, proj in experts:
            m = rx.search(key)
            if m:
                return f"{key[:m.start()]}.experts.{m[1]}.{proj}.weight"
        return key
    return rename


def model_keys(model: Any, headers: Mapping[str, tuple[Path, TensorInfo]]) -> dict[str, tuple[Path, TensorInfo]]:
    """``headers`` under the model's parameter names (:func:`checkpoint_renamer`); two tensors that become one
    name are refused."""
    rename = checkpoint_renamer(model)
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for key, (f, info) in headers.items():
        name = rename(key)
        if name in out:
            raise InputError(f"{f}: tensors {out[name][1].name!r} and {key!r} are both the parameter {name!r}")
        out[name] = (f, info)
    return out


def _float_dtype(name: str, info: TensorInfo, file: Path) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise InputError(f"{file}: tensor {name!r} is {info.dtype}; model weights must be floating point")


def _same_values(a: tuple[Path, TensorInfo], b: tuple[Path, TensorInfo], rows: int = 4096) -> bool:
    """Whether two stored tensors of one shape hold equal values (read through the maps, ``rows`` at a time)."""
    import torch

    with SafetensorsFile(a[0]) as fa, SafetensorsFile(b[0]) as fb:
        ta, tb = fa.get(a[1].name), fb.get(b[1].name)
        for i in range(0, max(ta.shape[0] if ta.dim() else 1, 1), rows):
            pa, pb = (ta[i : i + rows], tb[i : i + rows]) if ta.dim() else (ta, tb)
            if not torch.equal(pa.float(), pb.float()):
                return False
    return True


def plan_hf(path: Path, model: Any, headers: Mapping[str, tuple[Path, TensorInfo]]) -> dict[str, Source]:
    """Where each stored parameter of ``model`` (meta device) is; InputError for a missing, unexpected,
    mis-shaped or non-float tensor (tied lm_head optional; a fused experts tensor may hold per-expert ones)."""
    spec = arch_for(model.config)
    kind = model.config.model_type
    headers = model_keys(model, headers)
    plan: dict[str, Source] = {}
    missing: list[str] = []
    used: set[str] = set()
    experts: dict[str, int] = {}
    for n in stored_names(model):
        shape = tuple(model.get_parameter(n).shape)
        fused = fused_source(n) if n not in headers else None
        if fused is not None and fused[0] in headers:
            fname, e, proj = fused
            f, info = headers[fname]
            _float_dtype(fname, info, f)
            want = shape if proj == "down_proj" else (2 * shape[0], *shape[1:])
            if len(info.shape) != 1 + len(want) or tuple(info.shape[1:]) != want or e >= info.shape[0]:
                raise InputError(f"{f}: fused tensor {fname!r} has shape {info.shape}, the {kind} model of "
                                 f"config.json expects (experts, {', '.join(map(str, want))})")
            plan[n] = Source(f, info.name, e, proj)
            used.add(fname)
            experts[fname] = max(experts.get(fname, 0), e + 1)
        elif n in headers:
            f, info = headers[n]
            _float_dtype(n, info, f)
            if tuple(info.shape) != shape:
                raise InputError(f"{f}: tensor {n!r} has shape {info.shape}, the {kind} model of config.json "
                                 f"expects {shape}")
            plan[n] = Source(f, info.name)
            used.add(n)
        else:
            missing.append(n)
    if missing:
        raise InputError(f"{path}: no tensor {missing[0]!r} in its safetensors files; the {kind} model of "
                         f"config.json needs it ({len(missing)} of its parameters are missing)")
    for fname, count in experts.items():
        f, info = headers[fname]
        if info.shape[0] != count:
            raise InputError(f"{f}: fused tensor {fname!r} holds {info.shape[0]} experts, the config {count}")
    head, embed = f"{spec.lm_head}.weight", f"{spec.embedding}.weight"
    extra = [n for n in headers if n not in used and not n.endswith(".inv_freq") and n != head]
    if head in headers and head not in used:  # a tied lm_head stored anyway: the embedding's twin
        f, info = headers[head]
        if embed in headers and info.shape != headers[embed][1].shape:
            raise InputError(f"{f}: tied tensor {head!r} has shape {info.shape}, the embedding "
                             f"{headers[embed][1].shape}")
        if embed in headers and not _same_values(headers[head], headers[embed]):
            raise InputError(f"{f}: config.json ties {head!r} to {embed!r} (tie_word_embeddings), but the file "
                             "stores a different lm_head; set tie_word_embeddings to false or remove the tensor")
    if extra:
        raise InputError(f"{headers[extra[0]][0]}: tensor {extra[0]!r} is not a parameter of the {kind} model of "
                         f"config.json ({len(extra)} unexpected tensors)")
    return plan


# ------------------------------------------------------------------------------------------------ GGUF
def check_gguf_counts(path: Path, metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """``block_count`` and ``expert_count`` against the tensor names and stacked shapes (before a model is built)."""
    arch = metadata.get("general.architecture")
    layers = metadata.get(f"{arch}.block_count")
    found = {int(m[1]) for n in shapes if (m := re.match(r"blk\.(\d+)\.", n))}
    if isinstance(layers, int) and found != set(range(layers)):
        have = f"blocks {min(found)}..{max(found)} ({len(found)} distinct)" if found else "no blk.N tensor"
        raise _counts_error(str(path), f"{arch}.block_count", layers, have)
    n = metadata.get(f"{arch}.expert_count")
    for name, shape in shapes.items():
        if name.startswith("blk.0.") and name.endswith("_exps.weight") and shape[0] != n:
            raise _counts_error(str(path), f"{arch}.expert_count", n, f"{shape[0]} experts in {name}")


def check_gguf_tensors(path: Path, g: Any, model: Any, names: Any) -> None:
    """Every GGUF tensor is a parameter (or runtime table) of ``model`` with its shape (stacked experts:
    ``(experts, *shape)``) and a float or block-quantized type, and every stored parameter is present."""
    kind = model.config.model_type
    want = {n: tuple(model.get_parameter(n).shape) for n in stored_names(model)}
    covered: set[str] = set()
    for gname, info in g.tensors.items():
        try:
            members = names.members(gname)
        except InputError:
            raise InputError(f"{path}: tensor {gname!r} is not a parameter of the {kind} model its metadata "
                             "describes") from None
        if not members:
            continue
        if info.type.name in _GGUF_INT:
            raise InputError(f"{path}: tensor {gname!r} is {info.type.name}; model weights must be float or quantized")
        if not all(m in want for m in members):
            raise InputError(f"{path}: tensor {gname!r} is not a stored parameter of the {kind} model")
        shape = want[members[0]] if len(members) == 1 else (len(members), *want[members[0]])
        if tuple(info.shape) != shape or any(want[m] != want[members[0]] for m in members):
            raise InputError(f"{path}: tensor {gname!r} has shape {tuple(info.shape)}, the {kind} model its "
                             f"metadata describes expects {shape}")
        for m in members:
            heads = names.rope_heads(m, g.metadata)
            if heads is not None and (heads <= 0 or want[m][0] % heads or want[m][0] // heads % 2):
                raise InputError(f"{path}: tensor {gname!r} has {want[m][0]} rows, which do not split into "
                                 f"{heads} heads of even size")
        covered.update(members)
    missing = [n for n in want if n not in covered]
    if missing:
        raise InputError(f"{path} has no tensor for {missing[0]!r} (GGUF {names.to_gguf(missing[0])!r}); "
                         f"{len(missing)} parameters of the {kind} model are missing")


def gguf_model(path: Path, g: Any, dtype: Any) -> tuple[Any, list[str], Any]:
    """The meta model of an open GGUF, its stored names and name map, once metadata and headers agree."""
    from bitalloc.models.gguf_config import config_from_gguf
    from bitalloc.models.gguf_map import empty_model, model_names

    shapes = {n: tuple(i.shape) for n, i in g.tensors.items()}
    meta = g.metadata
    with naming(path):
        config = config_from_gguf(meta, shapes)  # checks every hyper-parameter's type and range first
        check_gguf_counts(path, meta, shapes)
        model = empty_model(config, dtype)
        names = model_names(model)
        check_gguf_tensors(path, g, model, names)
    return model, stored_names(model), names


__all__ = ["INDEX", "Source", "check_gguf_counts", "check_gguf_tensors", "check_hf_counts", "checkpoint_files", "checkpoint_renamer",
           "gguf_model", "model_keys", "naming", "plan_hf", "read_headers", "stored_names"]
