"""The command line: complete --help, one-line errors with exit status 2, plan from a measured table."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bitalloc.cli import build_parser, main
from bitalloc.pipeline import measure_model

from conftest import tiny_llama, token_ids

COMMANDS = ["measure", "plan", "quantize", "eval", "sweep", "demo"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"bitalloc {cmd}" in out
    for word in {"measure": ["--calib", "--formats", "--out", "--method", "--no-fisher", "--windows"],
                 "plan": ["--budget", "--constraints", "--out"],
                 "quantize": ["--budget", "--format", "--calib", "--out", "--measurement", "--plan"],
                 "eval": ["--reference", "--text", "--json"],
                 "sweep": ["--budgets", "--calib", "--eval", "--out"],
                 "demo": ["--budgets"]}[cmd]:
        assert word in out


def test_top_level_help_lists_commands():
    out = build_parser().format_help()
    for cmd in COMMANDS:
        assert cmd in out


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert match in err


def test_errors_are_one_line_with_status_2(capsys, tmp_path):
    _one_line_error(capsys, ["quantize", "--budget", "3xx", "--out", str(tmp_path / "q")], "budget")
    _one_line_error(capsys, ["measure", "--calib", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t.json")],
                    "not found")
    _one_line_error(capsys, ["plan", str(tmp_path / "missing.json"), "--budget", "3bpw", "--out", "p.json"],
                    "not found")
    (tmp_path / "exists").mkdir()
    _one_line_error(capsys, ["quantize", "--format", "int4-g128", "--out", str(tmp_path / "exists")],
                    "already exists")
    _one_line_error(capsys, ["quantize", "--format", "nonsense7", "--out", str(tmp_path / "q")], "format")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "table.json"
    measure_model(tiny_llama(), None, token_ids(2), ["int2-g32", "int4-g32"], "rtn", progress=False).save(path)
    return path


def test_plan_command_writes_a_plan_within_budget(table, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(table), "--budget", "3.5bpw", "--constraints", "fused", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["kind"] == "bitalloc.plan" and plan["total_bytes"] <= plan["budget_bytes"]
    _one_line_error(capsys, ["plan", str(table), "--budget", "0.5bpw", "--out", str(tmp_path / "p2.json")], "")
    _one_line_error(capsys, ["plan", str(table), "--budget", "3bpw", "--out", str(out)], "already exists")


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitalloc.cli", "plan", str(tmp_path / "x.json"), "--budget", "3bpw",
                        "--out", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
