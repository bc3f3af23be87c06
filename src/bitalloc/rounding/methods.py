"""Rounding methods as a registry of :class:`Rounder` objects, looked up by the name users give (``--method``).

A rounder chooses codes on a grid the format has already fit (``Format.fit``); it never searches scales.  It
has three entry points, one per way the pipeline calls it:

* :meth:`Rounder.round`: one weight onto one grid (``quantize_chunks`` / ``quantize_weight``);
* :meth:`Rounder.round_many`: one weight onto the grids of every candidate format (the measurement);
* :meth:`Rounder.quantize_block`: the per-block hook of the sequential quantization
  (:func:`bitalloc.quantize.quantize_model`): which input statistics of a decoder block it asks the block runner
  for, and which of the block's tensors are rounded together (side by side, where the placement has workers).

Registered here: ``gptq`` (error feedback with the input Hessian, the format refitting its scales to the codes in
between, :data:`GPTQ_REFITS` rounds; each sequential group of a block is rounded with the Hessian of its inputs
after the groups before it were replaced) and ``rtn`` (nearest grid point; the Hessian's diagonal only weights
the format's scale search, so one pass over the block collects every input statistic).  A new method is one
:class:`Rounder` subclass passed to :func:`register_rounder`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import InputError
from ..formats.base import Format, Grid, QTensor
from ..formats.refit import row_errors
from ..timing import StageTimer, timed
from .gptq import FactoredHessian, gptq_factor, gptq_round_many_measured
from .rtn import rtn_round

log = logging.getLogger(__name__)

#: GPTQ rounds per weight for formats that refit their scales to the codes (:func:`gptq_refit`); each row keeps
#: its best round.  Two rounds cost a third less, with layer errors equal to the last of three rounds' on real
#: layers, but the GGUF bench's files came out up to 6 % worse in KLD (README: "Two rounds were tried and dropped")
GPTQ_REFITS = 3

#: ``collect(groups)``: the block runner's input statistics (``{tensor: Hessian}``) of the current block's
#: sequential ``groups`` (indices; None = every group in one pass), with the groups before them already rounded
Collect = Callable[[Sequence[int] | None], Mapping[str, torch.Tensor]]
#: ``round_tensors({tensor: hessian})``: round those tensors of the block into their planned formats and write
#: them back (side by side in the placement's workers, where it has them); returns ``{tensor: QTensor}``
RoundTensors = Callable[[Mapping[str, "torch.Tensor | None"]], Mapping[str, QTensor]]


def gptq_refit(w: torch.Tensor, hessian: torch.Tensor | FactoredHessian, grid: Grid, fmt: Format,
               rounds: int = GPTQ_REFITS) -> tuple[torch.Tensor, Grid]:
    """GPTQ codes on ``grid``, then up to ``rounds`` times: the format refits the grid to the codes
    (:meth:`Format.refine`) and GPTQ rounds again on the refit grid, ending with a refit; each row keeps the
    round whose codes and refit grid give it the smallest layer-output error under ``hessian``.

    Returns ``(codes, grid)``.  Stops early when the format refits nothing (returns the same grid).  The
    Hessian is factorised once for all rounds (not at all when it comes factorised, :class:`FactoredHessian`).
    """
    return gptq_refit_many(w, hessian, [grid], [fmt], rounds)[0]


def gptq_refit_many(
    w: torch.Tensor,
    hessian: torch.Tensor | FactoredHessian,
    grids: Sequence[Grid],
    fmts: Sequence[Format],
    rounds: int = GPTQ_REFITS,
    *,
    timer: StageTimer | None = None,
) -> list[tuple[torch.Tensor, Grid]]:
    """:func:`gptq_refit` of ``w`` for every ``(grid, fmt)`` pair at once: ``[(codes, grid)]`` in order.

    One factorisation of ``hessian`` (none for a :class:`FactoredHessian`); each GPTQ round stacks the formats still
    refitting (:func:`~.gptq.gptq_round_many`); a format whose ``refine`` returns its grid unchanged drops out.  The
    result for each format equals :func:`gptq_refit` of it alone up to float rounding in the blocked matrix products
    (exactly, for one format).  Memory grows with ``len(grids)``: stack fewer rows to bound it.  ``timer`` gets
    ``measure.gptq`` (the factorisation it makes, and rounding) and ``measure.refit`` (the refits and the choice
    of each row's round).
    """
    return [(c, g) for c, g, _ in gptq_refit_many_measured(w, hessian, grids, fmts, rounds, timer=timer, errors=False)]


def gptq_refit_many_measured(
    w: torch.Tensor,
    hessian: torch.Tensor | FactoredHessian,
    grids: Sequence[Grid],
    fmts: Sequence[Format],
    rounds: int = GPTQ_REFITS,
    *,
    timer: StageTimer | None = None,
    errors: bool = True,
) -> list[tuple[torch.Tensor, Grid, torch.Tensor | None]]:
    """:func:`gptq_refit_many` with each format's per-row layer-output error under ``hessian`` where it is known
    without a ``rows x cols²`` product: ``[(codes, grid, row_errors)]``, or None for that format.

    A round's error is GPTQ's own feedback (:func:`~.gptq.gptq_round_many_measured`) plus the change its refit
    reports (:meth:`Format.refine_measured`); where either is unknown and rows must choose between rounds, it is
    computed from the values (:func:`~bitalloc.formats.refit.row_errors`).  Each row keeps the round with the
    smallest error (the earlier on a tie): a later round is not always better, and a row's rounds are independent
    of the other rows'.  ``errors`` False returns None for every format (the rounding alone)."""
    grids = list(grids)
    if len(fmts) != len(grids):
        raise ValueError(f"{len(grids)} grids but {len(fmts)} formats")
    feedback = errors or rounds > 1  # the choice between rounds needs each round's errors
    with timed(timer, "measure.gptq"):
        if isinstance(hessian, FactoredHessian):
            factor, hessian = hessian.factor, hessian.hessian
        else:
            factor = gptq_factor(hessian, device=w.device)
        first = gptq_round_many_measured(w, factor, grids, errors=feedback)
    codes = [c for c, _, _ in first]
    errs = [e for _, _, e in first]
    del first  # its values: the measurement decodes each format's own when it needs them
    best: list[_Round | None] = [None] * len(grids)
    active = list(range(len(grids)))
    for r in range(rounds):
        still = []
        with timed(timer, "measure.refit"):
            for f in active:
                refined, change = fmts[f].refine_measured(w, codes[f], grids[f], hessian)
                same = refined is grids[f]  # nothing refit: this round's rounding is the format's last
                err = errs[f]
                if not same and err is not None:
                    err = None if change is None else err + change.to(err.device)
                best[f] = _better(best[f], _Round(codes[f], refined, err), w, hessian)
                if not same:
                    grids[f] = refined
                    still.append(f)
        active = still
        if not active:
            break
        if r + 1 < rounds:
            with timed(timer, "measure.gptq"):
                again = gptq_round_many_measured(w, factor, [grids[f] for f in active], errors=feedback)
            for f, (c, _, e) in zip(active, again):
                codes[f], errs[f] = c, e
    out = []
    for f, b in enumerate(best):
        if b is None:  # no rounds asked for: GPTQ on the fitted grid
            b = _Round(codes[f], grids[f], errs[f])
        out.append((b.codes, b.grid, b.errors if errors else None))
    return out


@dataclass
class _Round:
    """One format's rounding after one GPTQ round and its refit, with each row's error when known."""

    codes: torch.Tensor
    grid: Grid
    errors: torch.Tensor | None


def _better(best: _Round | None, new: _Round, w: torch.Tensor, hessian: torch.Tensor) -> _Round:
    """Row by row whichever of ``best`` and ``new`` has the smaller error under ``hessian`` (``best`` on a tie);
    ``new`` when there is no ``best``, and where the grids cannot be mixed row by row (:meth:`Grid.pick_rows`)."""
    if best is None:
        return new
    eb, en = (r.errors if r.errors is not None else row_errors(w, r.grid.values(r.codes), hessian)
              for r in (best, new))
    take = en.to(eb.device) < eb
    grid = new.grid.pick_rows(take, best.grid)
    if grid is None:
        log.debug("GPTQ refit: the grids of two rounds differ beyond their rows; keeping the last round")
        return new
    codes = torch.where(take.to(new.codes.device).unsqueeze(1), new.codes, best.codes.to(new.codes.device))
    return _Round(codes, grid, torch.where(take, en.to(eb.device), eb))


class Rounder:
    """A rounding method: how codes are chosen on a fitted grid.  Subclasses set :attr:`name` and implement
    :meth:`round`; :meth:`round_many` and :meth:`quantize_block` have defaults (one grid at a time; one pass over
    the block)."""

    name: str = ""

    def prepare(self, hessian: torch.Tensor | None, device: torch.device) -> Any:
        """What :meth:`round` and :meth:`round_many` take as ``hessian`` for every row block of one weight, made
        once per weight (GPTQ: the Hessian with its factorisation).  Default: ``hessian`` itself."""
        return hessian

    def round(self, w: torch.Tensor, grid: Grid, fmt: Format, hessian: Any) -> tuple[torch.Tensor, Grid]:
        """``(codes, grid)`` of ``w`` (float32, rows x cols) on ``grid``; the returned grid is what the format
        encodes (a method may refit it through ``fmt.refine``).  ``hessian``: the inputs' ``E[xxᵀ]`` (None for a
        lookup table), or what :meth:`prepare` made of it."""
        raise NotImplementedError

    def round_many(self, w: torch.Tensor, hessian: Any, grids: Sequence[Grid],
                   fmts: Sequence[Format], timer: StageTimer | None = None) -> list[tuple[torch.Tensor, Grid]]:
        """:meth:`round` of ``w`` onto every ``(grid, fmt)``, in order (the measurement's candidates)."""
        with timed(timer, f"measure.{self.name}"):
            return [self.round(w, g, f, hessian) for g, f in zip(grids, fmts)]

    def round_many_measured(self, w: torch.Tensor, hessian: Any, grids: Sequence[Grid], fmts: Sequence[Format],
                            timer: StageTimer | None = None
                            ) -> list[tuple[torch.Tensor, Grid, torch.Tensor | None]]:
        """:meth:`round_many` with, where the method knows it without computing it from ΔW, each format's per-row
        layer-output error ``(ΔW H ΔWᵀ)_rr`` (float64) under the Hessian it rounded with (``hessian``), else None.
        Default: None for every format (the measurement computes the errors)."""
        return [(c, g, None) for c, g in self.round_many(w, hessian, grids, fmts, timer)]

    def quantize_block(self, groups: Sequence[Sequence[str]], collect: Collect, round_tensors: RoundTensors
                       ) -> dict[str, QTensor]:
        """The per-block hook: round every tensor of one decoder block (``groups``: its sequential groups of
        tensor names, in order) with ``collect`` and ``round_tensors``; returns ``{tensor: QTensor}``.  Default:
        one collection pass over the whole block, then every tensor at once."""
        return dict(round_tensors(collect(None)))


class RTN(Rounder):
    """Nearest grid point for every element."""

    name = "rtn"

    def round(self, w: torch.Tensor, grid: Grid, fmt: Format, hessian: Any) -> tuple[torch.Tensor, Grid]:
        return rtn_round(w, grid)[0], grid


class GPTQ(Rounder):
    """GPTQ with the format's scale refits (:func:`gptq_refit`); nearest point where there is no Hessian."""

    name = "gptq"

    def prepare(self, hessian: torch.Tensor | None, device: torch.device) -> FactoredHessian | None:
        """The Hessian with its GPTQ factorisation (on ``device``), shared by every row block of the weight."""
        if hessian is None:
            return None
        return FactoredHessian(hessian, gptq_factor(hessian, device=device))

    def round(self, w: torch.Tensor, grid: Grid, fmt: Format, hessian: torch.Tensor | FactoredHessian | None
              ) -> tuple[torch.Tensor, Grid]:
        if hessian is None:
            return rtn_round(w, grid)[0], grid
        return gptq_refit(w, hessian, grid, fmt)

    def round_many(self, w: torch.Tensor, hessian: torch.Tensor | FactoredHessian | None, grids: Sequence[Grid],
                   fmts: Sequence[Format], timer: StageTimer | None = None) -> list[tuple[torch.Tensor, Grid]]:
        if hessian is None:
            return RTN().round_many(w, None, grids, fmts, timer)
        return gptq_refit_many(w, hessian, grids, fmts, timer=timer)

    def round_many_measured(self, w: torch.Tensor, hessian: torch.Tensor | FactoredHessian | None,
                            grids: Sequence[Grid], fmts: Sequence[Format], timer: StageTimer | None = None
                            ) -> list[tuple[torch.Tensor, Grid, torch.Tensor | None]]:
        """GPTQ's feedback gives the errors of every format that its last refit left unchanged
        (:func:`gptq_refit_many_measured`)."""
        if hessian is None:
            return RTN().round_many_measured(w, None, grids, fmts, timer)
        return gptq_refit_many_measured(w, hessian, grids, fmts, timer=timer)

    def quantize_block(self, groups: Sequence[Sequence[str]], collect: Collect, round_tensors: RoundTensors
                       ) -> dict[str, QTensor]:
        """Group by group: each group's Hessians are collected after the groups before it were rounded; a group's
        tensors are rounded together."""
        done: dict[str, QTensor] = {}
        for g, names in enumerate(groups):
            hs = collect([g])
            done.update(round_tensors({name: hs[name] for name in names}))
        return done


def _registry(*rounders: Rounder) -> dict[str, Rounder]:
    return {r.name: r for r in rounders}


_ROUNDERS: dict[str, Rounder] = _registry(GPTQ(), RTN())
#: the registered rounding methods by name (read-only; :func:`register_rounder` adds one)
ROUNDERS: Mapping[str, Rounder] = MappingProxyType(_ROUNDERS)


def register_rounder(rounder: Rounder) -> Rounder:
    """Add ``rounder`` under its name (a name already taken is refused)."""
    if not rounder.name or not isinstance(rounder.name, str):
        raise ValueError(f"a rounder needs a name, got {rounder.name!r}")
    if rounder.name in _ROUNDERS:
        raise ValueError(f"rounding method {rounder.name!r} is already registered")
    _ROUNDERS[rounder.name] = rounder
    return rounder


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order (``gptq`` first: the default)."""
    return tuple(_ROUNDERS)


def get_rounder(method: str | Rounder) -> Rounder:
    """The rounder called ``method`` (a :class:`Rounder` is returned as is); one-line InputError otherwise."""
    if isinstance(method, Rounder):
        return method
    r = _ROUNDERS.get(method) if isinstance(method, str) else None
    if r is None:
        raise InputError(f"unknown rounding method {method!r}; use one of {', '.join(method_names())}")
    return r


__all__ = ["Collect", "FactoredHessian", "GPTQ", "GPTQ_REFITS", "ROUNDERS", "RTN", "RoundTensors", "Rounder",
           "get_rounder", "gptq_refit", "gptq_refit_many", "gptq_refit_many_measured", "method_names",
           "register_rounder"]
