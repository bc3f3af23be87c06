"""Recovery-aware allocation: how much of each format's error block-wise recovery takes back, measured on a few
sample blocks, folded into the measurement table before the allocator reads it.

For every sample block and candidate grid format, the block's linears are GPTQ-rounded in that format (Hessians of
the full-precision inputs on the quantization's windows) and the block is recovered as
:func:`bitalloc.recover.train.recover_blocks` would, on the same training windows; the format's *gain* is the
geometric mean over the samples of (block output error after) / (before), both measured on the windows held out
after the training ones (as recovery's own guard: a gain that holds only on the training text is not counted).
The table's errors of that format are multiplied by its gain (:func:`scaled_table`) for the tensors block recovery
trains (the blocks' linears), so the allocator sees the errors the recovered model will have: formats that recovery
helps most become cheaper in error.  The embedding and the output projection, which no block holds, keep their
errors: the e2e stage only moves their scales.  A format that can store only some linears of a sample block (the
K-quants' 256-wide blocks and narrow rows) is measured on those, the others at full precision; formats that store
none of them, and pass-through formats, keep a gain of 1.

The samples are single blocks fed full-precision inputs; in the whole model most of a deep block's error is
inherited from the blocks before it, which its recovery cannot take back, so these gains can overstate what the
pipeline recovers (at the GGUF bench's Q2_K size the aware plan recovered to a higher KLD than the plain one:
README, "Recovery").
"""
from __future__ import annotations

import logging
import math
from typing import Collection, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import BlockRunner
from ..formats import get_format
from ..layout import layout_of, window_batches
from ..measure import Measurement
from ..models.view import ModelView
from ..placement import Placement
from ..rounding import dequantize, quantize_weight
from ..table import MeasureRow
from .attach import Attached
from .config import RecoverConfig
from .train import _out, _train_block

log = logging.getLogger(__name__)


def sample_blocks(nblocks: int, count: int = 2) -> list[int]:
    """``count`` blocks spread over the depth (first quarter to last quarter)."""
    if nblocks <= count:
        return list(range(nblocks))
    return sorted({round((i + 1) * nblocks / (count + 1)) - 1 for i in range(count)})


def format_gains(model: nn.Module, windows: torch.Tensor, formats: Sequence[str], cfg: RecoverConfig, *,
                 guard: int = 0, quant: int | None = None, blocks: Sequence[int] | None = None,
                 placement: Placement | None = None, progress: bool = True) -> dict[str, float]:
    """``{format: remaining error fraction after block recovery}`` measured on ``blocks`` of the full-precision
    ``model`` (its weights are put back); formats that cannot be measured get 1.0.

    ``windows`` are recovery's (:func:`bitalloc.recover.training_windows`): the samples train on all but the last
    ``guard`` and measure the errors before and after on those (on the first training windows when ``guard`` is
    0); their GPTQ Hessians come from the first ``quant`` windows (the quantization's; at most, and by default,
    every training window)."""
    n = int(windows.shape[0])
    quant = n - guard if quant is None else min(quant, n - guard)
    if not 0 <= guard < n or quant < 1:
        raise ValueError(f"format_gains: {guard} held-out and {quant} quantization windows of {n}")
    lay = layout_of(model)
    blocks = sorted(set(blocks if blocks is not None else sample_blocks(len(lay.blocks))))
    ctx = int(windows.shape[1])
    steps = cfg.steps_for("block", ctx)
    grid = [f for f in formats if get_format(f).is_grid]
    ratios: dict[str, list[float]] = {f: [] for f in grid}
    for p in model.parameters():
        p.requires_grad_(False)
    bar = tqdm(total=len(blocks) * len(grid), desc="recovery gains", disable=not progress, leave=False)
    with BlockRunner(model, windows, placement=placement) as r:
        for b in range(max(blocks) + 1):
            if b in blocks:
                _sample(model, r, b, grid, steps, cfg, ratios, bar, guard, quant)
            r.advance()
    bar.close()
    gains = {f: math.exp(sum(map(math.log, v)) / len(v)) if v else 1.0 for f, v in ratios.items()}
    log.info("recovery gains (error kept after block recovery): %s",
             ", ".join(f"{f} {g:.3f}" for f, g in gains.items()))
    return {f: gains.get(f, 1.0) for f in formats}


def _sample(model: nn.Module, r: BlockRunner, b: int, formats: Sequence[str], steps: int, cfg: RecoverConfig,
            ratios: dict[str, list[float]], bar: tqdm, guard: int, quant: int) -> None:
    lay = r.layout
    hs = r.collect(first=quant)
    n = int(r.hidden.shape[0])
    with torch.no_grad():  # the full-precision block's outputs: the targets
        target = torch.cat([_out(lay.blocks[b](r.placement.to_device(r.hidden[s]), **r.kwargs[b]))
                            for s in window_batches(n, 8)])
    names = [t for g in lay.block_groups(b) for t in g]
    saved = {t: model.get_parameter(t).detach().clone() for t in names}
    try:
        for f in formats:
            fmt = get_format(f)
            # the linears this format can store (a K-quant takes the 1536-wide down_proj of a 576-wide model, not
            # the others); the rest stay at full precision, so a format is not left without a gain for them
            takes = [t for t in names if fmt.supports(tuple(saved[t].shape))]
            if takes:
                q = {t: quantize_weight(r.placement.to_device(saved[t]), fmt, hessian=hs[t], method="gptq")
                     for t in takes}
                with torch.no_grad():
                    for t, w in saved.items():
                        model.get_parameter(t).copy_(dequantize(q[t]).reshape(w.shape) if t in q else w)
                att = Attached(model, q, {}, codes=True, scales=True)
                before, after = _train_block(r, b, att, target, steps, cfg, guard)
                att.finish()
                if before > 0:
                    ratios[f].append(max(min(after, before), 1e-12) / before)
            bar.update(1)
    finally:
        with torch.no_grad():
            for t, w in saved.items():
                model.get_parameter(t).copy_(w)


def block_tensors(view: ModelView) -> set[str]:
    """The tensors block recovery trains: every decoder block's linears (not the embedding, not the lm_head)."""
    return {r.name for r in view.quantizable() if r.block is not None}


def scaled_table(m: Measurement, gains: Mapping[str, float], trained: Collection[str]) -> Measurement:
    """``m`` with the errors of every row of a ``trained`` tensor multiplied by its format's gain (1 when not
    given); the rows of other tensors as they are."""
    trained = frozenset(trained)

    def g(r: MeasureRow) -> float:
        return gains.get(r.format, 1.0) if r.tensor in trained else 1.0

    rows = tuple(MeasureRow(r.tensor, r.format, r.bytes, r.output_error * g(r),
                            None if r.fisher_error is None else r.fisher_error * g(r))
                 for r in m.rows)
    fp = dict(m.fingerprint)
    fp["recovery_gains"] = ",".join(f"{f}:{g:.6g}" for f, g in sorted(gains.items()))
    return Measurement(m.tensors, rows, m.fixed_bytes, m.total_params, fp)


__all__ = ["block_tensors", "format_gains", "sample_blocks", "scaled_table"]
