"""(stub: being written) RTN and the scale/clipping search."""
from __future__ import annotations

import torch

from ..formats.base import Grid


def rtn_round(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid point for every element: (codes, values)."""
    return grid.snap(w)
