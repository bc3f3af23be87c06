"""``--device`` and ``--threads`` on every command: parsed, refused in one line (exit 2), applied once at the entry."""
from __future__ import annotations

import pytest
import torch

from bitalloc.cli import build_parser, main
from bitalloc.cli.options import available_cpus, placement_of
from bitalloc.placement import Placement

COMMANDS = ["measure", "plan", "quantize", "eval", "sweep", "demo", "gguf"]


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert match in err


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_takes_device_and_threads(cmd):
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if cmd not in sub:
        pytest.skip(f"{cmd} is not installed")
    text = sub[cmd].format_help()
    assert "--device" in text and "--threads" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path / "q"), "--device", "cuda"], "not available")
    _one_line_error(capsys, ["quantize", "--format", "int4-g128", "--out", str(tmp_path / "q"), "--device", "cuda:1"],
                    "not available")


def test_bad_device_and_threads_are_refused(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path / "q"), "--device", "tpu"], "unknown device")
    for bad in ("0", "-2", "many"):  # an option error: argparse's exit, one line, status 2
        with pytest.raises(SystemExit) as e:
            main(["eval", str(tmp_path / "q"), "--threads", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "--threads" in err


def test_threads_are_applied_once_at_the_entry(capsys, tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["eval", str(tmp_path / "missing"), "--device", "cpu", "--threads", "1"]) == 2  # after parsing
        assert torch.get_num_threads() == 1
        capsys.readouterr()
        main(["eval", str(tmp_path / "missing"), "--device", "cpu"])
        assert torch.get_num_threads() == available_cpus()
    finally:
        torch.set_num_threads(before)


def test_placement_of_the_options():
    args = build_parser().parse_args(["eval", "d", "--device", "cpu"])
    assert args.device == "cpu" and args.threads is None
    assert placement_of(args) == Placement()
