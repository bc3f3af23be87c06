"""The two recovery stages (EfficientQAT's order: block-wise, then end to end), on the calibration windows only.

* :func:`recover_blocks`: block by block, the quantized block -- fed the outputs of the already recovered blocks --
  learns its codes (a learned rounding), group scales/offsets and norms to match the full-precision block's
  outputs on the full-precision inputs (mean squared error); the recovered block's stored values then produce the
  next block's inputs.  A block whose calibration loss does not fall keeps what it had.
* :func:`recover_e2e`: the whole model learns the stored floats only (scales, offsets, norms; codes fixed) by
  KL divergence to the full-precision model's next-token distribution: the blocks', and the output projection's
  and the embedding's, which no block holds (block 0's inputs are computed from the embedding in every step, so
  its scales train through both uses when it is tied to the output); blocks are recomputed in the backward
  (gradient checkpointing), so one block's activations are resident.  The calibration KL is checked
  :data:`E2E_CHECKS` times along the run: the stage ends at its best check (as it started when none was lower), and
  a check that finds no gain halves the rates from there.

Both train on the windows before the last ``guard`` ones; those last windows are held out, never trained on, and
the guards and checks measure the loss on them, so a stage that only fits its training windows is caught (with
``guard=0``, on the first :data:`GUARD_WINDOWS` training windows).  Both are deterministic for a fixed seed (the
windows of each step come from a seeded generator).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..calibrate import BlockRunner
from ..fisher import final_logit_cap
from ..formats import QTensor
from ..layout import Layout, block0_inputs, layout_of, window_batches
from ..models.view import ModelView
from ..placement import Placement
from .attach import Attached
from .config import RecoverConfig

log = logging.getLogger(__name__)

#: without held-out windows (``guard=0``), the training windows (the first ones) on which the guard compares the
#: loss before and after training: a sample is enough to catch a stage that made things worse
GUARD_WINDOWS = 16

#: the e2e stage's rate for the stored floats, relative to ``RecoverConfig.lr``: every scale (and norm) of the model
#: moves at once, so it is well below the block stage's 1/10 for one block's.  The first version's 1/4 raised the
#: calibration KL at 4 bpw until the guard reverted the whole stage; this rate suits the low-bit models, where the
#: stage gains most, and the checks below halve it where it is still too large (README, "Recovery")
E2E_FLOAT_SHARE = 1 / 16
#: the e2e stage's float rate holds for grids whose outermost level is this many steps from zero (int2: 0..3); a grid
#: reaching further moves its scales proportionally slower, so that a relative change of a scale moves the weights
#: by the same number of steps in every format (at 5 bits and above the full rate overshot: README, "Recovery")
E2E_REACH = 3.0
#: how often the e2e stage measures the calibration KL on the guard's windows (evenly along the run, the last at its
#: end): a check that finds it no lower than the best so far returns to the best and halves the rates
E2E_CHECKS = 4

#: ``on_block(b, recovered QTensors of block b, fixed values of block b, student states, teacher states)``
RecoverHook = Callable[[int, dict[str, QTensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor], None]


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _optimizer(att: Attached, cfg: RecoverConfig, float_share: float, steps: int, start: int = 0,
               reach: float | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam over the codes at ``cfg.lr`` and the floats (scales, offsets, norms) at ``cfg.lr * float_share``,
    with the learning rates decaying to zero over ``steps`` along a cosine (the last steps settle the codes);
    ``start``: the step the schedule starts at (a fresh optimizer in the middle of a run).  ``reach``: each tensor's
    floats move at that rate times ``min(1, reach / its grid's reach)`` (:meth:`Attached.float_groups`)."""
    codes, floats = att.parameters()
    float_groups = [(floats, 1.0)] if reach is None else att.float_groups(reach)
    groups = [g for g in ({"params": codes, "lr": cfg.lr},
                          *({"params": ps, "lr": cfg.lr * float_share * r} for ps, r in float_groups))
              if g["params"]]
    opt = torch.optim.Adam(groups)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i + start, steps) / steps)))


def _picks(n: int, per_step: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The windows of every step: seeded shuffles of all ``n``, ``per_step`` at a time (sorted within a step)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * per_step:
        order += torch.randperm(n, generator=gen).tolist()
    k = min(per_step, n)
    return [torch.tensor(sorted(order[i * k:(i + 1) * k])) for i in range(steps)]


def guard_range(n: int, guard: int) -> range:
    """The windows (of ``n``, the last ``guard`` held out) on which the guards and checks measure the loss."""
    if not 0 <= guard < n:
        raise ValueError(f"{guard} held-out windows of {n}: at least one must be left to train on")
    return range(n - guard, n) if guard else range(min(n, GUARD_WINDOWS))


def _check_batches(check: range, per_batch: int) -> list[slice]:
    """``check`` (a :func:`guard_range`) as slices of at most ``per_batch`` windows."""
    return [slice(check.start + s.start, check.start + s.stop) for s in window_batches(len(check), per_batch)]


def _where(guard: int) -> str:
    return f"{guard} held-out windows" if guard else "first training windows"


def fixed_formats(model: nn.Module, prefix: str = "") -> dict[str, str]:
    """Stored format of every fixed tensor (norm, bias) whose name starts with ``prefix``."""
    return {f.name: f.format for f in ModelView(model).fixed() if f.name.startswith(prefix)}


# ------------------------------------------------------------------------------------------- block-wise
def recover_blocks(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, qtensors: Mapping[str, QTensor],
                   cfg: RecoverConfig, *, placement: Placement | None = None, progress: bool = True,
                   on_block: RecoverHook | None = None,
                   start: tuple[int, torch.Tensor, torch.Tensor] | None = None, guard: int = 0
                   ) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """Block-wise recovery of ``student`` (holding ``qtensors``' values) toward ``teacher`` (full precision), on
    ``windows`` less the last ``guard`` (held out for the guard).

    Returns the QTensors of every recovered tensor and the trained float values of the blocks' fixed tensors;
    ``student``'s weights hold the stored values.  ``start`` = ``(block, student states, teacher states)`` resumes
    at that block (the blocks before it already recovered and put into ``student``)."""
    lay = layout_of(student)
    ctx = int(windows.shape[1])
    steps = cfg.steps_for("block", ctx)
    out: dict[str, QTensor] = {}
    values: dict[str, torch.Tensor] = {}
    with BlockRunner(student, windows, placement=placement, write_back=True) as rs, \
            BlockRunner(teacher, windows, placement=placement) as rt:
        first = 0
        if start is not None:
            first, hs, ht = start
            for r, h in ((rs, hs), (rt, ht)):
                r.hidden, r.block = h.to(r.placement.states_device), first
                r._hold(first)
        bar = tqdm(range(first, len(lay.blocks)), desc="recover (block)", disable=not progress, leave=False)
        for b in bar:
            rt.advance()  # the full-precision block's outputs on the full-precision inputs: the targets
            names = [n for g in lay.block_groups(b) for n in g]
            att = Attached(student, {n: qtensors[n] for n in names}, fixed_formats(student, lay.block_paths[b] + "."),
                           codes=True, scales=True)
            before, after = _train_block(rs, b, att, rt.hidden, steps, cfg, guard)
            bar.set_postfix(mse=f"{min(before, after):.3g}", was=f"{before:.3g}")
            done, vals = att.finish()
            rs.advance()
            out.update(done)
            values.update(vals)
            if on_block is not None:
                on_block(b, done, vals, rs.hidden_cpu(), rt.hidden_cpu())
    return out, values


def _block_loss(rs: BlockRunner, b: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    blk = rs.layout.blocks[b]
    got = _out(blk(rs.placement.to_device(x), **rs.kwargs[b]))
    return F.mse_loss(got.float(), rs.placement.to_device(y).float())


def _train_block(rs: BlockRunner, b: int, att: Attached, target: torch.Tensor, steps: int,
                 cfg: RecoverConfig, guard: int = 0) -> tuple[float, float]:
    """Train block ``b``'s attached parameters on all windows but the last ``guard``; ``(loss before, loss
    after)`` on the guard's windows (:func:`guard_range`; the better kept)."""
    n = int(rs.hidden.shape[0])
    check = guard_range(n, guard)

    def full() -> float:
        with torch.no_grad():
            tot = 0.0
            for sl in _check_batches(check, 8):
                tot += float(_block_loss(rs, b, rs.hidden[sl], target[sl])) * (sl.stop - sl.start)
            return tot / len(check)

    before, saved = full(), att.snapshot()
    opt, sched = _optimizer(att, cfg, 0.1, steps)
    for idx in _picks(n - guard, cfg.block_windows, steps, cfg.seed * 100003 + b):
        loss = _block_loss(rs, b, rs.hidden[idx], target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        att.clamp_()
    after = full()
    if not after < before:
        log.info("block %d: recovery did not lower the loss on the %s (%.4g -> %.4g); kept as quantized", b,
                 _where(guard), before, after)
        att.restore(saved)
    return before, after


# -------------------------------------------------------------------------------------------- end to end
def _logits(lay: Layout, kwargs: list[dict[str, Any]], x: torch.Tensor, grad: bool,
            cap: float | None = None) -> torch.Tensor:
    """Blocks, final norm and lm_head from block 0's inputs ``x`` (each block recomputed in the backward), then
    the model's final logit soft cap ``cap`` (:func:`bitalloc.fisher.final_logit_cap`) when it has one."""
    for b, blk in enumerate(lay.blocks):
        if grad:
            x = checkpoint(lambda h, blk=blk, kw=kwargs[b]: _out(blk(h, **kw)), x, use_reentrant=False)
        else:
            x = _out(blk(x, **kwargs[b]))
    z = lay.lm_head(lay.final_norm(x)).float()
    return z if cap is None else cap * torch.tanh(z / cap)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student), natural log."""
    t = F.log_softmax(teacher_logits, dim=-1)
    s = F.log_softmax(student_logits, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def recover_e2e(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, qtensors: Mapping[str, QTensor],
                cfg: RecoverConfig, *, placement: Placement | None = None, progress: bool = True, guard: int = 0
                ) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """End-to-end distillation of the stored floats of every block linear, the output projection and the embedding
    in ``qtensors`` and of every fixed tensor, on ``windows`` less the last ``guard`` (held out for the checks);
    returns ``(recovered QTensors, fixed values)`` as :func:`recover_blocks`."""
    lay, lay_t = layout_of(student), layout_of(teacher)
    head, emb = lay.lm_head_name, lay.embedding_name
    trained = {n for b in range(len(lay.blocks)) for g in lay.block_groups(b) for n in g} | {head, emb}
    n, ctx = int(windows.shape[0]), int(windows.shape[1])
    steps = cfg.steps_for("e2e", ctx)
    with BlockRunner(student, windows, placement=placement, write_back=True) as rs, \
            BlockRunner(teacher, windows, placement=placement) as rt:
        xs, xt, kw, kwt = rs.hidden, rt.hidden, rs.kwargs, rt.kwargs
        place, cap = rs.placement, final_logit_cap(student)
        att = Attached(student, {k: q for k, q in qtensors.items() if k in trained}, fixed_formats(student),
                       codes=False, scales=True)
        embedded = emb in att.q  # the embedding trains: block 0's inputs are computed from it in every step

        def loss(idx: torch.Tensor, grad: bool) -> torch.Tensor:
            with torch.no_grad():
                t = _logits(lay_t, kwt, place.to_device(xt[idx]), False, cap)
            x = block0_inputs(student, lay, input_ids=place.to_device(windows[idx])) if embedded else \
                place.to_device(xs[idx])
            return _kl(t, _logits(lay, kw, x, grad, cap))

        check = guard_range(n, guard)

        def full() -> float:
            with torch.no_grad():
                return sum(float(loss(torch.arange(s.start, s.stop), False)) * (s.stop - s.start)
                           for s in _check_batches(check, cfg.e2e_windows)) / len(check)

        before, saved = full(), att.snapshot()
        best, rate = before, 1.0
        checks = {max(1, round(steps * (j + 1) / E2E_CHECKS)) for j in range(E2E_CHECKS)}
        opt, sched = _optimizer(att, cfg, E2E_FLOAT_SHARE, steps, reach=E2E_REACH)
        bar = tqdm(_picks(n - guard, cfg.e2e_windows, steps, cfg.seed * 100003 + 99991), desc="recover (e2e)",
                   disable=not progress, leave=False)
        for i, idx in enumerate(bar, 1):
            value = loss(idx, True)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            bar.set_postfix(kl=f"{float(value.detach()):.4g}", best=f"{best:.4g}")
            if i in checks:
                now = full()
                if now < best:
                    best, saved = now, att.snapshot()
                    continue
                att.restore(saved)
                if i < steps:
                    rate /= 2
                    opt, sched = _optimizer(att, cfg, E2E_FLOAT_SHARE * rate, steps, start=i, reach=E2E_REACH)
                log.info("e2e recovery: KL %.4g on the %s at step %d, not below %.4g: back to it%s", now,
                         _where(guard), i, best,
                         ", rates halved" if i < steps else "")
        log.info("e2e recovery: KL on the %s %.4g -> %.4g", _where(guard), before, best)
        return att.finish()  # the last step is a check: the state is the best one (or the first)


__all__ = ["GUARD_WINDOWS", "RecoverHook", "fixed_formats", "guard_range", "recover_blocks", "recover_e2e"]
