"""The frozen run config: what the CLI hands the job, and the fingerprint derived from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bitalloc.budget import Budget
from bitalloc.errors import InputError
from bitalloc.jobs.config import RunConfig, SweepSpec, default_job_dir


@pytest.fixture()
def base(tmp_path) -> RunConfig:
    (tmp_path / "m.gguf").write_bytes(b"model")
    (tmp_path / "c.txt").write_text("calibration")
    (tmp_path / "e.txt").write_text("evaluation")
    return RunConfig(model=tmp_path / "m.gguf", calib_texts=(tmp_path / "c.txt",), windows=4, ctx=16,
                     job_dir=tmp_path / "j", formats=("int4-g32",), budgets=(Budget.parse("4bpw"),))


def test_frozen_and_checked(base):
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.windows = 5  # type: ignore[misc]
    with pytest.raises(InputError, match="rounding method"):
        dataclasses.replace(base, measure_method="nearest")
    with pytest.raises(InputError, match="at least one budget"):
        dataclasses.replace(base, budgets=(), sweep=SweepSpec((), 2, "t"))
    assert default_job_dir(Path("a/out.gguf")) == Path("a/out.gguf.job")


def test_fingerprint_names_every_option_that_changes_a_result(base, tmp_path):
    fp = base.fingerprint({"target": "packed"})
    assert set(fp) == {"version", "model", "calibration", "options"} and list(fp["model"]) == ["m.gguf"]
    opts = fp["options"]
    assert opts["budget"] == "4bpw" and opts["target"] == "packed" and opts["measure_method"] == "gptq"
    assert opts["activations"] == "cpu" and opts["device"] == "cpu" and opts["screen"] is False
    # a job resumed on another device would mix two devices' roundings: refused, naming options.device
    assert dataclasses.replace(base, device="cuda").fingerprint({"target": "packed"})["options"]["device"] == "cuda"
    assert dataclasses.replace(base, ctx=32).fingerprint({"target": "packed"})["options"]["ctx"] == 32
    sweep = dataclasses.replace(base, sweep=SweepSpec((tmp_path / "e.txt",), 2, "t"))
    sfp = sweep.fingerprint()
    assert "evaluation" in sfp and sfp["options"]["budgets"] == "4bpw" and "budget" not in sfp["options"]
    measure_only = dataclasses.replace(base, budgets=()).fingerprint()["options"]
    assert "budget" not in measure_only and "constraints" not in measure_only
