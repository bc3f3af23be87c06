"""Mixture-of-Experts layers as ordinary linears: every expert's projections become ``nn.Linear`` modules.

transformers 5 keeps the experts of a layer fused: ``experts.gate_up_proj`` ``(E, 2I, H)`` (each expert's gate
rows first, then its up rows) and ``experts.down_proj`` ``(E, H, I)``, with a forward
``(hidden_states, top_k_index, top_k_weights)`` that scales each expert's output by its routing weight.
:func:`unfuse_experts` replaces that module by :class:`UnfusedExperts` (same call, same outputs) holding one
:class:`ExpertMLP` per expert with ``gate_proj`` / ``up_proj`` / ``down_proj`` linears, named
``…experts.{e}.gate_proj`` as older transformers, the Hub checkpoints and gguf-py's TensorNameMap name them.
Everything built on linears (calibration and Fisher hooks, :class:`~bitalloc.models.view.ModelView`, quantize,
export) then sees each expert as its own tensors; its hooks fire only for the tokens routed to it.

Routing weights: an expert's output reaches the model scaled by its routing weight ``p``, so the error of its
output is scaled by ``p`` too.  While an :class:`ExpertMLP` runs, ``routing_weight`` holds ``p`` for each row of
its input (else None); calibration weights each row's ``x xᵀ`` by ``p²`` (normalised by all tokens, like every
Hessian) and the Fisher pass divides each row's output gradient by ``p`` (see :func:`routed_owner`).

The architecture table (:mod:`bitalloc.models.archs`) names an expert's linears with an ``{e}`` placeholder
(``mlp.experts.{e}.gate_proj``); :func:`expand_spec` repeats those groups once per expert, in expert order.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from bitalloc.errors import InputError

if TYPE_CHECKING:
    from bitalloc.models.archs import ArchSpec

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertSpec:
    """Where a block keeps its routed experts.

    module: the fused experts module, relative to a block (``mlp.experts``); after :func:`unfuse_experts` the
            expert ``e``'s linears are ``{module}.{e}.gate_proj`` / ``up_proj`` / ``down_proj``.
    count:  the config attribute holding the number of experts per layer.
    """

    module: str = "mlp.experts"
    count: str = "num_experts"

    def linear(self, e: int | str, proj: str) -> str:
        return f"{self.module}.{e}.{proj}"


# ----------------------------------------------------------------------------------------- the table
def num_experts(spec: ArchSpec, config: Any) -> int:
    """Experts per layer of ``config`` (InputError when the config has none or mixes dense and sparse layers)."""
    assert spec.experts is not None
    cfg = getattr(config, "config", config)
    n = getattr(cfg, spec.experts.count, None)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"{spec.name} config has no valid {spec.experts.count} ({n!r})")
    if getattr(cfg, "mlp_only_layers", None) or int(getattr(cfg, "decoder_sparse_step", 1) or 1) != 1:
        raise InputError(f"{spec.name} models with dense MLP layers among the MoE layers (mlp_only_layers, "
                         "decoder_sparse_step) are not supported")
    return n


def expand_spec(spec: ArchSpec, config: Any) -> ArchSpec:
    """``spec`` with every ``{e}`` group repeated for experts ``0..E-1`` (a run of consecutive ``{e}`` groups
    is repeated as a whole, expert by expert: ``[e0 gate, up], [e0 down], [e1 gate, up], …``)."""
    if spec.experts is None:
        return spec
    n = num_experts(spec, config)
    groups: list[tuple[str, ...]] = []
    norms: list[str | None] = []
    run: list[tuple[tuple[str, ...], str | None]] = []

    def flush() -> None:
        for e in range(n):
            for g, norm in run:
                groups.append(tuple(s.replace("{e}", str(e)) for s in g))
                norms.append(norm)
        run.clear()

    for g, norm in zip(spec.groups, spec.group_norms):
        if any("{e}" in s for s in g):
            run.append((g, norm))
        else:
            flush()
            groups.append(g)
            norms.append(norm)
    flush()
    ties = [tg for tg in spec.tie_groups if not any("{e}" in s for s in tg)]
    ties += [tuple(s.replace("{e}", str(e)) for s in tg) for e in range(n)
             for tg in spec.tie_groups if any("{e}" in s for s in tg)]
    return dataclasses.replace(spec, groups=tuple(groups), group_norms=tuple(norms), tie_groups=tuple(ties),
                               **{f: getattr(spec, f).replace("{e}", "0")
                                  for f in ("v_proj", "o_proj", "up_proj", "down_proj")})


def expert_stacks(view: Any) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(block, projection, tensor names in expert order)`` for every MoE layer and projection: what GGUF
    stacks into one ``ffn_{gate,up,down}_exps`` tensor (and what a tie constraint per layer would tie)."""
    spec = view.spec
    if spec.experts is None:
        return []
    n = num_experts(spec, view.model.config)
    return [(b.index, proj, tuple(f"{b.path}.{spec.experts.linear(e, proj)}.weight" for e in range(n)))
            for b in view.blocks() for proj in PROJECTIONS]


# ---------------------------------------------------------------------------------------- the modules
class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``.  ``routing_weight``: while the expert runs inside
    :class:`UnfusedExperts`, the routing weight of each row of its input (detached); None otherwise."""

    def __init__(self, hidden: int, inter: int, act_fn: Callable, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.act_fn = act_fn
        self.routing_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of one layer as a list of :class:`ExpertMLP`; called like transformers' fused experts."""

    def __init__(self, experts: list[ExpertMLP], fused_class: type | None = None) -> None:
        super().__init__(experts)
        self.fused_class = fused_class

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):  # as transformers' eager loop: experts in order, tokens by (slot, token)
            top_k_pos, token_idx = torch.where((top_k_index == e).T)
            if token_idx.numel() == 0:
                continue
            p = top_k_weights[token_idx, top_k_pos]
            expert.routing_weight = p.detach()
            try:
                y = expert(hidden_states[token_idx]) * p[:, None]
            finally:
                expert.routing_weight = None
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def routed_owner(block: nn.Module, linear: str) -> ExpertMLP | None:
    """The :class:`ExpertMLP` that owns linear ``linear`` (a path inside ``block``), or None for other linears."""
    parent = linear.rpartition(".")[0]
    if not parent:
        return None
    try:
        mod = block.get_submodule(parent)
    except AttributeError:
        return None
    return mod if isinstance(mod, ExpertMLP) else None


# ------------------------------------------------------------------------------------- fuse / unfuse
def split_fused(gate_up: torch.Tensor, down: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per expert ``{gate_proj, up_proj, down_proj}`` views of fused ``(E, 2I, H)`` and ``(E, H, I)`` tensors."""
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2 or gate_up.shape[0] != down.shape[0] \
            or tuple(down.shape[1:]) != (gate_up.shape[2], gate_up.shape[1] // 2):
        raise InputError(f"fused experts of shapes {tuple(gate_up.shape)} and {tuple(down.shape)} do not fit "
                         "(E, 2I, H) and (E, H, I)")
    inter = gate_up.shape[1] // 2
    return [{"gate_proj": gate_up[e, :inter], "up_proj": gate_up[e, inter:], "down_proj": down[e]}
            for e in range(gate_up.shape[0])]


def fuse_tensors(experts: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`split_fused`: ``(gate_up_proj (E, 2I, H), down_proj (E, H, I))``."""
    gate_up = torch.stack([torch.cat([x["gate_proj"], x["up_proj"]]) for x in experts])
    return gate_up, torch.stack([x["down_proj"] for x in experts])


_FUSED = re.compile(r"^(?P<prefix>.*)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fused_source(name: str) -> tuple[str, int, str] | None:
    """For a per-expert tensor name (``….experts.3.up_proj.weight``): the fused checkpoint tensor that holds it
    (``….experts.gate_up_proj``), the expert index and the projection; None for other names."""
    m = _FUSED.match(name)
    if m is None or not m["prefix"].endswith("experts"):
        return None
    proj = m["proj"]
    return f"{m['prefix']}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}", int(m["e"]), proj


def fused_rows(t: torch.Tensor, e: int, proj: str) -> torch.Tensor:
    """Expert ``e``'s ``proj`` weight inside a fused tensor ``t`` (gate_up_proj: gate rows first, then up)."""
    w = t[e]
    if proj == "down_proj":
        return w
    inter = w.shape[0] // 2
    return w[:inter] if proj == "gate_proj" else w[inter:]


def _experts_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    from bitalloc.models.archs import arch_for

    spec = arch_for(model.config)
    if spec.experts is None:
        return []
    parent_path, _, attr = spec.experts.module.rpartition(".")
    out = []
    for blk in model.get_submodule(spec.blocks):
        parent = blk.get_submodule(parent_path) if parent_path else blk
        out.append((parent, attr, getattr(parent, attr)))
    return out


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by an equivalent :class:`UnfusedExperts` (weights copied,
    same device and dtype, meta stays meta); returns how many were replaced (0 for a dense model)."""
    done = 0
    for parent, attr, fused in _experts_modules(model):
        if isinstance(fused, UnfusedExperts):
            continue
        gu, dn = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
        if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor):
            raise InputError(f"{type(fused).__name__} has no fused gate_up_proj/down_proj parameters")
        parts = split_fused(gu, dn)
        e_count, two_i, hidden = gu.shape
        experts = [ExpertMLP(hidden, two_i // 2, fused.act_fn, device=gu.device, dtype=gu.dtype)
                   for _ in range(e_count)]
        if gu.device.type != "meta":
            with torch.no_grad():
                for ex, w in zip(experts, parts):
                    for proj in PROJECTIONS:
                        getattr(ex, proj).weight.copy_(w[proj])
        new = UnfusedExperts(experts, type(fused))
        new.train(fused.training)
        setattr(parent, attr, new)
        done += 1
    return done


def fuse_experts(model: nn.Module) -> int:
    """The inverse of :func:`unfuse_experts`: transformers' own fused modules again (weights copied)."""
    done = 0
    for parent, attr, mod in _experts_modules(model):
        if not isinstance(mod, UnfusedExperts):
            continue
        if mod.fused_class is None:
            raise InputError("these experts were not unfused from a transformers module; cannot fuse them back")
        gu, dn = fuse_tensors([{p: getattr(ex, p).weight.detach() for p in PROJECTIONS} for ex in mod])
        fused = mod.fused_class(model.config).to(dtype=gu.dtype)
        with torch.no_grad():
            fused.gate_up_proj.copy_(gu)
            fused.down_proj.copy_(dn)
        fused.train(mod.training)
        setattr(parent, attr, fused)
        done += 1
    return done
