"""The state file of a job directory (``job.json``), parsed strictly, and the checks of its checkpoint files.

``job.json`` (version 2)::

    {"version": 2, "fingerprint": {...}, "stages_done": [names, in completion order],
     "stage_seq": {name: n}, "seq": last n, "checkpoints": {"<stage>/<file>" | "<file>": {"seq": n, "sha256": hex}}}

``n`` numbers the writes (checkpoints and stage completions) in order, so everything that may have been
computed from a checkpoint has a larger number.  Anything else -- another version, wrong types, a path that
could leave the job directory -- is refused by :meth:`JobState.parse` with a ValueError naming the problem.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.atomic import file_digest

VERSION = 2
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
REL = re.compile(rf"(?:{NAME.pattern}/)?{NAME.pattern}")  # a checkpoint's path inside the job directory
SHA = re.compile(r"[0-9a-f]{64}")
RESERVED = ("job.json", "job.lock")  # never a checkpoint


def checkpoint_name(rel: str) -> bool:
    """True when ``rel`` may name a checkpoint: ``<stage>/<file>`` or ``<file>`` inside the job directory."""
    return bool(REL.fullmatch(rel)) and rel not in RESERVED


class JobState:
    """The parsed ``job.json``: stages done and recorded checkpoints, each with its sequence number."""

    def __init__(self, fingerprint: dict[str, Any], stages: dict[str, int] | None = None,
                 checkpoints: dict[str, tuple[int, str]] | None = None, seq: int = 0) -> None:
        self.fingerprint = fingerprint
        self.stages = dict(stages or {})  # name -> seq, in completion order
        self.checkpoints = dict(checkpoints or {})  # relative path -> (seq, sha256)
        self.seq = seq

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "fingerprint": self.fingerprint, "stages_done": list(self.stages),
                           "stage_seq": self.stages, "seq": self.seq,
                           "checkpoints": {k: {"seq": n, "sha256": h} for k, (n, h) in self.checkpoints.items()}},
                          indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str) -> JobState:
        """Raises ValueError, naming what is wrong, unless ``text`` is a job state this version wrote."""
        state = json.loads(text)
        if not isinstance(state, dict) or state.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} job state")
        fp, names, marks, seq, ckpts = (state.get(k) for k in
                                        ("fingerprint", "stages_done", "stage_seq", "seq", "checkpoints"))
        if not isinstance(fp, dict):
            raise ValueError("fingerprint must be an object")
        if not _is_seq(seq):
            raise ValueError("seq must be a non-negative integer")
        if not (isinstance(names, list) and isinstance(marks, dict) and set(map(str, names)) == set(marks)
                and len(set(map(str, names))) == len(names)
                and all(isinstance(n, str) and NAME.fullmatch(n) and _is_seq(marks[n], seq) for n in names)):
            raise ValueError("stages_done must list distinct stage names, each with its number in stage_seq")
        if not isinstance(ckpts, dict):
            raise ValueError("checkpoints must be an object")
        out: dict[str, tuple[int, str]] = {}
        for rel, rec in ckpts.items():
            if not (checkpoint_name(rel) and isinstance(rec, dict) and _is_seq(rec.get("seq"), seq)
                    and isinstance(rec.get("sha256"), str) and SHA.fullmatch(rec["sha256"])):
                raise ValueError(f"bad checkpoint record {rel[:80]!r}")
            out[rel] = (rec["seq"], rec["sha256"])
        return cls(fp, {n: marks[n] for n in names}, out, seq)


def _is_seq(x: Any, limit: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x and (limit is None or x <= limit)


def _blocked(root: Path, rel: str) -> Path | None:
    """The stage directory of ``rel`` when it is not a plain directory (a file, a symbolic link)."""
    if "/" not in rel:
        return None
    d = root / rel.split("/", 1)[0]
    return d if d.is_symlink() or (d.exists() and not d.is_dir()) else None


def file_problem(root: Path, rel: str, sha256: str) -> str | None:
    """None when ``root/rel`` is a regular file (no symbolic link on the way) with digest ``sha256``, else what
    is wrong with it."""
    blocked = _blocked(root, rel)
    if blocked is not None:
        return f"is unreachable ({blocked.name} is not a directory)"
    path = root / rel
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return "is not a regular file"
        return None if file_digest(path) == sha256 else "changed since it was written (SHA-256 differs)"
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"is unreadable ({exc.strerror or exc})"


def remove_checkpoint(root: Path, rel: str) -> None:
    """Delete the checkpoint ``root/rel`` -- or its stage "directory" when that is a file or a symbolic link:
    nothing outside ``root`` is ever deleted."""
    remove_path(_blocked(root, rel) or root / rel)


def remove_path(path: Path) -> None:
    """Delete a file, a symbolic link (not its target) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise InputError(f"cannot remove the discarded checkpoint {path}: {exc.strerror or exc}") from exc


__all__ = ["JobState", "NAME", "REL", "RESERVED", "VERSION", "checkpoint_name", "file_problem",
           "remove_checkpoint", "remove_path"]
