"""``bitalloc nest`` as a resumable job: interrupted at any block (or the head), the same command continues from
the last nested block, without a second gradient pass, to a byte-identical artifact; a changed option or text is
refused naming it; a kill after the rename is recognised; a corrupted checkpoint is recomputed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bitalloc.cli import main
from bitalloc.jobs.config import default_job_dir
from bitalloc.jobs.nest import NEST_STAGE
from bitalloc.nest import build
from tests.cli_process import kill_at_marks, run_to_end
from tests.gguf_tiny import write_loadable_gguf

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_loadable_gguf(tmp_path_factory.mktemp("nestjob") / "tiny.gguf")


def _argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["nest", str(src), "--calib", str(src.parent / "calib.txt"), "--windows", "4", "--ctx", "32",
            "--fisher-windows", "2", "--group", "32", "--max-bits", "4", "-q", "--out", str(out), *extra]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def reference(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nestref") / "art"
    assert main(_argv(src, out)) == 0
    assert not default_job_dir(out).exists()  # a finished job leaves nothing behind
    return out


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """A Ctrl-C when the ``call``-th block (1-based; the last is the head) starts nesting."""
    real, calls = build._nest_block, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "_nest_block", crashing)


@pytest.mark.parametrize("call", [2, 3])  # block 1 of the tiny model's 2; the head after both
def test_interrupted_nest_resumes_to_an_identical_artifact(src, reference, tmp_path, monkeypatch, caplog, call):
    out = tmp_path / "art"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        _interrupt_at(m, call)
        assert main(_argv(src, out)) == 130
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [job.name]  # no temporary left
    assert (job / NEST_STAGE / f"block{call - 2:04d}.safetensors").exists()
    caplog.set_level("INFO", logger="bitalloc.resume")
    with monkeypatch.context() as m:
        m.setattr("bitalloc.fisher.fisher_pass", lambda *a, **k: pytest.fail("the gradient pass ran again"))
        assert main(_argv(src, out)) == 0
    assert f"resuming the nest at block {call - 1}" in caplog.text
    assert _files(out) == _files(reference)
    assert not job.exists()


def test_a_changed_option_or_text_is_refused_and_the_job_kept(src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "art"
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        assert main(_argv(src, out)) == 130
    capsys.readouterr()
    assert main(_argv(src, out, "--descent-passes", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "options.descent_passes" in err
    other = tmp_path / "other.txt"
    other.write_text("quite another calibration text " * 80)
    argv = _argv(src, out)
    argv[argv.index("--calib") + 1] = str(other)
    assert main(argv) == 2
    assert "calibration" in capsys.readouterr().err
    assert not out.exists() and (default_job_dir(out) / NEST_STAGE / "block0000.safetensors").exists()


def test_a_kill_after_the_rename_is_recognised(src, reference, tmp_path):
    out = tmp_path / "art"
    assert main(_argv(src, out, "--keep-job")) == 0  # as if killed before the job directory was removed
    assert main(_argv(src, out)) == 0
    assert _files(out) == _files(reference) and not default_job_dir(out).exists()


def test_a_finished_artifact_changed_since_is_not_taken_for_this_jobs(src, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(_argv(src, out, "--keep-job")) == 0
    cfg = out / "config.json"
    cfg.write_text(cfg.read_text().replace("{", "{ ", 1))  # same manifest file, a small file that no longer matches it
    capsys.readouterr()
    assert main(_argv(src, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already exists" in err and "\n" not in err


def test_an_existing_artifact_not_from_this_job_is_refused(src, reference, tmp_path, capsys):
    out = tmp_path / "art"
    shutil.copytree(reference, out)
    assert main(_argv(src, out)) == 2
    assert "already exists" in capsys.readouterr().err
    default_job_dir(out).mkdir()  # an (empty) job directory does not make another run's artifact this job's
    assert main(_argv(src, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert _files(out) == _files(reference)


def test_a_corrupted_block_checkpoint_is_recomputed(src, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "art"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        assert main(_argv(src, out)) == 130
    path = job / NEST_STAGE / "block0001.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(_argv(src, out)) == 0
    assert _files(out) == _files(reference)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(src, reference, tmp_path):
    out = tmp_path / "art"
    job = default_job_dir(out)
    marks = [job / "job.json", job / NEST_STAGE / "fisher.safetensors", job / NEST_STAGE / "rows0000.json",
             job / NEST_STAGE / "rows0001.json"]
    assert kill_at_marks(_argv(src, out), marks, out, seed=2468, pause=0.2) >= 2
    if not out.exists():  # the last run, resumed, may have finished before its kill
        run_to_end(_argv(src, out))
    assert _files(out) == _files(reference)
    assert not job.exists() and not [p for p in tmp_path.iterdir() if p.name != out.name]
