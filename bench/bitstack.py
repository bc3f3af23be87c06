"""A BitStack-style any-size baseline (Wang et al., "BitStack: Any-Size Compression of Large Language Models in
Variable Memory Environments", arXiv 2410.23918, ICLR 2025), written from the paper's description.

What is implemented, per weight ``W`` (rows = outputs, cols = inputs):

* **activation-aware scaling**: ``s_j`` = the L2 norm of input channel ``j`` over the tokens of a calibration
  window, averaged over the windows (:func:`collect_scales`), divided by its mean (a constant factor changes
  nothing but the fp16 range) and rounded to fp16; the decomposition works on ``W · diag(s)`` and the
  assembled weight is divided by ``s`` again.  The paper folds ``s`` into the preceding norm / linear where it
  can; here every stack *stores* its fp16 ``s`` (2 bytes per input channel), counted in its bytes.
* **iterative absolute-value decomposition** (:func:`decompose`): residual ``R_0 = W·diag(s)``; block ``i``
  stores ``sign(R_i)`` (1 bit per weight, zero -> +1, packed 8 to a byte) and the rank-``r`` SVD of ``|R_i|``
  as fp16 ``u = U_r·sqrt(S_r)`` (rows x r) and ``v = V_r·sqrt(S_r)`` (cols x r); ``R_{i+1} = R_i -
  sign(R_i) ⊙ (u vᵀ)`` with the *stored* (fp16) factors.  ``r = 16`` as in the paper, ``n`` blocks per weight.
* **one global stack** (:func:`global_order`): the paper's universal sort.  Every weight loads at least one
  block (the base); then level by level (block 2 of every weight, then block 3, ...) the weights are ranked by
  a score of adding *that* block with every weight at the previous level, lower = first.  The paper's score
  is the calibration perplexity (:func:`ppl_scores`, needs one forward pass per weight and level); the
  cheaper :func:`proxy_scores` (the fall in activation-weighted squared residual per byte, no forward pass)
  is a substitute that the bench names in its JSON when it is used.
* **any budget** (:func:`select`): the largest prefix of the stack whose exact bytes fit -- fixed tensors
  (norms, biases: :attr:`ModelView.fixed_bytes`), every stack's scale vector and blocks, and, with
  ``embedding="fp16"`` (the paper's choice), the embedding / lm_head at 2 bytes per weight.  With
  ``embedding="stack"`` (our default: in bpw over ALL weights a fp16 embedding alone is 3.4 bpw of SmolLM2)
  the embedding (and an untied lm_head) are decomposed and sorted like the linears; a tied embedding is scaled
  by the lm_head's input activations, an untied one by ones (a lookup has no input activations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from bitalloc.errors import BudgetError
from bitalloc.models.view import ModelView

RANK = 16  # the paper's r
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_signs(sign: torch.Tensor) -> torch.Tensor:
    """Pack ``sign < 0`` of every element (row-major) into ``ceil(numel / 8)`` uint8 bytes."""
    bits = (sign.reshape(-1) < 0).to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(-1, 8)
    return (bits * _BITS).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The ±1 float32 matrix of :func:`pack_signs`."""
    bits = (packed.view(-1, 1) & _BITS).ne(0).view(-1)[: shape[0] * shape[1]]
    return (1.0 - 2.0 * bits.float()).view(shape)


@dataclass(frozen=True)
class Block:
    """One residual block: packed signs, fp16 ``u`` (rows x r) and ``v`` (cols x r)."""

    signs: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.signs.numel() + 2 * (self.u.numel() + self.v.numel())


@dataclass(frozen=True)
class WeightStack:
    """The blocks of one weight, best first, and its fp16 activation scale (cols,)."""

    name: str
    shape: tuple[int, int]
    scale: torch.Tensor
    blocks: tuple[Block, ...]
    residual_sq: tuple[float, ...]  # ||R_i||² in the scaled domain after i blocks, i = 0 .. len(blocks)

    def nbytes(self, k: int) -> int:
        """Stored bytes of the first ``k`` blocks (with the scale vector once any block is loaded)."""
        if not 0 <= k <= len(self.blocks):
            raise ValueError(f"{self.name}: {k} blocks asked, {len(self.blocks)} stored")
        return 0 if k == 0 else 2 * self.scale.numel() + sum(b.nbytes for b in self.blocks[:k])

    def weight(self, k: int) -> torch.Tensor:
        """The weight assembled from the first ``k`` blocks (float32)."""
        w = torch.zeros(self.shape)
        for b in self.blocks[:k]:
            w += unpack_signs(b.signs, self.shape) * (b.u.float() @ b.v.float().T)
        return w / self.scale.float()


def block_bytes(shape: tuple[int, int], rank: int = RANK) -> int:
    """Bytes of one block of a ``shape`` weight: packed signs plus two fp16 factors."""
    rows, cols = shape
    r = min(rank, rows, cols)
    return math.ceil(rows * cols / 8) + 2 * r * (rows + cols)


def decompose(name: str, w: torch.Tensor, scale: torch.Tensor, n_blocks: int, rank: int = RANK) -> WeightStack:
    """``n_blocks`` residual blocks of ``w · diag(scale)`` (iterative absolute-value decomposition)."""
    s = scale.detach().to(torch.float16)
    if s.shape != (w.shape[1],) or not bool((s.float() > 0).all()):
        raise ValueError(f"{name}: the scale must be positive, one per input channel")
    res = w.detach().float() * s.float()
    r = min(rank, *w.shape)
    blocks, errs = [], [float((res * res).sum())]
    for _ in range(n_blocks):
        sign = torch.where(res < 0, -1.0, 1.0)
        u_, sv, vh = torch.linalg.svd(res.abs(), full_matrices=False)
        root = sv[:r].sqrt()
        u, v = (u_[:, :r] * root).half(), (vh[:r].T * root).half()
        res = res - sign * (u.float() @ v.float().T)
        blocks.append(Block(pack_signs(sign), u, v))
        errs.append(float((res * res).sum()))
    return WeightStack(name, (int(w.shape[0]), int(w.shape[1])), s, tuple(blocks), tuple(errs))


def stacked_names(view: ModelView, embedding: str) -> list[str]:
    """The weights that get a stack: every quantizable one, or all but embedding/lm_head for ``"fp16"``."""
    if embedding not in ("stack", "fp16"):
        raise ValueError(f"embedding must be 'stack' or 'fp16', got {embedding!r}")
    return [r.name for r in view.quantizable() if embedding == "stack" or r.kind == "linear"]


def other_bytes(view: ModelView, embedding: str) -> int:
    """Bytes stored outside the stacks: fixed tensors, plus fp16 embedding / lm_head when not stacked."""
    kept = set(r.name for r in view.quantizable()) - set(stacked_names(view, embedding))
    return view.fixed_bytes + sum(2 * view.ref(n).numel for n in kept)


@torch.no_grad()
def collect_scales(view: ModelView, windows: torch.Tensor, names: Sequence[str], batch: int = 2
                   ) -> dict[str, torch.Tensor]:
    """Per weight: the mean over windows of each input channel's L2 norm over the window's tokens.

    A tied embedding takes the lm_head's inputs; an untied (lookup-only) embedding gets ones."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        ref = view.ref(name)
        if ref.kind == "embedding" and not view.tied:
            continue
        mod = view.layout.lm_head if ref.kind == "embedding" else view.module(name)

        def hook(_m: torch.nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().float()
            norms = x.reshape(x.shape[0], -1, x.shape[-1]).pow(2).sum(1).sqrt().sum(0)
            sums[name] = sums[name] + norms if name in sums else norms
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for i in range(0, windows.shape[0], batch):
            view.model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name in names:
        s = sums[name] / windows.shape[0] + 1e-3 if name in sums else torch.ones(view.ref(name).shape[1])
        out[name] = s / s.mean()
    return out


def decompose_model(view: ModelView, windows: torch.Tensor, n_blocks: int, rank: int = RANK,
                    embedding: str = "stack") -> dict[str, WeightStack]:
    """A stack for every weight of :func:`stacked_names`, in the view's order."""
    names = stacked_names(view, embedding)
    scales = collect_scales(view, windows, names)
    return {n: decompose(n, view.get_weight(n), scales[n], n_blocks, rank) for n in names}


Score = Callable[[int, Sequence[str]], Mapping[str, float]]  # (level, names) -> score per name, lower first


def global_order(stacks: Mapping[str, WeightStack], score: Score, levels: int | None = None
                 ) -> list[tuple[str, int]]:
    """The universal stack: ``(name, k)`` = "load block ``k`` (1-based) of ``name``".

    First block 1 of every weight (in ``stacks``' order), then for each level ``k = 2 ..`` the weights sorted by
    ``score(k, names)`` (ties: ``stacks``' order).  Only the first ``levels`` levels are listed (default all)."""
    names = list(stacks)
    depth = min(len(s.blocks) for s in stacks.values())
    depth = depth if levels is None else min(depth, levels)
    order = [(n, 1) for n in names] if depth >= 1 else []
    for k in range(2, depth + 1):
        sc = score(k, names)
        order += [(n, k) for _, _, n in sorted((float(sc[n]), i, n) for i, n in enumerate(names))]
    return order


def proxy_scores(stacks: Mapping[str, WeightStack]) -> Score:
    """Cheap substitute for the paper's perplexity score: minus the fall of ``||R||²`` (the residual in the
    activation-scaled domain, a proxy of the output error) that block ``k`` brings, per byte of the block."""
    def score(k: int, names: Sequence[str]) -> dict[str, float]:
        return {n: -(stacks[n].residual_sq[k - 1] - stacks[n].residual_sq[k]) / stacks[n].blocks[k - 1].nbytes
                for n in names}
    return score


@dataclass(frozen=True)
class Selection:
    counts: dict[str, int]  # blocks loaded per stack
    bytes: int  # exact stored bytes of the whole model
    prefix: int  # entries of the global order loaded


def base_bytes(stacks: Mapping[str, WeightStack], other: int) -> int:
    """Bytes of the smallest model: one block of every stack plus everything outside the stacks."""
    return other + sum(s.nbytes(1) for s in stacks.values())


def select(stacks: Mapping[str, WeightStack], order: Sequence[tuple[str, int]], other: int,
           budget_bytes: int) -> Selection:
    """The largest prefix of ``order`` whose model (plus ``other`` bytes) fits ``budget_bytes``."""
    total = other
    counts = {n: 0 for n in stacks}
    prefix = 0
    for n, k in order:
        if k != counts[n] + 1:
            raise ValueError(f"the order loads block {k} of {n} after {counts[n]} blocks")
        add = stacks[n].nbytes(k) - stacks[n].nbytes(k - 1)
        if total + add > budget_bytes:
            break
        total += add
        counts[n] = k
        prefix += 1
    if any(c == 0 for c in counts.values()):
        raise BudgetError(f"{budget_bytes} B is below the smallest BitStack model "
                          f"({base_bytes(stacks, other)} B: one block of every weight)")
    return Selection(counts, total, prefix)


def assemble(stacks: Mapping[str, WeightStack], counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The weights of a selection (float32), by tensor name."""
    return {n: stacks[n].weight(counts[n]) for n in stacks}


def ppl_scores(view: ModelView, stacks: Mapping[str, WeightStack], windows: torch.Tensor, batch: int = 2,
               progress: Callable[[str], None] | None = None) -> Score:
    """The paper's score: calibration perplexity with every stack at ``k - 1`` blocks and one at ``k``.

    Writes the assembled weights into ``view``'s model; the caller restores the fp weights afterwards."""
    @torch.no_grad()
    def ppl() -> float:
        nll, n = 0.0, 0
        for i in range(0, windows.shape[0], batch):
            x = windows[i:i + batch]
            logits = view.model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
        return math.exp(nll / n) if math.isfinite(nll / n) else math.inf

    def score(k: int, names: Sequence[str]) -> dict[str, float]:
        for n in names:
            view.set_weight(n, stacks[n].weight(k - 1))
        out = {}
        for j, n in enumerate(names):
            prev = view.get_weight(n).clone()
            view.set_weight(n, stacks[n].weight(k))
            out[n] = ppl()
            view.set_weight(n, prev)
            if progress is not None:
                progress(f"level {k}: {j + 1}/{len(names)} {n} ppl {out[n]:.3f}")
        return out
    return score
