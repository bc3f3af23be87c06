"""Issue #16 (#4, #6): a checkpoint whose bytes changed between runs is never trusted -- it is discarded with
everything computed after it, with a warning, and the rerun writes the bytes of a clean run; a malformed
``job.json`` is one error line; a failed first run leaves no job directory to block the corrected rerun."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from bitalloc.jobs import checkpoints
from bitalloc.jobs.config import default_job_dir
from bitalloc.cli import main
from bitalloc.errors import InputError
from bitalloc.jobs.store import Job, run_job
from tests.test_resume import assert_same_tree, make_hf_dir, measure_argv, quantize_argv

torch.set_num_threads(1)

FP = {"model": "m", "options": {"budget": "4bpw"}}
WARNED = "discarding it"


def flip(path: Path) -> None:
    """Change one byte in the middle of ``path`` (a JSON file may stay valid JSON: the silent case)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped": flip,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "emptied": lambda p: p.write_bytes(b""),
    "garbled": lambda p: p.write_bytes(os.urandom(64)),
    "deleted": lambda p: p.unlink(),
    "a directory": lambda p: (p.unlink(), p.mkdir(), (p / "x").write_text("x")),
}


# ----------------------------------------------------------------------------------------- Job level
def _three_items(job_dir: Path) -> None:
    with Job(job_dir, FP) as job:
        job.save_item("s", "a", {"t": torch.arange(16.0)})
        job.complete_stage("first")
        job.save_item("s", "b", {"v": [1, 2, 3]})
        job.save_item("s", "c", {"t": torch.ones(4)})
        job.complete_stage("second")


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_changed_checkpoint_is_discarded_with_everything_written_after_it(tmp_path, caplog, how):
    _three_items(tmp_path / "job")
    CORRUPTIONS[how](tmp_path / "job" / "s" / "b.json")
    with caplog.at_level(logging.WARNING, logger="bitalloc.jobs.store"):
        with Job(tmp_path / "job", FP) as job:
            assert job.items("s") == ["a"] and job.stages_done == ("first",)
            assert torch.equal(job.load_item("s", "a")["t"], torch.arange(16.0))
            with pytest.raises(InputError, match="no checkpoint s/b"):
                job.load_item("s", "b")
    assert "checkpoint s/b.json" in caplog.text and WARNED in caplog.text
    assert sorted(p.name for p in (tmp_path / "job" / "s").iterdir()) == ["a.safetensors"]
    with Job(tmp_path / "job", FP) as job:  # the discard is final: no second warning
        assert job.items("s") == ["a"]


def test_stage_directory_replaced_by_a_link_or_a_file_is_discarded_within_the_job(tmp_path, caplog):
    _three_items(tmp_path / "job")
    outside = tmp_path / "outside"
    shutil.move(tmp_path / "job" / "s", outside)
    flip(outside / "b.json")
    (tmp_path / "job" / "s").symlink_to(outside)
    with Job(tmp_path / "job", FP) as job:
        assert job.items("s") == [] and job.stages_done == ()
        job.save_item("s", "a", {"v": 2})  # the stage directory is a real one again
        assert job.load_item("s", "a") == {"v": 2}
    assert "s is not a directory" in caplog.text
    assert sorted(p.name for p in outside.iterdir()) == ["a.safetensors", "b.json", "c.safetensors"]
    (tmp_path / "job" / "t").write_text("a file where a stage directory belongs")
    with Job(tmp_path / "job", FP) as job:
        job.save_item("t", "x", {"v": 3})
        assert job.items("t") == ["x"]


def test_unrecorded_files_are_never_read(tmp_path):
    with Job(tmp_path / "job", FP) as job:
        (job.stage_dir("s") / "planted.json").write_text('{"v": 1}\n')  # as a kill before the record leaves it
        assert not job.has_item("s", "planted") and job.items("s") == []


def test_an_intact_job_is_reopened_without_warnings(tmp_path, caplog):
    _three_items(tmp_path / "job")
    with caplog.at_level(logging.WARNING, logger="bitalloc.jobs.store"):
        with Job(tmp_path / "job", FP) as job:
            assert job.items("s") == ["a", "b", "c"] and job.stages_done == ("first", "second")
    assert not caplog.records


def _state(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


BAD_STATES = {
    "not JSON": lambda d: "{broken",
    "binary": lambda d: "\udcff\x00",
    "a list": lambda d: "[1, 2]",
    "a string": lambda d: '"job"',
    "old version": lambda d: json.dumps({**d, "version": 1}),
    "stages a string": lambda d: json.dumps({**d, "stages_done": "first"}),
    "stage without number": lambda d: json.dumps({**d, "stage_seq": {}}),
    "stage names not strings": lambda d: json.dumps({**d, "stages_done": [1], "stage_seq": {"1": 1}}),
    "fingerprint a list": lambda d: json.dumps({**d, "fingerprint": []}),
    "checkpoints a list": lambda d: json.dumps({**d, "checkpoints": []}),
    "seq a float": lambda d: json.dumps({**d, "seq": 1.5}),
    "record not an object": lambda d: json.dumps({**d, "checkpoints": {"s/a.json": "x"}}),
    "bad digest": lambda d: json.dumps({**d, "checkpoints": {"s/a.json": {"seq": 1, "sha256": "zz"}}}),
    "path escapes": lambda d: json.dumps({**d, "checkpoints": {"../victim": {"seq": 1, "sha256": "0" * 64}}}),
    "absolute path": lambda d: json.dumps({**d, "checkpoints": {"/tmp/victim": {"seq": 1, "sha256": "0" * 64}}}),
    "the state itself as a checkpoint": lambda d: json.dumps(
        {**d, "checkpoints": {"job.json": {"seq": 1, "sha256": "0" * 64}}}),
    "deep nesting": lambda d: "[" * 100000 + "]" * 100000,
    "missing keys": lambda d: json.dumps({"version": 2}),
}


@pytest.mark.parametrize("what", sorted(BAD_STATES))
def test_malformed_job_file_is_one_clear_error_and_deletes_nothing(tmp_path, what):
    job_dir = tmp_path / "job"
    _three_items(job_dir)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    text = BAD_STATES[what](_state(job_dir))
    (job_dir / "job.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InputError) as e:
        Job(job_dir, FP)
    msg = str(e.value)
    assert "\n" not in msg and "job.json" in msg and "malformed" in msg and len(msg) < 400
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert victim.read_text() == "keep me"


def test_job_file_that_is_a_directory_is_one_clear_error(tmp_path):
    (tmp_path / "job" / "job.json").mkdir(parents=True)
    with pytest.raises(InputError, match="job.json is unreadable or malformed"):
        Job(tmp_path / "job", FP)


# --------------------------------------------------------------------------------- failed first runs
def _fails(exc: BaseException, stage: str | None = None):
    def run(job: Job) -> None:
        job.save_item("s", "a", {"v": 1})
        if stage:
            job.complete_stage(stage)
        raise exc

    return run


@pytest.mark.parametrize("exc", [InputError("bad input"), ValueError("bug"), RuntimeError("crash")])
def test_failed_first_run_leaves_no_job_directory(tmp_path, exc):
    with pytest.raises(type(exc)):
        run_job(tmp_path / "deep" / "job", FP, _fails(exc))
    assert not (tmp_path / "deep" / "job").exists()
    assert run_job(tmp_path / "deep" / "job", {**FP, "options": {"budget": "3bpw"}}, lambda job: 1) == 1


def test_interrupted_first_run_or_crash_after_a_stage_keeps_the_job(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path / "a", FP, _fails(KeyboardInterrupt()))
    with pytest.raises(RuntimeError):
        run_job(tmp_path / "b", FP, _fails(RuntimeError("crash"), stage="measure"))
    for d in ("a", "b"):
        with Job(tmp_path / d, FP) as job:
            assert job.items("s") == ["a"]


def test_existing_directory_is_left_as_it_was(tmp_path):
    pre = tmp_path / "mine"
    pre.mkdir()
    (pre / "notes.txt").write_text("user file")
    with pytest.raises(InputError):
        run_job(pre, FP, _fails(InputError("bad input")))
    assert sorted(os.listdir(pre)) == ["notes.txt"] and (pre / "notes.txt").read_text() == "user file"
    _three_items(tmp_path / "resumed")  # a job that existed before: a failing resume keeps it
    with pytest.raises(ValueError):
        run_job(tmp_path / "resumed", FP, _fails(ValueError("bug")))
    with Job(tmp_path / "resumed", FP) as job:
        assert job.stages_done == ("first", "second")


def test_directory_with_other_files_is_never_used_as_a_job(tmp_path):
    """A finished job's directory is removed, so a --job directory holding a user's files is refused up front
    (before the lock or job.json is written into it), and the files survive."""
    pre = tmp_path / "home"
    pre.mkdir()
    (pre / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="not a bitalloc job"):
        Job(pre, FP)
    assert os.listdir(pre) == ["thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with Job(empty, FP) as job:  # an empty directory is fine
        assert job.stages_done == ()


# ------------------------------------------------------------------------------------- real commands
@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("dm") / "model", layers=2, seed=11)


@pytest.fixture(scope="module")
def reference(hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dref") / "out"
    assert main(quantize_argv(hf, out)) == 0
    return out


def _interrupt(stage: str, block: int, exc: type[BaseException] = KeyboardInterrupt):
    real = checkpoints._save_hidden

    def stopping(job, b, hidden, st=checkpoints.QUANT_STAGE):
        real(job, b, hidden, st)
        if b == block and st == stage:
            raise exc("stopped here")

    return stopping


@pytest.fixture(scope="module")
def interrupted(hf, tmp_path_factory) -> dict[str, Path]:
    """Job directories of quantize runs interrupted in the measurement and in the quantization."""
    jobs = {}
    for stage in (checkpoints.MEASURE_STAGE, checkpoints.QUANT_STAGE):
        out = tmp_path_factory.mktemp("int") / "out"
        with pytest.MonkeyPatch.context() as m:
            m.setattr(checkpoints, "_save_hidden", _interrupt(stage, 1))
            assert main(quantize_argv(hf, out)) == 130
        jobs[stage] = default_job_dir(out)
    return jobs


@pytest.mark.parametrize("stage,name", [
    (checkpoints.MEASURE_STAGE, "measure_blocks/fisher.safetensors"),
    (checkpoints.MEASURE_STAGE, "measure_blocks/rows0000.json"),
    (checkpoints.MEASURE_STAGE, "measure_blocks/hidden.safetensors"),
    (checkpoints.QUANT_STAGE, "measurement.json"),
    (checkpoints.QUANT_STAGE, "plan.json"),
    (checkpoints.QUANT_STAGE, "quantize/block0000.safetensors"),
    (checkpoints.QUANT_STAGE, "quantize/hidden.safetensors"),
])
def test_corrupted_checkpoint_is_recomputed_to_the_clean_output(hf, reference, interrupted, tmp_path, caplog,
                                                                stage, name):
    out = tmp_path / "out"
    job = default_job_dir(out)
    shutil.copytree(interrupted[stage], job)
    flip(job / name)
    caplog.set_level(logging.INFO, logger="bitalloc.resume")
    assert main(quantize_argv(hf, out)) == 0
    assert f"checkpoint {name} changed since it was written" in caplog.text and WARNED in caplog.text
    assert_same_tree(reference, out)
    assert not job.exists()


def test_measure_command_recomputes_a_corrupted_row_checkpoint(hf, tmp_path, caplog):
    ref = tmp_path / "ref.json"
    assert main(measure_argv(hf, ref)) == 0
    out = tmp_path / "m.json"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoints, "_save_hidden", _interrupt(checkpoints.MEASURE_STAGE, 1))
        assert main(measure_argv(hf, out)) == 130
    flip(default_job_dir(out) / "measure_blocks" / "rows0000.json")
    assert main(measure_argv(hf, out)) == 0
    assert "measure_blocks/rows0000.json changed since it was written" in caplog.text
    assert out.read_bytes() == ref.read_bytes()


def test_quantize_failing_with_a_user_error_before_a_stage_leaves_no_job(hf, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoints, "_save_hidden", _interrupt(checkpoints.MEASURE_STAGE, 1, InputError))
        assert main(quantize_argv(hf, out)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not out.exists() and not default_job_dir(out).exists()
    pre = tmp_path / "existing"  # a --job directory that was there before is left as it was
    pre.mkdir()
    (pre / "keep.txt").write_text("x")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoints, "_save_hidden", _interrupt(checkpoints.MEASURE_STAGE, 1, InputError))
        assert main(quantize_argv(hf, out, "--job", str(pre))) == 2
    assert sorted(os.listdir(pre)) == ["keep.txt"]
