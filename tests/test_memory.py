"""Heap helpers: freed large tensors go back to the OS once return_large_frees is set (glibc only)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bitalloc.memory import release_free_memory, return_large_frees


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_a_freed_tensor_in_the_middle_leaves_memory_at_once():
    big = torch.ones(4 << 20)  # freeing a 16 MiB mapping raises glibc's dynamic mmap threshold above 8 MiB
    del big
    if not return_large_frees():
        pytest.skip("not glibc")
    a = torch.ones(2 << 20)  # 8 MiB, then 8 MiB above it: freeing `a` alone cannot shrink a heap top
    b = torch.ones(2 << 20)
    before = _anon_mib()
    del a
    after = _anon_mib()
    assert before - after > 6, (before, after)
    del b
    release_free_memory()  # still callable, a no-op in effect here


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="threshold"):
        return_large_frees(0)
