"""(stub: being written) GPTQ onto a fixed grid."""
from __future__ import annotations

import torch

from ..formats.base import Grid


def gptq_round(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError
