"""Heap helpers: freed large tensors go back to the OS once return_large_frees is set (glibc only)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bitalloc.memory import return_large_frees


_FREED_IN_THE_MIDDLE = """
import sys
from pathlib import Path

import torch

from bitalloc.memory import release_free_memory, return_large_frees


def anon_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no RssAnon in /proc/self/status")


big = torch.ones(4 << 20)  # freeing a 16 MiB mapping raises glibc's dynamic mmap threshold above 8 MiB
del big
if not return_large_frees():
    print("not glibc")
    sys.exit(0)
a = torch.ones(2 << 20)  # 8 MiB, then 8 MiB above it: freeing `a` alone cannot shrink a heap top
b = torch.ones(2 << 20)
before = anon_mib()
del a
after = anon_mib()
print(before - after)
del b
release_free_memory()  # still callable, a no-op in effect here
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_a_freed_tensor_in_the_middle_leaves_memory_at_once():
    """In a fresh interpreter: the allocator's thresholds are process-wide state that earlier tests (any BLAS or
    LAPACK call, thread pools) move, so the suite's order must not decide the result."""
    r = subprocess.run([sys.executable, "-c", _FREED_IN_THE_MIDDLE], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "not glibc":
        pytest.skip("not glibc")
    freed = float(r.stdout.strip())
    assert freed > 6, freed


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="threshold"):
        return_large_frees(0)
