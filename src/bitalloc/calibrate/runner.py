"""The block runner: every calibration window's hidden states at the current block, Hessians of its linear groups
and the activation noise of their inputs, on the run's placement (see :mod:`bitalloc.calibrate`)."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..activations import get_rounding, gram_noise, gram_pays, output_noise, residual_gram
from ..data import check_token_ids, embedding_rows
from ..errors import InputError, NumericsError
from ..layout import StopForward, check_windows, layout_of, require_finite, window_batches
from ..models.experts import routed_owner
from ..models.spill import SpillFile, release_rows, scratch_tensor, spill_directory
from ..placement import Placement, cpu_copy
from ..timing import StageTimer, timed

log = logging.getLogger(__name__)

NoiseStats = dict[str, dict[str, torch.Tensor]]
"""``tensor name -> activation rounding -> E[((x − R(x)) · w_j)²]`` per output channel."""

class BlockRunner:
    """Hidden states of all windows at the current block's input, and Hessians of its linear groups.

    Blocks run on ``batch_size`` windows at a time, fewer when that would exceed ``max_positions`` positions
    (at least one window): the activations of one forward stay bounded whatever the batch size asked for.
    Hessians are sums over the batches, in a fixed order, so results are deterministic.

    With a spilled model (:mod:`bitalloc.models.spill`) the hidden states live in a scratch spill file of
    their own (a new one per block, so a consumer holding older states keeps them), in the same directory,
    and each batch's slice is released after it is read or written: only the running batch's states are
    resident.

    The runner owns the run's ``placement`` (default: the CPU, today's behaviour): its device computes every
    forward and Hessian, the hidden states live there (in CPU memory when blocks are offloaded, each batch moved
    to the device), and the model's weights are on the device from construction until :meth:`close` (a ``with``
    block; see :class:`~bitalloc.placement.Residency`: ``write_back`` for a stage that changes weights).
    ``max_positions`` overrides the placement's.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8, *,
                 max_positions: int | None = None, placement: Placement | None = None,
                 timer: StageTimer | None = None, write_back: bool = False) -> None:
        check_windows(windows)
        self.placement = placement if placement is not None else Placement()
        max_positions = self.placement.max_positions if max_positions is None else max_positions
        if max_positions < 1:
            raise InputError(f"max_positions must be at least 1, got {max_positions}")
        self.model = model
        self.timer = timer
        self.layout = layout_of(model)
        check_token_ids(windows, embedding_rows(self.layout.embedding), f"the embedding {self.layout.embedding_name}")
        self.windows = windows
        self.batches = window_batches(len(windows), max(1, min(batch_size, max_positions // windows.shape[1])))
        self.block = 0
        self._spill_dir = spill_directory(model)
        self._files: list[SpillFile] = []  # scratch files of the current and the next hidden states (spilled models)
        self.residency = self.placement.residency(model, self.layout.blocks, write_back=write_back).__enter__()
        try:
            self.kwargs = self._capture_kwargs()
            self.hidden = self._embed()
        except BaseException:
            self.close()
            raise
        self.tokens: dict[str, int] = {}  # tokens seen by each tensor in the last collect (routed experts: fewer)

    def close(self) -> None:
        """Put the model's weights back in CPU memory (a no-op on the CPU); the runner is done."""
        self.residency.close()

    def __enter__(self) -> "BlockRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def hidden_cpu(self) -> torch.Tensor:
        """The current hidden states in CPU memory (the states themselves on the CPU): what checkpoints save."""
        return cpu_copy(self.hidden)

    def _hold(self, i: int) -> None:
        """Keep block ``i`` on the device (offloaded blocks), and only it."""
        for j, blk in enumerate(self.layout.blocks):
            if j != i:
                self.residency.drop(blk)
        if i < len(self.layout.blocks):
            self.residency.hold(self.layout.blocks[i])

    def _new_states(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An (n, ctx, hidden) buffer: on the device (unless offloading), a scratch spill file for a spilled
        model, else ordinary memory."""
        where = self.placement.states_device
        if where.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=where)
        if self._spill_dir is None:
            return torch.empty(shape, dtype=dtype)
        t, f = scratch_tensor(shape, dtype, self._spill_dir)
        self._files.append(f)
        return t

    def _adopt(self, t: torch.Tensor) -> torch.Tensor:
        """Make ``t`` (from :meth:`_new_states`) the current states' buffer (older scratch files are let go);
        returns it."""
        self._files = [f for f in self._files if f.holds(t)]
        return t

    def _release(self, t: torch.Tensor) -> None:
        """Drop the resident pages of ``t`` when it lies in a scratch file of this runner (else a no-op)."""
        for f in self._files:
            f.release_tensor(t)

    def _capture_kwargs(self) -> list[dict[str, Any]]:
        """The keyword arguments the model passes to each block (masks, rotary tables), from one window."""
        captured: list[dict[str, Any]] = [{} for _ in self.layout.blocks]
        last = len(self.layout.blocks) - 1

        def pre(i: int):
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if i == last:
                    raise StopForward

            return hook

        # prepended: the stop comes before an offloaded block would move to the device
        hs = [blk.register_forward_pre_hook(pre(i), with_kwargs=True, prepend=True)
              for i, blk in enumerate(self.layout.blocks)]
        try:
            with torch.no_grad():
                self.model(self.placement.to_device(self.windows[:1]), use_cache=False)
        except StopForward:
            pass
        finally:
            for h in hs:
                h.remove()
        return captured

    def _embed(self) -> torch.Tensor:
        """Inputs of block 0 for every window (whatever the model does before it, e.g. embedding scale)."""
        out: list[torch.Tensor] = []  # one tensor, filled batch by batch (no list + torch.cat copy)
        where: list[slice] = []

        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["hidden_states"]).detach()
            if not out:
                out.append(self._new_states((len(self.windows), *x.shape[1:]), x.dtype))
            out[0][where[0]] = x
            self._release(out[0][where[0]])
            raise StopForward

        h = self.layout.blocks[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
        try:
            with torch.no_grad(), timed(self.timer, "calibrate.forward"):
                for sl in self.batches:
                    where[:] = [sl]
                    try:
                        self.model(self.placement.to_device(self.windows[sl]), use_cache=False)
                    except StopForward:
                        pass
        finally:
            h.remove()
        hidden = self._adopt(out[0])
        self._require_finite(hidden, "the embedding output")
        self.placement.release()
        return hidden

    def _require_finite(self, t: torch.Tensor, what: str) -> None:
        for sl in self.batches:
            require_finite(t[sl], what)
            self._release(t[sl])

    def _forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on a batch of states ``x`` (moved to the device)."""
        with timed(self.timer, "calibrate.forward"):
            out = self.layout.blocks[i](self.placement.to_device(x), **self.kwargs[i])
            return out[0] if isinstance(out, tuple) else out

    def collect(self, groups: list[int] | None = None, advance: bool = False,
                first: int | None = None) -> dict[str, torch.Tensor]:
        """``H = E[xxᵀ]`` (float32) of the current block's groups ``groups`` (default all), by tensor name.

        Every tensor of a group gets the same H object.  With ``advance`` the block's outputs replace the
        hidden states (one pass for both); otherwise the pass stops after the last requested group.  ``first``:
        only the first that many windows feed the statistics (not with ``advance``, which needs every window).
        """
        return self.collect_with_noise(groups, advance, first=first)[0]

    def collect_with_noise(self, groups: list[int] | None = None, advance: bool = False,
                           roundings: Sequence[str] = (), first: int | None = None
                           ) -> tuple[dict[str, torch.Tensor], NoiseStats]:
        """:meth:`collect`, and per tensor and activation rounding R (names from :mod:`bitalloc.activations`)
        ``E[((x − R(x)) · w_j)²]`` per output channel (float64), for the tensors whose inputs R can round.

        A routed expert's linears (:mod:`bitalloc.models.experts`) see only the tokens routed to the expert and
        weight each by its routing weight p: ``H = Σ_routed p² x xᵀ / all tokens`` (noise likewise); an expert
        no token reached gets a zero Hessian.  ``self.tokens`` then holds each tensor's token count (routed
        tokens for an expert, every token otherwise)."""
        i, lay = self.block, self.layout
        if first is not None and (advance or not 0 < first <= int(self.hidden.shape[0])):
            raise ValueError(f"collect: first={first} needs 0 < first <= {int(self.hidden.shape[0])} windows and "
                             "no advance")
        batches = self.batches if first is None else \
            [slice(sl.start, min(sl.stop, first)) for sl in self.batches if sl.start < first]
        gidx = list(range(len(lay.spec.groups))) if groups is None else sorted(groups)
        sums: dict[int, torch.Tensor] = {}
        noise: dict[str, dict[str, torch.Tensor]] = {}
        grams: dict[tuple[int, str], torch.Tensor] = {}  # (group, rounding): Σ d dᵀ where that is cheaper
        count = 0
        seen: set[int] = set()
        rounders = [get_rounding(r) for r in roundings]

        tokens: dict[int, int] = {}  # rows seen per group (routed experts: the tokens routed to them)
        owners = {g: routed_owner(lay.blocks[i], lay.spec.groups[g][0]) for g in gidx}
        outputs = {g: sum(int(lay.linear(i, lin).weight.shape[0]) for lin in lay.spec.groups[g]) for g in gidx}
        tokens_total = sum(sl.stop - sl.start for sl in batches) * int(self.hidden.shape[1])

        def pre(g: int):
            first = lay.tensor_name(i, lay.spec.groups[g][0])
            owner = owners[g]

            def hook(_m: nn.Module, args: tuple) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                require_finite(x, f"the calibration activations at the input of {first}")
                p = None if owner is None else owner.routing_weight
                with timed(self.timer, "calibrate.hessians"):
                    xw = x if p is None else x * p.float().reshape(-1, 1)  # routed expert: Σ p² x xᵀ
                    sums[g] = sums[g] + xw.T @ xw if g in sums else xw.T @ xw
                tokens[g] = tokens.get(g, 0) + x.shape[0]
                applied = [r for r in rounders if r.applies(x.shape[1])]
                with timed(self.timer, "calibrate.act_noise") if applied else nullcontext():
                    for rnd in applied:
                        d = rnd.residual(x)  # once for the group: q/k/v (gate/up) read the same input
                        if p is not None:
                            d = d * p.float().reshape(-1, 1)
                        if gram_pays(x.shape[1], outputs[g], tokens_total):
                            _accumulate(grams, (g, rnd.name), residual_gram(d))
                            continue
                        for lin in lay.spec.groups[g]:
                            _accumulate(noise.setdefault(lay.tensor_name(i, lin), {}), rnd.name,
                                        output_noise(d, lay.linear(i, lin).weight.detach()))
                seen.add(g)
                if not advance and len(seen) == len(gidx):
                    raise StopForward

            return hook

        self._hold(i)
        hs = [lay.linear(i, lay.spec.groups[g][0]).register_forward_pre_hook(pre(g)) for g in gidx]
        # outputs go straight into one new tensor (a list + torch.cat would hold them twice)
        nxt = self._new_states(tuple(self.hidden.shape), self.hidden.dtype) if advance else None
        try:
            with torch.no_grad():
                for sl in batches:
                    seen.clear()
                    x = self.hidden[sl]
                    try:
                        y = self._forward(i, x)
                        if nxt is not None:
                            require_finite(y, f"the output of block {i}")
                            nxt[sl] = y
                            self._release(nxt[sl])
                        del y
                    except StopForward:
                        pass
                    count += x.shape[0] * x.shape[1]
                    self._release(x)
        finally:
            for h in hs:
                h.remove()
        with timed(self.timer, "calibrate.act_noise") if grams else nullcontext():
            for (g, rname), gram in grams.items():
                for lin in lay.spec.groups[g]:
                    noise.setdefault(lay.tensor_name(i, lin), {})[rname] = gram_noise(
                        gram, lay.linear(i, lin).weight.detach())
        if nxt is not None:
            self.hidden = self._adopt(nxt)
            self.block += 1
            self._hold(self.block)
        self.placement.release()
        result: dict[str, torch.Tensor] = {}
        self.tokens = {}
        for g in gidx:
            name0 = lay.tensor_name(i, lay.spec.groups[g][0])
            if g not in sums:
                if owners[g] is None:
                    raise NumericsError(f"block {i}: group {lay.spec.groups[g]} received no input during calibration")
                width = int(lay.linear(i, lay.spec.groups[g][0]).weight.shape[1])
                dev = self.placement.device
                sums[g] = torch.zeros(width, width, device=dev)  # an expert no calibration token was routed to
                for rnd in (r for r in rounders if r.applies(width)):
                    for lin in lay.spec.groups[g]:
                        rows = int(lay.linear(i, lin).weight.shape[0])
                        noise.setdefault(lay.tensor_name(i, lin), {})[rnd.name] = torch.zeros(
                            rows, dtype=torch.float64, device=dev)
            h = sums[g] / count  # every Hessian is normalised by all tokens (routed experts: Σ p² x xᵀ / all)
            require_finite(h, f"the Hessian of {name0}")
            for lin in lay.spec.groups[g]:
                result[lay.tensor_name(i, lin)] = h
                self.tokens[lay.tensor_name(i, lin)] = tokens.get(g, 0) if owners[g] is not None else count
        return result, {name: _mean(per, count, name) for name, per in noise.items()}

    def advance(self) -> None:
        """Run the current block on every window and move to the next block."""
        nxt = self._new_states(tuple(self.hidden.shape), self.hidden.dtype)
        self._hold(self.block)
        with torch.no_grad():
            for sl in self.batches:
                nxt[sl] = self._forward(self.block, self.hidden[sl])
                self._release(self.hidden[sl])
                self._release(nxt[sl])
        self._require_finite(nxt, f"the output of block {self.block}")
        self.hidden = self._adopt(nxt)
        self.block += 1
        self._hold(self.block)
        self.placement.release()

    @property
    def done(self) -> bool:
        return self.block >= len(self.layout.blocks)

    def head_hessian(self) -> torch.Tensor:
        """``E[xxᵀ]`` over the final-norm outputs (the lm_head input), after the last block."""
        return self.head_with_noise()[0]

    def head_with_noise(self, roundings: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`head_hessian`, and the lm_head's activation noise per rounding (as :meth:`collect_with_noise`;
        the weight is read ``VOCAB_CHUNK`` rows at a time, each slice released after use)."""
        if not self.done:
            raise RuntimeError("head_hessian needs every block to have run")
        lay = self.layout
        rounders = [r for r in map(get_rounding, roundings) if r.applies(int(self.hidden.shape[-1]))]
        weight = lay.lm_head.weight
        total: torch.Tensor | None = None
        noise: dict[str, torch.Tensor] = {}
        grams: dict[str, torch.Tensor] = {}  # rounding: Σ d dᵀ, where that is the cheaper way (by_gram)
        count = 0
        tokens = int(self.hidden.shape[0]) * int(self.hidden.shape[1])
        by_gram = gram_pays(int(weight.shape[1]), int(weight.shape[0]), tokens)
        with torch.no_grad():
            for sl in self.batches:
                with timed(self.timer, "calibrate.forward"):
                    x = lay.final_norm(self.placement.to_device(self.hidden[sl]))
                x = x.reshape(-1, self.hidden.shape[-1]).float()
                self._release(self.hidden[sl])
                with timed(self.timer, "calibrate.hessians"):
                    total = x.T @ x if total is None else total + x.T @ x
                count += x.shape[0]
                with timed(self.timer, "calibrate.act_noise") if rounders else nullcontext():
                    for rnd in rounders:
                        d = rnd.residual(x)
                        if by_gram:  # the vocabulary is read once, after the last batch
                            _accumulate(grams, rnd.name, residual_gram(d))
                        else:  # one residual for every vocabulary slice
                            _accumulate(noise, rnd.name, self._head_noise(weight, lambda w: output_noise(d, w)))
        with timed(self.timer, "calibrate.act_noise") if grams else nullcontext():
            for rname, gram in grams.items():
                noise[rname] = self._head_noise(weight, lambda w: gram_noise(gram, w))
        h = total / count
        require_finite(h, f"the Hessian of {lay.lm_head_name}")
        return h, _mean(noise, count, lay.lm_head_name)

    def _head_noise(self, weight: torch.Tensor, per_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``per_rows(rows of the head's weight on the device)`` for every ``vocab_chunk`` rows, joined; each slice
        released after use (a spilled head is read a slice at a time)."""
        parts, rows, step = [], int(weight.shape[0]), self.placement.vocab_chunk
        for v0 in range(0, rows, step):
            v1 = min(v0 + step, rows)
            parts.append(per_rows(self.placement.to_device(weight[v0:v1].detach())))
            release_rows(self.model, self.layout.lm_head_name, slice(v0, v1))
        return torch.cat(parts)

    def token_freq(self) -> torch.Tensor:
        vocab = int(self.layout.embedding.weight.shape[0])
        ids = self.windows.reshape(-1)
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise InputError(f"calibration token ids fall outside the vocabulary (0..{vocab - 1})")
        return torch.bincount(ids, minlength=vocab).float() / ids.numel()


def _accumulate(into: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    into[key] = into[key] + value if key in into else value


def _mean(sums: dict[str, torch.Tensor], count: int, name: str) -> dict[str, torch.Tensor]:
    """Per-rounding noise sums of tensor ``name`` over ``count`` tokens -> means, checked finite."""
    out = {r: v / count for r, v in sums.items()}
    for r, v in out.items():
        require_finite(v, f"the {r} activation noise of {name}")
    return out


__all__ = ["BlockRunner", "NoiseStats"]
