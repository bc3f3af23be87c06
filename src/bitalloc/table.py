"""The measurement table as data: for every tensor and candidate format, exact bytes and predicted errors.

:class:`Measurement` round-trips through human-readable JSON (one row per line) and is reused for every
budget; loading validates it fully through :mod:`bitalloc.checked` (the error functions that fill it live in
:mod:`bitalloc.measure`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .checked import Checker, parse_json, read_text, short, versioned
from .errors import InputError, NumericsError
from .formats import get_format

FORMAT_VERSION = 1
ROLES = ("linear", "lookup")


@dataclass(frozen=True)
class MeasureRow:
    """One (tensor, format) cell: exact storage bytes and the predicted errors of that choice."""

    tensor: str
    format: str
    bytes: int
    output_error: float
    fisher_error: float | None = None


@dataclass(frozen=True)
class TensorInfo:
    """An allocated tensor.  ``roles`` e.g. ``("linear",)`` or ``("lookup", "linear")`` for a tied embedding.

    ``group``: a tie group name from the model view; tensors with the same non-None group must share one
    format (q/k/v stored fused, experts of a layer).  ``allocate`` honours it like a constraint tie group.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    roles: tuple[str, ...] = ("linear",)
    group: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "roles", tuple(self.roles))
        if not self.name:
            raise InputError("a tensor needs a name")
        if self.numel <= 0 or math.prod(self.shape) != self.numel:
            raise InputError(f"tensor {self.name!r}: numel {self.numel} does not match shape {self.shape}")


@dataclass(frozen=True, eq=False)
class Measurement:
    """The whole table.  ``fixed_bytes``: stored tensors not allocated (norms, biases); ``total_params``:
    every stored parameter, tied tensors once (the bpw denominator); ``fingerprint``: model, calibration
    and option hashes.  Rows are kept in a canonical order (tensor order, then bytes, then format id)."""

    tensors: tuple[TensorInfo, ...]
    rows: tuple[MeasureRow, ...]
    fixed_bytes: int
    total_params: int
    fingerprint: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tensors, rows = tuple(self.tensors), tuple(self.rows)
        index: dict[str, int] = {}
        for i, t in enumerate(tensors):
            if t.name in index:
                raise InputError(f"measurement: tensor {t.name!r} is listed twice")
            index[t.name] = i
        seen: set[tuple[str, str]] = set()
        for r in rows:
            if r.tensor not in index:
                raise InputError(f"measurement: a row names unknown tensor {r.tensor!r} (format {r.format})")
            if (r.tensor, r.format) in seen:
                raise InputError(f"measurement: duplicate row for tensor {r.tensor!r}, format {r.format!r}")
            seen.add((r.tensor, r.format))
            if not isinstance(r.bytes, int) or r.bytes < 0:
                raise InputError(f"measurement: negative or non-integer bytes {r.bytes!r} for {r.tensor}/{r.format}")
            for what, v in (("output_error", r.output_error), ("fisher_error", r.fisher_error)):
                if v is None and what == "fisher_error":
                    continue
                if v is None or not math.isfinite(v):
                    raise NumericsError(f"measurement: {what} of {r.tensor}/{r.format} is {v!r}")
                if v < 0:
                    raise InputError(f"measurement: negative {what} {v!r} for {r.tensor}/{r.format}")
        if not isinstance(self.fixed_bytes, int) or self.fixed_bytes < 0:
            raise InputError(f"measurement: fixed_bytes must be a non-negative int, got {self.fixed_bytes!r}")
        if not isinstance(self.total_params, int) or self.total_params <= 0:
            raise InputError(f"measurement: total_params must be a positive int, got {self.total_params!r}")
        rows = tuple(sorted(rows, key=lambda r: (index[r.tensor], r.bytes, r.format)))
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "fingerprint", {str(k): str(v) for k, v in dict(self.fingerprint).items()})
        by: dict[str, list[MeasureRow]] = {t.name: [] for t in tensors}
        for r in rows:
            by[r.tensor].append(r)
        object.__setattr__(self, "_by_tensor", {k: tuple(v) for k, v in by.items()})
        object.__setattr__(self, "_index", index)

    # --- queries ----------------------------------------------------------------------------------
    def rows_for(self, tensor: str) -> tuple[MeasureRow, ...]:
        try:
            return self._by_tensor[tensor]  # type: ignore[attr-defined]
        except KeyError:
            raise InputError(f"tensor {tensor!r} is not in the measurement") from None

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[self._index[name]]  # type: ignore[attr-defined]
        except KeyError:
            raise InputError(f"tensor {name!r} is not in the measurement") from None

    def formats(self) -> list[str]:
        """Every format id measured for at least one tensor, in order of first appearance."""
        return list(dict.fromkeys(r.format for r in self.rows))

    @property
    def objectives(self) -> tuple[str, ...]:
        """``("fisher", "output")`` when every row has a Fisher error, else ``("output",)``."""
        if self.rows and all(r.fisher_error is not None for r in self.rows):
            return ("fisher", "output")
        return ("output",)

    @property
    def allocated_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def check_tensors(self, model: Sequence[TensorInfo], what: str = "the model") -> None:
        """InputError unless this table describes exactly ``model``'s allocated tensors, with their shapes."""
        have = {t.name: t.shape for t in model}
        mine = {t.name: t.shape for t in self.tensors}
        unknown = [n for n in mine if n not in have]
        missing = [n for n in have if n not in mine]
        wrong = [n for n in mine if n in have and have[n] != mine[n]]
        if unknown or missing:
            raise InputError(f"the measurement does not describe {what}: tensors not in it {short(unknown[:3], 200)}, "
                             f"tensors it lacks {short(missing[:3], 200)}")
        if wrong:
            raise InputError(f"the measurement gives {wrong[0]!r} shape {list(mine[wrong[0]])}, {what} has "
                             f"{list(have[wrong[0]])}")

    # --- combining tables -------------------------------------------------------------------------
    def subset(self, formats: Sequence[str]) -> "Measurement":
        """The table restricted to ``formats`` (ids as given or normalised); every one must be measured."""
        want = [get_format(f).id for f in formats]
        have = set(self.formats())
        missing = [f for f in want if f not in have]
        if missing:
            raise InputError(f"measurement: formats {missing} were not measured (measured: {self.formats()})")
        keep = set(want)
        fp = dict(self.fingerprint)
        if "formats" in fp:
            fp["formats"] = ",".join(f for f in fp["formats"].split(",") if f in keep)
        return Measurement(self.tensors, tuple(r for r in self.rows if r.format in keep), self.fixed_bytes,
                           self.total_params, fp)

    def merge(self, other: "Measurement") -> "Measurement":
        """This table plus ``other``'s rows for formats not measured here (same model, calibration, method).

        Errors of one format do not depend on the others (each is measured with fp inputs), so a table
        measured later for extra formats extends an earlier one.  Refused when the two tables describe
        different tensors or were measured from different models, calibration data or rounding methods."""
        if self.tensors != other.tensors or (self.fixed_bytes, self.total_params) != (other.fixed_bytes,
                                                                                      other.total_params):
            raise InputError("measurement merge: the two tables describe different tensors")
        for key in ("model", "calibration", "method", "windows", "fisher_windows"):
            a, b = self.fingerprint.get(key), other.fingerprint.get(key)
            if a != b:
                raise InputError(f"measurement merge: {key} differs ({a!r} vs {b!r})")
        if self.objectives != other.objectives:
            raise InputError("measurement merge: one table has Fisher errors and the other does not")
        have = set(self.formats())
        new = tuple(r for r in other.rows if r.format not in have)
        fp = dict(self.fingerprint)
        fmts = list(dict.fromkeys(self.formats() + other.formats()))
        fp["formats"] = ",".join(fmts)
        fp["options"] = "merged:" + ",".join(sorted(filter(None, {self.fingerprint.get("options"),
                                                                   other.fingerprint.get("options")})))
        return Measurement(self.tensors, self.rows + new, self.fixed_bytes, self.total_params, fp)

    # --- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        head = {
            "format_version": FORMAT_VERSION,
            "kind": "bitalloc.measurement",
            "fingerprint": {k: self.fingerprint[k] for k in sorted(self.fingerprint)},
            "fixed_bytes": self.fixed_bytes,
            "total_params": self.total_params,
            "objectives": list(self.objectives),
        }
        tensors = [
            {"name": t.name, "shape": list(t.shape), "numel": t.numel, "roles": list(t.roles), "group": t.group}
            for t in self.tensors
        ]
        rows = [[r.tensor, r.format, r.bytes, r.output_error, r.fisher_error] for r in self.rows]
        return json_with_lines(head, {"tensors": tensors, "rows": rows})

    @classmethod
    def from_json(cls, text: str, source: str = "measurement table") -> "Measurement":
        """Parse and validate fully (:mod:`bitalloc.checked`): every key present and of its type, tensor
        shapes and numels consistent, every format id known and able to store its tensor, every row's bytes
        the format's exact byte count, errors finite and non-negative, no duplicates.  InputError names
        ``source`` and the offending entry."""
        c = Checker(source)
        d = versioned(parse_json(text, source), "bitalloc.measurement", FORMAT_VERSION, source)
        tensors = [_tensor_from_json(c, t, f"tensors[{i}]")
                   for i, t in enumerate(c.array(c.key(d, "tensors"), "tensors"))]
        shapes = {t.name: t.shape for t in tensors}
        rows = [_row_from_json(c, r, f"rows[{i}]", shapes) for i, r in enumerate(c.array(c.key(d, "rows"), "rows"))]
        fixed = c.count(c.key(d, "fixed_bytes"), "fixed_bytes")
        total = c.count(c.key(d, "total_params"), "total_params", 1)
        fp = c.str_map(d.get("fingerprint", {}), "fingerprint")
        if total < sum(t.numel for t in tensors):
            raise c.fail("total_params", f"{total} is less than the {sum(t.numel for t in tensors)} allocated parameters")
        try:
            m = cls(tuple(tensors), tuple(rows), fixed, total, fp)
        except InputError as e:
            raise c.fail("", str(e).removeprefix("measurement: ")) from None
        bare = [t.name for t in m.tensors if not m.rows_for(t.name)]
        if bare:
            raise c.fail("rows", f"no row for tensor {short(bare[0])} ({len(bare)} tensors have none)")
        if "objectives" in d and d["objectives"] != list(m.objectives):
            raise c.fail("objectives", f"{short(d['objectives'])} disagrees with the rows ({list(m.objectives)})")
        return m

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        write_text_atomic(Path(path), self.to_json(), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Measurement":
        source = f"measurement table {path}"
        return cls.from_json(read_text(path, source), source)


def _tensor_from_json(c: Checker, v: Any, where: str) -> TensorInfo:
    t = c.obj(v, where)
    name = c.string(c.key(t, "name", where), f"{where}.name")
    shape = c.shape(c.key(t, "shape", where), f"{where}.shape")
    numel = c.count(c.key(t, "numel", where), f"{where}.numel", 1)
    if numel != math.prod(shape):
        raise c.fail(f"{where}.numel", f"{numel} does not match shape {list(shape)} of {short(name)}")
    roles = tuple(c.choice(r, f"{where}.roles[{i}]", ROLES) for i, r in enumerate(c.array(c.key(t, "roles", where),
                                                                                          f"{where}.roles")))
    if not roles or len(set(roles)) != len(roles):
        raise c.fail(f"{where}.roles", f"expected distinct roles from {', '.join(ROLES)}, got {short(list(roles))}")
    return TensorInfo(name, shape, numel, roles, c.opt_string(t.get("group"), f"{where}.group"))


def _row_from_json(c: Checker, v: Any, where: str, shapes: dict[str, tuple[int, ...]]) -> MeasureRow:
    name, fid, nbytes, out, fisher = c.array(v, where, 5)
    name = c.string(name, f"{where}[0]")
    if name not in shapes:
        raise c.fail(f"{where}[0]", f"tensor {short(name)} is not listed under 'tensors'")
    fmt = c.format_for(fid, f"{where}[1]", shapes[name])
    nbytes = c.count(nbytes, f"{where}[2]")
    exact = fmt.nbytes(shapes[name])
    if nbytes != exact:
        raise c.fail(f"{where}[2]", f"{name} {list(shapes[name])} takes exactly {exact} B in {fmt.id}, "
                                    f"the row says {nbytes}")
    return MeasureRow(name, fmt.id, nbytes, c.real(out, f"{where}[3]"), c.opt_real(fisher, f"{where}[4]"))


def parse_versioned_json(text: str, what: str, version: int, source: str | None = None) -> dict[str, Any]:
    """The object of a bitalloc JSON file of kind ``bitalloc.<what>`` at ``format_version`` (else InputError)."""
    src = source or what
    return versioned(parse_json(text, src), f"bitalloc.{what}", version, src)


def json_with_lines(head: dict[str, Any], lists: dict[str, list[Any] | dict[str, Any]]) -> str:
    """JSON a person can read and diff: ``head`` keys indented, then each list/dict with one item per line."""
    parts = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
    for k, items in lists.items():
        if isinstance(items, dict):
            body = ",\n".join(f"    {json.dumps(n)}: {json.dumps(v)}" for n, v in items.items())
            parts.append(f"  {json.dumps(k)}: {{\n{body}\n  }}" if body else f"  {json.dumps(k)}: {{}}")
        else:
            body = ",\n".join(f"    {json.dumps(v)}" for v in items)
            parts.append(f"  {json.dumps(k)}: [\n{body}\n  ]" if body else f"  {json.dumps(k)}: []")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_text_atomic(path: Path, text: str, overwrite: bool = True) -> None:
    """Write ``text`` so that ``path`` is either the old file or the complete new one (replaces it unless
    ``overwrite`` is False: then a file that appeared meanwhile is refused, never replaced)."""
    from .io.atomic import atomic_write

    with atomic_write(path, overwrite=overwrite) as f:
        f.write(text.encode("utf-8"))
