"""Several grids of one weight stacked row-wise, and the GPTQ column loop that rounds onto all at once.

GPTQ treats rows independently and every candidate format of a tensor shares its Hessian, so the copies
of ``w``'s rows for ``F`` formats can be stacked into one ``(F·rows) x cols`` matrix (row ``f·rows + r`` is
row ``r`` under format ``f``) and rounded by a single column loop: one factorisation, one Python loop, ``F``
times wider tensor operations.  :class:`StackedGrid` supplies, per block of columns, every stacked row's
scale and offset (gathered once per block from each format's own group size, not once per column) and the
nearest-level search within each row's own codebook (codebooks padded with ``+inf`` midpoints, so a row
never reaches another format's levels).

The arithmetic per element is exactly :meth:`~bitalloc.formats.base.Grid.snap`'s and the GPTQ update's, so
with one grid the codes are bit-identical to rounding that grid alone.  Every tensor lives on the weight's
device; the loop makes no host round trip (non-finite error feedback is collected per row and checked once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..formats.base import Grid


def _mids(levels: torch.Tensor) -> torch.Tensor:
    return (levels[1:] + levels[:-1]) * 0.5


def _uniform(levels: torch.Tensor) -> bool:
    """Consecutive small integers: the nearest level has a closed form (see :meth:`StackedGrid.nearest`)."""
    lo = float(levels[0])
    return lo == round(lo) and abs(lo) < 1 << 20 and levels.numel() < 1 << 20 and bool(torch.equal(
        levels, torch.arange(levels.numel(), device=levels.device, dtype=torch.float32) + lo))


@dataclass(frozen=True, eq=False)
class StackedGrid:
    """``grids`` (each for the same ``rows``) stacked: row ``j·rows + r`` uses ``grids[j]``'s row ``r``.

    The grids are stacked with the consecutive-integer codebooks first (``index[j]`` is the position in the
    caller's list of stacked grid ``j``); their ``nu`` rows find the nearest level in closed form, per-row
    bounds ``lo``/``hi``.  The other rows search ``mids``: one shared codebook's midpoints (1-D), or a
    ``(rows, M-1)`` table, each row its format's midpoints padded with ``+inf``, with ``table`` the padded
    level values ``(F', M)`` flattened and ``base`` (``f·M`` per row) indexing it.
    """

    grids: tuple[Grid, ...]
    index: tuple[int, ...]
    rows: int
    nu: int
    lo: torch.Tensor | float
    hi: torch.Tensor | float
    mids: torch.Tensor
    table: torch.Tensor
    base: torch.Tensor | None
    #: mixture mode (some grid has a ``set_index``): per searched row and column a codebook id into ``mids``
    #: (``(ncodebooks, M-1)``) and ``table`` (``ncodebooks·M``): ``cbase[j]`` is the first codebook of searched
    #: grid ``j``; None otherwise
    cbase: tuple[int, ...] | None = None
    #: some grid stores elements exactly (``Grid.exact_mask``)
    exact: bool = False

    @classmethod
    def of(cls, grids: Sequence[Grid], device: torch.device) -> "StackedGrid":
        if not grids:
            raise ValueError("StackedGrid needs at least one grid")
        rows = grids[0].rows
        if any(g.rows != rows for g in grids):
            raise ValueError(f"stacked grids must have equal rows, got {[g.rows for g in grids]}")
        if not all(g.plain for g in grids):
            return cls._extended(grids, device, rows)
        levels = [g.levels.to(device=device, dtype=torch.float32).reshape(-1) for g in grids]
        uni = [_uniform(lv) for lv in levels]
        index = tuple(sorted(range(len(grids)), key=lambda j: not uni[j]))
        nuf = sum(uni)
        los = [float(levels[j][0]) for j in index[:nuf]]
        his = [float(levels[j][-1]) for j in index[:nuf]]
        lo: torch.Tensor | float = 0.0
        hi: torch.Tensor | float = 0.0
        if len(set(zip(los, his))) == 1:  # one uniform codebook: scalar bounds
            lo, hi = los[0], his[0]
        elif los:
            lo = torch.tensor(los, device=device).repeat_interleave(rows)
            hi = torch.tensor(his, device=device).repeat_interleave(rows)
        rest = [levels[j] for j in index[nuf:]]
        empty = torch.zeros(0, device=device)
        if not rest:
            mids, table, base = empty, empty, None
        elif all(lv.shape == rest[0].shape and bool(torch.equal(lv, rest[0])) for lv in rest[1:]):
            mids, table, base = _mids(rest[0]).contiguous(), rest[0], None
        else:
            m = max(int(lv.numel()) for lv in rest)
            table = torch.stack([torch.cat([lv, lv[-1:].expand(m - lv.numel())]) for lv in rest]).reshape(-1)
            mids = torch.stack([torch.cat([_mids(lv), torch.full((m - lv.numel(),), torch.inf, device=device)])
                                for lv in rest]).repeat_interleave(rows, dim=0).contiguous()
            base = (torch.arange(len(rest), device=device) * m).repeat_interleave(rows)
        return cls(tuple(grids[j] for j in index), index, rows, nuf * rows, lo, hi, mids, table, base)

    @classmethod
    def _extended(cls, grids: Sequence[Grid], device: torch.device, rows: int) -> "StackedGrid":
        """Stack with mixtures or exactly stored elements: every row searches a padded codebook table (uniform
        codebooks included), by a per-column codebook id (:meth:`codebooks`)."""
        books = [g.levels.to(device=device, dtype=torch.float32).reshape(-1, int(g.levels.shape[-1])) for g in grids]
        m = max(int(b.shape[1]) for b in books)
        cbase, tabs, mids = [], [], []
        for b in books:
            cbase.append(sum(int(t.shape[0]) for t in tabs))
            pad = m - int(b.shape[1])
            tabs.append(torch.cat([b, b[:, -1:].expand(-1, pad)], 1))
            mids.append(torch.cat([_mids(b.T).T, torch.full((b.shape[0], pad), torch.inf, device=device)], 1))
        table = torch.cat(tabs).reshape(-1).contiguous()
        return cls(tuple(grids), tuple(range(len(grids))), rows, 0, 0.0, 0.0, torch.cat(mids).contiguous(), table,
                   None, tuple(cbase), any(g.exact_mask is not None for g in grids))

    def codebooks(self, cols: torch.Tensor) -> torch.Tensor | None:
        """Codebook id ``(k, F·rows)`` of every stacked row at the original columns ``cols`` (mixture mode)."""
        if self.cbase is None:
            return None
        out = []
        for g, c0 in zip(self.grids, self.cbase):
            if g.set_index is None:
                out.append(torch.full((int(cols.shape[0]), self.rows), c0, dtype=torch.int64, device=cols.device))
            else:
                out.append(g.set_index[:, torch.div(cols, g.group_size, rounding_mode="floor")].T.to(torch.int64) + c0)
        return torch.cat(out, 1).contiguous()

    def exact_at(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mask and values ``(k, F·rows)`` of the exactly stored elements at the original columns ``cols``."""
        if not self.exact:
            return None
        k = int(cols.shape[0])
        masks, vals = [], []
        for g in self.grids:
            if g.exact_mask is None:
                masks.append(torch.zeros((k, self.rows), dtype=torch.bool, device=cols.device))
                vals.append(torch.zeros((k, self.rows), dtype=torch.float32, device=cols.device))
            else:
                masks.append(g.exact_mask[:, cols].T)
                vals.append(g.exact_values[:, cols].T.to(torch.float32))
        return torch.cat(masks, 1).contiguous(), torch.cat(vals, 1).contiguous()

    def nearest_in(self, u: torch.Tensor, codes: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        """Mixture mode: the level nearest ``u`` in codebook ``cb`` (per stacked row), exactly as
        :meth:`Grid.snap` (``searchsorted`` over that codebook's midpoints)."""
        m = int(self.mids.shape[1]) + 1
        c = torch.searchsorted(self.mids.index_select(0, cb), u.unsqueeze(1)).squeeze(1)
        codes.copy_(c)
        return self.table.take(cb * m + c)

    @property
    def size(self) -> int:
        return len(self.grids) * self.rows

    def columns(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and offset ``(k, F·rows)`` of every stacked row at the original columns ``cols`` (k,)."""
        s = [g.scale[:, torch.div(cols, g.group_size, rounding_mode="floor")].T for g in self.grids]
        o = [g.offset[:, torch.div(cols, g.group_size, rounding_mode="floor")].T for g in self.grids]
        return torch.cat(s, 1).to(torch.float32).contiguous(), torch.cat(o, 1).to(torch.float32).contiguous()

    def nearest(self, u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Level values nearest ``u`` (F·rows,) in each row's codebook (ties: the lower level), exactly
        ``searchsorted`` over the midpoints as :meth:`Grid.snap`; their indices are written to ``codes``."""
        nu = self.nu
        if nu == int(u.shape[0]):
            return self._nearest_uniform(u, codes)
        if nu == 0:
            return self._nearest_search(u, codes)
        vals = torch.empty_like(u)
        vals[:nu] = self._nearest_uniform(u[:nu], codes[:nu])
        vals[nu:] = self._nearest_search(u[nu:], codes[nu:])
        return vals

    def _nearest_uniform(self, u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        # midpoints are k + 0.5 exactly: round half to even, then move exact ties (u == r - 0.5) down
        # (non-finite u, from overflowed error feedback, give meaningless codes that the caller discards)
        t = torch.clamp(u, self.lo - 1, self.hi + 1)
        r = torch.round(t)
        r -= (r - 0.5 == t).to(r.dtype)
        r = torch.clamp(r, self.lo, self.hi)
        codes.copy_(r - self.lo)
        return r

    def _nearest_search(self, u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.base is None:
            c = torch.searchsorted(self.mids, u)
            codes.copy_(c)
            return self.table[c]
        c = torch.searchsorted(self.mids, u.unsqueeze(1)).squeeze(1)
        codes.copy_(c)
        return self.table.take(self.base + c)


def stacked_codes(
    w: torch.Tensor, u: torch.Tensor, sg: StackedGrid, cols: torch.Tensor, block_size: int,
    feedback_sq: bool = False, overwrite: bool = False, skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ codes of the stacked ``w`` (``F·rows x n``, columns already in processing order, original
    indices ``cols``) given the upper factor ``u`` (n x n, float32).

    ``w`` is not modified unless ``overwrite`` (the caller's own copy, then used as the loop's working copy instead
    of a clone of it).  Returns ``(codes, bad, sq)``: int32 codes ``(F·rows, n)`` in processing order (half the
    memory of int64 for the largest tensor the loop holds; every codebook has far fewer levels),
    a bool per stacked row whose error feedback went non-finite (its codes are then meaningless) and, when
    ``feedback_sq``, each stacked row's sum of its squared scaled errors ``Σ_j e_j²`` (float64; else None), from
    which :func:`~.gptq.gptq_round_many_measured` reads the layer-output error; the columns ``skip`` marks (bool,
    processing order) are left out of those sums.
    """
    w = w if overwrite else w.clone()
    nrows, n = w.shape
    codes = torch.empty((n, nrows), dtype=torch.int32, device=w.device)
    bad = torch.zeros(nrows, dtype=torch.bool, device=w.device)
    sq = torch.zeros(nrows, dtype=torch.float64, device=w.device) if feedback_sq else None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].T.contiguous()  # (k, rows): column i of the block is the contiguous row i
        s, o = sg.columns(cols[i1:i2])
        zero = s == 0
        safe = torch.where(zero, torch.ones_like(s), s)
        u1 = u[i1:i2, i1:i2]
        diag = torch.diagonal(u1).tolist()
        err1 = torch.empty_like(w1)
        if sg.cbase is not None or sg.exact:  # mixtures / exactly stored elements
            _extended_block(w1, err1, s, o, zero, safe, u1, diag, sg, cols[i1:i2], codes[i1:i2])
        else:
            for i in range(i2 - i1):
                x = w1[i]
                t = torch.where(zero[i], torch.zeros_like(x), (x - o[i]) / safe[i])
                lv = sg.nearest(t, codes[i1 + i])
                e = (x - (s[i] * lv + o[i])) / diag[i]
                w1[i + 1:] -= u1[i, i + 1:].unsqueeze(1) * e.unsqueeze(0)
                err1[i] = e
        bad |= ~torch.isfinite(err1).all(0)
        if sq is not None:
            e2 = err1.to(torch.float64).square_()
            if skip is not None:
                e2[skip[i1:i2]] = 0
            sq += e2.sum(0)
            del e2
        if i2 < n:
            w[:, i2:] -= err1.T.contiguous() @ u[i1:i2, i2:]
    return codes.T, bad, sq


def _extended_block(w1, err1, s, o, zero, safe, u1, diag, sg: StackedGrid, cols: torch.Tensor,
                    codes: torch.Tensor) -> None:
    """One block of the column loop for stacks with mixtures or exactly stored elements (see
    :meth:`StackedGrid._extended`): each row's own codebook per column; an exactly stored element takes its
    stored value, its error ``x − exact`` fed back like any rounding error."""
    cb = sg.codebooks(cols)
    ex = sg.exact_at(cols)
    for i in range(int(cols.shape[0])):
        x = w1[i]
        t = torch.where(zero[i], torch.zeros_like(x), (x - o[i]) / safe[i])
        lv = sg.nearest_in(t, codes[i], cb[i]) if cb is not None else sg.nearest(t, codes[i])
        v = s[i] * lv + o[i]
        if ex is not None:
            v = torch.where(ex[0][i], ex[1][i], v)
        e = (x - v) / diag[i]
        w1[i + 1:] -= u1[i, i + 1:].unsqueeze(1) * e.unsqueeze(0)
        err1[i] = e


__all__ = ["StackedGrid", "stacked_codes"]
