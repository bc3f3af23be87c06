"""Calibration statistics from text, with bounded memory (a package: the runner, the stream, the Fisher pass).

* :func:`fisher_pass` (module :mod:`bitalloc.fisher`, re-exported here) — gradients squared per output channel,
  with bounded memory.
* :class:`BlockRunner` (:mod:`.runner`) — the hidden states of every window at the input of the current block
  (n·ctx·hidden floats), the per-block call arguments (masks, rotary tables) captured once, and ``collect`` /
  ``advance``: input Hessians ``H = E[xxᵀ]`` of chosen linear groups, and the step to the next block.  It owns the
  run's :class:`~bitalloc.placement.Placement` (device, offloaded blocks, chunk sizes; default the CPU).
* :func:`stream_blocks` (:mod:`.stream`) — for each block ``{tensor: TensorStats}`` from the fp model, then the
  embedding and lm_head (tied: one tensor, two roles); memory holds one block's statistics at a time.

A :class:`~bitalloc.timing.StageTimer`, when given, records ``calibrate.forward`` (block forwards),
``calibrate.hessians`` and ``calibrate.act_noise`` (inside them).
"""
from __future__ import annotations

from ..fisher import FisherStats, fisher_pass
from ..layout import Layout, layout_of
from ..memory import release_free_memory
from ..placement import HEAD_CHUNK, MAX_POSITIONS, VOCAB_CHUNK, Placement
from .runner import BlockRunner, NoiseStats
from .stream import head_stats, stream_blocks

__all__ = ["BlockRunner", "FisherStats", "HEAD_CHUNK", "Layout", "MAX_POSITIONS", "NoiseStats", "Placement",
           "VOCAB_CHUNK", "fisher_pass", "head_stats", "layout_of", "release_free_memory", "stream_blocks"]
