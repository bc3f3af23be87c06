"""A compressed-tensors checkpoint as a job's target (:mod:`bitalloc.export.compressed_tensors` writes and reads it).

The budget covers every tensor ``model.safetensors`` stores: the quantized modules' parts as the library lays
them out, the pass-through tensors, the fixed tensors (norms, biases) as the plan stores them.  For every format
and shape this target allows, the library's bytes are exactly bitalloc's ``nbytes`` plus the 16-byte
``weight_shape`` (:mod:`bitalloc.export.ct_schemes`), so the capacity sets aside 16 B for each tensor that can
take a quantized format (``overhead``) and the allocator sees the rest; a tensor the plan keeps at fp16 leaves
its 16 B unused (the output is then below the budget by that much; it is never over it: the writer asserts it).

:meth:`CompressedTensorsTarget.constraints` allows each tensor only the formats the library can store for it:
transformers quantizes ``nn.Linear`` modules only (an embedding, tied or not, stays fp16/bf16/fp32), a group must
divide the columns, a per-row format must fill whole int32 words.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..budget import Budget, Constraints
from ..errors import InputError
from ..formats import QTensor
from ..measure import Measurement
from ..models.view import ModelView
from ..plan import Plan
from .base import Capacity, Prepared, Written, check_size, remove_temps_beside

log = logging.getLogger(__name__)


def default_formats(formats: str) -> str:
    """The formats of ``formats`` (comma-separated) this target can express: integer ids become ``-sym``, and
    formats it has no scheme for (the double-scale ``-dq`` ones, GGUF types...) are left out."""
    from ..export.ct_schemes import scheme_for
    from ..formats import FormatError, get_format
    from ..formats.int import IntFormat

    out: list[str] = []
    for f in formats.split(","):
        fmt = get_format(f)
        if isinstance(fmt, IntFormat) and not fmt.symmetric:
            fmt = IntFormat(fmt.bits, fmt.group, True)
        try:
            scheme_for(fmt)
        except FormatError:
            continue
        if fmt.id not in out:
            out.append(fmt.id)
    return ",".join(out)


def linear_modules(config: Any) -> set[str]:
    """The nn.Linear module names of the model transformers builds from ``config`` (on the meta device): the
    modules a compressed-tensors checkpoint may quantize (MoE experts fused by transformers are not among them)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}


def allowed_formats(view: ModelView, formats: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """Per quantizable tensor, the formats (of ``formats``; without them, patterns of every format of the table)
    the library can store for it: pass-through for all, a grid format for a linear whose shape it fits."""
    from ..export.ct_schemes import PASS_THROUGH, SCHEMES, scheme_for
    from ..formats import get_format

    linears = linear_modules(view.model.config)
    out: dict[str, tuple[str, ...]] = {}
    for r in view.quantizable():
        shape = tuple(r.shape)
        linear = r.name.endswith(".weight") and r.name[: -len(".weight")] in linears
        if formats:
            ok = []
            for f in formats:
                s = scheme_for(f)
                if s is None or (linear and s.fits(get_format(f), shape)):
                    ok.append(get_format(f).id)
            out[r.name] = tuple(ok)
        else:
            out[r.name] = PASS_THROUGH + (tuple(p for s in SCHEMES for p in s.patterns(shape)) if linear else ())
    return out


def set_aside(view: ModelView, formats: Sequence[str] = ()) -> int:
    """Bytes the library stores beyond bitalloc's for the allocated tensors at most: per tensor, the largest
    extra of its allowed grid formats (16 B of ``weight_shape`` for the integer formats)."""
    from ..export.ct_schemes import PASS_THROUGH, SCHEMES, scheme_for
    from ..formats import get_format

    allowed = allowed_formats(view, formats)
    total = 0
    for r in view.quantizable():
        shape = tuple(r.shape)
        if formats:  # the largest extra among the tensor's allowed grid formats
            grid = [f for f in allowed[r.name] if scheme_for(f) is not None]
            total += max((scheme_for(f).extra_bytes(get_format(f), shape) for f in grid), default=0)
        else:  # every format of the table: the largest bound among the rows that fit it
            quantizable = len(allowed[r.name]) > len(PASS_THROUGH)  # a linear the library stores some row for
            total += max((s.extra_bound for s in SCHEMES if quantizable and s.patterns(shape)), default=0)
    return total


class CompressedTensorsTarget:
    """``out``: the compressed-tensors folder."""

    kind = "compressed-tensors"

    def __init__(self, out: str | Path, formats: Sequence[str] = ()) -> None:
        self.out = Path(out)
        self.formats = tuple(formats)  # the candidate formats (the run's); empty: every format of the table

    def fingerprint(self) -> dict[str, Any]:
        return {"target": self.kind}

    def capacity(self, budget: Budget, measurement: Measurement | None, view: ModelView) -> Capacity:
        limit = budget.resolve(view.total_params)
        overhead = view.fixed_bytes + set_aside(view, self.formats)
        if overhead > limit:
            raise InputError(f"budget {budget.text} ({limit} B) is below the fixed tensors and compressed-tensors' "
                             f"per-tensor overhead ({overhead} B)")
        return Capacity(budget.text, limit, limit - overhead, overhead, "weights")

    def constraints(self, view: ModelView) -> Constraints:
        return Constraints(allowed=tuple(allowed_formats(view, self.formats).items()))

    def prepare(self, model: Any, view: ModelView, plan: Plan, qtensors: Mapping[str, QTensor],
                originals: Mapping[str, Any], tokenizer: Any) -> Prepared:
        from ..export.compressed_tensors import convert
        from ..io.atomic import tensor_digest

        linears = linear_modules(model.config)
        state, _ = convert(qtensors, linears)
        size = sum(t.numel() * t.element_size() for t in state.values())
        digests = {k: tensor_digest(t) for k, t in sorted(state.items())}
        return Prepared({"weights": size}, digests, (model, view, qtensors, plan, tokenizer, linears))

    def write_verified(self, prepared: Prepared, capacity: Capacity, *, overwrite: bool) -> Written:
        from ..export.compressed_tensors import save_compressed_tensors
        from ..export.packed import WEIGHTS_FILE, save_config

        check_size(self.out, prepared.sizes[capacity.unit], capacity.limit, capacity.unit)
        model, view, qtensors, plan, tokenizer, linears = prepared.payload
        source = getattr(model.config, "_name_or_path", "")

        def write_base(tmp: Path) -> None:
            save_config(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))

        info = save_compressed_tensors(
            self.out, qtensors, linears=linears, write_base=write_base, total_params=view.total_params,
            tied=bool(getattr(model.config, "tie_word_embeddings", False)),
            plan=json.loads(plan.to_json()) if hasattr(plan, "to_json") else None, limit=capacity.limit,
            overwrite=overwrite,
            inputs=[source] if source and Path(source).exists() else [])
        return Written(self.out, (self.out / WEIGHTS_FILE).stat().st_size, len(info["formats"]), info)

    def is_ours(self, expected: Mapping[str, Any]) -> Written | None:
        from ..export.compressed_tensors import read_compressed_tensors, verify_compressed_tensors
        from ..export.packed import WEIGHTS_FILE

        try:
            verify_compressed_tensors(self.out, expected)
            info = read_compressed_tensors(self.out, verify=False)[0]  # verified just above
        except (InputError, OSError):
            return None
        log.info("%s was already written and verified by this job", self.out)
        return Written(self.out, (self.out / WEIGHTS_FILE).stat().st_size, len(info["formats"]), info)

    def remove_stale(self) -> None:
        remove_temps_beside(self.out)


__all__ = ["CompressedTensorsTarget", "allowed_formats", "default_formats", "linear_modules", "set_aside"]
