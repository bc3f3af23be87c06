"""The packed safetensors directory as a job's target (:mod:`bitalloc.export.packed` writes and reads it).

A budget covers every stored weight: the allocated tensors take the budget less the fixed tensors (norms and
biases at fp16).  The expected digests are those of every stored tensor (``manifest.json``'s ``tensors``); a
directory that verifies against them is this job's finished output.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ..budget import Budget, Constraints
from ..errors import InputError
from ..formats import QTensor
from ..measure import Measurement
from ..models.view import ModelView
from ..plan import Plan
from .base import Capacity, Prepared, Written, check_size, remove_temps_beside

log = logging.getLogger(__name__)


def weights_capacity(budget: Budget, measurement: Measurement | ModelView) -> Capacity:
    """A budget over all stored weights (the packed accounting, which a sweep's points use too); the view's
    totals serve before a measurement exists (the same ``total_params`` and ``fixed_bytes``)."""
    limit = budget.resolve(measurement.total_params)
    return Capacity(budget.text, limit, limit - measurement.fixed_bytes, measurement.fixed_bytes, "weights")


class PackedTarget:
    """``out``: the packed directory (:func:`bitalloc.export.packed.save_packed`); ``inputs``: paths it must not
    replace, lie in or contain besides the model's own folder (a nested artifact it is extracted from)."""

    kind = "packed"

    def __init__(self, out: str | Path, inputs: tuple[str | Path, ...] = ()) -> None:
        self.out = Path(out)
        self.inputs = tuple(inputs)

    def fingerprint(self) -> dict[str, Any]:
        return {"target": self.kind}

    def capacity(self, budget: Budget, measurement: Measurement | None, view: ModelView) -> Capacity:
        return weights_capacity(budget, measurement if measurement is not None else view)

    def constraints(self, view: ModelView) -> Constraints:
        return Constraints()

    def prepare(self, model: Any, view: ModelView, plan: Plan, qtensors: Mapping[str, QTensor],
                originals: Mapping[str, Any], tokenizer: Any) -> Prepared:
        from ..export.packed import flat_digests

        size = sum(q.nbytes() for q in qtensors.values())
        return Prepared({"weights": size}, flat_digests(qtensors), (model, view, qtensors, plan, tokenizer))

    def write_verified(self, prepared: Prepared, capacity: Capacity, *, overwrite: bool) -> Written:
        from ..export.packed import WEIGHTS_FILE, save_packed

        check_size(self.out, prepared.sizes[capacity.unit], capacity.limit, capacity.unit)
        model, view, qtensors, plan, tokenizer = prepared.payload
        info = save_packed(self.out, model, view, qtensors, plan, tokenizer, overwrite=overwrite, inputs=self.inputs)
        return Written(self.out, (self.out / WEIGHTS_FILE).stat().st_size, len(info["tensors"]), info)

    def is_ours(self, expected: Mapping[str, Any]) -> Written | None:
        from ..export.packed import WEIGHTS_FILE, read_packed, verify_packed

        try:
            verify_packed(self.out, expected)
        except (InputError, OSError):
            return None
        info = read_packed(self.out, verify=False)[0]  # verified just above
        log.info("%s was already written and verified by this job", self.out)
        return Written(self.out, (self.out / WEIGHTS_FILE).stat().st_size, len(info["tensors"]), info)

    def remove_stale(self) -> None:
        remove_temps_beside(self.out)


__all__ = ["PackedTarget", "weights_capacity"]
