"""Round to nearest: every element to the nearest point of its grid (the grid's own arithmetic,
:meth:`~bitalloc.formats.base.Grid.snap`).  The scale search that fits the grid is the format's
(:mod:`bitalloc.formats.fit`)."""
from __future__ import annotations

import torch

from ..formats.base import Grid


def rtn_round(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid point for every element: (codes, values)."""
    return grid.snap(w)


__all__ = ["rtn_round"]
