"""``bitalloc.load(path)``: a packed directory (or a compressed-tensors folder bitalloc wrote) back as a working
transformers model."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .checked import one_line
from .errors import InputError, NumericsError
from .export.compressed_tensors import is_compressed_tensors_dir, read_compressed_tensors
from .export.packed import read_packed
from .models.archs import arch_for
from .models.config_checks import read_config
from .models.experts import unfuse_experts
from .rounding import dequantize

log = logging.getLogger(__name__)



def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config.json whose values cannot build a model (zero heads, wrong types;
    huggingface_hub's strict dataclasses raise their own, non-ValueError type)."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError, AttributeError,
                                               ZeroDivisionError, OverflowError, IndexError, RuntimeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: no strict dataclasses
        return errors
    return errors + (StrictDataclassError,)


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, verify: bool = True,
         device: str | torch.device = "cpu", budget: Any = None) -> Any:
    """Load a directory written by ``bitalloc quantize`` as a transformers causal LM with dequantized weights.

    With ``verify`` (the default) every file and stored tensor is first checked against the directory's
    ``manifest.json`` (a flipped bit, a missing or extra file or tensor is refused); ``verify=False`` skips
    that check but never the validation of ``bitalloc.json``.  Every parameter of the model must be present
    in the directory with its shape, and decode to finite values; the result is in eval mode, no grad, on
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; :func:`bitalloc.placement.resolve_device`).

    A nested artifact (``bitalloc nest``) needs ``budget`` (``"3.5bpw"``, ``"90MB"``, ...): the model of that size
    is extracted from it (:func:`bitalloc.nest.extract`: allocation from the stored errors, no calibration).
    """
    return load_packed(path, dtype, verify=verify, device=device, budget=budget)[0]


def load_packed(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                verify: bool = True, device: str | torch.device = "cpu",
                budget: Any = None) -> tuple[Any, dict[str, Any]]:
    """:func:`load`, also returning the directory's ``bitalloc.json`` (bytes, bpw, plan)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .placement import resolve_device

    target = resolve_device(device)  # a missing device is refused before anything is read

    p = Path(path)
    from .nest.artifact import is_artifact

    if is_artifact(p):
        if budget is None:
            raise InputError(f"{p} is a nested artifact: say which size to load (budget=, e.g. '3.5bpw')")
        from .nest.extract import extract

        ex = extract(p, budget, verify=verify)
        values = {n: (lambda q=q: dequantize(q)) for n, q in ex.qtensors.items()}
        shapes = {n: tuple(q.shape) for n, q in ex.qtensors.items()}
        info = {"bpw": ex.plan.bpw, "bytes": ex.plan.total_bytes, "tied": bool(ex.info.get("tied")),
                "plan": ex.plan, "budget": ex.capacity.budget}
        kind = "nested artifact"
    elif budget is not None:
        raise InputError(f"budget= applies to a nested artifact (from `bitalloc nest`); {p} is not one")
    elif is_compressed_tensors_dir(p):  # a compressed-tensors folder bitalloc wrote: decompressed by the library
        info, weights = read_compressed_tensors(p, verify=verify)
        values = {n: (lambda w=w: w) for n, w in weights.items()}
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        kind = "compressed-tensors"
    else:
        info, qtensors = read_packed(p, verify=verify)
        values = {n: (lambda q=q: dequantize(q)) for n, q in qtensors.items()}
        shapes = {n: tuple(q.shape) for n, q in qtensors.items()}
        kind = "packed"
    config_errors = _config_errors()
    if kind != "compressed-tensors":
        read_config(p)  # the checks a model folder's config.json gets: types, ranges, consistency, known type
    else:
        _read_quantized_config(p)
    try:
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    except config_errors as e:
        raise InputError(f"cannot read {p / 'config.json'}: {one_line(e)}") from None
    if hasattr(config, "quantization_config"):  # the weights are decompressed here: build a dense model
        del config.quantization_config
    arch_for(config)
    try:  # names and shapes first, on the meta device: a crafted config allocates nothing
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        unfuse_experts(meta)  # MoE: the packed directory stores one tensor per expert projection
    except config_errors as e:
        raise InputError(f"{p / 'config.json'} does not describe a model transformers can build: {one_line(e)}") \
            from None
    _check_shapes(p, {n: tuple(t.shape) for n, t in meta.named_parameters()}, shapes)
    del meta
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    unfuse_experts(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            v = value().reshape(params[name].shape)
            if not torch.isfinite(v).all():
                raise NumericsError(f"{p}: tensor {name} decodes to NaN or Inf")
            params[name].copy_(v.to(dtype))
    if info.get("tied") and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    if target.type != "cpu":
        model.to(target)
    log.info("loaded %s %s (%d tensors, %.4f bpw%s)", kind, p, len(values), info["bpw"], ", verified" if verify else "")
    return model, info


def _read_quantized_config(p: Path) -> None:
    """:func:`read_config`'s checks of a compressed-tensors folder's ``config.json`` less its
    ``quantization_config`` (which :func:`bitalloc.export.compressed_tensors.read_compressed_tensors` checked)."""
    from .checked import read_json
    from .models.archs import ARCHS, supported_types
    from .models.config_checks import _walk_finite, check_values

    file = p / "config.json"
    cfg = read_json(file, "model config")
    if not isinstance(cfg, dict) or cfg.get("model_type") not in ARCHS:
        raise InputError(f"{file}: not a config of a supported architecture ({', '.join(supported_types())})")
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    _walk_finite(cfg, str(file))
    check_values(cfg, str(file))


def _check_shapes(p: Path, params: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(params) - set(shapes))
    unknown = sorted(set(shapes) - set(params))
    if missing or unknown:
        raise InputError(f"{p} does not match its config: missing {missing[:3]}, unknown {unknown[:3]}")
    wrong = [n for n, s in params.items() if tuple(shapes[n]) != s]
    if wrong:
        n = wrong[0]
        raise InputError(f"{p} does not match its config: {n} is stored as {list(shapes[n])}, the model "
                         f"needs {list(params[n])} ({len(wrong)} tensors differ)")
