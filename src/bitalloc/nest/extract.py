"""Extraction: a model of any size from a nested artifact -- allocation from the stored errors, assembly of the chosen
prefixes; no calibration text, no rounding, no weights beyond the artifact.

* :func:`extract`: the plan (the exact allocator over the artifact's table, budget over all stored weights as the
  packed directory counts them) and every tensor (allocated: ``int{k}-g{G}`` from ``k`` planes; fixed: fp16, or
  fp32 beyond its range, as ``quantize`` stores them);
* :func:`extract_packed`: that model as a packed directory (``bitalloc.load`` and ``bitalloc eval`` read it), written
  by the packed target (:class:`bitalloc.targets.packed.PackedTarget`);
* :func:`extract_gguf`: as a GGUF llama.cpp runs, for an artifact nested with ``--group 32`` from a GGUF source:
  its ``int4``/``int5`` depths are exactly Q4_1/Q5_1 (:mod:`bitalloc.nest.gguf`); other depths have no GGUF type,
  so the allocation is restricted to those two (one per stacked expert tensor) and the norms stay F32.  The GGUF
  target resolves the budget as for ``bitalloc gguf`` (bits per weight over all tensor data, a size over the whole
  file) and writes it (:class:`bitalloc.targets.gguf.GGUFTarget`);
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
    tensors' float32 values (``fixed``), the budget as resolved and, for a GGUF, the artifact's GGUF template."""

    plan: Plan
    qtensors: dict[str, QTensor]
    fixed: dict[str, torch.Tensor]
    capacity: Capacity
    info: dict[str, Any]
    template: Any = None


def extract(art: str | os.PathLike, budget: str | Budget, *, objective: str | None = None, verify: bool = True,
            gguf: bool = False) -> Extracted:
    """The model of ``art`` that fits ``budget`` with the least predicted error (see the module)."""
    from ..models.view import fixed_format
    from ..pipeline import make_plan
    from ..targets.packed import weights_capacity

    b = Budget.parse(budget)
    with Artifact(art, verify=verify) as a:
        m = a.measurement
        cap, constraints, tpl = _gguf_capacity(a, b) if gguf else (weights_capacity(b, m), Constraints(), None)
        plan = make_plan(m, cap.plan_budget(m.fixed_bytes), constraints, objective)
        qtensors = {name: a.qtensor(name, fmt) for name, fmt in sorted(plan.assignments.items())}
        fixed = {name: a.fixed_value(name) for name in sorted(a.fixed)}
        info = dict(a.info)
    for name, v in fixed.items():
        qtensors[name] = get_format(fixed_format(v)).store(v)
    log.info("extracted %d tensors at %.4f bpw (budget %s) from %s", len(qtensors), plan.bpw, b.text, art)
    return Extracted(plan, qtensors, fixed, cap, info, tpl)


def _gguf_capacity(a: Artifact, b: Budget) -> tuple[Capacity, Constraints, Any]:
    """The budget of a GGUF extraction as the GGUF target resolves it (:func:`bitalloc.targets.gguf.split_budget`:
    bits per weight count all tensor data, a size counts the file), its constraints (the formats with a GGUF type,
    one type per stacked expert tensor) and the artifact's GGUF template."""
    from ..targets.gguf import preflight, split_budget, stack_ties
    from .gguf import gguf_type_of, template_from_files

    if not a.info.get("gguf_template"):
        raise InputError(f"{a.path} was not nested from a GGUF, so it holds no GGUF metadata to write one "
                         "(nest the .gguf model to extract GGUFs)")
    fmts = tuple(f for f in sorted({r.format for r in a.measurement.rows}) if gguf_type_of(f) is not None)
    if a.group != 32 or a.outliers or not fmts:
        raise InputError(f"{a.path} has groups of {a.group} columns and {a.outliers} exact elements per row: only an "
                         "artifact nested with --group 32 --outliers 0 has depths that are exactly GGUF types "
                         "(int4-g32 = Q4_1, int5-g32 = Q5_1)")
    tpl = template_from_files(a.path)
    preflight(tpl, fmts, b)  # below the smallest or above the largest GGUF of these types: refused as `bitalloc gguf`
    names = sorted({tpl.names.to_gguf(t.name) for t in a.measurement.tensors})
    cap = split_budget(tpl, names, b, a.total_params)
    return cap, Constraints(tie_groups=stack_ties(tpl).tie_groups, allowed=(("*", fmts),)), tpl


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
    """Write the extracted model of ``budget`` as a packed directory (the packed target, which asserts the size);
    returns its ``bitalloc.json``."""
    from ..targets.packed import PackedTarget
    from .gguf import meta_model_of

    ex = extract(art, budget, objective=objective, verify=verify)
    target = PackedTarget(out, inputs=(art,))
    prepared = target.prepare(meta_model_of(Path(art)), None, ex.plan, ex.qtensors, ex.fixed,
                              _CopiedTokenizer(Path(art)))
    return dict(target.write_verified(prepared, ex.capacity, overwrite=overwrite).info)


def extract_gguf(art: str | os.PathLike, budget: str | Budget, out: str | os.PathLike, *,
                 objective: str | None = None, verify: bool = True, overwrite: bool = False) -> Written:
    """Write the extracted model of ``budget`` as a GGUF (see the module) through the GGUF target, which asserts the
    size; refuses an artifact without exact GGUF depths in one line before any work."""
    from .gguf import extracted_gguf

    ex = extract(art, budget, objective=objective, verify=verify, gguf=True)
    allocated = {n: q for n, q in ex.qtensors.items() if n in ex.plan.assignments}
    target, prepared = extracted_gguf(Path(out), ex.template, Path(art), allocated, ex.fixed)
    written = target.write_verified(prepared, ex.capacity, overwrite=overwrite)
    log.info("wrote %s from %s (%d tensors, %d bytes)", out, art, written.n_tensors, written.file_size)
    return written


__all__ = ["Extracted", "extract", "extract_gguf", "extract_packed"]
