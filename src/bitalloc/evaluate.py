"""Evaluation of a candidate against a reference on held-out windows: PPL, KLD, top-1.  Never quantizes.

Scoring follows llama.cpp's perplexity tool: in every ``ctx``-token window the first ``ctx // 2`` tokens are
context only; the logits at positions ``first .. ctx-2`` are scored against tokens ``first+1 .. ctx-1``
(``ctx - 1 - ctx//2`` tokens per window, 255 at ctx 512).

* PPL  = exp(mean NLL of the candidate) (``ref_ppl`` the same for the reference),
* KLD  = mean over scored tokens of ``Σ_v p_ref (log p_ref − log p_cand)``, natural log,
* top1 = share of scored tokens whose argmaxes agree.

Log-softmax runs in float64 over chunks of token rows (bounded memory at vocab 49152; exact enough to
resolve KLD ~1e-12) and every sum is accumulated in float64.

With a :class:`~bitalloc.placement.Placement` the forwards and the scoring run on its device (torch models are
moved there for the evaluation, offloaded blocks one at a time, and put back after); a
:class:`~bitalloc.timing.StageTimer` records ``evaluate``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

from bitalloc.data import check_token_ids, embedding_rows
from bitalloc.errors import InputError, NumericsError
from bitalloc.formats.fit import all_finite
from bitalloc.placement import Placement
from bitalloc.timing import StageTimer, timed

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (b, ctx) int64 -> (b, ctx, vocab) logits
_ROW_CHUNK = 64
_MAX_NLL = math.log(1e300)  # a mean NLL above this has no float perplexity (exp overflows near 709.8)


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    ref_ppl: float
    kld: float
    top1: float
    ntokens: int
    ctx: int

    def __post_init__(self) -> None:
        if self.ntokens <= 0 or self.ctx < 3:
            raise ValueError(f"EvalResult needs ntokens > 0 and ctx >= 3, got {self.ntokens}, {self.ctx}")
        if not 0.0 <= self.top1 <= 1.0:
            raise ValueError(f"top1 must lie in [0, 1], got {self.top1}")
        if self.kld < -1e-9:
            raise ValueError(f"KLD cannot be negative, got {self.kld}")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def first_scored(ctx: int) -> int:
    """Index of the first scored logit position in a window (llama.cpp: ``n_ctx / 2``)."""
    return ctx // 2


def _as_logits_fn(m: torch.nn.Module | LogitsFn, n_keep: int, device: torch.device | None = None) -> LogitsFn:
    """A torch model as a logits function on ``device`` (default: where its first parameter is)."""
    if not isinstance(m, torch.nn.Module):
        return m
    device = device if device is not None else next(m.parameters()).device

    def fn(batch: torch.Tensor) -> torch.Tensor:
        ids = batch.to(device)
        try:  # only the scored half needs the (large) lm_head output
            out = m(input_ids=ids, logits_to_keep=n_keep, use_cache=False)
        except TypeError:
            out = m(input_ids=ids, use_cache=False)
        return out.logits

    return fn


def _scored(logits: torch.Tensor, b: int, ctx: int, name: str) -> torch.Tensor:
    """The logits at positions first .. ctx-2 from a full (b, ctx, V) or last-half (b, ctx-first, V) output."""
    first = first_scored(ctx)
    if logits.dim() != 3 or logits.shape[0] != b or logits.shape[1] not in (ctx, ctx - first):
        raise InputError(f"{name} returned logits of shape {tuple(logits.shape)}; expected ({b}, {ctx}, vocab)")
    start = first if logits.shape[1] == ctx else 0
    return logits[:, start: start + ctx - 1 - first]


@dataclass
class _Acc:
    nll: float = 0.0
    ref_nll: float = 0.0
    kld: float = 0.0
    agree: int = 0
    n: int = 0


def _check_inputs(m: torch.nn.Module | LogitsFn, windows: torch.Tensor, name: str) -> None:
    """Token ids beyond a torch model's embedding, refused before its first forward."""
    if isinstance(m, torch.nn.Module) and hasattr(m, "get_input_embeddings"):
        emb = m.get_input_embeddings()
        if emb is not None:
            check_token_ids(windows, embedding_rows(emb), f"the {name} model's embedding")


def check_same_architecture(candidate: torch.nn.Module, reference: torch.nn.Module, what: str = "candidate") -> None:
    """InputError unless both models hold the same parameter names and shapes (``reference`` may sit on the meta
    device): a quantized model compared with another model's reference gives numbers that mean nothing.  Tying
    is storage, not architecture: a tied lm_head counts under both names (``--untie-head`` outputs compare with
    their tied source)."""
    cand = {n: tuple(p.shape) for n, p in candidate.named_parameters(remove_duplicate=False)}
    ref = {n: tuple(p.shape) for n, p in reference.named_parameters(remove_duplicate=False)}
    if cand == ref:
        return
    only_c, only_r = sorted(cand.keys() - ref.keys()), sorted(ref.keys() - cand.keys())
    if only_c or only_r:
        n, where = (only_c[0], f"only the {what}") if only_c else (only_r[0], "only the reference")
        detail = f"{len(cand)} vs {len(ref)} tensors; {n!r} is in {where}"
    else:
        n = next(k for k in sorted(cand) if cand[k] != ref[k])
        detail = f"{n!r} is {cand[n]} vs {ref[n]}"
    raise InputError(f"the {what} and the reference are different models ({detail}): give the reference the "
                     f"{what} was quantized from")


def _check_finite(logits: torch.Tensor, name: str, s: int) -> None:
    """NumericsError naming the first window whose logits hold NaN/Inf (float16 overflow, a corrupted scale)."""
    if all_finite(logits):  # one min/max pass; the per-window search only when something is wrong
        return
    bad = ~torch.isfinite(logits).reshape(logits.shape[0], -1).all(1)
    if bool(bad.any()):
        w = s + int(bad.nonzero()[0, 0])
        raise NumericsError(f"the {name} model produced NaN/Inf logits (window {w}): its weights hold NaN/Inf "
                            "or overflow")


def _accumulate(acc: _Acc, cand: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one batch: cand/ref (N, V) finite logits, targets (N,) ids below V."""
    for i in range(0, cand.shape[0], _ROW_CHUNK):
        c = cand[i: i + _ROW_CHUNK].to(torch.float64)
        r = ref[i: i + _ROW_CHUNK].to(torch.float64)
        t = targets[i: i + _ROW_CHUNK].to(c.device).unsqueeze(1)
        lc, lr = torch.log_softmax(c, -1), torch.log_softmax(r, -1)
        acc.nll -= lc.gather(1, t).sum().item()
        acc.ref_nll -= lr.gather(1, t).sum().item()
        acc.kld += (lr.exp() * (lr - lc)).sum().item()
        acc.agree += int((c.argmax(-1) == r.argmax(-1)).sum().item())
        acc.n += c.shape[0]


def _exp(nll: float, what: str) -> float:
    """exp(mean NLL); NumericsError when it overflows or is not finite (absurd logits from corrupted weights)."""
    if not math.isfinite(nll) or nll > _MAX_NLL:
        raise NumericsError(f"the {what} perplexity overflows: mean NLL {nll:.4g} nats per token (logits of "
                            "absurd magnitude, e.g. a corrupted scale)")
    return math.exp(nll)


def _result(acc: _Acc, ctx: int) -> EvalResult:
    kld = acc.kld / acc.n
    if not math.isfinite(kld):
        raise NumericsError(f"the KLD of the candidate is not finite ({kld})")
    return EvalResult(ppl=_exp(acc.nll / acc.n, "candidate"), ref_ppl=_exp(acc.ref_nll / acc.n, "reference"),
                      kld=max(kld, 0.0), top1=acc.agree / acc.n, ntokens=acc.n, ctx=ctx)


@torch.no_grad()
def evaluate(candidate: torch.nn.Module | LogitsFn, reference: torch.nn.Module | LogitsFn,
             windows: torch.Tensor, *, batch_size: int = 2, progress: bool = False,
             placement: Placement | None = None, timer: StageTimer | None = None) -> EvalResult:
    """Score ``candidate`` against ``reference`` on token windows ``(n, ctx)``.

    Each of ``candidate``/``reference`` is a torch causal LM (called with ``input_ids``) or a callable
    mapping a ``(b, ctx)`` int64 batch to logits ``(b, ctx, vocab)`` (or only the last ``ctx - ctx//2``
    positions), e.g. llama.cpp's logits for a GGUF.  ``placement``: where the forwards and the scoring run
    (default: where each torch model already is; a callable's logits are scored where the candidate's are).
    """
    with timed(timer, "evaluate"), ExitStack() as stack:
        device = None
        if placement is not None:
            device = placement.device
            for m in (candidate, reference):
                if isinstance(m, torch.nn.Module) and not placement.on_cpu:
                    stack.enter_context(placement.residency(m, _blocks(m) if placement.offload else ()))
        return _evaluate(candidate, reference, windows, batch_size, progress, device)


def _blocks(m: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    from bitalloc.layout import layout_of

    return layout_of(m).blocks


def _evaluate(candidate: torch.nn.Module | LogitsFn, reference: torch.nn.Module | LogitsFn, windows: torch.Tensor,
              batch_size: int, progress: bool, device: torch.device | None) -> EvalResult:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise InputError("windows must be a 2-D int64 tensor (n, ctx)")
    n, ctx = windows.shape
    if n == 0 or ctx < 3:
        raise InputError(f"need at least one window of at least 3 tokens, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    first = first_scored(ctx)
    _check_inputs(candidate, windows, "candidate")
    _check_inputs(reference, windows, "reference")
    cand_fn, ref_fn = _as_logits_fn(candidate, ctx - first, device), _as_logits_fn(reference, ctx - first, device)
    acc = _Acc()
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch")
    for s in starts:
        batch = windows[s: s + batch_size]
        b = batch.shape[0]
        c = _scored(cand_fn(batch), b, ctx, "candidate")
        if device is not None:
            c = c.to(device)
        r = _scored(ref_fn(batch), b, ctx, "reference").to(c.device)  # a callable's logits may come from the CPU
        if c.shape[-1] != r.shape[-1]:
            raise InputError(f"candidate vocab {c.shape[-1]} != reference vocab {r.shape[-1]}")
        targets = batch[:, first + 1:]
        check_token_ids(targets, c.shape[-1], "the models' vocabulary", "logits")
        _check_finite(c, "candidate", s)
        _check_finite(r, "reference", s)
        _accumulate(acc, c.reshape(-1, c.shape[-1]), r.reshape(-1, r.shape[-1]), targets.reshape(-1))
    result = _result(acc, int(ctx))
    log.info("eval: ppl %.4f (ref %.4f) kld %.3g top1 %.4f over %d tokens", result.ppl, result.ref_ppl,
             result.kld, result.top1, result.ntokens)
    return result

