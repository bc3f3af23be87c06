"""Inputs and outputs of a command, checked against each other before any work.

Every output a command may write (the output file or directory, a GGUF's manifest, the job directory, the
temporary siblings of the atomic writers) is compared with every input it reads (model file or folder and its
files, calibration and evaluation texts, tables, plans) and refused when it *is* one, lies *inside* one or
*contains* one.  Paths are compared by identity (device and inode, so symbolic links, hard-linked folders, bind
mounts and case-insensitive file systems are followed) and, for paths that do not exist yet, through their
nearest existing parent.  Input paths are checked with ``stat`` only, never opened: a FIFO named like a model
would block a reader forever, so anything that is not a regular file or a directory is refused.
"""
from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence, Union

from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]
TEMP_SUFFIX = ".bitalloc-tmp"  # the atomic writers' temporaries: ``.<name>.<random><TEMP_SUFFIX>`` beside <name>

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def kind_of(mode: int) -> str:
    """``file``, ``directory`` or the words for anything else (a FIFO, a socket, a device)."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def check_input(path: PathLike, what: str, expect: str = "any") -> Path:
    """``path`` when it is an existing regular file or directory (``expect``: ``file``, ``directory`` or ``any``);
    otherwise one InputError naming it.  Uses ``stat`` only: nothing is opened."""
    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if p.is_symlink():
            raise InputError(f"{what} {p} is a broken symbolic link") from None
        raise InputError(f"{what} not found: {p}") from None
    except OSError as exc:
        raise InputError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    kind = kind_of(st.st_mode)
    if kind not in ("file", "directory"):
        raise InputError(f"{what} {p} is {kind}, not a regular file or directory; refused without opening it")
    if expect != "any" and kind != expect:
        raise InputError(f"{what} {p} is a {kind}, expected a {expect}")
    return p


def open_regular(path: PathLike, what: str = "file") -> BinaryIO:
    """``path`` opened for binary reading, InputError unless it is a regular file.  Opened non-blocking and
    checked by ``fstat`` on the open descriptor: a FIFO never blocks, and nothing can swap the file in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        kind = kind_of(os.fstat(fd).st_mode)
        if kind != "file":
            raise InputError(f"{what} {path} is {'a ' if kind == 'directory' else ''}{kind}; a regular file is "
                             "required")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_entries(directory: PathLike, what: str) -> None:
    """Refuse a directory holding, at its top level, something a reader could block on (a FIFO, socket, device)."""
    d = Path(directory)
    try:
        entries = sorted(d.iterdir())
    except OSError as exc:
        raise InputError(f"{what} {d} cannot be listed: {exc.strerror or exc}") from None
    for entry in entries:
        try:
            mode = os.stat(entry).st_mode
        except OSError:
            continue  # a broken link is not read by anyone
        if kind_of(mode) not in ("file", "directory"):
            raise InputError(f"{what} {d} holds {entry.name}, which is {kind_of(mode)}; refused without opening it")


@dataclass(frozen=True)
class _Where:
    """A path's identity: its resolved form and the (device, inode) of itself and of each existing ancestor."""

    path: Path
    resolved: Path
    ids: tuple[tuple[int, int] | None, ...]  # [self, parent, grandparent, ...]; None where it does not exist

    @classmethod
    def of(cls, path: PathLike) -> _Where:
        p = Path(path)
        resolved = Path(os.path.realpath(p))
        ids = []
        for q in (resolved, *resolved.parents):
            try:
                st = os.stat(q)
                ids.append((st.st_dev, st.st_ino))
            except OSError:
                ids.append(None)
        return cls(p, resolved, tuple(ids))

    @property
    def own(self) -> tuple[int, int] | None:
        return self.ids[0]

    def within(self, other: _Where) -> bool:
        """True when ``self`` is ``other`` or lies anywhere below it."""
        if other.own is not None and other.own in self.ids:
            return True
        return self.resolved == other.resolved or other.resolved in self.resolved.parents


def relation(output: PathLike, input: PathLike) -> str | None:
    """``is``, ``is inside`` or ``contains`` when the two paths overlap, else None."""
    return _relation(_Where.of(output), _Where.of(input))


def _relation(out: _Where, src: _Where) -> str | None:
    if out.within(src):
        return "is" if (out.own is not None and out.own == src.own) or out.resolved == src.resolved else "is inside"
    if src.within(out):
        return "contains"
    return None


def _is_temp_of(src: _Where, out: _Where) -> bool:
    """``src`` is named like a temporary of ``out`` (the writers remove those as debris of a killed run)."""
    return (src.resolved.parent == out.resolved.parent
            and fnmatch.fnmatchcase(src.resolved.name, f".{out.resolved.name}.*{TEMP_SUFFIX}"))


def _words(rel: str) -> str:
    return {"is": "is the input", "is inside": "is inside the input", "contains": "contains the input"}[rel]


def check_overlap(outputs: Sequence[tuple[str, PathLike]], inputs: Sequence[tuple[str, PathLike]], *,
                  containers: Sequence[tuple[str, PathLike]] = ()) -> None:
    """Refuse when an output is, lies inside or contains an input, or an input is named like an output's
    temporary; also when two outputs overlap (a job directory and the output it produces).

    ``outputs`` and ``inputs``: ``(what, path)`` pairs, e.g. ``("output", "out/")``, ``("model", "m/")``.
    ``containers``: directories only written *into* (a sweep's results folder): refused when they are or lie
    inside an input, but they may contain inputs.
    """
    srcs = [(what, Path(p), _Where.of(p)) for what, p in inputs]
    outs = [(what, Path(p), _Where.of(p)) for what, p in outputs]
    for what, p in containers:
        c = _Where.of(p)
        for swhat, sp, src in srcs:
            if (rel := _relation(c, src)) in ("is", "is inside"):
                raise InputError(f"{what} {p} {_words(rel)} {sp} ({swhat}); results may not be written into an "
                                 "input: choose another path")
    for what, p, out in outs:
        rels = [(rel, swhat, sp) for swhat, sp, src in srcs if (rel := _relation(out, src)) is not None]
        if rels:
            rel, swhat, sp = min(rels, key=lambda r: r[0] != "is")  # the exact input first
            raise InputError(f"{what} {p} {_words(rel)} {sp} ({swhat}); an output may not be, lie inside or "
                             "contain an input: choose another path")
        for swhat, sp, src in srcs:
            if _is_temp_of(src, out):
                raise InputError(f"{swhat} {sp} is named like a temporary of {what} {p} and would be removed; "
                                 "rename it")
    for i, (what, p, out) in enumerate(outs):
        for what2, p2, out2 in outs[i + 1:]:
            rel = _relation(out, out2)
            if rel is not None:
                raise InputError(f"{what} {p} and {what2} {p2} overlap ({what} {rel} {what2}); "
                                 "choose separate paths")


def check_output(path: PathLike, what: str, expect: str, *, replaced: bool = False) -> None:
    """Refuse an output that exists as something other than ``expect`` (``file`` or ``directory``), whose nearest
    existing ancestor is not a directory, or (``replaced``: a directory renamed into place as a whole) that is a
    symbolic link -- refusals the writers would otherwise make only after the job."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError:
        st = None
    if st is not None and kind_of(st.st_mode) != expect:
        raise InputError(f"{what} {p} exists and is {'a ' if kind_of(st.st_mode) in ('file', 'directory') else ''}"
                         f"{kind_of(st.st_mode)}, expected a {expect}")
    if st is not None and replaced and p.is_symlink():
        raise InputError(f"{what} {p} is a symbolic link to a directory; give the directory itself")
    if st is not None and replaced:
        check_replaceable(p, what)
    for parent in Path(os.path.abspath(p)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write {what} {p}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):  # refused now, not after the job
                raise InputError(f"cannot write {what} {p}: directory {parent} is not writable")
            break


def check_new_dir(out: Path, inputs: Iterable[PathLike], overwrite: bool, what: str = "output directory") -> None:
    """A directory writer's refusals before any work: ``out`` is not an input, its parent or inside one
    (:func:`check_overlap`); it does not exist unless ``overwrite``; and then it is replaced only when empty or a
    previous bitalloc output (:func:`check_replaceable`)."""
    check_overlap([(what, out)], [("input", p) for p in inputs])
    if out.exists() and not overwrite:
        raise InputError(f"{what} {out} already exists (choose another path or allow overwriting)")
    if out.is_dir() and not out.is_symlink():
        check_replaceable(out, what)  # never a folder of other files


def check_replaceable(path: Path, what: str) -> None:
    """``--overwrite`` replaces a directory as a whole: only an empty one or one bitalloc wrote (it holds the
    ``manifest.json`` every packed output carries), never a directory of someone's other files."""
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if names and "manifest.json" not in names:
        raise InputError(f"{what} {path} is a directory bitalloc did not write (no manifest.json); --overwrite "
                         "replaces only a previous bitalloc output: choose another path")


def text_inputs(paths: Iterable[PathLike], what: str) -> list[tuple[str, Path]]:
    """``(what, path)`` of each text path as given and of each file read from it (a directory's ``*.txt``, which
    may be links to anywhere)."""
    out: list[tuple[str, Path]] = []
    for p in paths:
        path = check_input(p, what)
        out.append((what, path))
        if path.is_dir():
            out.extend((what, f) for f in sorted(path.rglob("*.txt")) if f.is_file())
    return out


def model_inputs(path: PathLike, what: str) -> list[tuple[str, Path]]:
    """``(what, path)`` of a model file or directory and of the directory's top-level files (often links, as in a
    Hugging Face cache)."""
    p = check_input(path, what)
    if not p.is_dir():
        return [(what, p)]
    check_entries(p, what)
    return [(what, p), *((what, f) for f in sorted(p.iterdir()) if f.is_file())]


__all__ = ["check_entries", "check_input", "open_regular", "check_output", "check_overlap", "check_replaceable", "kind_of", "model_inputs", "relation",
           "text_inputs"]
