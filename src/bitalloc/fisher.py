"""The Fisher pass: ``E[(∂ Σ log p / ∂ y)²]`` per output channel of every linear, the embedding and the logits.

Per batch of windows one no-grad forward keeps only each block's input; the head (final norm -> lm_head ->
log_softmax -> NLL) runs over chunks of positions; then blocks are recomputed with autograd one at a time, last
to first, so neither all activations nor the full (positions x vocab) logits ever exist at once.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError, NumericsError
from .layout import Layout, StopForward, check_windows, layout_of, require_finite, window_batches
from .memory import release_free_memory

log = logging.getLogger(__name__)

FisherStats = dict[tuple[str, str], torch.Tensor]
"""``(tensor name, role) -> E[g²]``; role is ``"linear"`` (per output channel) or ``"lookup"`` (per hidden)."""

#: positions whose (positions x vocab) logits exist at once in the Fisher head pass
HEAD_CHUNK = 32


def fisher_pass(
    model: nn.Module,
    view: Any,
    windows: torch.Tensor,
    batch_size: int = 2,
    progress: bool = True,
    *,
    head_chunk: int = HEAD_CHUNK,
) -> FisherStats:
    """``E[(∂ Σ log p(next token) / ∂ y)²]`` per output channel of every linear, the embedding, the logits.

    The log-likelihood of a window is summed over its positions; squares are averaged over positions, so
    ``½ Σ_j grad_sq_j E[Δy_j²]`` estimates the increase of the mean per-token loss.  Weights get no grad.

    Bounded memory: per batch one forward without autograd keeps only each block's input; the head
    (final norm -> lm_head -> log-softmax -> NLL) runs over ``head_chunk`` positions at a time, so a
    (positions x vocab) array exists for one chunk only; then the blocks are recomputed with autograd one at
    a time, last to first, each backpropagating the gradient of its output to its input (gradient
    checkpointing).  Every linear output is hooked during the recomputation only, so nothing is counted twice.
    """
    check_windows(windows)
    if head_chunk < 1:
        raise InputError(f"head_chunk must be at least 1, got {head_chunk}")
    lay = layout_of(model)
    sums: dict[tuple[str, str], torch.Tensor] = {}
    handles = _hook_linear_outputs(lay, sums)
    scale = float(getattr(lay.embedding, "embed_scale", 1.0))
    emb_key = (lay.embedding_name, "lookup")
    ntok = 0
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)  # gradients w.r.t. activations only, never weights
    try:
        for sl in tqdm(window_batches(len(windows), batch_size), desc="fisher", disable=not progress, leave=False):
            ids = windows[sl]
            g_emb = _fisher_batch(model, lay, ids, sums, head_chunk)
            _accumulate(sums, emb_key, g_emb)
            ntok += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
    out = {k: v / ntok for k, v in sums.items()}
    # y = scale·E[token]: the gradient w.r.t. the stored row is scale·g.
    out[emb_key] = out[emb_key] * scale**2
    for (name, role), v in out.items():
        require_finite(v, f"the Fisher statistics of {name} ({role})")
    return out


def _accumulate(sums: dict[tuple[str, str], torch.Tensor], key: tuple[str, str], g: torch.Tensor) -> None:
    sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
    sums[key] = sums[key] + sq if key in sums else sq


def _hook_linear_outputs(lay: Layout, sums: dict[tuple[str, str], torch.Tensor]) -> list[Any]:
    """Forward hooks that square the gradient of every linear's (and the lm_head's) output into ``sums``.

    A hook only fires for outputs that require grad, i.e. in the recomputation with autograd."""

    def on_output(key: tuple[str, str]):
        def fhook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: _accumulate(sums, key, g))

        return fhook

    handles = []
    for b in range(len(lay.blocks)):
        for lin in lay.spec.linears:
            handles.append(lay.linear(b, lin).register_forward_hook(on_output((lay.tensor_name(b, lin), "linear"))))
    handles.append(lay.lm_head.register_forward_hook(on_output((lay.lm_head_name, "linear"))))
    return handles


def _block_inputs(
    model: nn.Module, lay: Layout, emb: torch.Tensor
) -> tuple[list[torch.Tensor], list[dict[str, Any]], torch.Tensor]:
    """One forward without autograd: each block's input and call arguments, and the final-norm input."""
    n = len(lay.blocks)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = [{} for _ in range(n)]
    final: list[torch.Tensor] = []

    def pre(i: int):
        def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
            inputs.append((args[0] if args else kw["hidden_states"]).detach())
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}

        return hook

    def at_norm(_m: nn.Module, args: tuple) -> None:
        final.append(args[0].detach())
        raise StopForward

    hs = [blk.register_forward_pre_hook(pre(i), with_kwargs=True) for i, blk in enumerate(lay.blocks)]
    hs.append(lay.final_norm.register_forward_pre_hook(at_norm))
    try:
        with torch.no_grad():
            model(inputs_embeds=emb, use_cache=False)
    except StopForward:
        pass
    finally:
        for h in hs:
            h.remove()
    if len(inputs) != n or len(final) != 1:
        raise NumericsError(f"the Fisher pass saw {len(inputs)} of {n} blocks and {len(final)} final norms")
    return inputs, kwargs, final[0]


def _block0_input(model: nn.Module, lay: Layout, emb: torch.Tensor) -> torch.Tensor:
    """The input of block 0 as a differentiable function of the embedding output ``emb``."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
        got.append(args[0] if args else kw["hidden_states"])
        raise StopForward

    h = lay.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(inputs_embeds=emb, use_cache=False)
    except StopForward:
        pass
    finally:
        h.remove()
    return got[0]


def _softcap(model: nn.Module) -> float | None:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    cap = getattr(cfg, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _head_grad(lay: Layout, final: torch.Tensor, ids: torch.Tensor, chunk: int, cap: float | None) -> torch.Tensor:
    """``∂ Σ log p(next token) / ∂ final`` (the final-norm input), over ``chunk`` positions at a time."""
    bsz, ctx, hidden = final.shape
    x_all = final[:, :-1].reshape(-1, hidden)
    tgt = ids[:, 1:].reshape(-1, 1)
    grad = torch.zeros(bsz * (ctx - 1), hidden, dtype=final.dtype)
    total = 0.0
    for a in range(0, x_all.shape[0], chunk):
        x = x_all[a : a + chunk].detach().requires_grad_(True)
        logits = lay.lm_head(lay.final_norm(x))
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        ll = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt[a : a + chunk]).sum()
        ll.backward()
        total += float(ll.detach())
        grad[a : a + chunk] = x.grad
    if not math.isfinite(total):
        raise NumericsError("non-finite values (NaN/Inf) in the log-likelihood of the calibration windows (fp model)")
    out = torch.zeros_like(final)
    out[:, :-1] = grad.reshape(bsz, ctx - 1, hidden)
    return out


def _fisher_batch(
    model: nn.Module, lay: Layout, ids: torch.Tensor, sums: dict[tuple[str, str], torch.Tensor], chunk: int
) -> torch.Tensor:
    """Backpropagate the summed log-likelihood of ``ids`` block by block; returns the embedding-output gradient."""
    emb = lay.embedding(ids).detach()
    inputs, kwargs, final = _block_inputs(model, lay, emb)
    with torch.enable_grad():
        release_free_memory()
        g = _head_grad(lay, final, ids, chunk, _softcap(model))
        del final
        release_free_memory()
        for i in reversed(range(len(lay.blocks))):
            x = inputs.pop().requires_grad_(True)
            out = lay.blocks[i](x, **kwargs[i])
            y = out[0] if isinstance(out, tuple) else out
            torch.autograd.backward(y, g)
            g = x.grad
            del x, y, out
            release_free_memory()
        emb.requires_grad_(True)
        x0 = _block0_input(model, lay, emb)
        torch.autograd.backward(x0, g)
    return emb.grad
