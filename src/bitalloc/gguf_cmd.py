"""``bitalloc gguf IN.gguf --budget SIZE -o OUT.gguf``: the best per-tensor llama.cpp types at a file size.

IN may be F32/F16 or already quantized (transformers dequantizes it on load); it is also the template
whose metadata (architecture, tokenizer, chat template...) the output keeps.  Candidate types per tensor
are the GGUF block types its shape allows (K-quants need rows of a multiple of 256 values); norms and
biases are written as F32, as llama.cpp expects.  A file-size budget becomes a tensor-bytes budget by
subtracting the exact non-tensor bytes (header, metadata, tensor infos), the F32 tensors and the worst
case of alignment padding; the final size is computed exactly before writing and never exceeds SIZE.

The command is a resumable job (:mod:`bitalloc.gguf_job`): after ``kill -9`` the same command continues from
the last checkpoint and writes a byte-identical file; ``OUT.gguf.manifest.json`` beside it lists the SHA-256
of the file and of every tensor's raw bytes, and the file is re-read and checked against it before success.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from gguf import GGMLQuantizationType

from .budget import Budget, Constraints
from .errors import BudgetError, InputError, output_exists
from .export.gguf import (
    GGUFTemplate, GGUFTensor, WrittenGGUF, gguf_file_size, gguf_layout, ggml_nbytes, read_template, runtime_tensor,
    stacked,
)
from .io.gguf import GGUFFile
from .formats import get_format

log = logging.getLogger(__name__)

GGUF_FORMATS = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_nl", "q3_k", "q2_k")
F32 = GGMLQuantizationType.F32


@dataclass(frozen=True)
class GGUFBudget:
    """How a target splits: ``capacity`` bytes for the allocated tensors, the rest fixed."""

    target: int  # file bytes (or tensor bytes for a bpw budget)
    capacity: int  # bytes the allocated tensors may take (padding slack already removed)
    header_bytes: int  # header + metadata + tensor infos + padding
    fixed_bytes: int  # F32 tensors (norms, biases), padded
    kind: str  # "file" or "bpw"


def gguf_formats(text: str | None) -> list[str]:
    """Validated candidate ids; every one must be a GGUF block type."""
    ids = list(GGUF_FORMATS) if not text else [f.strip().lower() for f in text.split(",") if f.strip()]
    if not ids:
        raise InputError("--formats is empty")
    for f in ids:
        if not hasattr(get_format(f), "gguf_type"):
            raise InputError(f"--formats: {f} is not a GGUF block type (use {', '.join(GGUF_FORMATS)})")
    return ids


def _split(tpl: GGUFTemplate, allocated: Sequence[str]) -> tuple[list[tuple[str, tuple[int, ...]]], list[str]]:
    """(allocated GGUF names with shapes, fixed GGUF names) of the template."""
    alloc = set(allocated)
    missing = [n for n in alloc if n not in {t[0] for t in tpl.tensors}]
    if missing:
        raise InputError(f"the template GGUF has no tensor {missing[0]!r}")
    return [(n, s) for n, s, _ in tpl.tensors if n in alloc], [n for n, _, _ in tpl.tensors if n not in alloc]


def split_budget(tpl: GGUFTemplate, allocated: Sequence[str], budget: str | Budget, total_params: int) -> GGUFBudget:
    """Bytes the allocated tensors may take so that the file (or, for bpw, all tensor data) fits ``budget``."""
    b = Budget.parse(budget)
    shapes = {n: s for n, s, _ in tpl.tensors}
    _, fixed = _split(tpl, allocated)
    layout = gguf_layout(tpl, [(n, s, F32) for n, s, _ in tpl.tensors])
    header = len(layout.header)
    align = tpl.alignment
    fixed_bytes = sum(-(-ggml_nbytes(shapes[n], F32) // align) * align for n in fixed)
    if b.kind == "bpw":
        target = b.resolve(total_params)
        capacity = target - sum(ggml_nbytes(shapes[n], F32) for n in fixed)
        return GGUFBudget(target, capacity, header, fixed_bytes, "bpw")
    target = b.resolve(total_params)
    capacity = target - header - fixed_bytes - len(allocated) * (align - 1)
    return GGUFBudget(target, capacity, header, fixed_bytes, "file")


def preflight(tpl: GGUFTemplate, fmts: Sequence[str], budget: str) -> None:
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
    split = split_budget(tpl, list(allocated), budget, total)
    if split.capacity < lo:
        need = split.target - split.capacity + lo
        raise BudgetError(f"budget {budget} ({split.target} B) is below the smallest GGUF these types can make "
                          f"(about {need} B {'of tensor data' if split.kind == 'bpw' else 'file size'})")
    if split.capacity > hi + len(allocated) * tpl.alignment:
        most = split.target - split.capacity + hi
        raise BudgetError(f"budget {budget} ({split.target} B) is above the largest GGUF these types can make "
                          f"(about {most} B {'of tensor data' if split.kind == 'bpw' else 'file size'}, every "
                          f"tensor in its largest type): ask for at most that")


def allocated_gguf_names(view: Any, tpl: GGUFTemplate) -> dict[str, str]:
    """HF name -> GGUF name of every allocated tensor of a ModelView."""
    return {r.name: tpl.names.to_gguf(r.name) for r in view.quantizable()}


def plan_gguf(measurement: Any, view: Any, tpl: GGUFTemplate, budget: str | Budget) -> tuple[Any, GGUFBudget]:
    """Allocate GGUF types so that the written file fits ``budget``; returns ``(plan, split)``."""
    from .pipeline import make_plan

    names = allocated_gguf_names(view, tpl)
    split = split_budget(tpl, list(names.values()), budget, measurement.total_params)
    smallest = sum(min(r.bytes for r in measurement.rows_for(hf)) for hf in names)
    if split.capacity < smallest:
        need = split.target - split.capacity + smallest
        raise BudgetError(f"budget {budget} ({split.target} B) is below the smallest GGUF these types can make "
                          f"(about {need} B {'of tensor data' if split.kind == 'bpw' else 'file size'})")
    ties = tuple(m for m in tpl.names.stacks.values() if len(m) > 1)  # stacked experts: one GGUF type each
    plan = make_plan(measurement, Budget.parse(split.capacity + measurement.fixed_bytes), Constraints(tie_groups=ties))
    return plan, split


def export_plan(
    model: torch.nn.Module,
    view: Any,
    plan: Any,
    windows: torch.Tensor,
    tpl: GGUFTemplate,
    out: str | Path,
    *,
    method: str = "gptq",
    overwrite: bool = False,
    progress: bool = True,
) -> WrittenGGUF:
    """Quantize ``model`` in place by ``plan`` onto the GGUF grids and write the GGUF and its manifest.

    Afterwards ``model`` holds exactly the values the file decodes to: quantized tensors dequantized,
    fixed tensors (norms) at their original float32 values, as written.
    """
    from .gguf_job import write_gguf_verified

    tensors = quantize_for_gguf(model, view, plan, windows, tpl, method=method, progress=progress)
    specs = {n: (tuple(int(d) for d in (v.shape)), _type_of(v)) for n, v in tensors.items()}
    log.info("exact output size: %d bytes", gguf_file_size(tpl, specs))
    return write_gguf_verified(out, tpl, tensors, overwrite=overwrite)


def quantize_for_gguf(
    model: torch.nn.Module,
    view: Any,
    plan: Any,
    windows: torch.Tensor,
    tpl: GGUFTemplate,
    *,
    method: str = "gptq",
    progress: bool = True,
    on_block: Any = None,
    start: Any = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place by ``plan``; returns every GGUF tensor (QTensors, F32 norms) by GGUF name.

    ``on_block`` / ``start``: checkpoint and resume hooks of :func:`bitalloc.quantize.quantize_model`.
    """
    from .quantize import quantize_model, set_weight

    params = dict(model.named_parameters())
    originals = {f.name: params[f.name].detach().clone() for f in view.fixed()}
    qt = quantize_model(model, view, plan, windows, method=method, progress=progress,  # type: ignore[arg-type]
                        on_block=on_block, start=start)
    for name, value in originals.items():  # the GGUF keeps norms in F32: undo quantize's fp16 rounding
        set_weight(model, name, value)
    names = allocated_gguf_names(view, tpl)
    tensors: dict[str, Any] = {}
    for gg in dict.fromkeys(names.values()):
        members = tpl.names.members(gg)
        tensors[gg] = stacked(gg, [qt[m] for m in members])
    with GGUFFile(tpl.path) as f:
        for name, _shape, _typ in tpl.tensors:
            if name in tensors:
                continue
            members = tpl.names.members(name)
            if not members:  # a runtime tensor (rope_freqs): kept as it is
                tensors[name] = runtime_tensor(f, name)
                continue
            for hf in members:
                if hf not in params:
                    raise InputError(f"the model has no tensor {hf!r} for GGUF tensor {name}")
            tensors[name] = stacked(name, [params[hf].detach().to(torch.float32) for hf in members])
    return tensors


def _type_of(v: Any) -> GGMLQuantizationType:
    if isinstance(v, GGUFTensor):
        return v.ggml_type
    if isinstance(v, torch.Tensor):
        return F32
    fmt = get_format(v.format)
    return GGMLQuantizationType(int(fmt.gguf_type)) if hasattr(fmt, "gguf_type") else F32


# --------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gguf", help="a llama.cpp GGUF with the best per-tensor types at a file size",
        description="Measure each tensor's sensitivity to every GGUF block type its shape allows, choose the "
        "types (exact allocation) so the output FILE fits --budget, quantize with GPTQ onto the llama.cpp "
        "grids and write a verified GGUF that keeps every metadata key of the input.",
    )
    p.add_argument("input", metavar="IN.gguf", help="input GGUF (F32, F16 or quantized: dequantized first)")
    p.add_argument("--budget", required=True, help="output file size (95MB, 90MiB, 0.1GiB, 98000000B) or bpw")
    p.add_argument("-o", "--out", required=True, metavar="OUT.gguf", help="output GGUF (must not exist)")
    p.add_argument("--calib", nargs="+", metavar="TEXT",
                   help="calibration text files or directories of .txt (default: Shakespeare comedies)")
    p.add_argument("--windows", type=int, default=32, metavar="N", help="calibration windows (default 32)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--formats", default=",".join(GGUF_FORMATS), metavar="F,F,...",
                   help="candidate GGUF types (default: all of them; each tensor gets those its shape allows)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="rounding (default gptq)")
    p.add_argument("--measure-method", choices=("gptq", "rtn"), default=None,
                   help="rounding when measuring each tensor x type (default: --method); rtn measures about "
                   "twice as fast, GPTQ predicts the errors of a GPTQ output more closely")
    p.add_argument("--no-fisher", dest="fisher", action="store_false",
                   help="allocate by layer-output error instead of Fisher-weighted error")
    p.add_argument("--fisher-windows", type=int, default=8, metavar="N", help="windows of the gradient pass")
    p.add_argument("--activations", choices=("cpu", "none"), default="cpu",
                   help="llama.cpp's CPU backend rounds every matmul input to 8 bits (Q8_0 blocks of 32 for the "
                   "32-wide types, Q8_K blocks of 256 for K-quants); cpu (default) counts that error when choosing "
                   "types, none measures the weights alone (e.g. for a GPU backend, whose kernels round differently)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--job", metavar="DIR", help="job directory for checkpoints (default OUT.gguf.job); rerunning "
                   "the same command after an interruption continues from the last checkpoint")
    p.add_argument("--keep-job", action="store_true", help="keep the job directory after success")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.set_defaults(func=cmd_gguf)
    return p


def gguf_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes the written file: input and calibration text digests, and the options."""
    from .data import default_calibration_files, expand_paths
    from .resume import model_digests, text_digest

    files = expand_paths([Path(p) for p in args.calib] if args.calib else default_calibration_files())
    options = {"budget": args.budget, "formats": ",".join(gguf_formats(args.formats)), "method": args.method,
               "measure_method": measure_method(args),
               "fisher": bool(args.fisher), "fisher_windows": args.fisher_windows, "windows": args.windows,
               "ctx": args.ctx, "activations": activations(args)}
    return {"version": 1, "model": model_digests(args.input), "calibration": text_digest(files), "options": options}


def measure_method(args: argparse.Namespace) -> str:
    """The rounding of the measurement: ``--measure-method``, else ``--method``."""
    return getattr(args, "measure_method", None) or args.method


def activations(args: argparse.Namespace) -> str:
    """``--activations``: ``cpu`` (llama.cpp's CPU activation rounding measured) or ``none``."""
    return getattr(args, "activations", None) or "cpu"


def cmd_gguf(args: argparse.Namespace) -> int:
    from .data import default_calibration_files, text_windows
    from .gguf_job import GGUFSteps, run_gguf_job
    from .models.sources import load_model
    from .pipeline import measure_model
    from .resume import default_job_dir

    src, out = Path(args.input), Path(args.out)
    if src.suffix.lower() != ".gguf":
        raise InputError(f"{src}: the input must be a .gguf file")
    job_dir = Path(args.job) if args.job else default_job_dir(out)
    if out.exists() and not args.overwrite and not job_dir.exists():
        raise output_exists(out)
    Budget.parse(args.budget)
    fmts = gguf_formats(args.formats)
    tpl = read_template(src)
    preflight(tpl, fmts, args.budget)
    limit = tpl.metadata.get(f"{tpl.arch}.context_length")
    if isinstance(limit, int) and not isinstance(limit, bool) and args.ctx > limit:
        raise InputError(f"--ctx {args.ctx} is longer than the model's context of {limit} tokens "
                         f"({tpl.arch}.context_length of {src}); give --ctx {limit} or less")
    t0 = time.perf_counter()
    files = [Path(p) for p in args.calib] if args.calib else default_calibration_files()

    def measure(model: Any, view: Any, windows: torch.Tensor, checkpoints: Any) -> Any:
        fisher_w = windows[: args.fisher_windows] if args.fisher else None
        return measure_model(model, view, windows, fmts, measure_method(args), args.fisher, progress=not args.quiet,
                             fisher_windows=fisher_w, activation_noise=activations(args) == "cpu",
                             **checkpoints.kwargs())

    def quantize(model: Any, view: Any, plan: Any, windows: torch.Tensor, **hooks: Any) -> dict[str, Any]:
        return quantize_for_gguf(model, view, plan, windows, tpl, method=args.method, progress=not args.quiet,
                                 **hooks)

    steps = GGUFSteps(
        load=lambda: load_model(src, low_memory=True),
        calibration=lambda tok: text_windows(tok, files, args.ctx, args.windows),
        measure=measure,
        plan=lambda m, view: plan_gguf(m, view, tpl, args.budget),
        quantize=quantize,
        template=tpl,
    )
    res = run_gguf_job(out, job_dir, gguf_fingerprint(args), steps, keep_job=args.keep_job,
                       overwrite=args.overwrite)
    plan, split = res.plan, GGUFBudget(**res.split)
    counts: dict[str, int] = {}
    for e in plan.entries:
        counts[e.format] = counts.get(e.format, 0) + 1
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"wrote {res.path}: {res.file_size} B ({res.file_size / 2**20:.2f} MiB, budget "
          f"{split.target} B{' of tensor data' if split.kind == 'bpw' else ''}), {res.n_tensors} tensors "
          f"[{mix}], predicted error {plan.error:.4g}, verified against {res.path.name}.manifest.json, "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0
