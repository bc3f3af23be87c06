"""What a recovery run does: :class:`RecoverConfig` (mode, training length, learning rate, seed), checked once."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

MODES = ("none", "block", "e2e", "block+e2e")

#: defaults when neither steps nor tokens are given: optimizer steps per block (block stage) and in all (e2e)
DEFAULT_BLOCK_STEPS = 64
DEFAULT_E2E_STEPS = 64
#: without ``windows``, recovery trains on this many times the quantization's calibration windows (read further
#: into the same text, as far as it goes): the learned rounding has a free choice per weight, and on the
#: quantization's windows alone it fits them and not the text (README, "Recovery")
DEFAULT_WINDOW_FACTOR = 4
#: calibration windows read after the training windows and held out: the guards and checks of both stages measure
#: their gain there, so a stage that only fits its training windows is reverted (README, "Recovery")
DEFAULT_GUARD_WINDOWS = 16


@dataclass(frozen=True)
class RecoverConfig:
    """``mode``: which stages run. ``steps``: optimizer steps of each block (``block``) and of the whole model
    (``e2e``); or ``tokens``: the training tokens each of those sees (steps = tokens ÷ tokens per step), not both.
    ``lr``: Adam's step in level units for the codes (the learned rounding); scales, offsets and norms move at
    ``lr / 10`` (block) and ``lr / 16`` (e2e, where every scale of the model moves at once:
    :data:`bitalloc.recover.train.E2E_FLOAT_SHARE`; halved at each of the stage's checks that finds the calibration
    KL no lower) relative to their stored values; every rate decays to zero along a cosine over the stage's steps.
    ``block_windows`` / ``e2e_windows``: the calibration windows of one step.  ``windows``: how many calibration
    windows training draws from (the first ones are those the quantization used; more text overfits less, since the
    learned rounding has as many free choices as the block has weights); None = :data:`DEFAULT_WINDOW_FACTOR` times the
    quantization's (:meth:`train_windows`).  ``guard_windows``: the windows after those, never trained on, on which
    each stage checks that it gained (:meth:`split`; 0 = check on the first training windows).  ``seed`` fixes the
    order of the windows (the
    run is deterministic).  ``aware``: the allocation sees each format's error after recovery
    (:mod:`bitalloc.recover.aware`)."""

    mode: str = "none"
    steps: int | None = None
    tokens: int | None = None
    lr: float = 2e-2
    block_windows: int = 2
    e2e_windows: int = 1
    windows: int | None = None
    guard_windows: int = DEFAULT_GUARD_WINDOWS
    seed: int = 0
    aware: bool = False  # allocate from errors scaled by each format's measured recovery gain (.aware)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown recovery {self.mode!r}; use one of {', '.join(MODES)}")
        if self.steps is not None and self.tokens is not None:
            raise InputError("give the recovery length as steps or as tokens, not both")
        for what, v in (("recovery steps", self.steps), ("recovery tokens", self.tokens),
                        ("recovery windows", self.windows)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{what} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise InputError(f"the recovery learning rate must be in (0, 1], got {self.lr!r}")
        for what, v in (("block_windows", self.block_windows), ("e2e_windows", self.e2e_windows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"recovery {what} must be a positive integer, got {v!r}")
        g = self.guard_windows
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise InputError(f"recovery guard_windows must be a non-negative integer, got {g!r}")

        if self.aware and not self.block:
            raise InputError("recovery-aware allocation measures block-wise recovery: use it with --recover block "
                             "or block+e2e")

    @property
    def block(self) -> bool:
        return self.mode in ("block", "block+e2e")

    @property
    def e2e(self) -> bool:
        return self.mode in ("e2e", "block+e2e")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def steps_for(self, stage: str, ctx: int) -> int:
        """Optimizer steps of ``stage`` ("block": per block, "e2e": in all) for windows of ``ctx`` tokens."""
        per_step = (self.block_windows if stage == "block" else self.e2e_windows) * ctx
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, -(-self.tokens // per_step))
        return DEFAULT_BLOCK_STEPS if stage == "block" else DEFAULT_E2E_STEPS

    def train_windows(self, quant_windows: int) -> int:
        """How many calibration windows recovery trains on when the quantization used ``quant_windows``."""
        return self.windows if self.windows is not None else DEFAULT_WINDOW_FACTOR * quant_windows

    def split(self, available: int, quant_windows: int) -> tuple[int, int]:
        """``(training windows, held-out windows)`` from a text of ``available`` windows: :meth:`train_windows`
        and ``guard_windows`` when it holds both; when it runs short, the held-out windows are kept as long as at
        least the quantization's ``quant_windows`` (or :meth:`train_windows`, when fewer) are left to train on, and
        the training windows shrink;
        otherwise no window is held out (the checks then use training windows)."""
        want, guard = self.train_windows(quant_windows), self.guard_windows
        if available >= want + guard:
            return want, guard
        if guard and available - guard >= min(want, quant_windows):
            return available - guard, guard
        return min(available, want), 0

    def fingerprint(self) -> dict[str, object]:
        """What changes a recovered result (a job reopened with another recovery is refused)."""
        return {"mode": self.mode, "steps": self.steps, "tokens": self.tokens, "lr": self.lr,
                "block_windows": self.block_windows, "e2e_windows": self.e2e_windows, "seed": self.seed,
                "aware": self.aware, "guard_windows": self.guard_windows,
                "windows": self.windows if self.windows is not None else f"{DEFAULT_WINDOW_FACTOR}x"}


__all__ = ["DEFAULT_WINDOW_FACTOR", "MODES", "RecoverConfig"]
