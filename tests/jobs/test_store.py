"""Resumable jobs: fingerprints, checkpoints, locking, and kill -9 / resume giving byte-identical output."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.io.atomic import TEMP_SUFFIX
from bitalloc.jobs.store import Job, fingerprint_diff, run_job

FP = {"model": {"path": "m.gguf", "sha256": "ab12"}, "calib": "cd34", "options": {"budget": "4bpw", "method": "gptq"}}


def test_checkpoints_round_trip_and_persist(tmp_path):
    t = {"w": torch.randn(3, 4), "q": torch.arange(5, dtype=torch.uint8)}
    with Job(tmp_path / "job", FP) as job:
        assert not job.has_item("quantize", "block000") and job.items("quantize") == []
        job.save_item("quantize", "block000", t)
        job.save_item("measure", "block000", {"rows": [[1, 2.5]], "name": "x"})
        assert not job.stage_done("measure")
        job.complete_stage("measure")
        job.complete_stage("measure")  # idempotent
    with Job(tmp_path / "job", json.loads(json.dumps(FP))) as job:
        assert job.stages_done == ("measure",) and job.stage_done("measure")
        got = job.load_item("quantize", "block000")
        assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t)
        assert job.load_item("measure", "block000") == {"rows": [[1, 2.5]], "name": "x"}
        assert job.items("quantize") == ["block000"]
        job.save_item("quantize", "block000", {"replaced": True})  # the tensor checkpoint is replaced
        assert job.load_item("quantize", "block000") == {"replaced": True}
        assert job.items("quantize") == ["block000"]
        with pytest.raises(InputError, match="no checkpoint"):
            job.load_item("quantize", "block001")


def test_different_fingerprint_is_refused_with_exact_differences(tmp_path):
    Job(tmp_path / "job", FP).close()
    new = {"model": {"path": "m.gguf", "sha256": "ffff"}, "calib": "cd34", "options": {"budget": "3bpw", "method": "gptq"},
           "seed": 1}
    with pytest.raises(InputError) as info:
        Job(tmp_path / "job", new)
    msg = str(info.value)
    assert "model.sha256: 'ab12' (job) vs 'ffff' (now)" in msg
    assert "options.budget: '4bpw' (job) vs '3bpw' (now)" in msg
    assert "seed: '<absent>' (job) vs 1 (now)" in msg
    assert "calib" not in msg and "method" not in msg and "path" not in msg
    assert fingerprint_diff(FP, FP) == []


def test_second_process_is_locked_out(tmp_path):
    with Job(tmp_path / "job", FP):
        with pytest.raises(InputError, match="in use by another"):
            Job(tmp_path / "job", FP)
    Job(tmp_path / "job", FP).close()  # released on close


def test_reopen_removes_stale_temporaries(tmp_path):
    with Job(tmp_path / "job", FP) as job:
        job.save_item("s", "a", {"x": 1})
    stale = tmp_path / "job" / "s" / f".b.json.x1y2{TEMP_SUFFIX}"
    stale.write_bytes(b"half a checkpo")
    with Job(tmp_path / "job", FP) as job:
        assert not stale.exists() and job.items("s") == ["a"]


@pytest.mark.parametrize("bad", ["../escape", "a/b", ".hidden", "", "x" * 200, "sp ace"])
def test_invalid_names_are_refused(tmp_path, bad):
    with Job(tmp_path / "job", FP) as job:
        with pytest.raises(InputError, match="invalid job"):
            job.save_item("s", bad, {"x": 1})
        with pytest.raises(InputError, match="invalid job"):
            job.complete_stage(bad)


def test_bad_values_and_files(tmp_path):
    with Job(tmp_path / "job", FP) as job:
        with pytest.raises(InputError, match="neither tensors nor JSON"):
            job.save_item("s", "a", {"x": float("nan")})
        with pytest.raises(InputError, match="neither tensors nor JSON"):
            job.save_item("s", "b", object())
        assert job.items("s") == []
    with pytest.raises(InputError, match="JSON data"):
        Job(tmp_path / "job2", {"x": object()})
    (tmp_path / "job" / "job.json").write_text("{broken")
    with pytest.raises(InputError, match="malformed"):
        Job(tmp_path / "job", FP)


# ------------------------------------------------------------------------------------- kill and resume
WORKER = textwrap.dedent('''
    import sys, time, json
    import torch
    from bitalloc.jobs.store import Job
    from bitalloc.io.safetensors import write_safetensors_atomic

    job_dir, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Job(job_dir, {"n": n, "seed": 7, "options": {"scale": 0.5}}) as job:
        print("ready", flush=True)
        for i in range(n):
            key = f"item{i:03d}"
            if not job.has_item("work", key):
                # each item depends on the previous checkpoint, as blocks of a model do
                prev = job.load_item("work", f"item{i - 1:03d}")["w"] if i else torch.zeros(64, 256)
                w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1000 + i)) + 0.5 * prev
                time.sleep(0.05)
                job.save_item("work", key, {"w": w, "codes": (w * 8).round().to(torch.int8)})
            if not job.has_item("meta", key):
                w = job.load_item("work", key)["w"]
                job.save_item("meta", key, {"i": i, "sum": float(w.double().sum())})
        job.complete_stage("work")
        if not job.stage_done("export"):
            keys = job.items("work")
            tensors = {k: job.load_item("work", k)["w"] for k in keys}
            meta = {k: json.dumps(job.load_item("meta", k), sort_keys=True) for k in keys}
            write_safetensors_atomic(out, tensors, meta, overwrite=True)
            job.complete_stage("export")
    print("done", flush=True)
''')
N_ITEMS = 30


def _start(script, job_dir, out):
    p = subprocess.Popen([sys.executable, str(script), str(job_dir), str(out), str(N_ITEMS)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read()
    return p


def _finish(p) -> None:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "done" in out, err


def test_kill_9_at_random_points_then_resume_is_byte_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ref = tmp_path / "ref.safetensors"
    _finish(_start(script, tmp_path / "ref_job", ref))

    out, job_dir = tmp_path / "out.safetensors", tmp_path / "job"
    rng = random.Random(1234)
    progress = []
    for _ in range(4):
        p = _start(script, job_dir, out)
        # the work takes at least 30 x 50 ms after "ready"; four waits of at most 0.2 s leave >= 0.7 s of it,
        # so every kill lands before the output can exist, however fast the machine
        time.sleep(rng.uniform(0.02, 0.2))
        assert p.poll() is None, "the worker finished before it could be killed"
        p.kill()  # SIGKILL: no cleanup handlers run
        p.communicate()
        assert not out.exists()
        progress.append(len(list((job_dir / "work").glob("*.safetensors"))))
    assert progress == sorted(progress) and 0 < progress[-1] < N_ITEMS, progress
    _finish(_start(script, job_dir, out))

    assert out.read_bytes() == ref.read_bytes()
    manifest = out.with_name(out.name + ".manifest.json")
    assert manifest.read_bytes() == ref.with_name(ref.name + ".manifest.json").read_bytes()
    assert not list(job_dir.rglob(f"*{TEMP_SUFFIX}"))
    assert json.loads((job_dir / "job.json").read_text())["stages_done"] == ["work", "export"]


# ------------------------------------------------------------------------------------------ run_job
def test_run_job_returns_and_finishes_or_keeps_the_job(tmp_path):
    seen = []
    assert run_job(tmp_path / "a", FP, lambda job: seen.append(job.dir) or 7) == 7
    assert seen == [tmp_path / "a"] and not (tmp_path / "a").exists()
    assert run_job(tmp_path / "b", FP, lambda job: job.complete_stage("s") or "x", keep_job=True) == "x"
    with Job(tmp_path / "b", FP) as job:
        assert job.stages_done == ("s",)


def _failing(exc: BaseException):
    def run(job: Job) -> None:
        job.complete_stage("started")
        raise exc

    return run


def test_run_job_removes_only_a_fresh_job_after_a_user_error(tmp_path):
    with pytest.raises(InputError, match="bad input"):
        run_job(tmp_path / "fresh", FP, _failing(InputError("bad input")))
    assert not (tmp_path / "fresh").exists()  # the same command fails again: no debris
    with pytest.raises(RuntimeError):  # a crash keeps the job for the rerun
        run_job(tmp_path / "crash", FP, _failing(RuntimeError("crash")))
    with pytest.raises(InputError, match="bad input"):  # a resumed job keeps its checkpoints
        run_job(tmp_path / "crash", FP, _failing(InputError("bad input")))
    with Job(tmp_path / "crash", FP) as job:
        assert job.stages_done == ("started",)


def test_run_job_refusal_unless_the_job_finds_its_own_result(tmp_path):
    def never(job: Job) -> None:
        raise AssertionError("run must not be called when the output is refused")

    refusal = InputError("output exists")
    calls = []
    with pytest.raises(InputError, match="output exists"):  # no job to reuse: refused, nothing created
        run_job(tmp_path / "job", FP, never, refusal=refusal, reuse=lambda job: calls.append(1) or 1)
    assert not calls and not (tmp_path / "job").exists()
    with Job(tmp_path / "job", FP) as job:
        job.complete_stage("export")
    with pytest.raises(InputError, match="output exists"):  # a job whose output is not its own: kept
        run_job(tmp_path / "job", FP, never, refusal=refusal, reuse=lambda job: None)
    assert (tmp_path / "job" / "job.json").exists()
    with pytest.raises(InputError, match="different inputs"):  # a different job is named, not the output
        run_job(tmp_path / "job", {**FP, "calib": "other"}, never, refusal=refusal, reuse=lambda job: 1)
    found = run_job(tmp_path / "job", FP, never, keep_job=True, refusal=refusal,
                    reuse=lambda job: job.stages_done)
    assert found == ("export",) and (tmp_path / "job").exists()
    assert run_job(tmp_path / "job", FP, never, refusal=refusal, reuse=lambda job: "done") == "done"
    assert not (tmp_path / "job").exists()
