"""Per block statistics of the fp model streamed from a :class:`~bitalloc.calibrate.runner.BlockRunner`, then
the embedding's and lm_head's; resumable at a block (see :mod:`bitalloc.calibrate`)."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..fisher import FisherStats
from ..placement import Placement
from ..stats import LinearStats, LookupStats, TensorStats
from ..timing import StageTimer
from .runner import BlockRunner

def head_stats(runner: BlockRunner, fisher: FisherStats | None,
               roundings: Sequence[str] = ()) -> dict[str, TensorStats]:
    """Statistics of the embedding and lm_head (one tensor with two roles when they are tied)."""
    lay = runner.layout
    fisher = fisher or {}
    lookup = LookupStats(
        token_freq=runner.placement.to_device(runner.token_freq()),
        ntokens=runner.windows.numel(),
        grad_sq=_on(runner, fisher.get((lay.embedding_name, "lookup"))),
    )
    h, noise = runner.head_with_noise(roundings)
    proj = LinearStats(hessian=h, ntokens=runner.windows.numel(),
                       grad_sq=_on(runner, fisher.get((lay.lm_head_name, "linear"))), act_noise=noise)
    if lay.tied:
        return {lay.embedding_name: TensorStats(roles=(lookup, proj))}
    return {lay.embedding_name: TensorStats(roles=(lookup,)), lay.lm_head_name: TensorStats(roles=(proj,))}


def stream_blocks(
    model: nn.Module,
    view: object,
    windows: torch.Tensor,
    *,
    fisher: FisherStats | None = None,
    batch_size: int = 8,
    progress: bool = True,
    start_block: int = 0,
    start_hidden: torch.Tensor | None = None,
    after_block: Callable[[int, torch.Tensor], None] | None = None,
    roundings: Sequence[str] = (),
    placement: Placement | None = None,
    timer: StageTimer | None = None,
) -> Iterator[dict[str, TensorStats]]:
    """Per block ``{tensor: TensorStats}`` of the fp model (one forward per block), then the head tensors.

    Resuming (:mod:`bitalloc.jobs`): ``start_block`` > 0 with ``start_hidden``, the saved inputs of that block,
    skips the blocks before it; ``after_block(b, hidden)`` runs when the consumer has finished block ``b``'s
    statistics (asks for the next item), with the inputs of block ``b + 1`` (in CPU memory).  ``roundings``: the
    activation roundings (:mod:`bitalloc.activations`) whose output noise each linear's stats carry
    (``act_noise``).  The statistics are on ``placement``'s device (default: the CPU), and so are the model's
    weights while the consumer handles a block (an offloaded block is back in CPU memory by then).
    """
    with BlockRunner(model, windows, batch_size, placement=placement, timer=timer) as runner:
        _resume_runner(runner, start_block, start_hidden)
        fisher = fisher or {}
        ntok = runner.windows.numel()
        nblocks = len(runner.layout.blocks)
        for b in tqdm(range(start_block, nblocks), desc="calibrate", disable=not progress, leave=False,
                      initial=start_block, total=nblocks):
            hs, noise = runner.collect_with_noise(advance=True, roundings=roundings)
            stats = {
                name: TensorStats(roles=(LinearStats(hessian=h, ntokens=runner.tokens.get(name, ntok),
                                                     grad_sq=_on(runner, fisher.get((name, "linear"))),
                                                     act_noise=noise.get(name, {})),))
                for name, h in hs.items()
            }
            del hs, noise
            yield stats
            del stats  # the consumer is done with this block: its Hessians leave before the next forward
            if after_block is not None:
                after_block(b, runner.hidden_cpu())
                runner._release(runner.hidden)  # a consumer that read the states (to save them) left them resident
        yield head_stats(runner, fisher, roundings)


def _on(runner: BlockRunner, t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` on the runner's device (None stays None)."""
    return None if t is None else runner.placement.to_device(t)


def _resume_runner(runner: BlockRunner, block: int, hidden: torch.Tensor | None) -> None:
    """Move ``runner`` to ``block`` with the saved inputs ``hidden`` (InputError when they do not fit)."""
    nblocks = len(runner.layout.blocks)
    if not 0 <= block <= nblocks:
        raise InputError(f"cannot resume calibration at block {block}: the model has {nblocks} blocks")
    if block == 0 and hidden is None:
        return
    if hidden is None:
        raise InputError(f"resuming calibration at block {block} needs the hidden states at its input")
    want = tuple(runner.hidden.shape)
    if tuple(hidden.shape) != want or hidden.dtype != runner.hidden.dtype:
        raise InputError(f"saved hidden states {tuple(hidden.shape)} {hidden.dtype} do not match the calibration "
                         f"{want} {runner.hidden.dtype}")
    runner.hidden = hidden.to(runner.placement.states_device)
    runner.block = block
    runner._hold(block)


__all__ = ["head_stats", "stream_blocks"]
