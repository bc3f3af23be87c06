"""Byte budgets and allocation constraints: what ``allocate`` must respect.

A :class:`Budget` is typed by a person (``"3.5bpw"``, ``"120MB"``, ``"1.2GiB"``, ``"88201792B"``) and
resolves to bytes for a model: bpw budgets count *all* stored parameters (embeddings, lm_head, norms,
biases; tied tensors once), exactly as :attr:`bitalloc.measure.Measurement.total_params` does.

:class:`Constraints` say which formats each tensor may take: tie groups (q/k/v fused, gate/up, experts of a
layer) share one format, pinned tensors get exactly the named format, and bits-per-weight bounds or allowed
format lists restrict the rest.  Patterns are :mod:`fnmatch` patterns over tensor names (and, in ``allowed``,
over format ids); for a tensor the *first* matching pattern wins.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal, Mapping

from .checked import MAX_COUNT, Checker, short
from .errors import BudgetError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from .measure import Measurement, MeasureRow

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
#: Largest bits-per-weight budget accepted (no format stores more than 32 bits per weight).
MAX_BPW = 1024.0
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A byte budget over all stored weights: ``kind`` "bytes" (``value`` in bytes) or "bpw"."""

    text: str
    kind: Literal["bytes", "bpw"]
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("bytes", "bpw"):
            raise BudgetError(f"budget kind must be 'bytes' or 'bpw', got {self.kind!r}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise BudgetError(f"budget must be positive and finite, got {self.text!r}")
        if self.kind == "bytes" and self.value < 1:
            raise BudgetError(f"budget {self.text!r} is less than one byte")
        limit = MAX_BPW if self.kind == "bpw" else MAX_COUNT
        if v > limit:
            unit = "bpw" if self.kind == "bpw" else f"B ({MAX_COUNT // 2**50} PiB)"
            raise BudgetError(f"budget {self.text!r} is beyond the largest supported, {limit:g} {unit}")

    @classmethod
    def parse(cls, text: "str | int | Budget") -> "Budget":
        """Parse ``"3.5bpw"``, ``"120MB"`` (10^6), ``"120MiB"`` (2^20), ``"1.5GB"``, ``"1.2GiB"``,
        ``"88201792B"`` or a plain byte count (``"88201792"`` or an int).  Units are case-insensitive."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, bool) or not isinstance(text, (str, int)):
            raise BudgetError(f"a budget is a string such as '3.5bpw' or '120MiB', got {short(text)}")
        if isinstance(text, int):
            if not 0 < text <= MAX_COUNT:
                raise BudgetError(f"budget must be a positive number of bytes up to {MAX_COUNT}, got {short(text)}")
            return cls(text=str(text), kind="bytes", value=float(text))
        m = _BUDGET_RE.match(text) if len(text) <= 64 else None
        if m is None:
            raise BudgetError(
                f"cannot parse budget {short(text)}: use e.g. '3.5bpw', '120MB', '120MiB', '1.2GiB' or '88201792B'"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "bpw":
            return cls(text=text.strip(), kind="bpw", value=number)
        if unit not in _UNITS:
            raise BudgetError(
                f"unknown unit {m.group(2)!r} in budget {text!r}: use bpw, B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )
        value = number * _UNITS[unit]
        if not math.isfinite(value) or value > MAX_COUNT:  # 1e400B, 30-digit byte counts
            raise BudgetError(f"budget {text.strip()!r} is beyond the largest supported, {MAX_COUNT} B "
                              f"({MAX_COUNT // 2**50} PiB)")
        return cls(text=text.strip(), kind="bytes", value=float(math.floor(value)))

    def resolve(self, total_params: int) -> int:
        """The budget in bytes for a model with ``total_params`` stored parameters (bpw: floor(bpw·n/8))."""
        if self.kind == "bytes":
            return int(self.value)
        if isinstance(total_params, bool) or not isinstance(total_params, int) or not 0 < total_params <= MAX_COUNT:
            raise BudgetError(f"cannot resolve {self.text!r}: the model has {short(total_params)} parameters")
        n = int(math.floor(self.value * total_params / 8.0))
        if n < 1 or n > MAX_COUNT:
            raise BudgetError(f"budget {self.text!r} is {n} B for {total_params} parameters: outside [1, {MAX_COUNT}]")
        return n

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class BpwBound:
    """Bits-per-weight bounds for tensors whose name matches ``pattern`` (None: no bound)."""

    pattern: str
    min_bpw: float | None = None
    max_bpw: float | None = None

    def __post_init__(self) -> None:
        _check_bounds(self.min_bpw, self.max_bpw, f"bpw bound {self.pattern!r}")


def _check_bounds(lo: float | None, hi: float | None, what: str) -> None:
    for v in (lo, hi):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise InputError(f"{what}: bpw bounds must be finite and non-negative, got {v!r}")
    if lo is not None and hi is not None and lo > hi:
        raise InputError(f"{what}: min_bpw {lo} is larger than max_bpw {hi}")


@dataclass(frozen=True)
class Constraints:
    """Restrictions on the allocation; every name is checked against the measurement by :meth:`validate`.

    tie_groups:  tensors that must share one format (groups that overlap are merged).
    pinned:      tensor -> format id it must get (overrides bpw bounds and allowed lists).
    min_bpw, max_bpw: global bounds on each tensor's bits per weight (``8·bytes/numel`` of that format).
    bpw_bounds:  per-tensor overrides of the global bounds, by fnmatch pattern (first match wins).
    allowed:     (tensor pattern, format patterns) pairs: a matching tensor may only take formats matching
                 one of the format patterns (first matching tensor pattern wins).
    """

    tie_groups: tuple[tuple[str, ...], ...] = ()
    pinned: Mapping[str, str] = field(default_factory=dict)
    min_bpw: float | None = None
    max_bpw: float | None = None
    bpw_bounds: tuple[BpwBound, ...] = ()
    allowed: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tie_groups", tuple(tuple(g) for g in self.tie_groups))
        object.__setattr__(self, "pinned", dict(self.pinned))
        object.__setattr__(self, "bpw_bounds", tuple(self.bpw_bounds))
        object.__setattr__(self, "allowed", tuple((p, tuple(fs)) for p, fs in self.allowed))
        _check_bounds(self.min_bpw, self.max_bpw, "constraints")
        for g in self.tie_groups:
            if len(g) == 0:
                raise InputError("constraints: an empty tie group")
        for p, fs in self.allowed:
            if len(fs) == 0:
                raise InputError(f"constraints: allowed formats for {p!r} is empty")

    # --- checks against a table -----------------------------------------------------------------
    def validate(self, table: "Measurement") -> None:
        """Raise :class:`InputError` for names or patterns that match nothing in ``table``."""
        names = {t.name for t in table.tensors}
        for g in self.tie_groups:
            unknown = [n for n in g if n not in names]
            if unknown:
                raise InputError(f"tie group {list(g)} names unknown tensors: {unknown}")
        for n, f in self.pinned.items():
            if n not in names:
                raise InputError(f"pinned tensor {n!r} is not in the measurement")
            measured = {r.format for r in table.rows_for(n)}
            if f not in measured:
                raise InputError(
                    f"tensor {n!r} is pinned to {f!r}, which was not measured for it "
                    f"(measured: {', '.join(sorted(measured)) or 'none'})"
                )
        for p in [b.pattern for b in self.bpw_bounds] + [p for p, _ in self.allowed]:
            if not any(fnmatchcase(n, p) for n in names):
                raise InputError(f"constraint pattern {p!r} matches no tensor in the measurement")

    def bounds_for(self, name: str) -> tuple[float | None, float | None]:
        for b in self.bpw_bounds:
            if fnmatchcase(name, b.pattern):
                return b.min_bpw, b.max_bpw
        return self.min_bpw, self.max_bpw

    def permits(self, name: str, numel: int, row: "MeasureRow") -> bool:
        """Whether ``row`` (a measured format of tensor ``name``) is a legal choice for that tensor alone."""
        if not (self.pinned or self.bpw_bounds or self.allowed) and self.min_bpw is None and self.max_bpw is None:
            return True
        if name in self.pinned:
            return row.format == self.pinned[name]
        lo, hi = self.bounds_for(name)
        bpw = 8.0 * row.bytes / numel
        eps = 1e-12 * max(1.0, bpw)
        if lo is not None and bpw < lo - eps:
            return False
        if hi is not None and bpw > hi + eps:
            return False
        for p, fs in self.allowed:
            if fnmatchcase(name, p):
                return any(fnmatchcase(row.format, f) for f in fs)
        return True

    # --- serialization (for fingerprints and job files) ------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "tie_groups": [list(g) for g in self.tie_groups],
            "pinned": {k: self.pinned[k] for k in sorted(self.pinned)},
            "min_bpw": self.min_bpw,
            "max_bpw": self.max_bpw,
            "bpw_bounds": [[b.pattern, b.min_bpw, b.max_bpw] for b in self.bpw_bounds],
            "allowed": [[p, list(fs)] for p, fs in self.allowed],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "constraints") -> "Constraints":
        """The inverse of :meth:`to_dict`; every name, pattern and bound is type-checked (InputError)."""
        c = Checker(source)
        d = c.obj(d, "")

        def names(v: Any, where: str) -> tuple[str, ...]:
            return tuple(c.string(x, f"{where}[{i}]") for i, x in enumerate(c.array(v, where)))

        def bound(v: Any, where: str) -> float | None:
            return c.opt_real(v, where, 0.0, MAX_BPW)

        bpw_bounds = []
        for i, b in enumerate(c.array(d.get("bpw_bounds", []), "bpw_bounds")):
            p, lo, hi = c.array(b, f"bpw_bounds[{i}]", 3)
            bpw_bounds.append(BpwBound(c.string(p, f"bpw_bounds[{i}][0]"), bound(lo, f"bpw_bounds[{i}][1]"),
                                       bound(hi, f"bpw_bounds[{i}][2]")))
        allowed = []
        for i, a in enumerate(c.array(d.get("allowed", []), "allowed")):
            p, fs = c.array(a, f"allowed[{i}]", 2)
            allowed.append((c.string(p, f"allowed[{i}][0]"), names(fs, f"allowed[{i}][1]")))
        pinned = c.str_map(d.get("pinned", {}), "pinned")
        return cls(
            tie_groups=tuple(names(g, f"tie_groups[{i}]")
                             for i, g in enumerate(c.array(d.get("tie_groups", []), "tie_groups"))),
            pinned=pinned,
            min_bpw=bound(d.get("min_bpw"), "min_bpw"),
            max_bpw=bound(d.get("max_bpw"), "max_bpw"),
            bpw_bounds=tuple(bpw_bounds),
            allowed=tuple(allowed),
        )
