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
