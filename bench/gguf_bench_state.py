"""Saved state of ``bench/gguf_vs_llamacpp.py``, so a rerun reuses finished work and a killed run continues.

* llama.cpp's side: ``bench/results/gguf_vs_llamacpp_llamaside.json`` (reference PPL and one result per
  llama.cpp type, with its ``llama-quantize`` wall time) with the settings that made it and the
  ``llama-imatrix`` wall time (``timing``).  It is reused when the settings match, every result has the keys
  asked for and the files the bitalloc side needs (the F32 reference GGUF and its saved logits) still exist.
* bitalloc's side: one result per target size in ``.cache/gguf_bench/bitalloc-sizes.json``, keyed by a digest
  of everything that changes it (measurement fingerprint, target bytes, rounding, evaluation settings and
  the source of the code that quantizes and writes), written after every size, with its stage times.
* the measurement's wall time: ``measure-<key>.seconds.json`` beside its job directory, so a reused
  measurement still reports what it cost when it was made (:func:`save_seconds` / :func:`load_seconds`).
* :func:`code_digest`: SHA-256 of source files, part of the measurement and size keys (an edited GGUF fit
  makes a new measurement rather than reusing a stale one).
* :func:`error_agreement`: how well the measured (predicted) per-tensor errors match the final ones.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from bitalloc.measure import write_text_atomic

LLAMA_KEYS = ("eval_chunks", "calib_windows", "threads")
_LEGACY = {"eval_chunks": r"--eval-chunks (\d+)", "calib_windows": r"--calib-windows (\d+)",
           "threads": r"--threads (\d+)"}


def digest(obj: Any) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest(paths: Sequence[Path]) -> str:
    """16 hex digits of SHA-256 over the names and bytes of ``paths`` (sorted by name)."""
    h = hashlib.sha256()
    for p in sorted(Path(q) for q in paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def llama_settings(args: Any) -> dict[str, int]:
    """The options that change llama.cpp's side (evaluation chunks, imatrix chunks, threads)."""
    return {k: int(getattr(args, k)) for k in LLAMA_KEYS}


def _saved_settings(raw: Any) -> dict[str, int] | None:
    """Settings of a saved llama.cpp side: a dict, or the command line string of the first saved version."""
    if isinstance(raw, dict):
        try:
            return {k: int(raw[k]) for k in LLAMA_KEYS}
        except (KeyError, TypeError, ValueError):
            return None
    if isinstance(raw, str):
        found = {k: re.search(p, raw) for k, p in _LEGACY.items()}
        if all(found.values()):
            return {k: int(m.group(1)) for k, m in found.items() if m}
    return None


RESULT_KEYS = frozenset({"bytes", "kld", "ppl", "top1"})


def load_llama_side(path: Path, settings: Mapping[str, int], types: Sequence[str], needed: Sequence[Path],
                    keys: Collection[str] = RESULT_KEYS) -> tuple[float, dict[str, dict]] | None:
    """``(reference PPL, {type: result})`` saved at ``path`` for the same ``settings`` and every type of
    ``types``, each result holding every key of ``keys``; None when there is none, it differs, or a file of
    ``needed`` is missing."""
    if not path.is_file() or not all(Path(p).is_file() for p in needed):
        return None
    try:
        saved = json.loads(path.read_text())
        ref_ppl = float(saved["reference_ppl"])
        results = saved["llamacpp"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _saved_settings(saved.get("settings")) != dict(settings) or not isinstance(results, dict):
        return None
    if not all(isinstance(results.get(t), dict) and set(keys) <= set(results[t]) for t in types):
        return None
    return ref_ppl, {t: dict(results[t]) for t in types}


def save_llama_side(path: Path, settings: Mapping[str, int], ref_ppl: float, results: Mapping[str, dict],
                    timing: Mapping[str, float] | None = None) -> None:
    """Save llama.cpp's side; ``timing`` (e.g. ``{"imatrix_seconds": s}``) is kept beside the results."""
    body: dict[str, Any] = {"reference_ppl": ref_ppl, "settings": dict(settings), "llamacpp": dict(results)}
    if timing is not None:
        body["timing"] = dict(timing)
    write_text_atomic(path, json.dumps(body, indent=2) + "\n")


def save_seconds(path: Path, seconds: float, **info: Any) -> None:
    """Record the wall time of a piece of work (e.g. the measurement) made from scratch."""
    write_text_atomic(path, json.dumps({"seconds": round(float(seconds), 3), **info}, indent=1) + "\n")


def load_seconds(path: Path) -> float | None:
    """Seconds saved by :func:`save_seconds` (None when absent or unreadable)."""
    try:
        return float(json.loads(Path(path).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_llama_timing(path: Path) -> dict[str, float] | None:
    """The ``timing`` saved with llama.cpp's side at ``path`` (None when absent or unreadable)."""
    try:
        timing = json.loads(Path(path).read_text()).get("timing")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(timing, dict):
        return None
    try:
        return {str(k): float(v) for k, v in timing.items()}
    except (TypeError, ValueError):
        return None


class SizeResults:
    """bitalloc results per target size in one JSON file, ``{key: result}``, rewritten after each size."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data: dict[str, dict] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self._data = {str(k): v for k, v in data.items() if isinstance(v, dict)}
            except (OSError, ValueError, AttributeError):
                self._data = {}

    def get(self, key: str) -> dict | None:
        found = self._data.get(key)
        return dict(found) if found is not None else None

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        self._data[key] = dict(result)
        write_text_atomic(self.path, json.dumps(self._data, indent=1, sort_keys=True) + "\n")


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (nan when either is constant or too short)."""
    if len(a) != len(b):
        raise ValueError(f"spearman: lengths differ ({len(a)} vs {len(b)})")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def _quantile(v: Sequence[float], q: float) -> float:
    s = sorted(v)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def error_agreement(pairs: Mapping[str, tuple[str, float, float]]) -> dict[str, Any]:
    """Predicted vs final per-tensor error, ``{tensor: (format, predicted, final)}``: the final/predicted
    ratio's quantiles overall and per format, the sums, and the Spearman correlation over tensors."""
    if not pairs:
        raise ValueError("error_agreement: no tensors")
    pred = [p for _, p, _ in pairs.values()]
    final = [f for _, _, f in pairs.values()]
    ratios = [f / p for _, p, f in pairs.values() if p > 0]

    def stats(rs: list[float]) -> dict[str, float]:
        return {"n": len(rs), "p10": _quantile(rs, 0.1), "median": _quantile(rs, 0.5), "p90": _quantile(rs, 0.9)}

    by_fmt: dict[str, list[float]] = {}
    for fmt, p, f in pairs.values():
        if p > 0:
            by_fmt.setdefault(fmt, []).append(f / p)
    return {"tensors": len(pairs), "predicted_sum": sum(pred), "final_sum": sum(final),
            "spearman": spearman(pred, final), "ratio": stats(ratios) if ratios else None,
            "ratio_by_format": {k: stats(v) for k, v in sorted(by_fmt.items())}}


__all__ = ["RESULT_KEYS", "SizeResults", "code_digest", "digest", "error_agreement", "llama_settings",
           "load_llama_side", "load_llama_timing", "load_seconds", "save_llama_side", "save_seconds", "spearman"]
