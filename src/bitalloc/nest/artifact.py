"""The nested artifact on disk: bit-planes per tensor, the errors of every depth, the model's config -- written
atomically, read strictly and only as far as a prefix needs.

Layout of ``ART/``::

    nest.json                 kind bitalloc.nest: group, depth, outliers per row, refit (how many of the shallowest
                              depths have their own scale and zero), tensors (shape, dtype, shard), fixed tensors
    measurement.json          the errors of every depth as a Measurement table (formats int{k}-g{G})
    tensors-0003.safetensors  block 3's tensors: "<name>.plane0" .. "<name>.plane{D-1}" (uint8, one bit per weight,
                              most significant first), "<name>.step" / "<name>.low" (fp16 per group), "<name>.ovalue" / "<name>.oindex"
                              (the elements every depth stores exactly, per row: fp16, ascending columns),
                              "<name>.mu{k}" / "<name>.tau{k}" (uint8 per group, a refit depth k's scale and zero:
                              bitalloc.nest.refit); fixed tensors
                              (norms, biases) at float32 under their own name
    config.json, tokenizer files, gguf_template.* (a GGUF source's header, see bitalloc.nest.gguf)
    manifest.json             SHA-256 of every small file, and of every stored tensor (by shard and key)

Reading (:class:`Artifact`): the small files are hashed and ``nest.json`` and ``measurement.json`` validated
against each other before anything else; the shards' headers are parsed strictly when opened (memory-mapped), and
each tensor is hashed against the manifest when it is read -- a prefix of depth ``k`` reads ``k`` planes of each
tensor and never touches the others.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checked import Checker, read_json, short
from ..errors import InputError
from ..formats import QTensor, get_format
from ..formats.packing import packed_nbytes
from ..io.atomic import compare_digests, file_digest, tensor_digest
from ..io.safetensors import SafetensorsFile
from ..measure import Measurement
from .codes import MAX_DEPTH, MIN_DEPTH, depth_grid, from_planes
from .refit import refit_depth_grid

FORMAT_VERSION = 2
#: Versions read: 1 (before refit depths: none) and this one.
READ_VERSIONS = (1, FORMAT_VERSION)
KIND = "bitalloc.nest"
META_FILE = "nest.json"
TABLE_FILE = "measurement.json"
MANIFEST_FILE = "manifest.json"
GROUPS = (32, 64, 128)
_SHARD = re.compile(r"tensors-\d{4}\.safetensors")


def offered(group: int, depth: int, outliers: int = 0) -> list[str]:
    """The formats an artifact of ``group``/``depth``/``outliers`` offers: ``int{k}-g{group}`` for every integer width
    ≤ depth, with ``+o{outliers}`` when it stores that many exact elements per row."""
    from ..formats.int import BITS

    tail = f"+o{outliers}" if outliers else ""
    return [f"int{k}-g{group}{tail}" for k in range(MIN_DEPTH, depth + 1) if k in BITS]


def depth_of(format_id: str) -> int:
    return int(format_id.split("-")[0].removeprefix("int"))


OUTLIERS = (0, 1, 2, 4, 8, 16)


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` looks like a nested artifact (a directory with ``nest.json``); not a validation."""
    return (Path(path) / META_FILE).is_file()


class Artifact:
    """A nested artifact opened for reading (a context manager; see the module)."""

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        if not self.path.is_dir() or not (self.path / META_FILE).is_file():
            raise InputError(f"{self.path} is not a nested artifact (no {META_FILE}; write one with `bitalloc nest`)")
        self._shards: dict[str, SafetensorsFile] = {}
        self.digests: dict[str, str] = {}
        if verify:
            self._verify_files()
        c = Checker(str(self.path / META_FILE))
        info = c.obj(read_json(self.path / META_FILE, "nest description"), "")
        version = info.get("format_version")
        if info.get("kind") != KIND or isinstance(version, bool) or version not in READ_VERSIONS:
            raise InputError(f"{self.path / META_FILE} is not a {KIND} description of version "
                             f"{' or '.join(map(str, READ_VERSIONS))}")
        self.info = info
        self.group = c.count(c.key(info, "group"), "group", 32, 128)
        if self.group not in GROUPS:
            raise c.fail("group", f"expected one of {GROUPS}, got {self.group}")
        self.depth = c.count(c.key(info, "depth"), "depth", MIN_DEPTH, MAX_DEPTH)
        self.outliers = c.count(c.key(info, "outliers"), "outliers", 0, 16)
        if self.outliers not in OUTLIERS:
            raise c.fail("outliers", f"expected one of {OUTLIERS}, got {self.outliers}")
        if version == 1 and "refit" in info:
            raise c.fail("refit", "a version-1 artifact has no refit depths")
        self.refit = 0 if version == 1 else c.count(c.key(info, "refit"), "refit", 0, self.depth - MIN_DEPTH)
        self.total_params = c.count(c.key(info, "total_params"), "total_params", 1)
        if not isinstance(info.get("tied"), bool):
            raise c.fail("tied", "expected true or false")
        self.tensors = {n: self._entry(c, n, v) for n, v in c.obj(c.key(info, "tensors"), "tensors").items()}
        self.fixed = {n: self._fixed_entry(c, n, v) for n, v in c.obj(c.key(info, "fixed"), "fixed").items()}
        if set(self.tensors) & set(self.fixed):
            raise c.fail("fixed", f"{short(sorted(set(self.tensors) & set(self.fixed))[0])} is also allocated")
        self.measurement = Measurement.load(self.path / TABLE_FILE)
        self._check_table()

    # --- validation -------------------------------------------------------------------------------------
    def _verify_files(self) -> None:
        from ..export.packed import read_packed_manifest

        man = read_packed_manifest(self.path)  # kind, version, SHA-256 digests: the packed directory's manifest
        files, tensors = man["files"], man["tensors"]
        present = {p.name for p in self.path.iterdir()}
        shards = {n for n in present if _SHARD.fullmatch(n)}
        small = present - shards - {MANIFEST_FILE}
        compare_digests(files, {n: file_digest(self.path / n) for n in sorted(small) if (self.path / n).is_file()},
                        str(self.path))
        listed = {k.split("/", 1)[0] for k in tensors}
        if listed != shards:
            raise InputError(f"{self.path} does not match its manifest: shards {short(sorted(listed ^ shards)[:3])}")
        self.digests = tensors

    def _entry(self, c: Checker, name: str, v: Any) -> dict[str, Any]:
        where = f"tensors[{short(name)}]"
        m = c.obj(v, where)
        shape = c.shape(c.key(m, "shape", where), f"{where}.shape")
        if len(shape) != 2:
            raise c.fail(f"{where}.shape", "an allocated tensor is 2-D")
        shard = c.string(c.key(m, "shard", where), f"{where}.shard")
        if not _SHARD.fullmatch(shard):
            raise c.fail(f"{where}.shard", f"not a shard name: {short(shard)}")
        dtype = c.choice(c.key(m, "dtype", where), f"{where}.dtype", ("float32", "float16", "bfloat16", "float64"))
        rows, cols = shape
        ng = -(-cols // self.group)
        want = {f"{name}.plane{j}": ("U8", (packed_nbytes(rows * cols, 1),)) for j in range(self.depth)}
        want |= {f"{name}.step": ("F16", (rows, ng)), f"{name}.low": ("F16", (rows, ng))}
        for k in self.refit_depths:
            want |= {f"{name}.mu{k}": ("U8", (rows, ng)), f"{name}.tau{k}": ("U8", (rows, ng))}
        if self.outliers:
            want |= {f"{name}.ovalue": ("F16", (rows, self.outliers)),
                     f"{name}.oindex": ("U16" if cols <= 65536 else "I32", (rows, self.outliers))}
        if self.outliers > cols:
            raise c.fail(where, f"{self.outliers} outliers per row of {cols} columns")
        return {"shape": shape, "shard": shard, "dtype": dtype, "want": want}

    def _fixed_entry(self, c: Checker, name: str, v: Any) -> dict[str, Any]:
        where = f"fixed[{short(name)}]"
        m = c.obj(v, where)
        shape = c.shape(c.key(m, "shape", where), f"{where}.shape")
        shard = c.string(c.key(m, "shard", where), f"{where}.shard")
        if not _SHARD.fullmatch(shard):
            raise c.fail(f"{where}.shard", f"not a shard name: {short(shard)}")
        return {"shape": shape, "shard": shard, "want": {name: ("F32", tuple(shape))}}

    def _check_table(self) -> None:
        """The table describes exactly the artifact's tensors, each with exactly the offered formats' bytes."""
        m, where = self.measurement, f"{self.path / TABLE_FILE}"
        if {t.name for t in m.tensors} != set(self.tensors):
            raise InputError(f"{where}: its tensors are not the artifact's")
        if m.total_params != self.total_params:
            raise InputError(f"{where}: total_params {m.total_params} is not the artifact's {self.total_params}")
        fixed = self.fixed_f32_bytes
        if not 0 <= m.fixed_bytes <= fixed:
            raise InputError(f"{where}: fixed_bytes {m.fixed_bytes} does not fit the stored fixed tensors")
        fmts = offered(self.group, self.depth, self.outliers)
        for t in m.tensors:
            if tuple(t.shape) != tuple(self.tensors[t.name]["shape"]):
                raise InputError(f"{where}: {t.name} has shape {list(t.shape)}, the artifact stores "
                                 f"{list(self.tensors[t.name]['shape'])}")
            rows = {r.format: r for r in m.rows_for(t.name)}
            if sorted(rows) != sorted(fmts):
                raise InputError(f"{where}: {t.name} has rows for {sorted(rows)}, the artifact offers {fmts}")
            for f, r in rows.items():
                if r.bytes != get_format(f).nbytes(t.shape):
                    raise InputError(f"{where}: {t.name} in {f} takes {get_format(f).nbytes(t.shape)} B, not {r.bytes}")

    @property
    def refit_depths(self) -> list[int]:
        """The depths decoded with their own scale and zero (:mod:`bitalloc.nest.refit`)."""
        return list(range(MIN_DEPTH, MIN_DEPTH + self.refit))

    @property
    def fixed_f32_bytes(self) -> int:
        """Bytes of the fixed tensors as stored (float32)."""
        return sum(4 * math.prod(e["shape"]) for e in self.fixed.values())

    # --- reading ------------------------------------------------------------------------------------------
    def _shard(self, name: str) -> SafetensorsFile:
        if name not in self._shards:
            p = self.path / name
            if not p.is_file():
                raise InputError(f"{self.path}: shard {name} is missing")
            self._shards[name] = SafetensorsFile(p)
        return self._shards[name]

    def _read(self, shard: str, key: str, want: tuple[str, tuple[int, ...]]) -> torch.Tensor:
        sf = self._shard(shard)
        info = sf.info(key)
        if (info.dtype, tuple(info.shape)) != want:
            raise InputError(f"{self.path / shard}: {key} is {info.dtype} {list(info.shape)}, expected "
                             f"{want[0]} {list(want[1])}")
        t = sf.get(key)
        if self.verify:
            expected = self.digests.get(f"{shard}/{key}")
            if expected is None or tensor_digest(t) != expected:
                raise InputError(f"{self.path / shard}: tensor {key} does not match its manifest")
        return t

    def qtensor(self, name: str, format_id: str) -> QTensor:
        """Tensor ``name`` at the depth of ``format_id`` (an offered ``int{k}-g{G}``), read from ``k`` planes."""
        e = self.tensors.get(name)
        if e is None:
            raise InputError(f"{self.path}: no allocated tensor {name!r}")
        fmts = offered(self.group, self.depth, self.outliers)
        if format_id not in fmts:
            raise InputError(f"{self.path}: {name} is not offered as {format_id} ({fmts})")
        k = depth_of(format_id)
        planes = [self._read(e["shard"], f"{name}.plane{j}", e["want"][f"{name}.plane{j}"]) for j in range(k)]
        step = self._read(e["shard"], f"{name}.step", e["want"][f"{name}.step"]).to(torch.float32)
        low = self._read(e["shard"], f"{name}.low", e["want"][f"{name}.low"]).to(torch.float32)
        if not (bool(torch.isfinite(step).all()) and bool(torch.isfinite(low).all()) and bool((step > 0).all())):
            raise InputError(f"{self.path}: {name} has non-finite or non-positive scales")
        codes = from_planes(planes, tuple(e["shape"]))
        if k in self.refit_depths:
            mu = self._read(e["shard"], f"{name}.mu{k}", e["want"][f"{name}.mu{k}"])
            tau = self._read(e["shard"], f"{name}.tau{k}", e["want"][f"{name}.tau{k}"])
            if not bool((mu > 0).all()):
                raise InputError(f"{self.path}: {name} has a zero scale byte at depth {k}")
            grid = refit_depth_grid(step, low, self.depth, k, self.group, mu, tau)
        else:
            grid = depth_grid(step, low, self.depth, k, self.group)
        if self.outliers:
            grid = self._exact(name, e, grid)
        return get_format(format_id).encode(codes, grid, tuple(e["shape"]), e["dtype"])

    def _exact(self, name: str, e: dict[str, Any], grid: Any) -> Any:
        """``grid`` with the tensor's exactly stored elements (checked: ascending columns in range, finite)."""
        import dataclasses

        rows, cols = e["shape"]
        vals = self._read(e["shard"], f"{name}.ovalue", e["want"][f"{name}.ovalue"]).to(torch.float32)
        idx = self._read(e["shard"], f"{name}.oindex", e["want"][f"{name}.oindex"]).to(torch.int64)
        ok = bool(torch.isfinite(vals).all()) and int(idx.min()) >= 0 and int(idx.max()) < cols
        if ok and self.outliers > 1:
            ok = bool((idx[:, 1:] > idx[:, :-1]).all())
        if not ok:
            raise InputError(f"{self.path}: {name} has outliers out of range, unordered or not finite")
        mask = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, idx, True)
        exact = torch.zeros(rows, cols).scatter_(1, idx, vals)
        return dataclasses.replace(grid, exact_mask=mask, exact_values=exact)

    def fixed_value(self, name: str) -> torch.Tensor:
        e = self.fixed[name]
        t = self._read(e["shard"], name, e["want"][name]).clone()
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{self.path}: fixed tensor {name} holds NaN or Inf")
        return t

    def close(self) -> None:
        for sf in self._shards.values():
            sf.close()
        self._shards.clear()

    def __enter__(self) -> "Artifact":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nest_json(group: int, depth: int, outliers: int, refit: int, total_params: int, tied: bool,
              tensors: Mapping[str, Any], fixed: Mapping[str, Any], fingerprint: Mapping[str, str],
              extra: Mapping[str, Any]) -> str:
    info = {"kind": KIND, "format_version": FORMAT_VERSION, "group": group, "depth": depth, "outliers": outliers,
            "refit": refit,
            "total_params": total_params, "tied": tied, "tensors": dict(tensors), "fixed": dict(fixed),
            "fingerprint": dict(fingerprint), **extra}
    return json.dumps(info, indent=1, sort_keys=True) + "\n"


__all__ = ["Artifact", "FORMAT_VERSION", "GROUPS", "OUTLIERS", "META_FILE", "MANIFEST_FILE", "TABLE_FILE", "depth_of",
           "is_artifact", "nest_json", "offered"]
