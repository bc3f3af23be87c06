"""The ``bitalloc`` CLI as a real subprocess, for the kill-and-resume tests (one thread, lowest priority)."""
from __future__ import annotations

import os
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
