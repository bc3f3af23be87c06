"""A llama.cpp GGUF as a job's target: per-tensor block types, the template's metadata kept.

Candidate types per tensor are the GGUF block types its shape allows (K-quants need rows of a multiple of 256
values); norms and biases are written as F32, as llama.cpp expects.  A file-size budget becomes a tensor-bytes
capacity by subtracting the exact non-tensor bytes (header, metadata, tensor infos), the F32 tensors and the
worst case of alignment padding (a bits-per-weight budget counts tensor data only); the final size is computed
exactly before writing and asserted.  The output is verified against ``OUT.gguf.manifest.json``
(:mod:`bitalloc.export.gguf_manifest`), whose digests the job saves before the write.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from gguf import GGMLQuantizationType

from ..budget import Budget, Constraints
from ..errors import BudgetError, InputError
from ..export.gguf import (
    GGUFTemplate, WrittenGGUF, gguf_layout, ggml_nbytes, runtime_tensor, stacked,
)
from ..export.gguf_manifest import prepare_gguf, verify_gguf_manifest, write_prepared
from ..formats import QTensor, get_format
from ..io.gguf import GGUFFile
from .base import Capacity, Prepared, Written, check_size, remove_temps_beside

log = logging.getLogger(__name__)

GGUF_FORMATS = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_nl", "q3_k", "q2_k")
F32 = GGMLQuantizationType.F32


def gguf_formats(text: str | None) -> list[str]:
    """Validated candidate ids; every one must be a GGUF block type."""
    ids = list(GGUF_FORMATS) if not text else [f.strip().lower() for f in text.split(",") if f.strip()]
    if not ids:
        raise InputError("--formats is empty")
    for f in ids:
        if not hasattr(get_format(f), "gguf_type"):
            raise InputError(f"--formats: {f} is not a GGUF block type (use {', '.join(GGUF_FORMATS)})")
    return ids


def split_budget(tpl: GGUFTemplate, allocated: Sequence[str], budget: Budget, total_params: int) -> Capacity:
    """Bytes the allocated tensors may take so that the file (or, for bpw, all tensor data) fits ``budget``."""
    shapes = {n: s for n, s, _ in tpl.tensors}
    alloc = set(allocated)
    missing = [n for n in alloc if n not in shapes]
    if missing:
        raise InputError(f"the template GGUF has no tensor {missing[0]!r}")
    fixed = [n for n, _, _ in tpl.tensors if n not in alloc]
    header = len(gguf_layout(tpl, [(n, s, F32) for n, s, _ in tpl.tensors]).header)
    align = tpl.alignment
    limit = budget.resolve(total_params)
    if budget.kind == "bpw":
        fixed_bytes = sum(ggml_nbytes(shapes[n], F32) for n in fixed)
        return Capacity(budget.text, limit, limit - fixed_bytes, fixed_bytes, "tensor data")
    padded = sum(-(-ggml_nbytes(shapes[n], F32) // align) * align for n in fixed)
    overhead = header + padded + len(allocated) * (align - 1)
    return Capacity(budget.text, limit, limit - overhead, overhead, "file")


def _what(cap: Capacity) -> str:
    return "of tensor data" if cap.unit == "tensor data" else "file size"


def preflight(tpl: GGUFTemplate, fmts: Sequence[str], budget: Budget) -> None:
    """Refuse, from the file's headers alone (before any weight is read), what the job could only refuse after
    measuring: an architecture or tensor the map cannot name, a tensor none of the candidate types can store,
    and a budget outside the sizes the candidates can reach."""
    names = tpl.names  # the architecture map: unknown architectures and tensor names are refused here
    shapes = {n: s for n, s, _ in tpl.tensors}
    allocated = {gg: shape for gg, shape in shapes.items()
                 if (members := names.members(gg)) and all(map(names.spec.is_quantizable, members))}
    lo = hi = 0
    for gg, shape in allocated.items():
        sizes = [get_format(f).nbytes(shape[-2:]) * math.prod(shape[:-2]) for f in fmts
                 if get_format(f).supports(shape[-2:])]
        if not sizes:
            raise InputError(f"tensor {gg} {tuple(shape)} can take none of --formats {','.join(fmts)} (K-quants "
                             f"need rows of a multiple of 256 values; add a 32-wide type such as q8_0 or q4_0)")
        lo, hi = lo + min(sizes), hi + max(sizes)
    total = sum(math.prod(s) for gg, s in shapes.items() if names.members(gg))
    cap = split_budget(tpl, list(allocated), budget, total)
    if cap.allocatable < lo:
        raise BudgetError(f"budget {budget} ({cap.limit} B) is below the smallest GGUF these types can make "
                          f"(about {cap.overhead + lo} B {_what(cap)})")
    if cap.allocatable > hi + len(allocated) * tpl.alignment:
        raise BudgetError(f"budget {budget} ({cap.limit} B) is above the largest GGUF these types can make "
                          f"(about {cap.overhead + hi} B {_what(cap)}, every tensor in its largest type): "
                          "ask for at most that")


def allocated_gguf_names(view: Any, tpl: GGUFTemplate) -> dict[str, str]:
    """HF name -> GGUF name of every allocated tensor of a ModelView."""
    return {r.name: tpl.names.to_gguf(r.name) for r in view.quantizable()}


def gguf_capacity(tpl: GGUFTemplate, view: Any, measurement: Any, budget: Budget) -> Capacity:
    """The budget resolved for this file: BudgetError when even the smallest measured types do not fit (checked
    once ``measurement`` exists; before it, e.g. to screen the formats, only the split)."""
    names = allocated_gguf_names(view, tpl)
    cap = split_budget(tpl, list(names.values()), budget, view.total_params)
    if measurement is None:
        return cap
    smallest = sum(min(r.bytes for r in measurement.rows_for(hf)) for hf in names)
    if cap.allocatable < smallest:
        raise BudgetError(f"budget {budget} ({cap.limit} B) is below the smallest GGUF these types can make "
                          f"(about {cap.overhead + smallest} B {_what(cap)})")
    return cap


def stack_ties(tpl: GGUFTemplate) -> Constraints:
    """Stacked experts (one GGUF tensor) take one type."""
    return Constraints(tie_groups=tuple(m for m in tpl.names.stacks.values() if len(m) > 1))


def plan_gguf(measurement: Any, view: Any, tpl: GGUFTemplate, budget: str | Budget) -> tuple[Any, Capacity]:
    """Allocate GGUF types so that the written file fits ``budget``; returns ``(plan, capacity)``."""
    from ..pipeline import make_plan

    cap = gguf_capacity(tpl, view, measurement, Budget.parse(budget))
    return make_plan(measurement, cap.plan_budget(measurement.fixed_bytes), stack_ties(tpl)), cap


def gguf_tensors(tpl: GGUFTemplate, view: Any, qtensors: Mapping[str, QTensor],
                 floats: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Every GGUF tensor by GGUF name: the allocated ones from ``qtensors`` (experts stacked), the others from
    ``floats`` (HF name -> value: norms at their original precision) or kept from the template (``rope_freqs``)."""
    tensors: dict[str, Any] = {}
    for gg in dict.fromkeys(allocated_gguf_names(view, tpl).values()):
        tensors[gg] = stacked(gg, [qtensors[m] for m in tpl.names.members(gg)])
    with GGUFFile(tpl.path) as f:
        for name, _shape, _typ in tpl.tensors:
            if name in tensors:
                continue
            members = tpl.names.members(name)
            if not members:  # a runtime tensor (rope_freqs): kept as it is
                tensors[name] = runtime_tensor(f, name)
                continue
            for hf in members:
                if hf not in floats:
                    raise InputError(f"the model has no tensor {hf!r} for GGUF tensor {name}")
            tensors[name] = stacked(name, [floats[hf].detach().to(torch.float32) for hf in members])
    return tensors


def quantize_for_gguf(model: torch.nn.Module, view: Any, plan: Any, windows: torch.Tensor, tpl: GGUFTemplate, *,
                      method: str = "gptq", progress: bool = True, placement: Any = None,
                      timer: Any = None, recover: Any = None, teacher: torch.nn.Module | None = None,
                      recover_windows: tuple[torch.Tensor, int] | None = None,
                      rounded: Mapping[str, QTensor] | None = None) -> dict[str, Any]:
    """Quantize ``model`` in place by ``plan``; returns every GGUF tensor (QTensors, F32 norms) by GGUF name.
    Afterwards ``model`` holds exactly the values the file decodes to (norms at their original values, or their
    trained ones).  ``placement``/``timer``: as :func:`bitalloc.quantize.quantize_model`; ``recover`` (a
    :class:`~bitalloc.recover.RecoverConfig`) trains the quantized model toward ``teacher`` (full precision) on
    ``recover_windows`` = ``(windows, held-out guard windows)`` (:func:`bitalloc.recover.training_windows`;
    default ``windows``, checked on its first ones).  ``rounded``: every planned tensor's QTensor as the measurement
    rounded it (``--reuse-rounding``; :func:`bitalloc.quantize.assemble_rounded`), used instead of rounding again."""
    from ..quantize import assemble_rounded, quantize_model, set_weight

    originals = {f.name: model.get_parameter(f.name).detach().clone() for f in view.fixed()}
    if rounded is not None:
        qt = assemble_rounded(model, view, plan, rounded, timer=timer)
    else:
        qt = quantize_model(model, view, plan, windows, method=method, progress=progress,  # type: ignore[arg-type]
                            placement=placement, timer=timer)
    if recover is not None and recover.active:
        from ..recover import recover_model

        if teacher is None:
            raise InputError("recovery needs the full-precision model as its teacher")
        train_on, guard = (windows, 0) if recover_windows is None else recover_windows
        qt, trained = recover_model(model, teacher, train_on, qt, recover, placement=placement, progress=progress,
                                    timer=timer, guard=guard)
        originals.update(trained)
    for name, value in originals.items():  # the GGUF keeps norms in F32: undo quantize's fp16 rounding
        set_weight(model, name, value)
    return gguf_tensors(tpl, view, qt, dict(model.named_parameters()))


def export_plan(model: torch.nn.Module, view: Any, plan: Any, windows: torch.Tensor, tpl: GGUFTemplate,
                out: str | Path, *, method: str = "gptq", overwrite: bool = False,
                progress: bool = True) -> WrittenGGUF:
    """Quantize ``model`` in place by ``plan`` onto the GGUF grids and write the GGUF and its manifest (a library
    call outside any job: benchmarks and tests)."""
    tensors = quantize_for_gguf(model, view, plan, windows, tpl, method=method, progress=progress)
    prep = prepare_gguf(Path(out).name, tpl, tensors)
    log.info("exact output size: %d bytes", prep.file_size)
    return write_prepared(out, tpl, prep, overwrite=overwrite)


class GGUFTarget:
    """``out``: a GGUF written with ``template``'s metadata, its manifest beside it."""

    kind = "gguf"

    def __init__(self, out: str | Path, template: GGUFTemplate) -> None:
        self.out = Path(out)
        self.template = template

    def fingerprint(self) -> dict[str, Any]:
        return {"target": self.kind}

    def capacity(self, budget: Budget, measurement: Any, view: Any) -> Capacity:
        return gguf_capacity(self.template, view, measurement, budget)

    def constraints(self, view: Any) -> Constraints:
        return stack_ties(self.template)

    def prepare(self, model: Any, view: Any, plan: Any, qtensors: Mapping[str, QTensor],
                originals: Mapping[str, Any], tokenizer: Any) -> Prepared:
        prep = prepare_gguf(self.out.name, self.template, gguf_tensors(self.template, view, qtensors, originals))
        return Prepared({"file": prep.file_size, "tensor data": prep.tensor_bytes}, prep.manifest, prep)

    def write_verified(self, prepared: Prepared, capacity: Capacity, *, overwrite: bool) -> Written:
        check_size(self.out, prepared.sizes[capacity.unit], capacity.limit, capacity.unit)
        written = write_prepared(self.out, self.template, prepared.payload, overwrite=overwrite)
        return Written(self.out, written.file_size, written.n_tensors, prepared.expected)

    def is_ours(self, expected: Mapping[str, Any]) -> Written | None:
        try:
            man = verify_gguf_manifest(self.out, expected)
        except (InputError, OSError):
            return None
        log.info("%s was already written and verified by this job", self.out)
        return Written(self.out, os.path.getsize(self.out), len(man["tensors"]), man)

    def remove_stale(self) -> None:
        remove_temps_beside(self.out)  # the manifest's too: .OUT.gguf.manifest.json.*


__all__ = ["F32", "GGUFTarget", "GGUF_FORMATS", "allocated_gguf_names", "export_plan", "gguf_capacity",
           "gguf_formats", "gguf_tensors", "plan_gguf", "preflight", "quantize_for_gguf",
           "split_budget", "stack_ties"]
