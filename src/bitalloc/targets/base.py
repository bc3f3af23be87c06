"""What an output format is to a job: a :class:`Target`.

A job (:mod:`bitalloc.jobs`) measures, plans and quantizes the same way whatever it writes; the target says
the rest:

* :meth:`Target.capacity` resolves the budget (parsed once, by the CLI) into bytes, once: the limit the
  written output must meet and the bytes the allocated tensors may take inside it (the rest is the target's
  fixed cost: norms and biases, a file header);
* :meth:`Target.constraints` adds the ties its layout needs (a GGUF stores one type per stacked expert tensor);
* :meth:`Target.prepare` turns the quantized tensors into what it will write, with the exact size and the
  ``expected`` digests (JSON data) the job checkpoints *before* writing;
* :meth:`Target.write_verified` writes atomically, re-reads and verifies, and asserts ``size <= limit``;
* :meth:`Target.is_ours` recognises a finished output from the saved ``expected`` digests (a kill came after
  the rename: the rerun returns it instead of refusing it as an existing output);
* :meth:`Target.fingerprint` is what the target adds to the job's fingerprint.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from ..checked import Checker
from ..errors import BudgetError
from ..io.atomic import TEMP_SUFFIX

if TYPE_CHECKING:  # pragma: no cover
    from ..budget import Budget, Constraints
    from ..formats import QTensor
    from ..measure import Measurement
    from ..models.view import ModelView
    from ..plan import Plan


@dataclass(frozen=True)
class Capacity:
    """A budget resolved by a target: the output must take at most ``limit`` bytes (``unit`` says of what),
    of which the allocated tensors may take ``allocatable``; ``overhead`` bytes are fixed (header, norms)."""

    budget: str  # the budget as the user typed it
    limit: int
    allocatable: int
    overhead: int
    unit: str  # "weights" (all stored weights), "file" (the file size), "tensor data" (a GGUF's tensor bytes)

    def plan_budget(self, fixed_bytes: int) -> Budget:
        """The budget the allocator gets: the allocatable bytes plus the measurement's ``fixed_bytes`` (the
        allocator's own accounting of the fixed tensors); a budget over all weights keeps its text."""
        from ..budget import Budget

        n = self.allocatable + fixed_bytes
        return Budget(self.budget if self.unit == "weights" else str(n), "bytes", float(n))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "capacity") -> Capacity:
        c = Checker(source)
        d = c.obj(d, "")
        return cls(c.string(c.key(d, "budget"), "budget"), c.count(c.key(d, "limit"), "limit"),
                   c.count(c.key(d, "allocatable"), "allocatable"), c.count(c.key(d, "overhead"), "overhead"),
                   c.choice(c.key(d, "unit"), "unit", ("weights", "file", "tensor data")))


def check_size(what: Path, size: int, limit: int | None, unit: str) -> None:
    """The writer's assertion: the output about to be written fits its budget (BudgetError otherwise)."""
    if limit is not None and size > limit:
        raise BudgetError(f"{what} would take {size} B of {unit}, over its budget of {limit} B; nothing was written")


def remove_temps_beside(out: Path) -> None:
    """Temporaries a killed atomic write left beside ``out`` (only ever called under the job's lock)."""
    for p in sorted(out.parent.glob(f".{out.name}.*{TEMP_SUFFIX}")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@dataclass(frozen=True, eq=False)
class Prepared:
    """An output ready to write: its exact ``sizes`` (by capacity unit), the ``expected`` digests (JSON data,
    checkpointed by the job before the write) and the target's own payload."""

    sizes: Mapping[str, int]
    expected: dict[str, Any]
    payload: Any


@dataclass(frozen=True)
class Written:
    """A written, verified output."""

    path: Path
    file_size: int  # bytes on disk (the weights file of a packed directory, the GGUF file)
    n_tensors: int
    info: Mapping[str, Any]  # the target's description (bitalloc.json of a packed directory, a GGUF's manifest)


class Target(Protocol):
    """An output of a job (see the module)."""

    out: Path

    def fingerprint(self) -> dict[str, Any]: ...

    def capacity(self, budget: Budget, measurement: Measurement | None, view: ModelView) -> Capacity:
        """``budget`` in bytes for this output; ``measurement`` None: before measuring (no measured-floor check)."""

    def constraints(self, view: ModelView) -> Constraints: ...

    def prepare(self, model: Any, view: ModelView, plan: Plan, qtensors: Mapping[str, QTensor],
                originals: Mapping[str, Any], tokenizer: Any) -> Prepared:
        """``qtensors``: :func:`bitalloc.quantize.quantize_model`'s result; ``originals``: the fixed tensors'
        values before quantization (a target that stores them at full precision)."""
        ...

    def write_verified(self, prepared: Prepared, capacity: Capacity, *, overwrite: bool) -> Written:
        """Write atomically, re-read and verify; refuses (BudgetError) a size over ``capacity.limit``."""
        ...

    def is_ours(self, expected: Mapping[str, Any]) -> Written | None:
        """The finished output when ``out`` is exactly what ``expected`` describes, else None."""
        ...

    def remove_stale(self) -> None:
        """Temporaries a killed write left beside ``out`` (called under the job's lock)."""
        ...


__all__ = ["Capacity", "Prepared", "Target", "Written", "check_size", "remove_temps_beside"]
