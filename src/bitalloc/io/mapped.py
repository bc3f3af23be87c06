"""The part both strict readers share: a copy-on-write memory map that closes on exit."""
from __future__ import annotations

import contextlib
import mmap
import os
import stat
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..errors import InputError

_M = TypeVar("_M", bound="MappedFile")


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, InputError unless it is a regular file.  Opened non-blocking and checked
    by ``fstat`` on the open descriptor: a FIFO never blocks, and nothing can swap the file in between."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise InputError(f"{path} is {kind}; a regular file is required")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class MappedFile:
    """Holds ``self._mm`` (set by the subclass while it validates the file); usable as a context manager."""

    _mm: mmap.mmap | None = None

    def close(self) -> None:
        """Release the map; tensors still referencing it keep it alive until they are freed."""
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
