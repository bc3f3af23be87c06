"""The part both strict readers share: a copy-on-write memory map that closes on exit."""
from __future__ import annotations

import contextlib
import mmap
from typing import TypeVar

_M = TypeVar("_M", bound="MappedFile")


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
