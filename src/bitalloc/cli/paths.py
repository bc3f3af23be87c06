"""Every command's input and output paths, checked against each other before anything is read or computed.

:func:`check_paths` runs in the CLI's precheck, after the options are parsed and checked.  It lists, per command, every path read (the model
file or folder -- the packaged model when MODEL is omitted -- and the folder's files, calibration and evaluation
texts and the files inside text folders, tables, plans, the packed folder and reference of ``eval``) and every
path written (the output, a GGUF's manifest, the job directory, a sweep's result files), then refuses with one
line, before any model or text is opened:

* an input that is missing, a broken link, or not a regular file or directory (a FIFO would block a reader);
* an output that is, lies inside or contains an input, symbolic links followed (:mod:`bitalloc.io.paths`);
* a job directory that overlaps the output, or an existing folder that is not a job directory (it is deleted
  when the job ends);
* an output that exists as the wrong kind (a folder where a file goes, or the reverse), which the writer
  would otherwise refuse only after the whole job.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from ..errors import InputError

# ``bitalloc.io`` imports torch: imported inside the functions, so importing the CLI stays light (a Ctrl-C
# during that import would escape ``main``) and ``--help`` stays fast

Pairs = list[tuple[str, Path]]


def _model(arg: str | None, what: str = "model") -> Pairs:
    from ..io.paths import model_inputs
    from ..models.sources import default_model_path

    return model_inputs(arg if arg else default_model_path(), what)


def _texts(arg: Sequence[str] | None, option: str, default: str) -> Pairs:
    from .. import data
    from ..io.paths import text_inputs

    return text_inputs(arg if arg else getattr(data, default)(), f"{option} text")


def _job(args: argparse.Namespace, out: Path) -> Path:
    from ..jobs.config import default_job_dir

    return Path(args.job) if args.job else default_job_dir(out)


def _check_job_dir(job: Path) -> None:
    """A job directory given by the user is deleted when the job ends: only an empty or a job directory will do."""
    from ..io.paths import TEMP_SUFFIX, check_output
    from ..jobs.store import JOB_FILE, LOCK_FILE

    check_output(job, "job directory", "directory")
    if job.is_dir() and not (job / JOB_FILE).is_file() and any(
            e.name != LOCK_FILE and not e.name.endswith(TEMP_SUFFIX) for e in job.iterdir()):  # a kill at its start
        raise InputError(f"job directory {job} exists and is not a bitalloc job directory (no {JOB_FILE}); it would "
                         "be deleted when the job ends: give a new or empty directory")


def command_paths(args: argparse.Namespace) -> tuple[Pairs, Pairs, Pairs]:
    """``(inputs, outputs, containers)`` of the parsed command ``args`` (containers: folders written into)."""
    from ..io.paths import check_input, model_inputs

    cmd = args.command
    if getattr(args, "out", None) is not None and Path(args.out).name in ("", ".", ".."):
        raise InputError(f"output {args.out!r} names no file or folder (its job directory would be OUT.job); give "
                         "a path such as ./results")
    ins: Pairs = []
    outs: Pairs = []
    cont: Pairs = []
    if cmd in ("measure", "quantize", "sweep", "demo", "nest"):
        ins += _model(args.model)
        ins += _texts(args.calib, "--calib", "default_calibration_files")
    for attr, what in (("measurement", "--measurement"), ("plan", "--plan"), ("table", "TABLE")):
        if getattr(args, attr, None):
            ins.append((what, check_input(getattr(args, attr), what, "file")))
    if cmd in ("eval", "export"):
        ins.append(("packed directory", check_input(args.dir, "packed directory", "directory")))
        ins += model_inputs(args.dir, "packed directory")[1:]
    if cmd == "eval":
        ins += _model(args.reference, "--reference model")
        ins += _texts(args.text, "--text", "default_eval_files")
    if cmd in ("sweep", "demo"):
        from ..jobs.sweep import OUTPUTS

        ins += _texts(args.eval, "--eval", "default_eval_files")
        out = Path(args.out)
        cont.append(("output directory", out))
        outs += [("output", out / name) for name in OUTPUTS]
    if cmd == "gguf":
        from ..export.gguf_manifest import manifest_path

        ins.append(("input GGUF", check_input(args.input, "input GGUF", "file")))
        ins += _texts(args.calib, "--calib", "default_calibration_files")
        out = Path(args.out)
        outs += [("output", out), ("manifest", manifest_path(out))]
    if cmd == "extract":
        ins.append(("nested artifact", check_input(args.art, "nested artifact", "directory")))
        if args.gguf is not None:
            from ..export.gguf_manifest import manifest_path

            outs += [("output", Path(args.gguf)), ("manifest", manifest_path(Path(args.gguf)))]
    if cmd in ("measure", "plan", "quantize", "export", "nest") or (cmd == "extract" and args.out is not None):
        outs.append(("output", Path(args.out)))
    if hasattr(args, "job") and outs:
        outs.append(("job directory", _job(args, Path(args.out))))
    return ins, outs, cont


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, every input/output conflict of the command ``args`` (see the module)."""
    from ..io.paths import check_output, check_overlap, relation

    ins, outs, cont = command_paths(args)
    check_overlap(outs, ins, containers=cont)
    for what, p in cont:  # a sweep's results folder: a folder, apart from its job directory
        check_output(p, what, "directory")
        for what2, p2 in outs:
            if what2 == "job directory" and (rel := relation(p2, p)) is not None:
                raise InputError(f"{what2} {p2} and {what} {p} overlap ({what2} {rel} {what}); choose separate paths")
    made = {Path(os.path.abspath(p)).parent for what, p in outs if what == "job directory"}  # mkdir -p by the job
    made |= {Path(os.path.abspath(p)) for _, p in cont}  # and by the sweep
    for what, p in outs:
        if what == "job directory":
            _check_job_dir(p)
        elif args.command in ("quantize", "export", "nest") or (args.command == "extract" and what == "output"
                                                                  and getattr(args, "gguf", None) is None):
            check_output(p, what, "directory", replaced=True)
        else:
            check_output(p, what, "file")
            parent = Path(os.path.abspath(p)).parent
            if not parent.exists() and parent not in made:  # the writer would refuse it after the job
                raise InputError(f"cannot write {what} {p}: directory {parent} does not exist")


__all__ = ["check_paths", "command_paths"]
