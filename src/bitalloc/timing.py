"""Wall time per stage of a run: where the time goes (load, calibration forwards, Hessians, Fisher pass,
measurement per format family, allocation, quantize, refits, evaluation, writing).

A :class:`StageTimer` is created by whoever runs a job (the CLI, a benchmark) and handed down; the numerical
code records into it with ``with timed(timer, "hessians"):``, where ``timer`` may be None (nothing is
recorded).  Stages nest freely; each name accumulates its own wall time and call count, so a nested stage is
also counted inside its parent (the breakdown is a set of named clocks, not a partition).  On CUDA, a stage
synchronises its device before reading the clock, so queued kernels are charged to the stage that queued them.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ContextManager, Iterator

import torch


@dataclass
class StageTimer:
    """Accumulated seconds and calls per stage name.  ``device``: the device whose queue a stage waits for
    before reading the clock (``cuda`` devices only; CPU work is synchronous)."""

    device: torch.device | str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def _sync(self) -> None:
        if self.device is not None and torch.device(self.device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(torch.device(self.device))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float, calls: int = 1) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)
        self.calls[name] = self.calls.get(name, 0) + int(calls)

    def merge(self, other: "StageTimer") -> None:
        for name, s in other.seconds.items():
            self.add(name, s, other.calls.get(name, 0))

    def as_dict(self, digits: int = 3) -> dict[str, dict[str, float | int]]:
        """``{stage: {"seconds": s, "calls": n}}`` in first-recorded order (JSON-ready)."""
        return {k: {"seconds": round(v, digits), "calls": self.calls.get(k, 0)} for k, v in self.seconds.items()}


def timed(timer: StageTimer | None, name: str) -> ContextManager[None]:
    """``timer.stage(name)``, or a no-op when ``timer`` is None."""
    return nullcontext() if timer is None else timer.stage(name)


__all__ = ["StageTimer", "timed"]
