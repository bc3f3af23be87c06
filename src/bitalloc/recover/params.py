"""The trainable form of what a file stores: one quantized tensor as codes, group scales and offsets, and one
fixed float tensor (a norm) as a per-element multiplier.

A stored tensor ``q`` of format ``F`` is unpacked (:meth:`bitalloc.formats.Format.unpack`) to its codes and grid.
Training then holds, per tensor,

* ``u`` (``rows x cols``, float32): each element's position on its codebook, in *level units* (initialised at the
  stored code's level, so the untrained tensor is exactly the stored one).  The code is the level nearest ``u``;
  the forward uses it with a straight-through estimator (``u + (level - u).detach()``), so training moves ``u`` and
  a code changes when ``u`` crosses a midpoint: a learned rounding, independent of the scales;
* ``a``, ``b`` (``rows x groups``): the group's scale ``s0·(1 + a)`` and offset ``o0 + |s0|·b`` (both in units of the
  stored step, so one learning rate fits every tensor), trained when the format stores learned scales
  (``Format.learns_scales``; the offset only when the grid has one).  A format whose offset is the scale times a
  stored integer (``Format.offset_follows_scale``: an integer zero point) trains no ``b``: its offset is
  ``o0·(1 + a)``, the same integer times the learned scale, so storing it rounds nothing but the scale.

:meth:`QWeight.stored` rounds everything to what the file holds -- codes on the codebook, scales through
``Format.with_scales`` (fp16, integer sub-scales...) -- and encodes it: the same format, the same bytes; its
decode is exactly the tensor the recovered model computes with.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor, get_format
from ..formats.base import Format, FormatError, Grid


def _unit_grid(grid: Grid) -> Grid:
    """``grid``'s codebook(s) with unit scales and zero offsets: snapping ``u`` to it gives the nearest level."""
    ones = torch.ones_like(grid.scale)
    return Grid(ones, torch.zeros_like(ones), grid.levels, grid.group_size, {}, grid.set_index)


def _per_column(t: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """A ``(rows, groups)`` tensor repeated over each group's columns: ``(rows, cols)``."""
    return t.repeat_interleave(group, dim=1)[:, :cols]


class QWeight(nn.Module):
    """A parametrization (:func:`torch.nn.utils.parametrize.register_parametrization`) computing a stored tensor's
    value from its trainable codes and scales; it ignores the tensor it replaces."""

    def __init__(self, q: QTensor, *, codes: bool = True, scales: bool = True,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.fmt = get_format(q.format)
        c, grid = self.fmt.unpack(q)
        c, grid = c.to(device), grid.to(device)
        self.shape, self.dtype_name = tuple(int(d) for d in q.shape), q.dtype
        self.grid = grid
        self.unit = _unit_grid(grid)
        lv = self.unit.level_values(c)
        levels = grid.levels.reshape(-1)
        self.lo, self.hi = float(levels.min()) - 0.5, float(levels.max()) + 0.5
        self.u = nn.Parameter(lv.clone(), requires_grad=codes)
        learn = scales and self.fmt.learns_scales
        self.tied = self.fmt.offset_follows_scale
        self.a = nn.Parameter(torch.zeros_like(grid.scale), requires_grad=learn)
        self.b = nn.Parameter(torch.zeros_like(grid.offset),
                              requires_grad=learn and not self.tied and bool((grid.offset != 0).any()))
        self._frozen_codes: torch.Tensor | None = None if codes else c

    @property
    def reach(self) -> float:
        """The outermost level's distance from zero in steps of its codebook (the mean spacing of its levels): how
        many steps a relative change of the scale moves it per unit (3 for int2's 0..3, 16 for q5_0's -16..15)."""
        lv = self.grid.levels.reshape(-1, int(self.grid.levels.shape[-1])).double()
        step = (lv[:, -1] - lv[:, 0]) / max(int(lv.shape[1]) - 1, 1)
        return float((lv.abs().amax(1) / step.clamp_min(1e-30)).max())

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in (self.u, self.a, self.b) if p.requires_grad]

    def codes(self) -> torch.Tensor:
        """The codes the current ``u`` rounds to (the stored codes while ``u`` is not trained)."""
        if self._frozen_codes is not None:
            return self._frozen_codes
        with torch.no_grad():
            return self.unit.snap(self.u)[0]

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        s0, o0 = self.grid.scale, self.grid.offset
        if self.tied:
            return s0 * (1 + self.a), o0 * (1 + self.a)
        return s0 * (1 + self.a), o0 + s0.abs() * self.b

    def forward(self, _replaced: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self.shape
        with torch.no_grad():
            lv = self.unit.level_values(self.codes())
        level = self.u + (lv - self.u).detach() if self.u.requires_grad else lv
        s, o = self.scale_offset()
        g = self.grid.group_size
        w = _per_column(s, g, cols) * level + _per_column(o, g, cols)
        if self.grid.exact_mask is not None:
            w = torch.where(self.grid.exact_mask, self.grid.exact_values, w)
        return w if _replaced is None else w.to(_replaced.dtype)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep ``u`` within half a level of the codebook (beyond it the straight-through gradient means nothing)."""
        self.u.clamp_(self.lo, self.hi)

    @torch.no_grad()
    def stored(self) -> QTensor:
        """Everything rounded to what the file holds, encoded in the same format."""
        grid = self.fmt.with_scales(self.grid, *self.scale_offset()) if self.a.requires_grad else self.grid
        q = self.fmt.encode(self.codes(), grid, self.shape, self.dtype_name)
        if q.nbytes() != self.fmt.nbytes(self.shape):  # the contract every format keeps; never a silent change
            raise FormatError(f"{self.fmt.id}: recovered tensor of {q.nbytes()} bytes, expected "
                              f"{self.fmt.nbytes(self.shape)}")
        return q


class Multiplier(nn.Module):
    """A fixed float tensor (norm weight) as ``w0 · (1 + c)``: scale-free, identity at ``c = 0``."""

    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.w0 = w0.detach().to(torch.float32).clone()
        self.c = nn.Parameter(torch.zeros_like(self.w0))

    def forward(self, _replaced: torch.Tensor | None = None) -> torch.Tensor:
        w = self.w0 * (1 + self.c)
        return w if _replaced is None else w.to(_replaced.dtype)


def trainable_qtensor(q: QTensor) -> bool:
    """True when ``q``'s format can be unpacked for training (others are left as they are)."""
    try:
        fmt = get_format(q.format)
    except FormatError:
        return False
    return fmt.is_grid and type(fmt).unpack is not Format.unpack


__all__ = ["Multiplier", "QWeight", "trainable_qtensor"]
