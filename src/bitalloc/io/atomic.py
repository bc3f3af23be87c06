"""Atomic, verified outputs: a destination is either absent or complete, never partial.

``atomic_write`` writes a temporary file in the destination's directory, fsyncs it, optionally verifies
it (re-read), renames it over the destination and fsyncs the directory.  On any error -- a full disk,
an exception in the caller's code, ``KeyboardInterrupt`` -- the temporary file is removed and the
destination is untouched.  A ``kill -9`` can leave a temporary file behind; its name ends in
:data:`TEMP_SUFFIX` so :func:`remove_stale_temps` (called by :class:`bitalloc.jobs.store.Job`) can clean it up.

Manifests map names (tensor names or file names) to SHA-256 digests; they are written beside outputs and
checked with :func:`verify_manifest`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Union

import torch

from ..errors import InputError
from .paths import TEMP_SUFFIX, check_overlap

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_CHUNK = 1 << 20


def _check_destination(dest: Path, overwrite: bool, inputs: Iterable[PathLike]) -> None:
    if not dest.parent.is_dir():
        raise InputError(f"cannot write {dest}: directory {dest.parent} does not exist")
    check_overlap([("output", dest)], [("input", src) for src in inputs])
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise InputError(f"output {dest} already exists (remove it or choose another path)")
        if dest.is_dir() and not dest.is_symlink():
            raise InputError(f"output {dest} is a directory, expected a file path")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory; the rename is still atomic
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(exc: BaseException, dest: Path) -> InputError | None:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return InputError(f"disk full while writing {dest} ({os.strerror(exc.errno)}); nothing was written")
    return None


def _place_new(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest`` only if ``dest`` does not exist, atomically: a hard link fails if another process
    wrote ``dest`` meanwhile (two runs with one output), where a rename would silently replace its output."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise InputError(f"output {dest} already exists (it appeared while writing; another run wrote it?)") from None
    except OSError:  # a filesystem without hard links: check, then rename
        if dest.exists() or dest.is_symlink():
            raise InputError(f"output {dest} already exists (it appeared while writing)") from None
        os.replace(tmp, dest)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_write(
    path: PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    verify: Callable[[Path], None] | None = None,
) -> Iterator[BinaryIO]:
    """Open a binary file that appears at ``path`` only if the ``with`` block (and ``verify``) succeeds.

    ``inputs``: paths being read to produce this output; a destination that is one of them, lies inside one or
    contains one (symbolic links followed, :func:`bitalloc.io.paths.check_overlap`) is refused so an input is
    never replaced.  ``verify(temp_path)`` runs after the data is on disk and before
    the rename; raise from it to abandon the write.
    """
    dest = Path(path)
    _check_destination(dest, overwrite, inputs)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
    tmp = Path(tmp_name)
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if verify is not None:
            verify(tmp)
        if overwrite:
            os.replace(tmp, dest)
        else:
            _place_new(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        full = _disk_full(exc, dest)
        if full is not None:
            raise full from exc
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_write_dir(
    path: PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    verify: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; it is renamed to ``path`` when the block succeeds.

    With ``overwrite`` an existing directory is moved aside, replaced, then deleted (the only moment the
    destination is absent is between two renames).  On error the temporary directory is removed.
    ``inputs``: as for :func:`atomic_write` (a directory that is, lies inside or contains an input is refused).
    """
    dest = Path(path)
    if not dest.parent.is_dir():
        raise InputError(f"cannot write {dest}: directory {dest.parent} does not exist")
    check_overlap([("output directory", dest)], [("input", src) for src in inputs])
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise InputError(f"output {dest} already exists (remove it or choose another path)")
        if not dest.is_dir() or dest.is_symlink():
            raise InputError(f"output {dest} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TEMP_SUFFIX))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        _fsync_tree(tmp)
        if verify is not None:
            verify(tmp)
        if dest.exists():
            if not overwrite:
                raise InputError(f"output {dest} already exists (it appeared while writing)")
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old.", suffix=TEMP_SUFFIX))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(exc, dest)
        if full is not None:
            raise full from exc
        raise


def remove_stale_temps(directory: PathLike) -> list[Path]:
    """Delete temporaries left by killed writers under ``directory``; return what was removed."""
    removed = []
    for p in sorted(Path(directory).rglob(f"*{TEMP_SUFFIX}"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    if removed:
        log.info("removed %d stale temporary file(s) under %s", len(removed), directory)
    return removed


# ----------------------------------------------------------------------------------------------- hashes
def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (row-major, no copy when already contiguous on CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 over ``"<dtype>:<shape>\\n"`` and the tensor's raw bytes: equal digests mean equal tensors."""
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}\n".encode())
    h.update(tensor_bytes(t))
    return h.hexdigest()


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(items: Mapping[str, torch.Tensor] | PathLike | Iterable[PathLike]) -> dict[str, str]:
    """Digests of tensors (a name -> tensor mapping), of every file under a directory (relative names),
    or of a list of files (base names)."""
    if isinstance(items, Mapping):
        return {name: tensor_digest(t) for name, t in sorted(items.items())}
    if isinstance(items, (str, os.PathLike)) and Path(items).is_dir():
        root = Path(items)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {p.relative_to(root).as_posix(): file_digest(p) for p in files}
    paths = [Path(items)] if isinstance(items, (str, os.PathLike)) else [Path(p) for p in items]
    out: dict[str, str] = {}
    for p in paths:
        if p.name in out:
            raise InputError(f"two files named {p.name} in one manifest")
        out[p.name] = file_digest(p)
    return dict(sorted(out.items()))


def write_manifest(path: PathLike, digests: Mapping[str, str], *, overwrite: bool = False) -> None:
    """Write ``{"sha256": {name: digest}}`` as JSON, atomically."""
    text = json.dumps({"version": 1, "sha256": dict(sorted(digests.items()))}, indent=1) + "\n"
    with atomic_write(path, overwrite=overwrite) as f:
        f.write(text.encode())


def read_manifest(path: PathLike) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        digests = data["sha256"]
        if not isinstance(digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in digests.items()
        ):
            raise TypeError("sha256 must map names to strings")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"manifest {path} is unreadable or malformed: {exc}") from exc
    return digests


def compare_digests(expected: Mapping[str, str], actual: Mapping[str, str], what: str) -> None:
    """Raise InputError naming every missing, unexpected or differing entry."""
    problems = [f"missing {n}" for n in sorted(set(expected) - set(actual))]
    problems += [f"unexpected {n}" for n in sorted(set(actual) - set(expected))]
    problems += [f"{n} differs" for n in sorted(set(expected) & set(actual)) if expected[n] != actual[n]]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} problems)" if len(problems) > 10 else "")
        raise InputError(f"{what} does not match its manifest: {shown}")


def verify_manifest(
    manifest_path: PathLike, items: Mapping[str, torch.Tensor] | PathLike | Iterable[PathLike]
) -> None:
    """Check tensors or files (as for :func:`manifest`) against a manifest written by :func:`write_manifest`."""
    compare_digests(read_manifest(manifest_path), manifest(items), str(manifest_path))
