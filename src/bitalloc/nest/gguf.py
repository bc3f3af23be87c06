"""A nested artifact's extracted model as a llama.cpp GGUF: exact type mapping, a template without weights.

Exact GGUF types of the integer formats (:func:`gguf_type_of`).  An integer tensor goes into a GGUF type only
when that type holds the same values with no re-rounding: the same codebook, fp16 parameters, and one
(scale, zero) per 32-wide block.  Exactly these five pairs qualify, for every group size:

==================  ======  ==============================================================================
bitalloc format     GGUF    why it is exact
==================  ======  ==============================================================================
``int4-g*``         q4_1    ``scale·q + zero``, q in 0..15, fp16 scale/zero  =  ``d·q + m``, fp16 d/m
``int5-g*``         q5_1    the same with q in 0..31
``int4-g*-sym``     q4_0    ``scale·q``, q in -8..7 (stored q + 8)      =  ``d·(q - 8)``, q in 0..15
``int5-g*-sym``     q5_0    ``scale·q``, q in -16..15 (stored q + 16)   =  ``d·(q - 16)``, q in 0..31
``int8-g*-sym``     q8_0    ``scale·q``, q in -128..127 (stored q + 128) = ``d·q``, q an int8
==================  ======  ==============================================================================

``g*`` is ``g32``, ``g64``, ``g128`` or ``row``: a group of 64/128/row columns spans whole 32-wide blocks,
each of which takes the group's scale and zero (exact, but the GGUF then pays one fp16 pair per 32 values:
``int4-g128`` at 4.25 bits per weight becomes ``q4_1`` at 5.0; only ``g32`` keeps the size).  The codes pass
through unchanged and both decoders compute the same float32 products and sums, so :func:`as_gguf` is
bit-exact (the symmetric ints add a zero offset, so a ``-0.0`` of ``q4_0`` is a ``+0.0`` there: equal under
``==``).  Nothing else maps: ``int2/3/6-*`` and asymmetric ``int8`` have no GGUF type with their codebook
(``q8_0`` is symmetric, ``q8_1`` is not a storage type), and every K-quant stores 6- or 4-bit *integer*
sub-scales under one fp16 super-scale, which cannot hold independent fp16 scales.  GGUF rows are whole
blocks while the int formats pad a row to whole groups: a row length that is not a multiple of 32 is refused.

The GGUF template without the weights (:func:`template_to_files` / :func:`template_from_files`), two files:

* ``gguf_template.gguf``: a valid GGUF holding the source's KV pairs byte for byte (``general.file_type``
  as a uint32, which every export rewrites anyway) and only its runtime tensors (``rope_freqs``) with data;
* ``gguf_template.json``: ``{"kind": "bitalloc.gguf_template", "format_version": 1, "gguf_sha256": ...,
  "version": V, "alignment": A, "tensors": [[name, [numpy shape], "Q4_K"], ...]}`` (the full tensor list).

Both are read strictly (the GGUF by :class:`bitalloc.io.gguf.GGUFFile`, the JSON by
:class:`bitalloc.checked.Checker`, the pair tied by the digest): anything else is one :class:`InputError`.
:func:`extracted_gguf` checks and prepares the extracted model with such a template and a ``config.json`` for the
GGUF target (:class:`bitalloc.targets.gguf.GGUFTarget`), whose verified, manifest-checked write writes it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from gguf import GGMLQuantizationType, LlamaFileType

from ..checked import Checker, error_line, one_line, read_json, versioned
from ..errors import InputError
from ..export.gguf import FILE_TYPE_KEY, GGUFTemplate, ggml_nbytes, read_template, runtime_tensor, write_gguf
from ..formats.base import FormatError, Grid, QTensor
from ..formats.gguf_legacy import GGUFLegacy
from ..formats.int import parse_int
from ..formats.packing import packed_nbytes, unpack_bits
from ..io.atomic import atomic_write, file_digest
from ..io.gguf import GGUFFile
from ..targets.base import Prepared
from ..targets.gguf import GGUFTarget

log = logging.getLogger(__name__)

TEMPLATE_GGUF = "gguf_template.gguf"
TEMPLATE_JSON = "gguf_template.json"
_KIND = "bitalloc.gguf_template"
_VERSION = 1
_MAX_TENSORS = 1 << 20
#: (bits, symmetric) of an int format -> the GGUF type holding its values exactly (see the module docstring)
EXACT: dict[tuple[int, bool], str] = {(4, False): "q4_1", (5, False): "q5_1", (4, True): "q4_0",
                                      (5, True): "q5_0", (8, True): "q8_0"}
QK = 32  # the GGUF block width of these types


def gguf_type_of(format_id: str) -> str | None:
    """The GGUF type storing ``format_id``'s values exactly (``int4-g32`` -> ``q4_1``), else None."""
    try:
        fmt = parse_int(format_id)
    except FormatError:
        return None
    return None if fmt is None else EXACT.get((fmt.bits, fmt.symmetric))


def exact_ids() -> str:
    """The int families with an exact GGUF type, for messages."""
    return ", ".join(f"int{b}-g*{'-sym' if s else ''} -> {t}" for (b, s), t in EXACT.items())


def as_gguf(q: QTensor) -> QTensor:
    """``q`` (``int4-g32`` etc.) as its exact GGUF type: the same codes and fp16 parameters, no re-rounding."""
    target = gguf_type_of(q.format)
    if target is None:
        raise FormatError(f"{q.format} has no exact GGUF type (exact: {exact_ids()})")
    fmt = parse_int(q.format)
    assert fmt is not None
    shape = tuple(int(d) for d in q.shape)
    fmt.check_shape(shape)
    rows, cols = shape
    if cols % QK:
        raise FormatError(f"{fmt.id} tensor of shape {shape}: GGUF {target} needs rows of a multiple of {QK} "
                          f"values, not {cols}")
    gs, ng = fmt.group_size(cols), fmt.ngroups(cols)
    want = {"weight_packed": (torch.uint8, (packed_nbytes(rows * ng * gs, fmt.bits),)),
            "weight_scale": (torch.float16, (rows, ng))}
    if not fmt.symmetric:
        want["weight_zero"] = (torch.float16, (rows, ng))
    got = {k: (t.dtype, tuple(t.shape)) for k, t in q.parts.items()}
    if got != want:
        raise FormatError(f"{fmt.id} tensor of shape {shape}: its parts are not this format's")
    codes = unpack_bits(q.parts["weight_packed"].cpu(), fmt.bits, rows * ng * gs).reshape(rows, ng * gs)[:, :cols]
    group = torch.div(torch.arange(0, cols, QK), gs, rounding_mode="floor")  # the group of each block
    scale = q.parts["weight_scale"].cpu().to(torch.float32)[:, group]
    offset = torch.zeros_like(scale) if fmt.symmetric else q.parts["weight_zero"].cpu().to(torch.float32)[:, group]
    grid = Grid(scale=scale, offset=offset, levels=fmt.levels, group_size=QK)
    return GGUFLegacy(target).encode(codes, grid, shape, q.dtype)  # the GGUF codebook is the int one: same codes


# --- the template without the weights ----------------------------------------------------------------------
def template_to_files(tpl: GGUFTemplate, dir: Path, *, overwrite: bool = False) -> None:
    """``dir/gguf_template.gguf`` (KV pairs, runtime tensors) and ``dir/gguf_template.json`` (tensor list)."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = [(n, s, t) for n, s, t in tpl.tensors if not tpl.names.members(n)]
    ft = tpl.metadata.get(FILE_TYPE_KEY)
    ftype = ft if isinstance(ft, int) and not isinstance(ft, bool) and 0 <= ft < 1 << 32 else int(LlamaFileType.ALL_F32)
    with GGUFFile(tpl.path) as f:
        kept = {n: runtime_tensor(f, n) for n, _, _ in runtime}
    small = dataclasses.replace(tpl, tensors=tuple(runtime))
    write_gguf(out / TEMPLATE_GGUF, small, kept, file_type=ftype, overwrite=overwrite)
    doc = {"kind": _KIND, "format_version": _VERSION, "gguf_sha256": file_digest(out / TEMPLATE_GGUF),
           "version": tpl.version, "alignment": tpl.alignment,
           "tensors": [[n, list(s), t.name] for n, s, t in tpl.tensors]}
    with atomic_write(out / TEMPLATE_JSON, overwrite=overwrite, inputs=[tpl.path]) as fh:
        fh.write((json.dumps(doc, indent=1) + "\n").encode())
    log.info("stored the GGUF template of %s in %s (%d tensors listed, %d kept)", tpl.path, out,
             len(tpl.tensors), len(runtime))


def template_from_files(dir: Path) -> GGUFTemplate:
    """The template :func:`template_to_files` stored in ``dir``, validated (InputError for anything else)."""
    d = Path(dir)
    jpath, gpath = d / TEMPLATE_JSON, d / TEMPLATE_GGUF
    source = f"GGUF template {jpath}"
    doc = versioned(read_json(jpath, "GGUF template"), _KIND, _VERSION, source)
    c = Checker(source)
    digest = c.string(c.key(doc, "gguf_sha256"), "gguf_sha256", 64)
    version = c.count(c.key(doc, "version"), "version", 1, 1 << 32)
    alignment = c.count(c.key(doc, "alignment"), "alignment", 1, 1 << 32)
    rows = c.array(c.key(doc, "tensors"), "tensors")
    if len(rows) > _MAX_TENSORS:
        raise c.fail("tensors", f"more than {_MAX_TENSORS} tensors")
    extra = sorted(set(doc) - {"kind", "format_version", "gguf_sha256", "version", "alignment", "tensors"})
    if extra:
        raise c.fail("", f"unknown key {extra[0]!r}")
    types = tuple(t.name for t in GGMLQuantizationType)
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = []
    for i, row in enumerate(rows):
        name, shape, typ = c.array(row, f"tensors[{i}]", 3)
        entry = (c.string(name, f"tensors[{i}][0]", 256), c.shape(shape, f"tensors[{i}][1]"),
                 GGMLQuantizationType[c.choice(typ, f"tensors[{i}][2]", types)])
        try:
            ggml_nbytes(entry[1], entry[2])
        except InputError as e:
            raise c.fail(f"tensors[{i}]", one_line(e)) from None
        tensors.append(entry)
    if len({n for n, _, _ in tensors}) != len(tensors):
        raise c.fail("tensors", "duplicate tensor names")
    if not gpath.is_file() or file_digest(gpath) != digest:
        raise InputError(f"{gpath} is missing or is not the file {jpath} describes (SHA-256 differs)")
    small = read_template(gpath)
    if (small.version, small.alignment) != (version, alignment):
        raise InputError(f"{gpath}: version/alignment {small.version}/{small.alignment} differ from {jpath}")
    tpl = GGUFTemplate(gpath, small.version, small.alignment, small.kv, small.metadata, tuple(tensors))
    try:
        names = tpl.names  # the architecture map must name every listed tensor
        runtime = [(n, s, t) for n, s, t in tensors if not names.members(n)]
    except InputError as e:
        raise InputError(f"{source}: the tensor list does not fit the architecture: {one_line(e)}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{source}: the tensor list does not fit the architecture: {error_line(e)}") from None
    if list(small.tensors) != runtime:
        raise InputError(f"{gpath}: its tensors are not the runtime tensors of {jpath}")
    return tpl


# --- the extracted model as a GGUF ---------------------------------------------------------------------------
def meta_model_of(config_dir: Path) -> Any:
    """The causal LM of ``config_dir/config.json`` on the meta device (checked as a model folder's config)."""
    from transformers import AutoConfig

    from ..models.archs import arch_for
    from ..models.config_checks import read_config
    from ..models.gguf_map import empty_model

    read_config(Path(config_dir))
    try:
        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
    except Exception as e:  # a config that passed read_config but not transformers: still one line
        raise InputError(f"cannot read the model config in {config_dir}: {one_line(e)}") from None
    arch_for(config)
    return empty_model(config, torch.float32)


def extracted_gguf(out: Path, tpl: GGUFTemplate, config_dir: Path, qtensors: Mapping[str, QTensor],
                   fixed: Mapping[str, torch.Tensor]) -> tuple[GGUFTarget, Prepared]:
    """The extracted model (allocated tensors as int QTensors, the rest as float tensors) as the GGUF target of
    ``out`` with ``tpl``'s metadata and what it will write (its exact sizes and manifest), after every check: tensor
    set, shapes, an exact GGUF type; the target's ``write_verified`` then writes it."""
    from ..models.view import ModelView

    view = ModelView(meta_model_of(config_dir))
    refs = {r.name: r for r in view.quantizable()}
    missing, unknown = sorted(set(refs) - set(qtensors)), sorted(set(qtensors) - set(refs))
    if missing or unknown:
        raise InputError(f"the extracted tensors do not match {Path(config_dir) / 'config.json'}: missing "
                         f"{missing[:3]}, unknown {unknown[:3]}")
    for name, ref in refs.items():
        q = qtensors[name]
        if tuple(int(d) for d in q.shape) != ref.shape:
            raise InputError(f"{name}: shape {tuple(q.shape)}, the model needs {ref.shape}")
        if gguf_type_of(q.format) is None:
            raise InputError(f"{name}: format {q.format} has no exact GGUF type (exact: {exact_ids()}); nothing "
                             "was written")
    params = {n: tuple(p.shape) for n, p in view.model.named_parameters() if n not in refs}
    params.pop(f"{view.spec.lm_head}.weight", None)  # a tied lm_head is the embedding
    extra = sorted(set(fixed) - set(params))
    if extra:
        raise InputError(f"fixed tensor {extra[0]} is not a parameter of the model in {config_dir}")
    for name, shape in params.items():
        t = fixed.get(name)
        if t is None or tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
            raise InputError(f"fixed tensor {name}: missing, not of shape {shape} or not finite")
    converted: dict[str, QTensor] = {}
    for name, q in qtensors.items():
        try:
            converted[name] = as_gguf(q)
        except FormatError as e:
            raise InputError(f"{name}: {one_line(e)}; nothing was written") from None
    target = GGUFTarget(out, tpl)
    prepared = target.prepare(None, view, None, converted, fixed, None)
    shapes = {n: tuple(s) for n, s, _ in tpl.tensors}
    for n, g in prepared.payload.items.items():
        if n in shapes and tuple(g.shape) != shapes[n]:
            raise InputError(f"GGUF tensor {n}: shape {g.shape}, the template has {shapes[n]}")
    return target, prepared


__all__ = ["EXACT", "QK", "TEMPLATE_GGUF", "TEMPLATE_JSON", "as_gguf", "exact_ids", "gguf_type_of", "meta_model_of",
           "extracted_gguf", "template_from_files", "template_to_files"]
