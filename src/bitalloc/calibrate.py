"""Calibration statistics from text, with bounded memory.

* :func:`fisher_pass` — one forward+backward of the fp model per batch of windows; hooks square the gradient
  of the summed log-likelihood w.r.t. every linear output, the embedding output and the logits, and keep
  only ``O(out)`` sums per tensor role.
* :class:`BlockRunner` — the hidden states of every window at the input of the current block (n·ctx·hidden
  floats), the per-block call arguments (masks, rotary tables) captured once, and ``collect`` / ``advance``:
  input Hessians ``H = E[xxᵀ]`` of chosen linear groups, and the step to the next block.
* :func:`stream_blocks` — for each block ``{tensor: TensorStats}`` from the fp model, then the embedding and
  lm_head (tied: one tensor, two roles); memory holds one block's statistics at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

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


def _finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericsError(f"non-finite values (NaN/Inf) in {what}")


# --------------------------------------------------------------------------------------------- Fisher
def fisher_pass(
    model: nn.Module, view: Any, windows: torch.Tensor, batch_size: int = 2, progress: bool = True
) -> FisherStats:
    """``E[(∂ Σ log p(next token) / ∂ y)²]`` per output channel of every linear, the embedding, the logits.

    The log-likelihood of a window is summed over its positions; squares are averaged over positions, so
    ``½ Σ_j grad_sq_j E[Δy_j²]`` estimates the increase of the mean per-token loss.  Weights get no grad.
    """
    _check_windows(windows)
    lay = layout_of(model)
    sums: dict[tuple[str, str], torch.Tensor] = {}

    def acc(key: tuple[str, str]):
        def hook(g: torch.Tensor) -> None:
            sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
            sums[key] = sums[key] + sq if key in sums else sq

        return hook

    def on_output(key: tuple[str, str]):
        def fhook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(acc(key))

        return fhook

    handles = []
    for b in range(len(lay.blocks)):
        for lin in lay.spec.linears:
            key = (lay.tensor_name(b, lin), "linear")
            handles.append(lay.linear(b, lin).register_forward_hook(on_output(key)))
    handles.append(lay.lm_head.register_forward_hook(on_output((lay.lm_head_name, "linear"))))
    scale = float(getattr(lay.embedding, "embed_scale", 1.0))
    emb_key = (lay.embedding_name, "lookup")
    ntok = 0
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)  # gradients w.r.t. activations only, never weights
    try:
        with torch.enable_grad():
            for sl in tqdm(_batches(len(windows), batch_size), desc="fisher", disable=not progress, leave=False):
                ids = windows[sl]
                emb = lay.embedding(ids).detach().requires_grad_(True)
                emb.register_hook(acc(emb_key))
                logits = model(inputs_embeds=emb, use_cache=False).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                ll = logp[:, :-1].gather(-1, ids[:, 1:, None]).sum()
                _finite(ll.detach(), "the log-likelihood of the calibration windows (fp model)")
                ll.backward()
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
) -> Iterator[dict[str, TensorStats]]:
    """Per block ``{tensor: TensorStats}`` of the fp model (one forward per block), then the head tensors."""
    runner = BlockRunner(model, windows, batch_size)
    fisher = fisher or {}
    ntok = runner.windows.numel()
    nblocks = len(runner.layout.blocks)
    for _ in tqdm(range(nblocks), desc="calibrate", disable=not progress, leave=False):
        hs = runner.collect(advance=True)
        yield {
            name: TensorStats(roles=(LinearStats(hessian=h, ntokens=ntok, grad_sq=fisher.get((name, "linear"))),))
            for name, h in hs.items()
        }
    yield head_stats(runner, fisher)
