"""The CLI's own conventions under Ctrl-C and bad options: an interrupt is ``interrupted`` and exit 130 at any
moment (also while the CLI is imported, or when a library turns it into another error); a bad option is one
line ``error: ...`` with exit 2, never argparse's usage block."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bitalloc.cli import main
from bitalloc.errors import InputError


def test_importing_the_cli_does_not_import_torch():
    """A Ctrl-C during a module-level import escapes ``main`` as a traceback: the heavy imports must happen
    inside it."""
    code = "import sys, bitalloc.cli; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("turned_into", [InputError("cannot read the model config"), ModuleNotFoundError("x"),
                                         RuntimeError("y")])
def test_an_interrupt_a_library_turns_into_another_error_is_still_an_interrupt(monkeypatch, capsys, turned_into):
    import bitalloc.cli.measure_plan as mp

    def interrupted_load(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C inside a library that wraps every exception
            for _ in range(5000):  # the handler runs at the interpreter's next check, whenever that comes
                time.sleep(0.001)
        except KeyboardInterrupt:
            raise turned_into
        raise AssertionError("no KeyboardInterrupt")

    monkeypatch.setattr(mp, "cmd_plan", interrupted_load)
    monkeypatch.setattr("bitalloc.cli._precheck", lambda args: None)
    # a process started in the background by a non-interactive shell ignores SIGINT from birth: Python's
    # default handler is what a terminal's Ctrl-C reaches, so the test installs it for its own duration
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = main(["plan", "t.json", "--budget", "3bpw", "--out", "p.json"])
    finally:
        after = signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert rc == 130 and err.strip() == "interrupted", err
    assert after is signal.default_int_handler  # the watch is undone


@pytest.mark.parametrize("argv", [["quantize", "--budget", "-3bpw", "--out", "q"], ["measure", "--windows", "x"],
                                  ["plan", "t", "--budget", "3bpw", "--constraints", "tied", "--out", "p"],
                                  ["nocommand"]])
def test_a_bad_option_is_one_error_line_with_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: bitalloc") and err.count("\n") == 1, err
