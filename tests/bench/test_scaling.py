"""The speed benchmarks' own logic (no timing is asserted): model shapes, the log-log fit, optional keyword
passing, the random model folder, the demo's phase split and the GGUF bench's time columns."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import demo_time
from bench import gguf_vs_llamacpp as gbench
from bench import scaling


@pytest.mark.parametrize("billions", [0.1, 0.5, 1.5, 3.0, 7.0])
def test_shapes_come_close_to_the_asked_size(billions: float) -> None:
    shape = scaling.shape_for(billions)
    assert abs(shape.params / (billions * 1e9) - 1) < 0.1
    assert shape.hidden == shape.heads * scaling.HEAD_DIM and shape.heads % shape.kv_heads == 0


def test_fit_exponent_recovers_a_power_law() -> None:
    xs = [1e8, 5e8, 1.5e9]
    assert scaling.fit_exponent(xs, [3 * x**1.25 for x in xs]) == pytest.approx(1.25)
    assert scaling.fit_exponent([1e8], [1.0]) is None
    assert scaling.fit_exponent([1e8, 2e8], [0.0, 1.0]) is None  # a zero time has no logarithm


def test_random_model_folder_loads(tmp_path: Path) -> None:
    from bitalloc.models.sources import load_model

    shape = scaling.Shape(hidden=64, layers=2, intermediate=128, heads=1, kv_heads=1, vocab=256)
    folder = scaling.write_model(shape, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001.safetensors"}
    model, tok = load_model(folder)
    assert tok is None and sum(p.numel() for p in model.parameters()) == shape.params
    stamp = (folder / "scaling.json").stat().st_mtime_ns
    scaling.write_model(shape, folder)  # complete: reused, not rewritten
    assert (folder / "scaling.json").stat().st_mtime_ns == stamp


def test_summary_goals() -> None:
    def entry(p: int, t: float, peak: int) -> dict:
        return {"size_b": p / 1e9, "params": p, "stages": {"measure": {"seconds": t, "calls": 1}},
                "library_stages": {"hessians": {"seconds": t / 2, "calls": 3}},
                "rss_peak_bytes": peak, "rss_floor_bytes": 100}

    s = scaling.summarise([entry(10**8, 1.0, 100 + 10**8), entry(10**9, 10.0, 100 + 10**9)])
    assert s["time_exponents"]["measure"]["exponent"] == pytest.approx(1.0)
    assert s["time_exponents"]["library:hessians"]["goal_met"] is True
    assert s["largest"]["rss_above_floor_fraction_of_fp32"] == pytest.approx(0.25) and s["largest"]["goal_met"]


def test_demo_phases_from_progress_bars() -> None:
    marks = [(1.0, "loading"), (2.0, "fisher:  50%|#    | 1/2"), (4.0, "calibrate:  10%|"),
             (9.0, "quantize (rtn):  5%|"), (10.0, "some log line"), (12.0, "evaluate: 100%|")]
    got = demo_time.phase_seconds(marks, 15.0)
    assert got == {"start": 2.0, "fisher": 2.0, "calibrate": 5.0, "quantize": 3.0, "evaluate": 3.0}
    assert math.isclose(sum(got.values()), 15.0)


def test_gguf_bench_time_columns_and_sweep() -> None:
    llama = {t: {"bytes": 1000, "ppl": 1.0, "kld": 0.1, "top1": 0.9, "quantize_seconds": 2.0}
             for t in gbench.TABLE_ORDER}
    rows = [{"type": t, "llamacpp": llama[t],
             "bitalloc": {"target_bytes": 500 if t in ("IQ4_NL", "Q4_0") else i, "gguf_seconds": 5.0}}
            for i, t in enumerate(gbench.TABLE_ORDER)]
    sweep = gbench.add_times(rows, {"imatrix_seconds": 8.0}, {"seconds": 20.0})
    assert rows[0]["time"] == {"bitalloc_seconds": 25.0, "llamacpp_seconds": 10.0, "ratio": 2.5, "goal_met": True,
                               "same_run": False}  # llama.cpp's times not marked as taken in this run
    # IQ4_NL and Q4_0 share one file: five bitalloc files against six llama.cpp quantizes
    assert sweep["bitalloc_files"] == 5 and sweep["bitalloc_seconds"] == pytest.approx(45.0)
    assert sweep["llamacpp_seconds"] == pytest.approx(20.0) and sweep["ratio"] == pytest.approx(2.25)
    assert gbench.add_times(rows, None, {"seconds": 1.0}) is None  # no llama.cpp times saved


def test_goal_exponents_use_the_issue_sizes_only() -> None:
    def entry(b: float, t: float) -> dict:
        p = int(b * 1e9)
        return {"size_b": b, "params": p, "stages": {"measure": {"seconds": t, "calls": 1}},
                "library_stages": {}, "rss_peak_bytes": 100 + p, "rss_floor_bytes": 100}

    # small sizes grow steeply (exponent 2 between them), the issue's sizes linearly
    entries = [entry(0.01, 1e-4), entry(0.03, 9e-4), entry(0.1, 1e-2), entry(0.5, 5e-2), entry(1.5, 0.15)]
    s = scaling.summarise(entries)
    assert s["time_exponents"]["measure"]["exponent"] > 1.2
    assert s["goal"]["sizes_run"] == 3
    assert s["goal"]["time_exponents"]["measure"]["exponent"] == pytest.approx(1.0)
    assert s["goal"]["total_exponent"]["goal_met"] is True
    one = scaling.summarise(entries[:3])  # one of the issue's sizes: no goal fit
    assert one["goal"]["time_exponents"] is None and one["goal"]["sizes_run"] == 1


def test_reuse_takes_finished_sizes_with_equal_settings(tmp_path: Path) -> None:
    args = scaling.parse_args(["--sizes", "0.1,0.5", "--threads", "2", "--device", "cpu"])
    same = scaling.run_settings(args)
    body = {"settings": dict(same, sizes="0.1"), "sizes": [
        {"size_b": 0.1, "params": 1, "commit": "abc"},                      # file settings match
        {"size_b": 0.5, "params": 2, "error": "timed out"},                 # failed: run again
        {"size_b": 1.5, "params": 3, "run_settings": dict(same, threads=16)},  # other threads
        "junk"]}
    out = tmp_path / "scaling.json"
    out.write_text(json.dumps(body))
    got = scaling.reusable(out, args)
    assert list(got) == [0.1] and got[0.1]["commit"] == "abc" and got[0.1]["run_settings"] == same
    assert scaling.reusable(tmp_path / "missing.json", args) == {}
    (tmp_path / "bad.json").write_text("{")
    assert scaling.reusable(tmp_path / "bad.json", args) == {}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_tree_sampler_adds_a_child_process_and_labels_samples_by_stage() -> None:
    """The sampled peak is this process's RSS plus its children's at the same moment (a child holding 64 MiB adds
    them), recorded under the running stage's label ``"<bench stage>/<library stage>"``."""
    import subprocess
    import sys
    import time

    sampler = scaling.TreeSampler(interval=0.01)
    timer = sampler.timer("cpu")
    code = "import sys, time; b = b'x' * (64 << 20); print('ready', flush=True); time.sleep(30)"
    with sampler:
        alone = sampler.sample()
        sampler.label = "measure"
        with timer.stage("fisher"):
            child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout is not None and child.stdout.readline().strip() == "ready"
                time.sleep(0.1)
                with_child = sampler.sample()
            finally:
                child.kill()
                child.wait()
        assert sampler.label == "measure"
    assert with_child >= alone + (60 << 20)
    assert sampler.by_label["measure/fisher"] >= with_child and sampler.peak >= with_child
    assert timer.seconds["fisher"] > 0
