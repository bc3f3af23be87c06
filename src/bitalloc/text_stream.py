"""Text files read on demand: the files' decoded text, a chunk of bytes at a time, in bounded memory.

:class:`TextReader` yields the text :func:`bitalloc.data.read_texts` would return (UTF-8, each file falling back
to Latin-1 as a whole when it is not UTF-8, byte-order marks stripped from both ends of a file, files joined by
a blank line), but only as far as it has been asked to read.  Paths are checked with ``stat`` before they are
opened, and opened non-blocking: a FIFO, device or socket is refused, never read (it could block or be endless).
A NUL byte means the file is not text (binary, or UTF-16): refused.
"""
from __future__ import annotations

import codecs
import logging
from pathlib import Path
from typing import BinaryIO, Sequence

from .errors import InputError
from .io.paths import check_input, open_regular

log = logging.getLogger(__name__)

_BOM = "\ufeff"
_SEPARATOR = "\n\n"
#: bytes looked at by :func:`sniff_text` (a quick refusal of binary files before any model is loaded)
SNIFF_BYTES = 8192


def text_path_kind(path: Path) -> str:
    """``"dir"`` or ``"file"`` from ``stat`` (nothing is opened); InputError for anything else."""
    return "dir" if check_input(path, "text path").is_dir() else "file"


def open_text_file(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, refused unless it is a regular file (checked on the open file)."""
    return open_regular(path, "text file")


def _refuse_nul(path: Path, raw: bytes, offset: int) -> None:
    i = raw.find(b"\0")
    if i >= 0:
        raise InputError(f"{path} is not text: a NUL byte at offset {offset + i} (a binary or UTF-16 file?); "
                         "give UTF-8 text")


def sniff_text(path: Path) -> None:
    """Refuse ``path`` when its first :data:`SNIFF_BYTES` bytes are not text (a NUL byte)."""
    with open_text_file(path) as f:
        _refuse_nul(path, f.read(SNIFF_BYTES), 0)


class TextReader:
    """The concatenated text of ``files``, decoded as far as :meth:`read` has been asked to go.

    ``text`` holds complete characters only; ``nbytes`` counts the bytes read from disk (a file that turns
    out not to be UTF-8 is read again from its start as Latin-1); ``done`` once every file is read to its end.
    """

    def __init__(self, files: Sequence[Path], chunk: int = 1 << 20) -> None:
        self.files = [Path(f) for f in files]
        self.chunk = max(1, chunk)
        self._parts: list[str] = []  # decoded pieces; joined on demand by ``text``
        self._joined: str | None = ""
        self.nbytes = 0
        self.done = not self.files
        self._index = -1
        self._fh: BinaryIO | None = None
        self._start = 0  # the index in _parts where the current file's text begins
        self._pos = 0  # bytes of the current file consumed
        self._decoder: codecs.IncrementalDecoder | None = None
        self._leading = True  # no character of the current file kept yet (leading BOMs are dropped)
        self._held = ""  # trailing BOMs, kept only if more text follows in the same file

    @property
    def text(self) -> str:
        """The text decoded so far."""
        if self._joined is None:
            self._joined = "".join(self._parts)
        return self._joined

    def _add(self, piece: str) -> None:
        if piece:
            self._parts.append(piece)
            self._joined = None

    @property
    def current(self) -> Path | None:
        """The file being read (None before the first read and once done)."""
        return self.files[self._index] if 0 <= self._index < len(self.files) and not self.done else None

    def __enter__(self) -> "TextReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def read(self, nbytes: int) -> None:
        """Read about ``nbytes`` more bytes (fewer at the end of the last file)."""
        goal = self.nbytes + max(1, nbytes)
        while not self.done and self.nbytes < goal:
            if self._fh is None:
                self._next_file()
                continue
            self._read_chunk(min(self.chunk, goal - self.nbytes))

    def read_all(self) -> None:
        while not self.done:
            self.read(self.chunk)

    def _next_file(self) -> None:
        self._index += 1
        if self._index >= len(self.files):
            self.done = True
            return
        if self._index > 0:
            self._add(_SEPARATOR)
        self._fh = open_text_file(self.files[self._index])
        self._start, self._pos, self._leading, self._held = len(self._parts), 0, True, ""
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def _read_chunk(self, size: int) -> None:
        assert self._fh is not None and self._decoder is not None
        path = self.files[self._index]
        try:
            raw = self._fh.read(size)
        except OSError as e:
            raise InputError(f"cannot read the text file {path}: {e.strerror or e}") from None
        self.nbytes += len(raw)
        _refuse_nul(path, raw, self._pos)
        self._pos += len(raw)
        try:
            piece = self._decoder.decode(raw, final=not raw)
        except UnicodeDecodeError:
            self._restart_latin1(path)
            return
        self._append(piece)
        if not raw:  # end of this file: trailing BOMs are dropped
            self.close()

    def _restart_latin1(self, path: Path) -> None:
        """The current file is not UTF-8: decode it again from its start as Latin-1 (as a whole, like before)."""
        log.warning("%s is not UTF-8; reading it as Latin-1", path)
        assert self._fh is not None
        del self._parts[self._start:]
        self._joined = None
        consumed = self._pos
        self._fh.seek(0)
        self._pos, self._leading, self._held = 0, True, ""
        self._decoder = codecs.getincrementaldecoder("latin-1")()
        while self._pos < consumed and self._fh is not None:  # the bytes read, again; then on as usual
            self._read_chunk(min(self.chunk, consumed - self._pos))

    def _append(self, piece: str) -> None:
        piece = self._held + piece
        if self._leading:
            piece = piece.lstrip(_BOM)
            self._leading = not piece
        body = piece.rstrip(_BOM)
        self._held = piece[len(body):]
        self._add(body)
