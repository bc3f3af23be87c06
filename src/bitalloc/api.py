"""``bitalloc.load(path)``: a packed directory back as a working transformers model."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .export.packed import read_packed
from .models.archs import arch_for
from .models.experts import unfuse_experts
from .rounding import dequantize

log = logging.getLogger(__name__)


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Any:
    """Load a directory written by ``bitalloc quantize`` as a transformers causal LM with dequantized weights.

    Every parameter of the model must be present in the directory; the result is in eval mode, no grad.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    info, qtensors = read_packed(p)
    try:
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read the model config in {p}: {e}") from e
    arch_for(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    unfuse_experts(model)  # MoE: the packed directory stores one tensor per expert projection
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(qtensors))
    unknown = sorted(set(qtensors) - set(params))
    if missing or unknown:
        raise InputError(f"{p} does not match its config: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, q in qtensors.items():
            v = dequantize(q).reshape(params[name].shape)
            params[name].copy_(v.to(dtype))
    if info.get("tied") and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s (%d tensors, %.4f bpw)", p, len(qtensors), info.get("bpw", float("nan")))
    return model

