"""bench/candidates_cost.py's plumbing (no timing is asserted): both lists timed on every tensor, the ratio
and the added formats recorded.  Run in its own process: the bench sets torch's threads and allocates
enough to change the process's allocator state, which later memory tests measure."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import candidates_cost

REPO = Path(__file__).resolve().parents[2]


def test_two_lists_timed_on_every_tensor(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    cmd = [sys.executable, str(REPO / "bench" / "candidates_cost.py"), "--before", "int4-row", "--after",
           "int4-row,int3-row", "--repeats", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = json.loads(out.read_text())
    names = [n for n, _, _ in candidates_cost.BLOCK]
    assert all(set(body["seconds"][k]) == set(names) for k in ("before", "after"))
    assert body["added"] == ["int3-row"] and body["removed"] == []
    assert body["ratio_after_over_before"] > 0 and out.with_suffix(".png").is_file()


def test_unknown_or_empty_lists_are_refused_before_any_work(capsys) -> None:
    import pytest

    for argv in (["--after", "int4-g128,bogus"], ["--before", ""]):
        with pytest.raises(SystemExit) as e:
            candidates_cost.main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--after: unknown format 'bogus'" in err and "--before names no format" in err
