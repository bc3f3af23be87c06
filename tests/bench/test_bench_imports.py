"""Every benchmark script imports (a library refactor that moves a name breaks a bench at once, not at its next
hour-long run)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_bench_module_imports(name, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name])
    monkeypatch.syspath_prepend(str(BENCH.parent))
    importlib.import_module(f"bench.{name}")
