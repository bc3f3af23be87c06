"""The Fisher pass: ``E[(∂ Σ log p / ∂ y)²]`` per output channel of every linear, the embedding and the logits.

Per batch of windows one no-grad forward keeps each block's input only at checkpoints (every
``ceil(sqrt(blocks))``-th block); the head (final norm -> lm_head -> log-softmax -> NLL) runs over chunks of
positions and, within a chunk, over slices of the vocabulary (an online logsumexp, then the gradient slice by
slice), so neither the (positions x vocab) logits nor the whole lm_head weight are ever resident; then the
blocks are recomputed with autograd one at a time, last to first, a segment's inputs re-derived from its
checkpoint, so neither all activations nor all block inputs exist at once.

It runs where its :class:`~bitalloc.placement.Placement` says (device, offloaded blocks, chunk sizes; default the
CPU) and returns the statistics in CPU memory; a :class:`~bitalloc.timing.StageTimer` records ``fisher``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import check_token_ids, embedding_rows
from .errors import InputError, NumericsError
from .layout import Layout, StopForward, block0_inputs, check_windows, layout_of, require_finite, window_batches
from .models.experts import routed_owner
from .models.spill import release_rows
from .placement import HEAD_CHUNK, VOCAB_CHUNK, Placement, Residency  # noqa: F401  (chunk defaults re-exported)
from .timing import StageTimer, timed

log = logging.getLogger(__name__)

FisherStats = dict[tuple[str, str], torch.Tensor]
"""``(tensor name, role) -> E[g²]``; role is ``"linear"`` (per output channel) or ``"lookup"`` (per hidden)."""


def fisher_pass(
    model: nn.Module,
    view: Any,
    windows: torch.Tensor,
    batch_size: int = 2,
    progress: bool = True,
    *,
    head_chunk: int | None = None,
    vocab_chunk: int | None = None,
    placement: Placement | None = None,
    timer: StageTimer | None = None,
) -> FisherStats:
    """``E[(∂ Σ log p(next token) / ∂ y)²]`` per output channel of every linear, the embedding, the logits.

    The log-likelihood of a window is summed over its positions; squares are averaged over positions, so
    ``½ Σ_j grad_sq_j E[Δy_j²]`` estimates the increase of the mean per-token loss.  Weights get no grad.

    Bounded memory: per batch one forward without autograd keeps the inputs of every ``ceil(sqrt(n))``-th
    block; the head runs over ``head_chunk`` positions and ``vocab_chunk`` vocabulary rows at a time (a
    ``head_chunk x vocab_chunk`` logits slice, one slice of the lm_head weight resident, released after use);
    then the blocks are recomputed with autograd one at a time, last to first, each backpropagating the
    gradient of its output to its input (gradient checkpointing; a segment's block inputs are recomputed
    from its checkpoint first).  Every block linear output is hooked during the recomputation only, so
    nothing is counted twice; the lm_head's output gradient is accumulated slice by slice.

    ``head_chunk`` / ``vocab_chunk`` override ``placement``'s (default: the CPU placement, 256 and 4,096).
    """
    place = placement if placement is not None else Placement()
    head_chunk = place.head_chunk if head_chunk is None else head_chunk
    vocab_chunk = place.vocab_chunk if vocab_chunk is None else vocab_chunk
    with timed(timer, "fisher"):
        return _fisher_pass(model, windows, batch_size, progress, head_chunk, vocab_chunk, place)


def _fisher_pass(model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool, head_chunk: int,
                 vocab_chunk: int, place: Placement) -> FisherStats:
    check_windows(windows)
    if head_chunk < 1:
        raise InputError(f"head_chunk must be at least 1, got {head_chunk}")
    if vocab_chunk < 1:
        raise InputError(f"vocab_chunk must be at least 1, got {vocab_chunk}")
    lay = layout_of(model)
    check_token_ids(windows, embedding_rows(lay.embedding), f"the embedding {lay.embedding_name}")
    sums: dict[tuple[str, str], torch.Tensor] = {}
    routed: dict[tuple[str, str], int] = {}  # routed experts' linears: rows (tokens) seen
    handles = _hook_linear_outputs(lay, sums, routed)
    scale = float(getattr(lay.embedding, "embed_scale", 1.0))
    emb_key = (lay.embedding_name, "lookup")
    ntok = 0
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)  # gradients w.r.t. activations only, never weights
    try:
        with place.residency(model, lay.blocks) as res:
            head = _Head(model, lay, final_logit_cap(model), head_chunk, vocab_chunk, place)
            for sl in tqdm(window_batches(len(windows), batch_size), desc="fisher", disable=not progress,
                           leave=False):
                ids = place.to_device(windows[sl])
                g_emb = _fisher_batch(model, lay, ids, head, res)
                _accumulate(sums, emb_key, g_emb)
                ntok += ids.numel()
            sums[(lay.lm_head_name, "linear")] = head.grad_sq
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
    out = {k: (v / (routed[k] if k in routed else ntok)).cpu() for k, v in sums.items()}
    for (name, role), n in routed.items():  # an expert no token was routed to: no gradient seen
        if n == 0:
            out[(name, role)] = torch.zeros(int(model.get_parameter(name).shape[0]))
    # y = scale·E[token]: the gradient w.r.t. the stored row is scale·g.
    out[emb_key] = out[emb_key] * scale**2
    for (name, role), v in out.items():
        require_finite(v, f"the Fisher statistics of {name} ({role})")
    return out


def _accumulate(sums: dict[tuple[str, str], torch.Tensor], key: tuple[str, str], g: torch.Tensor) -> None:
    sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
    sums[key] = sums[key] + sq if key in sums else sq


def _hook_linear_outputs(lay: Layout, sums: dict[tuple[str, str], torch.Tensor],
                         routed: dict[tuple[str, str], int]) -> list[Any]:
    """Forward hooks that square the gradient of every block linear's output into ``sums``.

    A hook only fires for outputs that require grad, i.e. in the recomputation with autograd.  A routed
    expert's linear (:mod:`bitalloc.models.experts`) sees only its tokens; its output gradient carries the
    routing weight p, which is divided out (its Hessian carries p² instead), and ``routed`` counts its rows so
    that its mean is over the routed tokens: ``½ Σ_j E_routed[g_j²] · (ΔW H ΔWᵀ)_jj`` then estimates the loss."""

    def on_output(key: tuple[str, str], owner: Any):
        def fhook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if not out.requires_grad:
                return
            p = None if owner is None else owner.routing_weight
            if p is None:
                out.register_hook(lambda g: _accumulate(sums, key, g))
                return
            routed[key] = routed.get(key, 0) + int(p.numel())
            w = torch.where(p > 0, 1.0 / p.float(), torch.zeros_like(p, dtype=torch.float32)).reshape(-1, 1)
            out.register_hook(lambda g: _accumulate(sums, key, g.float() * w))

        return fhook

    handles = []
    for b in range(len(lay.blocks)):
        for lin in lay.spec.linears:
            key = (lay.tensor_name(b, lin), "linear")
            owner = routed_owner(lay.blocks[b], lin)
            if owner is not None:
                routed.setdefault(key, 0)
            handles.append(lay.linear(b, lin).register_forward_hook(on_output(key, owner)))
    return handles


def _checkpoint_every(n: int) -> int:
    """Block inputs kept per forward: every k-th, k = ceil(sqrt(n)) (about 2·sqrt(n) alive at once)."""
    return max(1, math.ceil(math.sqrt(n)))


def _block_inputs(
    model: nn.Module, lay: Layout, emb: torch.Tensor, every: int
) -> tuple[dict[int, torch.Tensor], list[dict[str, Any]], torch.Tensor]:
    """One forward without autograd: the inputs of blocks ``0, every, 2·every, ...``, every block's call
    arguments, and the final-norm input."""
    n = len(lay.blocks)
    inputs: dict[int, torch.Tensor] = {}
    kwargs: list[dict[str, Any]] = [{} for _ in range(n)]
    seen: list[int] = []
    final: list[torch.Tensor] = []

    def pre(i: int):
        def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
            if i % every == 0:
                inputs[i] = (args[0] if args else kw["hidden_states"]).detach()
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            seen.append(i)

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
    if len(seen) != n or len(final) != 1:
        raise NumericsError(f"the Fisher pass saw {len(seen)} of {n} blocks and {len(final)} final norms")
    return inputs, kwargs, final[0]


def final_logit_cap(model: nn.Module) -> float | None:
    """The model's final logit soft cap (Gemma 2's ``final_logit_softcapping``: logits = cap·tanh(z/cap)), or
    None."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    cap = getattr(cfg, "final_logit_softcapping", None)
    return float(cap) if cap else None


def head_logits(
    h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of the vocabulary slice ``w`` (rows) for final-norm outputs ``h`` (float32), and the derivative
    of the soft-capped logits w.r.t. the raw ones (None without a soft cap)."""
    z = h @ w.float().T
    if bias is not None:
        z = z + bias.float()
    if cap is None:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, 1 - t * t


class _Head:
    """``∂ Σ log p(next token) / ∂ final`` and the lm_head output's ``Σ g²``, vocabulary slice by slice."""

    def __init__(self, model: nn.Module, lay: Layout, cap: float | None, chunk: int, vocab_chunk: int,
                 place: Placement) -> None:
        self.model, self.lay, self.cap = model, lay, cap
        self.chunk, self.vocab_chunk, self.place = chunk, vocab_chunk, place
        self.weight = lay.lm_head.weight
        self.bias = getattr(lay.lm_head, "bias", None)
        self.grad_sq = torch.zeros(int(self.weight.shape[0]), dtype=torch.float32, device=place.device)

    def _rows(self, v0: int, v1: int) -> torch.Tensor:
        """Rows ``v0:v1`` of the lm_head weight on the device."""
        return self.place.to_device(self.weight[v0:v1].detach())

    def _slices(self, h: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """``(v0, v1, logits, dcap)`` per vocabulary slice; each weight slice is released after use."""
        vocab = int(self.weight.shape[0])
        for v0 in range(0, vocab, self.vocab_chunk):
            v1 = min(vocab, v0 + self.vocab_chunk)
            b = None if self.bias is None else self.place.to_device(self.bias[v0:v1])
            z, dcap = head_logits(h, self._rows(v0, v1), b, self.cap)
            yield v0, v1, z, dcap
            release_rows(self.model, self.lay.lm_head_name, slice(v0, v1))

    def _grad_h(self, h: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``∂ ll / ∂ h`` for final-norm outputs ``h`` (float32, rows = positions) and the log-likelihood ll."""
        n, dev = h.shape[0], h.device
        rows = torch.arange(n, device=dev)
        m = torch.full((n,), -math.inf, device=dev)
        s = torch.zeros(n, device=dev)
        tl = torch.zeros(n, device=dev)
        for v0, v1, z, _ in self._slices(h):  # pass 1: online logsumexp and the target logits
            m_new = torch.maximum(m, z.max(1).values)
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            m = m_new
            hit = (tgt >= v0) & (tgt < v1)
            tl[hit] = z[rows[hit], tgt[hit] - v0]
        lse = m + torch.log(s)
        gh = torch.zeros_like(h)
        for v0, v1, z, dcap in self._slices(h):  # pass 2: d ll / d logits = onehot - softmax
            g = torch.exp(z - lse[:, None]).neg_()
            hit = (tgt >= v0) & (tgt < v1)
            g[rows[hit], tgt[hit] - v0] += 1
            if dcap is not None:
                g = g * dcap
            self.grad_sq[v0:v1] += g.pow(2).sum(0)
            gh.addmm_(g, self._rows(v0, v1).float())
        return gh, float((tl - lse).sum())

    def grad(self, final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``∂ Σ log p(next token) / ∂ final`` (the final-norm input), ``chunk`` positions at a time."""
        bsz, ctx, hidden = final.shape
        x_all = final[:, :-1].reshape(-1, hidden)
        tgt = ids[:, 1:].reshape(-1)
        grad = torch.zeros(bsz * (ctx - 1), hidden, dtype=final.dtype, device=final.device)
        total = 0.0
        for a in range(0, x_all.shape[0], self.chunk):
            x = x_all[a : a + self.chunk].detach().requires_grad_(True)
            h = self.lay.final_norm(x)
            gh, ll = self._grad_h(h.detach().float(), tgt[a : a + self.chunk])
            total += ll
            h.backward(gh.to(h.dtype))
            grad[a : a + self.chunk] = x.grad
        if not math.isfinite(total):
            raise NumericsError("non-finite values (NaN/Inf) in the log-likelihood of the calibration windows "
                                "(fp model)")
        out = torch.zeros_like(final)
        out[:, :-1] = grad.reshape(bsz, ctx - 1, hidden)
        return out


def _fisher_batch(model: nn.Module, lay: Layout, ids: torch.Tensor, head: _Head, res: Residency) -> torch.Tensor:
    """Backpropagate the summed log-likelihood of ``ids`` block by block; returns the embedding-output gradient.
    An offloaded block stays on the device (``res``) through its recomputation and backward."""
    emb = lay.embedding(ids).detach()
    n = len(lay.blocks)
    every = _checkpoint_every(n)
    checkpoints, kwargs, final = _block_inputs(model, lay, emb, every)
    with torch.enable_grad():
        head.place.release()
        g = head.grad(final, ids)
        del final
        head.place.release()
        for start in reversed(range(0, n, every)):
            xs = [checkpoints.pop(start)]
            with torch.no_grad():  # the segment's block inputs, recomputed from its checkpoint
                for j in range(start, min(n, start + every) - 1):
                    out = lay.blocks[j](xs[-1], **kwargs[j])
                    xs.append(out[0] if isinstance(out, tuple) else out)
            for i in reversed(range(start, start + len(xs))):
                x = xs.pop().requires_grad_(True)
                with res.holding(lay.blocks[i]):  # the backward reads the block's weights too
                    out = lay.blocks[i](x, **kwargs[i])
                    y = out[0] if isinstance(out, tuple) else out
                    torch.autograd.backward(y, g)
                g = x.grad
                del x, y, out
                head.place.release()
        emb.requires_grad_(True)
        x0 = block0_inputs(model, lay, inputs_embeds=emb)
        torch.autograd.backward(x0, g)
    return emb.grad
