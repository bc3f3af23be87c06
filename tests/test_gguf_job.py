"""``bitalloc gguf``: the manifest beside the GGUF, verification against it, and the resumable job
(interrupted in-process and killed with SIGKILL in a subprocess; the rerun writes byte-identical files)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import pytest
import torch

from bitalloc.export import gguf_manifest as gguf_job
from bitalloc.jobs import checkpoints
from bitalloc.jobs.config import default_job_dir
from tests.cli_process import kill_at_marks, run_to_end
from bitalloc.cli import build_parser, main
from bitalloc.errors import InputError
from bitalloc.export import gguf as gx
from bitalloc.models.gguf_map import model_names
from bitalloc.cli.gguf import gguf_fingerprint
from bitalloc.io.atomic import file_digest
from bitalloc.jobs.store import Job
from tests.conftest import tiny_llama
from tests.gguf_tiny import gguf_argv, write_loadable_gguf

torch.set_num_threads(1)
BUDGET = "80KB"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_loadable_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


def _files(out: Path) -> tuple[bytes, bytes]:
    return out.read_bytes(), gguf_job.manifest_path(out).read_bytes()


# --------------------------------------------------------------------------------------- manifest
def _tensors() -> dict[str, torch.Tensor]:
    model = tiny_llama()
    return {model_names(model).to_gguf(n): t for n, t in model.state_dict().items() if n != "lm_head.weight"}


def test_manifest_lists_file_and_raw_tensor_digests(src, tmp_path):
    tpl = gx.read_template(src)
    out = tmp_path / "o.gguf"
    written = gguf_job.write_gguf_verified(out, tpl, _tensors())
    man = json.loads(gguf_job.manifest_path(out).read_text())
    assert man["kind"] == "bitalloc.manifest" and man["files"] == {"o.gguf": file_digest(out)}
    assert written.file_size == os.path.getsize(out)
    reader = gguf.GGUFReader(out)  # an independent reader's view of each tensor's stored bytes
    assert man["tensors"] == {t.name: hashlib.sha256(t.data.tobytes()).hexdigest() for t in reader.tensors}
    assert gguf_job.verify_gguf_manifest(out) == man
    # the digests were predicted before writing: the same as those of the written file
    assert gguf_job.prepare_gguf("o.gguf", tpl, _tensors()).manifest == man


def test_tampered_output_fails_verification_naming_the_tensor(src, tmp_path):
    tpl = gx.read_template(src)
    out = tmp_path / "o.gguf"
    gguf_job.write_gguf_verified(out, tpl, _tensors())
    last = "blk.0.attn_q.weight"
    offset = next(t.data_offset for t in gguf.GGUFReader(out).tensors if t.name == last)
    data = bytearray(out.read_bytes())
    data[offset + 5] ^= 0x10  # inside that tensor's data
    out.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match") as e:
        gguf_job.verify_gguf_manifest(out)
    assert "o.gguf differs" in str(e.value)
    gguf_job.manifest_path(out).write_text(json.dumps({**json.loads(gguf_job.manifest_path(out).read_text()),
                                                        "files": {"o.gguf": file_digest(out)}}))
    with pytest.raises(InputError, match=f"{last} differs"):
        gguf_job.verify_gguf_manifest(out)
    gguf_job.manifest_path(out).unlink()
    with pytest.raises(InputError, match="missing or malformed"):
        gguf_job.verify_gguf_manifest(out)


def test_failed_write_leaves_neither_file_nor_manifest(src, tmp_path, monkeypatch):
    tpl = gx.read_template(src)
    out = tmp_path / "o.gguf"

    def corrupt(*_a, **_k):
        raise OSError("simulated verification failure")

    monkeypatch.setattr(gx, "verify_gguf", corrupt)
    with pytest.raises(OSError, match="simulated"):
        gguf_job.write_gguf_verified(out, tpl, _tensors())
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.undo()
    out.write_bytes(b"keep")
    with pytest.raises(InputError, match="already exists"):
        gguf_job.write_gguf_verified(out, tpl, _tensors())
    assert out.read_bytes() == b"keep" and not gguf_job.manifest_path(out).exists()


# ---------------------------------------------------------------------------------------------- job
def test_changed_option_is_refused_naming_it(src, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    args = build_parser().parse_args(gguf_argv(src, out, budget=BUDGET))
    with Job(default_job_dir(out), gguf_fingerprint(args)):
        pass  # as left by an interrupted run
    assert main(gguf_argv(src, out, budget="70KB")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert "options.budget" in err and BUDGET in err and "70KB" in err
    (src.parent / "other.txt").write_text("different calibration text " * 50)
    argv = gguf_argv(src, out, budget=BUDGET)
    argv[argv.index("--calib") + 1] = str(src.parent / "other.txt")
    assert main(argv) == 2
    assert "calibration" in capsys.readouterr().err
    assert not out.exists() and default_job_dir(out).exists()  # the job is kept for the right command


def _crash_at(monkeypatch, stage: str, block: int) -> None:
    real = checkpoints._save_hidden

    def crashing(job, b, hidden, st=checkpoints.QUANT_STAGE):
        real(job, b, hidden, st)
        if b == block and st == stage:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_save_hidden", crashing)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out.gguf"
    assert main(gguf_argv(src, out, budget=BUDGET)) == 0
    return out


@pytest.mark.parametrize("stage", [checkpoints.MEASURE_STAGE, checkpoints.QUANT_STAGE])
def test_interrupted_gguf_job_resumes_to_identical_files(src, reference, tmp_path, monkeypatch, caplog, stage):
    out = tmp_path / "out.gguf"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        _crash_at(m, stage, 1)
        assert main(gguf_argv(src, out, budget=BUDGET)) == 130
    assert not out.exists() and not gguf_job.manifest_path(out).exists()
    assert (job / stage / "hidden.safetensors").exists()
    caplog.set_level("INFO", logger="bitalloc.resume")
    assert main(gguf_argv(src, out, budget=BUDGET)) == 0
    what = "measurement" if stage == checkpoints.MEASURE_STAGE else "quantization"
    assert f"resuming {what} at block 1" in caplog.text
    assert _files(out) == _files(reference)
    assert not job.exists()


def test_kill_after_the_rename_is_recognised(src, reference, tmp_path):
    out = tmp_path / "out.gguf"
    assert main(gguf_argv(src, out, "--keep-job", budget=BUDGET)) == 0  # as if killed before the cleanup
    assert main(gguf_argv(src, out, budget=BUDGET)) == 0
    assert _files(out) == _files(reference) and not default_job_dir(out).exists()


# ----------------------------------------------------------------------------------- real kill -9
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(src, reference, tmp_path):
    out = tmp_path / "out.gguf"
    job = default_job_dir(out)
    marks = [job / "job.json", job / checkpoints.MEASURE_STAGE / "rows0000.json", job / "plan.json",
             job / checkpoints.QUANT_STAGE / "block0000.safetensors"]
    assert kill_at_marks(gguf_argv(src, out, budget=BUDGET), marks, out, seed=4321, pause=0.2) >= 2
    if not out.exists():  # the last run, resumed, may have finished before its kill
        run_to_end(gguf_argv(src, out, budget=BUDGET))
    assert _files(out) == _files(reference)
    assert not job.exists()


@pytest.mark.parametrize("name", ["plan/capacity.json", "quantize/hidden.safetensors"])
def test_corrupted_checkpoint_is_recomputed_to_identical_files(src, reference, tmp_path, monkeypatch, caplog, name):
    out = tmp_path / "out.gguf"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        _crash_at(m, checkpoints.QUANT_STAGE, 1)
        assert main(gguf_argv(src, out, budget=BUDGET)) == 130
    data = bytearray((job / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (job / name).write_bytes(bytes(data))
    assert main(gguf_argv(src, out, budget=BUDGET)) == 0
    assert f"checkpoint {name} changed since it was written" in caplog.text
    assert _files(out) == _files(reference) and not job.exists()
