"""bench/demo_time.py's result helpers: what a finished demo reports and the table two runs are compared by."""
from __future__ import annotations

import json

from bench.demo_time import demo_outputs, table_rows


def test_demo_outputs_reads_what_is_there(tmp_path) -> None:
    (tmp_path / "sweep.json").write_text(json.dumps({"measure_seconds": 3.5}))
    run = {"output": ["peak memory: 1 MiB", "x", "peak memory: 2 MiB"]}
    assert demo_outputs(run, tmp_path) == {"cli_peak_memory": "peak memory: 2 MiB", "measure_seconds": 3.5}
    (tmp_path / "sweep.json").write_text("{not json")
    assert demo_outputs({"output": []}, tmp_path) == {} == demo_outputs({"output": []}, tmp_path / "absent")


def test_table_rows_are_the_points_only() -> None:
    out = ["kind       budget   method", "-----", "allocated  3.5bpw   rtn  0.7", "", "uniform    4.5bpw   rtn  0.6",
           "measurement 186 s; results: ..."]
    assert table_rows(out) == ["allocated  3.5bpw   rtn  0.7", "uniform    4.5bpw   rtn  0.6"]
