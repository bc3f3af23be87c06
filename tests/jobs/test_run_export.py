"""The staged job called as a library: a RunConfig and a Target in, the verified output out -- the seam the
commands share (no closures cross into the job)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bitalloc.budget import Budget
from bitalloc.errors import InputError
from bitalloc.jobs.config import RunConfig
from bitalloc.jobs.run import run_export
from bitalloc.targets.packed import PackedTarget
from tests.test_resume import make_hf_dir


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("run") / "model")


def _config(hf: Path, tmp_path: Path, **kw) -> RunConfig:
    base = dict(model=hf, calib_texts=(hf.parent / "calib.txt",), windows=2, ctx=16, job_dir=tmp_path / "job",
                formats=("int4-g32", "int8-g128"), method="rtn", fisher=False, progress=False)
    return RunConfig(**{**base, **kw})


def test_budget_resolved_by_the_target_and_a_finished_output_recognised(hf, tmp_path):
    config = _config(hf, tmp_path, budgets=(Budget.parse("6bpw"),), keep_job=True)
    res = run_export(config, PackedTarget(tmp_path / "out"))
    cap = res.capacity
    assert cap is not None and cap.budget == "6bpw" and cap.unit == "weights"
    assert res.plan is not None and res.plan.total_bytes <= cap.limit and res.plan.budget == "6bpw"
    assert res.written.info["bytes"] == res.plan.total_bytes
    saved = json.loads((config.job_dir / "plan" / "capacity.json").read_text())
    assert saved["limit"] == cap.limit and saved["allocatable"] == cap.allocatable
    assert (config.job_dir / "export" / "expected.json").is_file()
    # the output exists: a rerun of the kept job recognises it as its own (the digests saved before the write)
    again = run_export(config, PackedTarget(tmp_path / "out"))
    assert again.written.info == res.written.info and again.plan is not None
    # another job (other inputs) refuses it without --overwrite
    other = dataclasses.replace(config, budgets=(Budget.parse("7bpw"),), job_dir=tmp_path / "job2")
    with pytest.raises(InputError, match="already exists"):
        run_export(other, PackedTarget(tmp_path / "out"))


def test_uniform_format_needs_no_measurement(hf, tmp_path):
    res = run_export(_config(hf, tmp_path, uniform_format="int8-g128"), PackedTarget(tmp_path / "out"))
    assert res.plan is not None and {e.format for e in res.plan.entries} == {"int8-g128"}
    assert not (tmp_path / "job").exists()  # finished: the job directory is removed


def test_screened_job_allocates_like_the_exhaustive_one_and_records_its_stages(hf, tmp_path):
    """``--screen`` through the job: the target resolves the budget before measuring, the screened table holds
    fewer GPTQ rows, and the plan at that budget is the exhaustive one (a tiny model: the estimates are close)."""
    fmts = ("int2-g32", "int3-g32", "int4-g32", "int8-g128")
    runs = {}
    for screen in (False, True):
        config = _config(hf, tmp_path / str(screen), formats=fmts, method="gptq", budgets=(Budget.parse("4bpw"),),
                         screen=screen, keep_job=True)
        runs[screen] = run_export(config, PackedTarget(tmp_path / str(screen) / "out"))
    full, screened = runs[False], runs[True]
    assert full.plan is not None and screened.plan is not None
    from bitalloc.jobs.stages import MEASUREMENT_FILE
    from bitalloc.measure import Measurement

    tables = {k: Measurement.load(tmp_path / str(k) / "job" / MEASUREMENT_FILE) for k in runs}
    assert "screen" in tables[True].fingerprint and "screen" not in tables[False].fingerprint
    assert len(tables[True].rows) < len(tables[False].rows)
    assert [(e.tensor, e.format) for e in screened.plan.entries] == [(e.tensor, e.format) for e in full.plan.entries]
    assert screened.written.info["bytes"] == full.written.info["bytes"]
    for res in runs.values():
        assert {"load", "measure.fit", "allocate", "quantize", "write"} <= set(res.timings)
    assert "screen" in screened.timings and "screen" not in full.timings


def test_screen_without_one_budget_is_refused_before_any_work(hf, tmp_path):
    for kw in ({"budgets": ()}, {"budgets": (Budget.parse("4bpw"),), "uniform_format": "int4-g32"}):
        with pytest.raises(InputError, match="--screen"):
            _config(hf, tmp_path, method="gptq", screen=True, **kw)
    assert not (tmp_path / "job").exists()
