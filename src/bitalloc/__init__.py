"""bitalloc: fit a neural network into a byte budget with the least quality loss."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, dtype=None, *, verify=True, device="cpu", budget=None):  # noqa: ANN001, ANN201 - see bitalloc.api.load
    """Load a packed directory (or the ``budget``-sized model of a nested artifact) as a transformers model with
    dequantized weights (see :func:`bitalloc.api.load`)."""
    import torch

    from .api import load as _load

    return _load(path, dtype=torch.float32 if dtype is None else dtype, verify=verify, device=device, budget=budget)


__all__ = ["load", "__version__"]
