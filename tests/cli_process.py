"""The ``bitalloc`` CLI as a real subprocess, for the kill-and-resume tests (one thread, lowest priority)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(argv: list[str], **kw) -> subprocess.Popen:
    """Start ``python -m bitalloc.cli *argv`` (stdout discarded, stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "bitalloc.cli", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lambda: os.nice(19), **kw)


def wait_for(proc: subprocess.Popen, path: Path, timeout: float = 240.0) -> bool:
    """Wait until ``path`` exists (True) or the process ended (False); kill it and fail after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{path} did not appear within {timeout} s")


def kill_at_marks(argv: list[str], marks: list[Path], out: Path, seed: int, pause: float) -> int:
    """Start the command once per mark and SIGKILL it a random moment (up to ``pause`` s, seeded) after the mark
    appears; stop once ``out`` exists (a run that ended first leaves it).  Returns how many runs were killed."""
    rng = random.Random(seed)
    kills = 0
    for mark in marks:
        proc = run_cli(argv)
        if wait_for(proc, mark):
            time.sleep(rng.uniform(0.0, pause))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += proc.returncode == -signal.SIGKILL
        else:
            proc.wait(timeout=60)
        if out.exists():
            break
    return kills


def run_to_end(argv: list[str]) -> None:
    """Run the command to its end; it must succeed."""
    proc = run_cli(argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
