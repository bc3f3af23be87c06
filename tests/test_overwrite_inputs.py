"""No command may destroy its input (issue #16, class 2): every output (``--out``/``-o``, a GGUF's manifest, the job
directory, a sweep's result files) is compared with every input (model folder and its files, GGUF, texts and the
files of text folders, tables, plans), symbolic links followed, and refused with one ``error:`` line before the
model or any text is read -- with ``--overwrite`` too.  Inputs that are FIFOs are refused without being opened.

Each refusal is checked against the whole working tree: not one byte of it changes, nothing is left beside it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from bitalloc.cli import build_parser, main
from bitalloc.errors import InputError
from bitalloc.io.atomic import atomic_write, atomic_write_dir
from bitalloc.io.paths import relation
from tests.gguf_tiny import gguf_argv, write_loadable_gguf
from tests.test_resume import make_hf_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("src")
    return make_hf_dir(root / "hf" / "model"), write_loadable_gguf(root / "tiny.gguf")


@pytest.fixture
def w(sources, tmp_path) -> Path:
    """A working tree: model/ (HF folder), calib.txt, eval.txt, table.json, tiny.gguf, link -> model."""
    model, src = sources
    shutil.copytree(model, tmp_path / "model")
    shutil.copy(model.parent / "calib.txt", tmp_path / "calib.txt")
    (tmp_path / "eval.txt").write_text(" ".join(reversed((tmp_path / "calib.txt").read_text().split())))
    (tmp_path / "table.json").write_text("{}")
    shutil.copy(src, tmp_path / "tiny.gguf")
    (tmp_path / "link").symlink_to("model")
    return tmp_path


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Loading a model or reading a text fails the test: every refusal here comes before any work."""
    import bitalloc.data
    import bitalloc.models.sources

    def forbidden(*a, **k):
        raise AssertionError("the model or a text was read before the refusal")

    monkeypatch.setattr(bitalloc.models.sources, "load_model", forbidden)
    monkeypatch.setattr(bitalloc.data, "read_texts", forbidden)


class Blocked(Exception):
    """An input was opened and blocked (a FIFO with no writer)."""


@pytest.fixture
def alarm():
    def hung(*_):
        raise Blocked("blocked opening an input")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by digest, links by target, folders and FIFOs by kind."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if p.is_dir() else "other"
    return out


def refused(capsys, root: Path, argv: list[str], *words: str) -> str:
    """``main(argv)`` exits 2 with one ``error:`` line holding ``words``, and nothing under ``root`` changed."""
    before = tree(root)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    assert tree(root) == before
    return lines[0]


def measure(w: Path, out: Path, *extra: object) -> list[object]:
    return ["measure", w / "model", "--calib", w / "calib.txt", "--formats", "int4-g32,int8-g128", "--windows", 2,
            "--ctx", 16, "-q", "--out", out, "--overwrite", *extra]


def quantize(w: Path, out: Path, *extra: object) -> list[object]:
    return ["quantize", w / "model", "--format", "int4-g32", "--calib", w / "calib.txt", "--windows", 2, "--ctx", 16,
            "-q", "--out", out, "--overwrite", *extra]


def sweep(w: Path, out: Path, *extra: object) -> list[object]:
    return ["sweep", w / "model", "--budgets", "6bpw", "--formats", "int4-g32,int8-g128", "--calib", w / "calib.txt",
            "--eval", w / "eval.txt", "--windows", 2, "--eval-windows", 2, "--ctx", 16, "-q", "--out", out,
            "--overwrite", *extra]


def gguf(w: Path, out: Path, *extra: object) -> list[object]:
    argv: list[object] = gguf_argv(w / "tiny.gguf", out, "--overwrite", *extra)
    argv[argv.index("--calib") + 1] = w / "calib.txt"
    return argv


def plan(w: Path, out: Path, *extra: object) -> list[object]:
    return ["plan", w / "table.json", "--budget", "4bpw", "--out", out, "--overwrite", *extra]


# (command, output relative to the tree, extra options, words of the refusal)
CASES = [
    ("quantize", "model", (), "is the input"),  # the lead's reproduction
    ("quantize", ".", (), "contains the input"),  # a folder holding the model
    ("quantize", "model/packed", (), "is inside the input"),
    ("quantize", "link", (), "is the input"),  # a link to the model
    ("quantize", "calib.txt", (), "is the input"),
    ("quantize", "q", ("--job", "model"), "job directory"),
    ("quantize", "q", ("--job", "."), "contains the input"),
    ("quantize", "q", ("--job", "q/job"), "overlap"),
    ("measure", "model", (), "is the input"),
    ("measure", "model/config.json", (), "is the input"),
    ("measure", "model/table.json", (), "is inside the input"),
    ("measure", "link/t.json", (), "is inside the input"),
    ("measure", ".", (), "contains the input"),
    ("measure", "calib.txt", (), "is the input"),
    ("measure", "t.json", ("--job", "link"), "is the input"),
    ("sweep", "model", (), "is the input"),
    ("sweep", "link", (), "is the input"),
    ("sweep", "model/results", (), "is inside the input"),
    ("sweep", "r", ("--job", "model"), "is the input"),
    ("sweep", "r", ("--job", "r"), "overlap"),
    ("gguf", "tiny.gguf", (), "is the input"),
    ("gguf", "tiny.gguf/x.gguf", (), "is inside the input"),
    ("gguf", ".", (), "contains the input"),
    ("gguf", "calib", (), "is the input"),  # its manifest calib.manifest.json: see the test below
    ("gguf", "o.gguf", ("--job", "."), "contains the input"),
    ("plan", "table.json", (), "is the input"),
    ("plan", "table.json/p.json", (), "is inside the input"),
    ("plan", ".", (), "contains the input"),
]
COMMANDS = {"quantize": quantize, "measure": measure, "sweep": sweep, "gguf": gguf, "plan": plan}


@pytest.mark.parametrize("command,out,extra,words", CASES, ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2])}" for c in CASES])
def test_an_output_over_an_input_is_refused_before_any_work(w, capsys, command, out, extra, words):
    if command == "gguf" and out == "calib":
        (w / "calib.txt").rename(w / "calib.manifest.json")  # the manifest OUT.manifest.json is the text
        argv = gguf(w, w / "calib")
        argv[argv.index("--calib") + 1] = w / "calib.manifest.json"
    else:
        argv = COMMANDS[command](w, w / out, *(w / e if i % 2 else e for i, e in enumerate(extra)))
    refused(capsys, w, argv, words)


def test_a_sweep_may_write_into_a_folder_holding_its_inputs_but_not_over_one(w, capsys):
    (w / "r").mkdir()
    (w / "calib.txt").rename(w / "r" / "sweep.json")  # a text named like a result
    argv = sweep(w, w / "r")
    argv[argv.index("--calib") + 1] = w / "r" / "sweep.json"
    refused(capsys, w, argv, "output", "sweep.json is the input")


def test_a_hard_link_and_a_file_of_a_text_folder_are_inputs(w, capsys):
    os.link(w / "table.json", w / "hard.json")
    refused(capsys, w, plan(w, w / "hard.json"), "is the input")
    texts = w / "texts"
    texts.mkdir()
    (texts / "a.txt").symlink_to(w / "calib.txt")  # a folder's file may be a link to anywhere
    argv = measure(w, w / "calib.txt")
    argv[argv.index("--calib") + 1] = texts
    refused(capsys, w, argv, "is the input")


def test_an_input_named_like_a_temporary_of_the_output_is_refused(w, capsys):
    (w / "calib.txt").rename(w / ".t.json.x.bitalloc-tmp")  # the writers remove such files as debris
    argv = measure(w, w / "t.json")
    argv[argv.index("--calib") + 1] = w / ".t.json.x.bitalloc-tmp"
    refused(capsys, w, argv, "temporary")


@pytest.mark.parametrize("command,out,kind", [("quantize", "table.json", "expected a directory"),
                                              ("measure", "model2", "expected a file"),
                                              ("gguf", "model2", "expected a file"),
                                              ("gguf", "g.gguf", "manifest"),
                                              ("sweep", "table2.json", "expected a directory")])
def test_an_output_of_the_wrong_kind_is_refused_before_the_job(w, capsys, command, out, kind):
    """These were refused by the writer after the whole job (the GGUF's left a manifest behind)."""
    (w / "model2").mkdir()
    (w / "g.gguf.manifest.json").mkdir()
    (w / "table2.json").write_text("x")
    refused(capsys, w, COMMANDS[command](w, w / out), kind)


def test_outputs_the_writer_would_refuse_after_the_job_are_refused_before_it(w, capsys):
    (w / "elsewhere").mkdir()
    (w / "dirlink").symlink_to("elsewhere")  # the packed folder is renamed into place: not through a link
    refused(capsys, w, quantize(w, w / "dirlink"), "symbolic link")
    refused(capsys, w, measure(w, w / "nodir" / "t.json", "--job", w / "j"), "does not exist")
    refused(capsys, w, gguf(w, w / "nodir" / "o.gguf", "--job", w / "j"), "does not exist")
    refused(capsys, w, plan(w, w / "nodir" / "p.json"), "does not exist")
    for out in (".", "/", "", "x/.."):  # no name: was a ValueError traceback from the job directory's name
        refused(capsys, w, quantize(w, out), "names no file or folder")
        refused(capsys, w, gguf(w, out), "names no file or folder")


def test_new_output_folders_and_resumable_jobs_are_accepted(w):
    """The check refuses only conflicts: outputs in folders the job or the sweep creates pass, as does a rerun."""
    from bitalloc.cli.paths import check_paths

    parse = build_parser().parse_args
    for argv in (sweep(w, w / "new" / "r"), measure(w, w / "new" / "t.json"), gguf(w, w / "new" / "o.gguf"),
                 quantize(w, w / "new" / "q"), sweep(w, w), measure(w, w / "t.json", "--job", w / "new" / "j")):
        check_paths(parse([str(a) for a in argv]))
    (w / "q.job").mkdir()
    (w / "q.job" / "job.json").write_text("{}")  # a job to resume
    (w / "q").mkdir()
    check_paths(parse([str(a) for a in quantize(w, w / "q")]))


def test_a_job_directory_that_is_not_one_is_refused(w, capsys):
    """A job directory is deleted when the job ends: an existing folder of other files may not be one."""
    (w / "mine").mkdir()
    (w / "mine" / "notes.txt").write_text("keep")
    refused(capsys, w, quantize(w, w / "q", "--job", w / "mine"), "not a bitalloc job directory")
    from bitalloc.cli.paths import _check_job_dir

    (w / "killed").mkdir()
    (w / "killed" / "job.lock").write_text("")  # killed at its very start: resumable
    _check_job_dir(w / "killed")


@pytest.mark.parametrize("where", ["model", "calib", "measurement", "plan", "table", "dir", "reference", "text",
                                   "gguf", "model-file"])
def test_a_fifo_input_is_refused_without_opening_it(w, capsys, alarm, where):
    fifo = w / ("x.gguf" if where in ("model", "reference", "gguf") else "x.safetensors"
                if where == "model-file" else "x.txt")
    os.mkfifo(fifo)
    argv = {
        "model": quantize(w, w / "q")[:1] + [fifo] + quantize(w, w / "q")[2:],
        "calib": measure(w, w / "t.json")[:3] + [fifo] + measure(w, w / "t.json")[4:],
        "measurement": quantize(w, w / "q", "--measurement", fifo),
        "plan": quantize(w, w / "q", "--measurement", w / "table.json", "--plan", fifo),
        "table": ["plan", fifo, "--budget", "4bpw", "--out", w / "p.json"],
        "dir": ["eval", fifo, "--reference", w / "model", "--text", w / "eval.txt"],
        "reference": ["eval", w / "model", "--reference", fifo, "--text", w / "eval.txt"],
        "text": ["eval", w / "model", "--reference", w / "model", "--text", fifo],
        "gguf": gguf(w, w / "o.gguf")[:1] + [fifo] + gguf(w, w / "o.gguf")[2:],
        "model-file": quantize(w, w / "q"),  # a FIFO named like weights inside the model folder
    }[where]
    if where == "model-file":
        fifo.rename(w / "model" / "x.safetensors")
    refused(capsys, w, argv, "FIFO")


def test_a_missing_input_is_one_line(w, capsys):
    refused(capsys, w, quantize(w, w / "q", "--measurement", w / "none.json"), "--measurement not found")
    (w / "dangling").symlink_to(w / "none")
    refused(capsys, w, quantize(w, w / "q", "--calib", w / "dangling"), "broken symbolic link")


def test_the_packaged_model_is_an_input_when_model_is_omitted(tmp_path):
    from bitalloc.cli.paths import command_paths
    from bitalloc.models.sources import default_model_path

    for argv in (["measure", "--out", str(tmp_path / "t.json")], ["demo"]):
        ins, _, _ = command_paths(build_parser().parse_args(argv))
        assert ("model", default_model_path()) in ins
    args = build_parser().parse_args(["eval", str(tmp_path)])
    assert ("--reference model", default_model_path()) in command_paths(args)[0]


def test_relation_follows_links_and_missing_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "l").symlink_to(tmp_path / "a")
    assert relation(tmp_path / "l", tmp_path / "a") == "is"
    assert relation(tmp_path / "l" / "new" / "deeper", tmp_path / "a") == "is inside"
    assert relation(tmp_path, tmp_path / "l" / "b") == "contains"
    assert relation(tmp_path / "a2", tmp_path / "a") is None  # a shared prefix is not a parent


def test_the_atomic_writers_refuse_every_overlap(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"weights")
    with pytest.raises(InputError, match="is inside the input"):
        with atomic_write_dir(model / "out", inputs=[model]):
            pass
    with pytest.raises(InputError, match="contains the input"):
        with atomic_write_dir(tmp_path, overwrite=True, inputs=[model / "w.bin"]):
            pass
    (tmp_path / "alias.bin").symlink_to(model / "w.bin")
    with pytest.raises(InputError, match="is the input"):
        with atomic_write(tmp_path / "alias.bin", overwrite=True, inputs=[model / "w.bin"]) as f:
            f.write(b"x")
    assert (model / "w.bin").read_bytes() == b"weights"


def test_save_packed_refuses_the_folder_its_model_came_from(tmp_path):
    """The library writer, called directly: the model's source folder (``config._name_or_path``) is an input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.export.packed import save_packed

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    (tmp_path / "m").mkdir()
    model.config._name_or_path = str(tmp_path / "m")
    before = tree(tmp_path)
    for out in (tmp_path / "m", tmp_path):
        with pytest.raises(InputError, match="the input"):
            save_packed(out, model, None, {}, None, overwrite=True)
    with pytest.raises(InputError, match="is the input"):
        save_packed(tmp_path / "other", model, None, {}, None, inputs=[tmp_path / "other"], overwrite=True)
    assert tree(tmp_path) == before


def test_every_command_with_overwrite_is_covered():
    parser = build_parser()
    for command, build in COMMANDS.items():
        args = parser.parse_args([str(a) for a in build(Path("w"), Path("o"))])
        assert args.command == command and args.overwrite


def test_overwrite_replaces_only_a_directory_bitalloc_wrote(tmp_path, capsys):
    """``--overwrite`` of a folder of other files (a home directory, a project) is refused before any work, and
    by the library writer; an empty folder or a previous packed output (it holds manifest.json) is replaced."""
    from bitalloc.cli import main
    from bitalloc.errors import InputError
    from bitalloc.io.paths import check_replaceable

    victim = tmp_path / "docs"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calib = tmp_path / "c.txt"
    calib.write_text("some text " * 50)
    argv = ["quantize", str(model), "--format", "int4-g32", "--calib", str(calib), "-q", "--out", str(victim),
            "--overwrite"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not write" in err[0], err
    assert os.listdir(victim) == ["thesis.tex"]
    with pytest.raises(InputError, match="did not write"):
        check_replaceable(victim, "output")
    (victim / "manifest.json").write_text("{}")
    check_replaceable(victim, "output")
    check_replaceable(tmp_path / "model" / ".." / "model" / ".." / "docs", "output")


def test_an_output_in_a_directory_that_cannot_be_written_is_refused_before_the_job(tmp_path, monkeypatch, capsys):
    """A read-only destination is refused at the precheck, not by the writer after the job (``os.access`` is
    patched: the suite may run as root, for whom every directory is writable)."""
    from bitalloc.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calib = tmp_path / "c.txt"
    calib.write_text("some text " * 50)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    capsys.readouterr()
    assert main(["quantize", str(model), "--format", "int4-g32", "--calib", str(calib), "-q",
                 "--out", str(locked / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"directory {locked} is not writable" in err[0], err
    assert os.listdir(locked) == []
