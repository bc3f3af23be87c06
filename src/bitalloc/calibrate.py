"""Calibration statistics from text, with bounded memory.

* :func:`fisher_pass` — per batch of windows, the gradient of the summed log-likelihood w.r.t. every linear
  output, the embedding output and the logits, squared into ``O(out)`` sums per tensor role; blocks are
  recomputed one at a time for the backward (only block inputs are kept) and the head runs over chunks of
  positions, so neither all activations nor the full (positions x vocab) logits ever exist at once.
* :class:`BlockRunner` — the hidden states of every window at the input of the current block (n·ctx·hidden
  floats), the per-block call arguments (masks, rotary tables) captured once, and ``collect`` / ``advance``:
  input Hessians ``H = E[xxᵀ]`` of chosen linear groups, and the step to the next block.
* :func:`stream_blocks` — for each block ``{tensor: TensorStats}`` from the fp model, then the embedding and
  lm_head (tied: one tensor, two roles); memory holds one block's statistics at a time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError, NumericsError
from .models.archs import ArchSpec, arch_for
from .stats import LinearStats, LookupStats, TensorStats

log = logging.getLogger(__name__)

FisherStats = dict[tuple[str, str], torch.Tensor]
"""``(tensor name, role) -> E[g²]``; role is ``"linear"`` (per output channel) or ``"lookup"`` (per hidden)."""


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


@dataclass(frozen=True, eq=False)
class Layout:
    """The modules of a model that calibration hooks, with the tensor names the rest of bitalloc uses."""

    spec: ArchSpec
    blocks: tuple[nn.Module, ...]
    block_paths: tuple[str, ...]
    embedding: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    tied: bool

    @property
    def embedding_name(self) -> str:
        return f"{self.spec.embedding}.weight"

    @property
    def lm_head_name(self) -> str:
        """The tensor that plays the output-projection role (the embedding itself when tied)."""
        return self.embedding_name if self.tied else f"{self.spec.lm_head}.weight"

    def tensor_name(self, block: int, linear: str) -> str:
        return f"{self.block_paths[block]}.{linear}.weight"

    def block_groups(self, block: int) -> list[list[str]]:
        """Tensor names of block ``block`` in sequential groups (one shared input per group)."""
        return [[self.tensor_name(block, lin) for lin in g] for g in self.spec.groups]

    def linear(self, block: int, linear: str) -> nn.Module:
        return self.blocks[block].get_submodule(linear)


def layout_of(model: nn.Module) -> Layout:
    """Resolve the architecture table row of ``model`` to its modules (InputError if it does not match)."""
    spec = arch_for(model.config)
    try:
        blocks = model.get_submodule(spec.blocks)
        emb = model.get_submodule(spec.embedding)
        norm = model.get_submodule(spec.final_norm)
        head = model.get_submodule(spec.lm_head)
    except AttributeError as e:
        raise InputError(f"the model does not match the {spec.name} layout: {e}") from e
    n = len(blocks)
    return Layout(
        spec=spec,
        blocks=tuple(blocks),
        block_paths=tuple(f"{spec.blocks}.{i}" for i in range(n)),
        embedding=emb,
        final_norm=norm,
        lm_head=head,
        tied=head.weight is emb.weight,
    )


def _batches(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise InputError(f"calibration windows must be a non-empty (n, ctx>=2) tensor, got {tuple(windows.shape)}")


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed mid-size tensors (a few MB: one block's activations, head chunks) in its heap, so
    fragmentation alone roughly doubled the peak RSS of the Fisher pass on SmolLM2; trimming after each
    block keeps the resident set near the live tensors."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericsError(f"non-finite values (NaN/Inf) in {what}")


# --------------------------------------------------------------------------------------------- Fisher
#: positions whose (positions x vocab) logits exist at once in the Fisher head pass
HEAD_CHUNK = 128


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
    _check_windows(windows)
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
        for sl in tqdm(_batches(len(windows), batch_size), desc="fisher", disable=not progress, leave=False):
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
        _finite(v, f"the Fisher statistics of {name} ({role})")
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
        raise _Stop

    hs = [blk.register_forward_pre_hook(pre(i), with_kwargs=True) for i, blk in enumerate(lay.blocks)]
    hs.append(lay.final_norm.register_forward_pre_hook(at_norm))
    try:
        with torch.no_grad():
            model(inputs_embeds=emb, use_cache=False)
    except _Stop:
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
        raise _Stop

    h = lay.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(inputs_embeds=emb, use_cache=False)
    except _Stop:
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


# ------------------------------------------------------------------------------------- block streaming
class BlockRunner:
    """Hidden states of all windows at the current block's input, and Hessians of its linear groups."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> None:
        _check_windows(windows)
        self.model = model
        self.layout = layout_of(model)
        self.windows = windows
        self.batches = _batches(len(windows), batch_size)
        self.block = 0
        self.kwargs = self._capture_kwargs()
        self.hidden = self._embed()

    def _capture_kwargs(self) -> list[dict[str, Any]]:
        """The keyword arguments the model passes to each block (masks, rotary tables), from one window."""
        captured: list[dict[str, Any]] = [{} for _ in self.layout.blocks]
        last = len(self.layout.blocks) - 1

        def pre(i: int):
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if i == last:
                    raise _Stop

            return hook

        hs = [blk.register_forward_pre_hook(pre(i), with_kwargs=True) for i, blk in enumerate(self.layout.blocks)]
        try:
            with torch.no_grad():
                self.model(self.windows[:1], use_cache=False)
        except _Stop:
            pass
        finally:
            for h in hs:
                h.remove()
        return captured

    def _embed(self) -> torch.Tensor:
        """Inputs of block 0 for every window (whatever the model does before it, e.g. embedding scale)."""
        parts: list[torch.Tensor] = []

        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            parts.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise _Stop

        h = self.layout.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for sl in self.batches:
                    try:
                        self.model(self.windows[sl], use_cache=False)
                    except _Stop:
                        pass
        finally:
            h.remove()
        hidden = torch.cat(parts)
        _finite(hidden, "the embedding output")
        return hidden

    def _forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self.layout.blocks[i](x, **self.kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    def collect(self, groups: list[int] | None = None, advance: bool = False) -> dict[str, torch.Tensor]:
        """``H = E[xxᵀ]`` (float32) of the current block's groups ``groups`` (default all), by tensor name.

        Every tensor of a group gets the same H object.  With ``advance`` the block's outputs replace the
        hidden states (one pass for both); otherwise the pass stops after the last requested group.
        """
        i, lay = self.block, self.layout
        gidx = list(range(len(lay.spec.groups))) if groups is None else sorted(groups)
        sums: dict[int, torch.Tensor] = {}
        count = 0
        seen: set[int] = set()

        def pre(g: int):
            first = lay.tensor_name(i, lay.spec.groups[g][0])

            def hook(_m: nn.Module, args: tuple) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                _finite(x, f"the calibration activations at the input of {first}")
                sums[g] = sums[g] + x.T @ x if g in sums else x.T @ x
                seen.add(g)
                if not advance and len(seen) == len(gidx):
                    raise _Stop

            return hook

        hs = [lay.linear(i, lay.spec.groups[g][0]).register_forward_pre_hook(pre(g)) for g in gidx]
        outs: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for sl in self.batches:
                    seen.clear()
                    x = self.hidden[sl]
                    try:
                        y = self._forward(i, x)
                        if advance:
                            _finite(y, f"the output of block {i}")
                            outs.append(y)
                    except _Stop:
                        pass
                    count += x.shape[0] * x.shape[1]
        finally:
            for h in hs:
                h.remove()
        if advance:
            self.hidden = torch.cat(outs)
            self.block += 1
        release_free_memory()
        result: dict[str, torch.Tensor] = {}
        for g in gidx:
            if g not in sums:
                raise NumericsError(f"block {i}: group {lay.spec.groups[g]} received no input during calibration")
            h = sums[g] / count
            name0 = lay.tensor_name(i, lay.spec.groups[g][0])
            _finite(h, f"the Hessian of {name0}")
            for lin in lay.spec.groups[g]:
                result[lay.tensor_name(i, lin)] = h
        return result

    def advance(self) -> None:
        """Run the current block on every window and move to the next block."""
        with torch.no_grad():
            self.hidden = torch.cat([self._forward(self.block, self.hidden[sl]) for sl in self.batches])
        _finite(self.hidden, f"the output of block {self.block}")
        self.block += 1
        release_free_memory()

    @property
    def done(self) -> bool:
        return self.block >= len(self.layout.blocks)

    def head_hessian(self) -> torch.Tensor:
        """``E[xxᵀ]`` over the final-norm outputs (the lm_head input), after the last block."""
        if not self.done:
            raise RuntimeError("head_hessian needs every block to have run")
        total: torch.Tensor | None = None
        count = 0
        with torch.no_grad():
            for sl in self.batches:
                x = self.layout.final_norm(self.hidden[sl]).reshape(-1, self.hidden.shape[-1]).float()
                total = x.T @ x if total is None else total + x.T @ x
                count += x.shape[0]
        h = total / count
        _finite(h, f"the Hessian of {self.layout.lm_head_name}")
        return h

    def token_freq(self) -> torch.Tensor:
        vocab = int(self.layout.embedding.weight.shape[0])
        ids = self.windows.reshape(-1)
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise InputError(f"calibration token ids fall outside the vocabulary (0..{vocab - 1})")
        return torch.bincount(ids, minlength=vocab).float() / ids.numel()


def head_stats(runner: BlockRunner, fisher: FisherStats | None) -> dict[str, TensorStats]:
    """Statistics of the embedding and lm_head (one tensor with two roles when they are tied)."""
    lay = runner.layout
    fisher = fisher or {}
    lookup = LookupStats(
        token_freq=runner.token_freq(),
        ntokens=runner.windows.numel(),
        grad_sq=fisher.get((lay.embedding_name, "lookup")),
    )
    proj = LinearStats(
        hessian=runner.head_hessian(),
        ntokens=runner.windows.numel(),
        grad_sq=fisher.get((lay.lm_head_name, "linear")),
    )
    if lay.tied:
        return {lay.embedding_name: TensorStats(roles=(lookup, proj))}
    return {lay.embedding_name: TensorStats(roles=(lookup,)), lay.lm_head_name: TensorStats(roles=(proj,))}


def stream_blocks(
    model: nn.Module,
    view: Any,
    windows: torch.Tensor,
    *,
    fisher: FisherStats | None = None,
    batch_size: int = 8,
    progress: bool = True,
    start_block: int = 0,
    start_hidden: torch.Tensor | None = None,
    after_block: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[dict[str, TensorStats]]:
    """Per block ``{tensor: TensorStats}`` of the fp model (one forward per block), then the head tensors.

    Resuming (:mod:`bitalloc.resume`): ``start_block`` > 0 with ``start_hidden``, the saved inputs of that block,
    skips the blocks before it; ``after_block(b, hidden)`` runs when the consumer has finished block ``b``'s
    statistics (asks for the next item), with the inputs of block ``b + 1``.
    """
    runner = BlockRunner(model, windows, batch_size)
    _resume_runner(runner, start_block, start_hidden)
    fisher = fisher or {}
    ntok = runner.windows.numel()
    nblocks = len(runner.layout.blocks)
    for b in tqdm(range(start_block, nblocks), desc="calibrate", disable=not progress, leave=False,
                  initial=start_block, total=nblocks):
        hs = runner.collect(advance=True)
        yield {
            name: TensorStats(roles=(LinearStats(hessian=h, ntokens=ntok, grad_sq=fisher.get((name, "linear"))),))
            for name, h in hs.items()
        }
        if after_block is not None:
            after_block(b, runner.hidden)
    yield head_stats(runner, fisher)


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
    runner.hidden = hidden
    runner.block = block
