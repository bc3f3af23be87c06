"""bench/thread_bits.py's probe on a tiny width: it rounds under both thread counts, compares what it says it
compares, and writes its table."""
from __future__ import annotations

import json

import torch

from bench import thread_bits


def test_probe_counts_differences_and_writes_its_json(tmp_path, monkeypatch) -> None:
    threads = torch.get_num_threads()
    try:
        row = thread_bits.run(2, 64, rows=8, tokens=128)
    finally:
        torch.set_num_threads(threads)
    assert row["factor_elements"] == 64 * 64 and 0 <= row["factor_elements_differing"] <= 64 * 64
    for f in thread_bits.FORMATS:
        assert row[f]["codes"] == 8 * 64 and row[f]["same_bytes"] == (row[f]["sha256_1"] == row[f]["sha256_2"])
    monkeypatch.setattr(thread_bits, "run", lambda t, w, r, k: row | {"width": w})
    out = tmp_path / "tb.json"
    assert thread_bits.main(["--widths", "64,128", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["width"] for r in doc["rows"]] == [64, 128] and doc["command"].endswith(f"--out {out}")
