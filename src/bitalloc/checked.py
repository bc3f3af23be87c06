"""The one validation layer for bitalloc's own JSON files: plans, measurement tables, packed descriptions.

Every such file is input (it may be edited, truncated, corrupted or crafted), so it is read through here:
:func:`read_json` (bytes -> strict UTF-8 -> JSON that rejects NaN/Infinity, numbers beyond the float range,
absurdly long integers, duplicate keys and deep nesting), :func:`versioned` (the ``kind`` and
``format_version``), then typed accessors that take a ``where`` (``"rows[3][2]"``) and raise one
:class:`InputError` line ``<file>: <where>: <what is wrong>``.  Counts (bytes, parameters, dimensions) are
ints in ``[0, MAX_COUNT]``, so arithmetic on them stays exact in int64 and float64; reals are finite floats
in ``[0, MAX_REAL]``, so sums of them stay finite.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import InputError
from .formats import Format, FormatError, get_format
from .io.paths import open_regular

#: Largest byte, parameter or dimension count accepted (2^53, 8 PiB: exact in float64, no int64 overflow).
MAX_COUNT = 2**53
#: Largest predicted error accepted (sums over a million tensors stay finite).
MAX_REAL = 1e200
_MAX_INT_DIGITS = 30
_MAX_DIMS = 8
#: Largest JSON file read (configs, plans, tables, indexes, descriptions).
MAX_JSON_BYTES = 64 << 20


def short(v: Any, n: int = 60) -> str:
    """A one-line, bounded ``repr`` of an offending value for messages."""
    r = repr(v).replace("\n", "\\n").replace("\r", "\\r")
    return r if len(r) <= n else r[: n - 3] + "..."


def one_line(text: object) -> str:
    return str(text).replace("\n", " ").replace("\r", " ")


def error_line(e: BaseException, limit: int = 400) -> str:
    """A third-party exception as one bounded line with its type (transformers' validation errors span several)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- parsing --------------------------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {short(k)} appears twice")
        d[k] = v
    return d


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {short(s)} is beyond the float range")
    return v


def _bounded_int(s: str) -> int:
    if len(s.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(s)} digits is beyond any valid count")
    return int(s)


def _no_constant(s: str) -> Any:
    raise ValueError(f"{s} is not a number bitalloc accepts")


def parse_json(text: str, source: str) -> Any:
    """Strict JSON: InputError naming ``source`` for syntax errors, NaN/Infinity, numbers out of range,
    duplicate keys or nesting too deep."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite_float,
                          parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{source} is not valid JSON: {one_line(e)}") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"{source} is not valid JSON: {one_line(e) or 'nested too deeply'}") from None


def decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source} is not UTF-8 text (invalid byte at offset {e.start})") from None


def read_text(path: str | Path, source: str) -> str:
    """The UTF-8 text of the file ``path`` (InputError naming ``source`` when it is not a regular file, larger
    than :data:`MAX_JSON_BYTES`, unreadable or not UTF-8).  Opened non-blocking: a FIFO is refused, not read."""
    try:
        f = open_regular(path, "file")
    except InputError as e:  # "file <path> is a FIFO ..." -> "cannot read <source>: it is a FIFO ..."
        reason = str(e).replace(f"file not found: {path}", "not found").replace(f"file {path} ", "it ")
        raise InputError(f"cannot read {source}: {reason}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{source} is {size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB allowed")
        try:
            raw = f.read()
        except OSError as e:
            raise InputError(f"cannot read {source}: {one_line(e.strerror or e)}") from None
    return decode(raw, source)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value of the file ``path``; ``what`` names it in messages (``"plan"``)."""
    source = f"{what} {path}"
    return parse_json(read_text(path, source), source)


def versioned(d: Any, kind: str, version: int, source: str) -> dict[str, Any]:
    """``d`` as the object of a bitalloc file of ``kind`` at ``format_version`` ``version``."""
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise InputError(f"{source} is not a bitalloc {kind.removeprefix('bitalloc.')} file "
                         f"(expected a JSON object with \"kind\": \"{kind}\")")
    if d.get("format_version") != version or isinstance(d.get("format_version"), bool):
        raise InputError(f"{source}: format_version {short(d.get('format_version'))} is not {version}")
    return d


# --- typed accessors ------------------------------------------------------------------------------
class Checker:
    """Typed access to one parsed file; every failure is ``InputError("<source>: <where>: ...")``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> InputError:
        return InputError(f"{self.source}: {where}: {what}" if where else f"{self.source}: {what}")

    def key(self, d: dict[str, Any], k: str, where: str = "") -> Any:
        if k not in d:
            raise self.fail(where, f"missing key {short(k)}")
        return d[k]

    def obj(self, v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(where, f"expected a JSON object, got {short(v)}")
        return v

    def array(self, v: Any, where: str, length: int | None = None) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(where, f"expected a JSON array, got {short(v)}")
        if length is not None and len(v) != length:
            raise self.fail(where, f"expected {length} items, got {len(v)}")
        return v

    def string(self, v: Any, where: str, max_len: int = 4096) -> str:
        if not isinstance(v, str) or not v or len(v) > max_len:
            raise self.fail(where, f"expected a non-empty string (at most {max_len} characters), got {short(v)}")
        if any(ord(c) < 32 for c in v):
            raise self.fail(where, f"control characters in {short(v)}")
        return v

    def opt_string(self, v: Any, where: str) -> str | None:
        return None if v is None else self.string(v, where)

    def count(self, v: Any, where: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(where, f"expected an integer in [{lo}, {hi}], got {short(v)}")
        return v

    def real(self, v: Any, where: str, lo: float = 0.0, hi: float = MAX_REAL) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise self.fail(where, f"expected a finite number in [{lo:g}, {hi:g}], got {short(v)}")
        return float(v)

    def opt_real(self, v: Any, where: str, lo: float = 0.0, hi: float = MAX_REAL) -> float | None:
        return None if v is None else self.real(v, where, lo, hi)

    def choice(self, v: Any, where: str, options: tuple[str, ...]) -> str:
        if not isinstance(v, str) or v not in options:
            raise self.fail(where, f"expected one of {', '.join(options)}, got {short(v)}")
        return v

    def str_map(self, v: Any, where: str) -> dict[str, str]:
        """A fingerprint-like mapping of names to strings."""
        d = self.obj(v, where)
        for k, x in d.items():
            self.string(k, f"{where} key", 256)
            self.string(x, f"{where}[{short(k)}]")
        return dict(d)

    def shape(self, v: Any, where: str) -> tuple[int, ...]:
        dims = self.array(v, where)
        if not 1 <= len(dims) <= _MAX_DIMS:
            raise self.fail(where, f"a tensor shape has 1 to {_MAX_DIMS} dimensions, got {short(v)}")
        shape = tuple(self.count(d, f"{where}[{i}]", 1) for i, d in enumerate(dims))
        if math.prod(shape) > MAX_COUNT:
            raise self.fail(where, f"shape {list(shape)} has more than {MAX_COUNT} elements")
        return shape

    def format_for(self, v: Any, where: str, shape: tuple[int, ...] | None = None) -> Format:
        """The format named ``v`` (which must store ``shape`` when given)."""
        fid = self.string(v, where, 64)
        try:
            fmt = get_format(fid)
            if shape is not None:
                fmt.check_shape(shape)
        except FormatError as e:
            msg = one_line(e)
            raise self.fail(where, msg if fid in msg else f"{short(fid)}: {msg}") from None
        return fmt
