"""Resumable ``bitalloc sweep``: an interrupted sweep continues from its saved points (and measurement blocks)
and writes the same outputs; changed inputs are refused naming what differs; existing outputs are protected."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bitalloc import sweep as sweep_mod
from bitalloc.jobs import checkpoints, sweep as sweep_job
from bitalloc.jobs.config import default_job_dir
from bitalloc.cli import main
from bitalloc.errors import InputError
from bitalloc.sweep import Point, point_key
from tests.cli_process import ENV, run_cli
from tests.test_resume import _crash_measure_at, make_hf_dir

torch.set_num_threads(1)

FORMATS = "int2-g32,int3-g32,int4-g32"
OUTPUTS = ("measurement.json", "sweep.json", "sweep.png")


def sweep_argv(model: Path, out: Path, *extra: str, budgets: str = "3.5bpw,4.5bpw") -> list[str]:
    d = model.parent
    return ["sweep", str(model), "--budgets", budgets, "--formats", FORMATS, "--method", "rtn", "--calib",
            str(d / "calib.txt"), "--eval", str(d / "eval.txt"), "--windows", "4", "--ctx", "32",
            "--fisher-windows", "2", "--eval-windows", "2", "-q", "--out", str(out), *extra]


def fixed_clock(monkeypatch) -> None:
    """Wall times of 0 s, so that two separate runs can be compared byte for byte."""
    clock = SimpleNamespace(perf_counter=lambda: 0.0)
    monkeypatch.setattr(sweep_mod, "time", clock)
    monkeypatch.setattr(sweep_job, "time", clock)


def interrupt_at_point(monkeypatch, n: int) -> list[int]:
    """KeyboardInterrupt when the ``n``-th point (from 0) of this run starts; returns the calls seen."""
    real, calls = sweep_mod.run_point, []

    def run_point(*a, **k):
        calls.append(len(calls))
        if len(calls) - 1 == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_point", run_point)
    return calls


def outputs(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in OUTPUTS}


def timings(doc: dict) -> dict:
    return {"measure_seconds": doc["measure_seconds"], "seconds": [p["seconds"] for p in doc["points"]]}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    model = make_hf_dir(tmp_path_factory.mktemp("sm") / "model", layers=2, seed=5)
    words = (model.parent / "calib.txt").read_text().split()
    random.Random(7).shuffle(words)
    (model.parent / "eval.txt").write_text(" ".join(words[:1500]))
    return model


@pytest.fixture(scope="module")
def reference(hf, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted sweep with a fixed clock."""
    out = tmp_path_factory.mktemp("sref") / "out"
    with pytest.MonkeyPatch.context() as m:
        fixed_clock(m)
        assert main(sweep_argv(hf, out)) == 0
    assert not default_job_dir(out).exists()
    return outputs(out)


def test_uninterrupted_sweep_writes_every_output(reference):
    doc = json.loads(reference["sweep.json"])
    kinds = [(p["kind"], p["budget"]) for p in doc["points"]]
    assert kinds[:2] == [("allocated", "3.5bpw"), ("allocated", "4.5bpw")] and len(kinds) >= 3
    assert {p["label"] for p in doc["points"][2:]} <= set(FORMATS.split(","))
    assert list(doc)[:6] == ["measure_seconds", "measure_method", "calib_windows", "eval_windows", "ctx", "formats"]
    assert reference["sweep.png"].startswith(b"\x89PNG") and json.loads(reference["measurement.json"])


def test_interrupted_after_first_point_resumes_to_identical_outputs(hf, reference, tmp_path, monkeypatch, caplog):
    fixed_clock(monkeypatch)
    out = tmp_path / "out"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        interrupt_at_point(m, 1)
        assert main(sweep_argv(hf, out)) == 130
    assert not out.exists()
    assert "measure" in json.loads((job / "job.json").read_text())["stages_done"]
    assert len(list((job / sweep_job.POINTS_STAGE).glob("p*.json"))) == 1
    caplog.set_level("INFO", logger="bitalloc.resume")
    with monkeypatch.context() as m:
        calls = interrupt_at_point(m, 10**6)  # counts the points computed, interrupts none
        assert main(sweep_argv(hf, out)) == 0
    assert "1 point(s) already done" in caplog.text
    assert len(calls) == len(json.loads(reference["sweep.json"])["points"]) - 1
    assert outputs(out) == reference
    assert not job.exists()


def test_resumed_sweep_keeps_the_saved_timings(hf, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        interrupt_at_point(m, 2)
        assert main(sweep_argv(hf, out)) == 130
    saved_measure = json.loads((job / "sweep" / "measure.json").read_text())["seconds"]
    saved = {p.stem: json.loads(json.loads(p.read_text())["json"])["seconds"]
             for p in sorted((job / sweep_job.POINTS_STAGE).glob("p*.json"))}
    assert len(saved) == 2 and saved_measure > 0
    assert main(sweep_argv(hf, out)) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["measure_seconds"] == saved_measure
    assert [p["seconds"] for p in doc["points"][:2]] == list(saved.values())
    assert all(p["seconds"] > 0 for p in doc["points"])
    # apart from the wall times, the bytes are those of the uninterrupted run
    ref = json.loads(reference["sweep.json"])
    masked = {**doc, "measure_seconds": 0.0, "points": [{**p, "seconds": 0.0} for p in doc["points"]]}
    assert json.dumps(masked, indent=1) + "\n" == json.dumps(ref, indent=1) + "\n"
    assert outputs(out)["sweep.png"] == reference["sweep.png"]


def test_sweep_resumes_inside_the_measurement(hf, reference, tmp_path, monkeypatch, caplog):
    fixed_clock(monkeypatch)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_measure_at(m, 1)
        assert main(sweep_argv(hf, out)) == 130
    assert (default_job_dir(out) / checkpoints.MEASURE_STAGE / "rows0000.json").exists()
    caplog.set_level("INFO", logger="bitalloc.resume")
    assert main(sweep_argv(hf, out)) == 0
    assert "resuming measurement at block 1" in caplog.text
    assert outputs(out) == reference


def test_changed_inputs_are_refused_naming_what_differs(hf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at_point(m, 1)
        assert main(sweep_argv(hf, out)) == 130
    capsys.readouterr()
    assert main(sweep_argv(hf, out, budgets="3.5bpw,5bpw")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "options.budgets" in err and "4.5bpw" in err
    other = hf.parent / "eval2.txt"
    other.write_text((hf.parent / "eval.txt").read_text()[::-1])
    argv = sweep_argv(hf, out)
    argv[argv.index("--eval") + 1] = str(other)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "evaluation" in err and "options" not in err
    assert main([*sweep_argv(hf, out), "--eval-windows", "1"]) == 2
    assert "options.eval_windows" in capsys.readouterr().err
    assert default_job_dir(out).exists()  # a refused rerun leaves the job for the right command


def test_existing_outputs_are_protected(hf, reference, tmp_path, monkeypatch, capsys):
    fixed_clock(monkeypatch)
    out = tmp_path / "out"
    job = default_job_dir(out)
    assert main(sweep_argv(hf, out, "--keep-job")) == 0  # as if killed before the job was removed
    assert job.exists()
    assert main(sweep_argv(hf, out)) == 0  # recognised as this job's own outputs: nothing is recomputed
    assert outputs(out) == reference and not job.exists()
    capsys.readouterr()
    assert main(sweep_argv(hf, out)) == 2  # no job: refused
    assert "already holds" in capsys.readouterr().err
    # kill between two of the final writes, and a user's file that is not the job's
    assert main(sweep_argv(hf, out, "--keep-job", "--overwrite")) == 0
    (out / "sweep.png").unlink()
    assert main(sweep_argv(hf, out, "--keep-job")) == 0
    assert outputs(out) == reference
    (out / "sweep.json").write_text("{}\n")
    assert main(sweep_argv(hf, out)) == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert main(sweep_argv(hf, out, "--overwrite")) == 0
    assert outputs(out) == reference and not job.exists()
    (tmp_path / "file").write_text("x")
    assert main(sweep_argv(hf, tmp_path / "file")) == 2
    assert "is a file" in capsys.readouterr().err


def test_sweep_hooks_and_saved_point_checks():
    p = Point("uniform", "3.5bpw", "rtn", "int4-g32", 100, 4.0, 0.5, 10.0, 9.0, 0.01, 0.9, float("inf"))
    d = json.loads(json.dumps(p.__dict__))
    assert Point.from_dict(d) == p
    with pytest.raises(InputError, match="malformed 'bytes'"):
        Point.from_dict({**d, "bytes": "100"})
    with pytest.raises(InputError, match="exactly the keys"):
        Point.from_dict({**d, "extra": 1})
    assert point_key(3, "rtn", "uniform", "1.2 GiB", "int4-g32") == "p0003_rtn_uniform_int4-g32_1.2_GiB"
    plan = SimpleNamespace(total_bytes=100)
    assert sweep_mod._check_saved("k", p, "uniform", "3.5bpw", "rtn", "int4-g32", plan) is p
    with pytest.raises(InputError, match="saved sweep point k .* now plans"):
        sweep_mod._check_saved("k", p, "uniform", "3.5bpw", "rtn", "int4-g32", SimpleNamespace(total_bytes=101))


@pytest.mark.slow
def test_sigkill_during_the_points_then_resume(hf, reference, tmp_path):
    out = tmp_path / "out"
    job = default_job_dir(out)
    proc = run_cli(sweep_argv(hf, out))
    end = time.monotonic() + 120
    while not list((job / sweep_job.POINTS_STAGE).glob("p0000*.json")):
        assert proc.poll() is None and time.monotonic() < end, "the sweep ended before its first point was saved"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "sweep.json").exists()
    r = subprocess.run([sys.executable, "-m", "bitalloc.cli", *sweep_argv(hf, out)], env=ENV, capture_output=True,
                       text=True, timeout=300, preexec_fn=lambda: os.nice(19))
    assert r.returncode == 0, r.stderr
    doc, ref = json.loads((out / "sweep.json").read_text()), json.loads(reference["sweep.json"])
    assert [{**p, "seconds": 0.0} for p in doc["points"]] == ref["points"]
    assert (out / "measurement.json").read_bytes() == reference["measurement.json"] and not job.exists()
    assert (out / "sweep.png").read_bytes() == reference["sweep.png"]  # the plot shows no wall times


def test_corrupted_point_is_recomputed_to_identical_outputs(hf, reference, tmp_path, monkeypatch, caplog):
    fixed_clock(monkeypatch)
    out = tmp_path / "out"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        interrupt_at_point(m, 2)
        assert main(sweep_argv(hf, out)) == 130
    first = sorted((job / sweep_job.POINTS_STAGE).glob("p*.json"))[0]
    first.write_text(first.read_text().replace("3.5", "9.5"))  # still valid JSON: the silent case
    with monkeypatch.context() as m:
        calls = interrupt_at_point(m, 10**6)
        assert main(sweep_argv(hf, out)) == 0
    assert f"checkpoint points/{first.name} changed since it was written" in caplog.text
    assert len(calls) == len(json.loads(reference["sweep.json"])["points"])  # that point and the next again
    assert outputs(out) == reference


def test_rotated_sweep_recovers_toward_the_rotated_reference(hf, tmp_path):
    """``--rotate residual`` in a sweep: the reference (recovery's teacher there) is loaded through the same
    rotation, so block recovery gains; an unrotated teacher's block outputs live in another basis."""
    kld = {}
    for mode in ("none", "block"):
        out = tmp_path / mode
        steps = ("--recover-steps", "8") if mode != "none" else ()  # a length without recovery is refused
        assert main(sweep_argv(hf, out, "--rotate", "residual", "--recover", mode, *steps,
                               "--uniform", "int3-g32", budgets="3.5bpw")) == 0
        doc = json.loads((out / "sweep.json").read_text())
        kld[mode] = next(p["kld"] for p in doc["points"] if p["kind"] == "allocated")
    assert kld["block"] < kld["none"], kld


def test_a_recovery_aware_sweep_allocates_from_the_scaled_table(hf, tmp_path, monkeypatch):
    """``--recover-aware`` in a sweep is not ignored: the gains are measured once, saved in the job, and every
    allocated point is planned from the table they scale (here a gain that makes int2 look free)."""
    import bitalloc.recover.aware as aware

    calls = []

    def gains(model, windows, formats, cfg, **kw):
        calls.append(kw["guard"])
        return {f: (1e-6 if f.startswith("int2") else 1.0) for f in formats}

    monkeypatch.setattr(aware, "format_gains", gains)
    plain, scaled = tmp_path / "plain", tmp_path / "aware"
    assert main(sweep_argv(hf, plain, "--recover", "block", "--recover-steps", "2", "--uniform", "int3-g32",
                           budgets="3.5bpw")) == 0
    assert main(sweep_argv(hf, scaled, "--recover", "block", "--recover-steps", "2", "--uniform", "int3-g32",
                           "--recover-aware", "--keep-job", budgets="3.5bpw")) == 0
    assert len(calls) == 1
    job = default_job_dir(scaled)
    assert any("recovery_gains" in p.name for p in (job / "plan").iterdir())
    allocated = [json.loads((d / "sweep.json").read_text())["points"][0] for d in (plain, scaled)]
    assert all(p["kind"] == "allocated" for p in allocated)
    assert allocated[0]["kld"] != allocated[1]["kld"]  # another plan: the int2 rows' errors were scaled down


def test_the_reference_copy_does_not_parse_the_tokenizer_again(hf, reference, tmp_path, monkeypatch):
    """The sweep's fp reference is a second load of the model: its tokenizer (seconds to parse for a GGUF) is not
    loaded again, and the outputs are the same."""
    from bitalloc.models import sources

    real, calls = sources._tokenizer, []
    monkeypatch.setattr(sources, "_tokenizer", lambda *a, **k: calls.append(a) or real(*a, **k))
    fixed_clock(monkeypatch)
    assert main(sweep_argv(hf, tmp_path / "out")) == 0
    assert len(calls) == 1
    assert outputs(tmp_path / "out") == reference


def test_a_sweep_restores_its_points_from_the_reference_without_copying_the_model(hf, reference, tmp_path,
                                                                                monkeypatch):
    """The fp reference is a second load of the same model, so every point restores the weights from it: no
    snapshot of the model is taken, and the outputs are those of a sweep that restored from a snapshot."""
    import bitalloc.quantize as quantize_mod

    fixed_clock(monkeypatch)
    for mod in (quantize_mod, sweep_mod):  # wherever a sweep could call it from
        monkeypatch.setattr(mod, "snapshot", lambda *a, **k: pytest.fail("the model was copied"), raising=False)
    out = tmp_path / "out"
    assert main(sweep_argv(hf, out)) == 0
    assert outputs(out) == reference
