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


# The exact defaults of every command: the option blocks are shared helpers, and a change to one must not
# silently change another command's options.
DEFAULTS = {
    "measure": (["--out", "t.json"], {"model": None, "calib": None, "windows": 32, "ctx": 512, "method": "gptq",
                "fisher": True, "fisher_windows": 8, "overwrite": False, "job": None, "keep_job": False,
                "quiet": False, "verbose": False}),
    "plan": (["t.json", "--budget", "3bpw", "--out", "p.json"], {"constraints": "none", "objective": None,
             "overwrite": False}),
    "quantize": (["--budget", "3bpw", "--out", "q"], {"format": None, "windows": 32, "ctx": 512, "method": "gptq",
                 "fisher_windows": 8, "measurement": None, "plan": None, "constraints": "none", "job": None}),
    "eval": (["q"], {"reference": None, "text": None, "windows": 32, "ctx": 512, "json": False}),
    "sweep": (["--budgets", "3bpw", "--out", "s"], {"model": None, "windows": 32, "method": "gptq",
              "fisher_windows": 4, "eval": None, "eval_windows": 16, "uniform": None, "constraints": "none",
              "reuse_rounding": False}),
    "demo": ([], {"model": None, "budgets": "3.5bpw,4.5bpw", "windows": 16, "method": "rtn", "fisher_windows": 4,
             "formats": "int2-g64,int3-g64,int3-g128,int4-g64,int4-g128,int8-g128", "eval_windows": 8,
             "out": "bitalloc-demo", "constraints": "none", "reuse_rounding": True}),
}


@pytest.mark.parametrize("cmd", COMMANDS)
def test_defaults_of_every_command(cmd):
    argv, expected = DEFAULTS[cmd]
    args = vars(build_parser().parse_args([cmd, *argv]))
    assert {k: args[k] for k in expected} == expected
    if cmd in ("measure", "quantize", "sweep"):
        fmts = args["formats"].split(",")
        assert fmts[:2] == ["int2-row", "int2-g32"] and "fp16" in fmts
        assert {"int2-g32-dq", "int3-g32-dq", "int4-g32-dq", "int5-g32-dq"} <= set(fmts)


@pytest.mark.parametrize("cmd, argv", [("demo", []), ("sweep", ["--budgets", "3bpw", "--out", "s"]),
                                       ("quantize", ["--budget", "3bpw", "--out", "q"]), ("gguf", ["m.gguf", "--budget", "3bpw", "-o", "o.gguf"])])
def test_reuse_rounding_is_the_demo_default_and_can_be_turned_off_everywhere(cmd, argv, tmp_path):
    """The demo assembles its points from the measurement's roundings unless told not to; the other commands round
    again block by block unless told to reuse; the job's configuration gets what was parsed."""
    from bitalloc.cli.common import run_config

    parse = build_parser().parse_args
    default = vars(parse([cmd, *argv]))["reuse_rounding"]
    assert default is (cmd == "demo")
    assert vars(parse([cmd, *argv, "--no-reuse-rounding"]))["reuse_rounding"] is False
    assert vars(parse([cmd, *argv, "--reuse-rounding"]))["reuse_rounding"] is True
    if cmd == "demo":
        for flag, want in (([], True), (["--no-reuse-rounding"], False)):
            args = parse([cmd, *argv, *flag])
            config = run_config(args, tmp_path / "out", tmp_path / "out.job", budgets=(), sweep=None)
            assert config.reuse_rounding is want


@pytest.mark.parametrize("argv", [["sweep", "--budgets", "3bpw"], ["quantize", "--out", "q"],
                                  ["quantize", "--budget", "3bpw", "--format", "int4-g128", "--out", "q"],
                                  ["plan", "t.json", "--budget", "3bpw", "--constraints", "tied", "--out", "p"]])
def test_required_and_exclusive_options_are_enforced(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_job_dir_refuses_an_existing_output_unless_resuming_or_overwriting(tmp_path):
    from argparse import Namespace

    from bitalloc.cli.common import _job_dir
    from bitalloc.errors import InputError

    out = tmp_path / "out"
    plain = Namespace(job=None, overwrite=False)
    assert _job_dir(plain, out) == tmp_path / "out.job"  # nothing there yet
    out.mkdir()
    with pytest.raises(InputError, match="already exists"):
        _job_dir(plain, out)
    with pytest.raises(InputError, match="already holds sweep.json"):
        _job_dir(plain, out, existing=["sweep.json"])
    assert _job_dir(plain, out, existing=[]) == tmp_path / "out.job"  # a results directory without results
    assert _job_dir(Namespace(job=None, overwrite=True), out) == tmp_path / "out.job"
    (tmp_path / "j").mkdir()
    assert _job_dir(Namespace(job=str(tmp_path / "j"), overwrite=False), out) == tmp_path / "j"  # resumes


def test_module_entry_point_prints_help(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitalloc.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: bitalloc" in r.stdout
    for cmd in COMMANDS:
        assert cmd in r.stdout


def test_a_bug_is_one_line_with_exit_1_and_the_traceback_with_verbose(monkeypatch, tmp_path, capsys):
    """Anything that is not an input error is a bug: one ``error: internal error`` line (exit 1, never the 2 of
    input errors, so tests of input errors cannot pass on it); ``-v`` adds the traceback."""
    import bitalloc.cli as cli

    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(cli, "_precheck", boom)
    for verbose in ([], ["-v"]):
        capsys.readouterr()
        assert main(["plan", "t.json", "--budget", "4bpw", "--out", str(tmp_path / "p.json"), *verbose]) == 1
        err = capsys.readouterr().err
        assert "error: internal error (ZeroDivisionError: division by zero)" in err
        assert ("Traceback" in err) == bool(verbose)
        if not verbose:
            assert len(err.strip().splitlines()) == 1, err
