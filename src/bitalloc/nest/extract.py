"""Extraction: a model of any size from a nested artifact -- allocation from the stored errors, assembly of the chosen
prefixes; no calibration text, no rounding, no weights beyond the artifact.

* :func:`extract`: the plan (the exact allocator over the artifact's table, budget over all stored weights as the
  packed directory counts them) and every tensor (allocated: ``int{k}-g{G}`` from ``k`` planes; fixed: fp16, or
  fp32 beyond its range, as ``quantize`` stores them);
* :func:`extract_packed`: that model as a packed directory (``bitalloc.load`` and ``bitalloc eval`` read it);
* :func:`extract_gguf`: as a GGUF llama.cpp runs, for an artifact nested with ``--group 32`` from a GGUF source:
  its ``int4``/``int5`` depths are exactly Q4_1/Q5_1 (:mod:`bitalloc.nest.gguf`); other depths have no GGUF type,
  so the allocation is restricted to those two and the norms stay F32 (their bytes count in the budget);
* ``bitalloc.load(ART, budget=B)``: the extracted model, dequantized, as a transformers model.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..budget import Budget, Constraints
from ..errors import InputError
from ..formats import QTensor, get_format
from ..plan import Plan
from ..targets.base import Capacity, Written
from .artifact import META_FILE, MANIFEST_FILE, TABLE_FILE, Artifact

log = logging.getLogger(__name__)

#: the artifact's own files; every other small file (config.json, the tokenizer's) is copied into an extraction
_OWN = (META_FILE, TABLE_FILE, MANIFEST_FILE)


@dataclass(frozen=True, eq=False)
class Extracted:
    """An extracted model: the plan, every stored tensor (``qtensors``, as a packed directory holds them), the fixed
    tensors' float32 values (``fixed``) and the budget as resolved."""

    plan: Plan
    qtensors: dict[str, QTensor]
    fixed: dict[str, torch.Tensor]
    capacity: Capacity
    info: dict[str, Any]


def extract(art: str | os.PathLike, budget: str | Budget, *, objective: str | None = None, verify: bool = True,
            gguf: bool = False) -> Extracted:
    """The model of ``art`` that fits ``budget`` with the least predicted error (see the module)."""
    from ..models.view import fixed_format
    from ..pipeline import make_plan
    from ..targets.packed import weights_capacity

    b = Budget.parse(budget)
    with Artifact(art, verify=verify) as a:
        m = a.measurement
        if gguf:
            cap, allowed = _gguf_capacity(a, b)
        else:
            cap, allowed = weights_capacity(b, m), ()
        plan = make_plan(m, cap.plan_budget(m.fixed_bytes), Constraints(allowed=allowed), objective)
        qtensors = {name: a.qtensor(name, fmt) for name, fmt in sorted(plan.assignments.items())}
        fixed = {name: a.fixed_value(name) for name in sorted(a.fixed)}
        info = dict(a.info)
    for name, v in fixed.items():
        qtensors[name] = get_format(fixed_format(v)).store(v)
    log.info("extracted %d tensors at %.4f bpw (budget %s) from %s", len(qtensors), plan.bpw, b.text, art)
    return Extracted(plan, qtensors, fixed, cap, info)


def _gguf_capacity(a: Artifact, b: Budget) -> tuple[Capacity, tuple[tuple[str, tuple[str, ...]], ...]]:
    """The budget of a GGUF extraction (tensor data: allocated tensors + F32 fixed tensors) and the formats allowed."""
    from .gguf import gguf_type_of

    if not a.info.get("gguf_template"):
        raise InputError(f"{a.path} was not nested from a GGUF, so it holds no GGUF metadata to write one "
                         "(nest the .gguf model to extract GGUFs)")
    fmts = tuple(f for f in sorted({r.format for r in a.measurement.rows}) if gguf_type_of(f) is not None)
    if a.group != 32 or a.outliers or not fmts:
        raise InputError(f"{a.path} has groups of {a.group} columns and {a.outliers} exact elements per row: only an "
                         "artifact nested with --group 32 --outliers 0 has depths that are exactly GGUF types "
                         "(int4-g32 = Q4_1, int5-g32 = Q5_1)")
    limit = b.resolve(a.total_params)
    fixed32 = a.fixed_f32_bytes
    cap = Capacity(b.text, limit, limit - fixed32, fixed32, "weights")
    if cap.allocatable < 0:
        raise InputError(f"budget {b.text} ({limit} B) is below the F32 norms alone ({fixed32} B)")
    return cap, (("*", fmts),)


class _CopiedTokenizer:
    """Stands in for a tokenizer in :func:`bitalloc.export.packed.save_packed`: copies the artifact's files."""

    def __init__(self, src: Path) -> None:
        self.src = src

    def save_pretrained(self, dest: str) -> None:
        for f in sorted(self.src.iterdir()):
            if f.is_file() and not f.is_symlink() and f.name not in _OWN and f.name != "config.json" \
                    and not f.name.startswith(("tensors-", "gguf_template")):
                shutil.copyfile(f, Path(dest) / f.name)


def extract_packed(art: str | os.PathLike, budget: str | Budget, out: str | os.PathLike, *,
                   objective: str | None = None, verify: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write the extracted model of ``budget`` as a packed directory; returns its ``bitalloc.json``."""
    from ..export.packed import save_packed
    from ..targets.base import check_size
    from .gguf import meta_model_of

    ex = extract(art, budget, objective=objective, verify=verify)
    model = meta_model_of(Path(art))
    size = sum(q.nbytes() for q in ex.qtensors.values())
    check_size(Path(out), size, ex.capacity.limit, ex.capacity.unit)
    return save_packed(out, model, None, ex.qtensors, ex.plan, _CopiedTokenizer(Path(art)),
                       overwrite=overwrite, inputs=[art])


def extract_gguf(art: str | os.PathLike, budget: str | Budget, out: str | os.PathLike, *,
                 objective: str | None = None, verify: bool = True, overwrite: bool = False) -> Written:
    """Write the extracted model of ``budget`` as a GGUF (see the module); refuses an artifact without exact
    GGUF depths in one line before any work."""
    from ..targets.base import check_size
    from .gguf import template_from_files, write_extracted_gguf

    ex = extract(art, budget, objective=objective, verify=verify, gguf=True)
    tpl = template_from_files(Path(art))
    allocated = {n: q for n, q in ex.qtensors.items() if n in ex.plan.assignments}
    size = sum(q.nbytes() for q in allocated.values()) + sum(4 * v.numel() for v in ex.fixed.values())
    check_size(Path(out), size, ex.capacity.limit, "tensor data")
    return write_extracted_gguf(Path(out), tpl, Path(art), allocated, ex.fixed, overwrite=overwrite)


__all__ = ["Extracted", "extract", "extract_gguf", "extract_packed"]
