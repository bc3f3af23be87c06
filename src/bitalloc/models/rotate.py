"""Folded rotations: function-preserving orthogonal transforms of a loaded model (QuaRot-style).

A randomised Hadamard matrix ``Q`` (:class:`bitalloc.formats.rotated.Rotation`: ``diag(±1)·H/√n``, exactly
orthogonal up to float64 rounding) is folded into pairs of linears whose product it leaves unchanged, so the
fp32 model computes the same function while its weights lose their outlier columns.  Two modes:

``vo`` (:func:`rotate_vo_`), every architecture of the map that names v_proj/o_proj: per decoder block one
``Q`` of order head_dim (seeded by ``(seed, layer)``); each KV head's rows of v_proj (and bias) become
``Qᵀ·W_v``, and the input columns of o_proj belonging to every query head served by that KV head become
``W_o·Q``.  Attention mixes value vectors across positions only, so ``Q`` passes through it.
up/down cannot take a rotation: the gate's elementwise product (``act(gate)·up``) sits between them and does
not commute with a rotation (only with a per-channel scale, which the rescaled copy folds there).

``residual`` (:func:`rotate_residual_`): one ``Q`` of order hidden rotates the whole residual stream.  Every
RMSNorm weight is folded into the linears that read the norm (their input columns ·= w), the norm's weight
becomes the identity (a weightless RMSNorm commutes with ``Q``: ‖xQ‖ = ‖x‖), then the embedding rows, the
residual-reading linears' input columns and the lm_head become ``·Q`` and the residual-writing linears' rows
(and biases) ``Qᵀ·``.  It needs every module on the residual path to be one the map names: refused (one-line
InputError, model untouched) for norms with a bias or a mean subtraction (LayerNorm), norms on the residual
path that feed no linear group (Gemma 2/3's post-attention/post-feedforward norms), Mixture-of-Experts blocks
(the router reads the normalised stream and the map does not name it), fused layouts without a group norm,
and a tied embedding whose final norm weight is not uniform (the shared matrix cannot hold both ``E·Q`` and
``E·diag(w)·Q``) unless ``untie=True`` gives the lm_head its own rotated copy (+vocab × hidden parameters).
Qualifying rows of the map: llama, mistral, qwen2, qwen3, phi3.

Products are formed in float64 and cast back once; fp32 logits agree to ~1e-5.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch

from bitalloc.errors import InputError
from bitalloc.formats.rotated import Rotation
from bitalloc.models.archs import ArchSpec, arch_for
from bitalloc.models.rescale import _LAYER_STRIDE, _get, _head_layout

log = logging.getLogger(__name__)

Mode = Literal["vo", "residual"]
MODES: tuple[str, ...] = ("vo", "residual")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _blocks(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    blocks = _get(model, spec.blocks, "the model")
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise InputError(f"cannot rotate: {spec.blocks} is not a non-empty list of blocks")
    return blocks


def _text_config(model: torch.nn.Module) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


# --- v/o ----------------------------------------------------------------------------------------------
def _check_vo(model: torch.nn.Module) -> tuple[ArchSpec, Any, torch.nn.ModuleList]:
    """InputError unless every block has a separate v_proj/o_proj whose shapes give the head layout (names and
    shapes only: works on a meta model).  Returns ``(spec, text config, blocks)``."""
    spec = arch_for(model.config)
    if spec.v_proj is None or spec.o_proj is None:
        raise InputError(f"cannot rotate {spec.name}: its v/o pair lives inside a fused linear")
    config = _text_config(model)
    blocks = _blocks(model, spec)
    for i, block in enumerate(blocks):
        where = f"{spec.blocks}.{i}"
        v, o = _get(block, spec.v_proj, where), _get(block, spec.o_proj, where)
        _head_layout(config, v.weight.shape[0], o.weight.shape[1])
    return spec, config, blocks


@torch.no_grad()
def rotate_vo_(model: torch.nn.Module, seed: int = 0) -> None:
    """Rotate every block's value heads in place: v_proj rows ``Qᵀ·`` per KV head, o_proj columns ``·Q`` per
    query head (grouped-query attention: a query head takes its KV head's ``Q``).  Function-preserving."""
    spec, config, blocks = _check_vo(model)
    for i, block in enumerate(blocks):
        where = f"{spec.blocks}.{i}"
        v, o = _get(block, spec.v_proj, where), _get(block, spec.o_proj, where)
        n_heads, n_kv, hd = _head_layout(config, v.weight.shape[0], o.weight.shape[1])
        rot = Rotation.build(hd, seed * _LAYER_STRIDE + i)
        wv = v.weight.detach().to(torch.float64).reshape(n_kv, hd, -1)  # (kv, hd, in): rows of each KV head
        _set(v.weight, rot.apply(wv.transpose(1, 2)).transpose(1, 2).reshape(v.weight.shape))  # Qᵀ·W_v,h
        if getattr(v, "bias", None) is not None:
            _set(v.bias, rot.apply(v.bias.detach().to(torch.float64).reshape(n_kv, hd)).reshape(-1))
        wo = o.weight.detach().to(torch.float64).reshape(o.weight.shape[0], n_heads, hd)
        _set(o.weight, rot.apply(wo).reshape(o.weight.shape))  # W_o,h·Q for every query head
    log.info("rotated the value heads of %d blocks (seed=%d)", len(blocks), seed)


# --- the residual stream ------------------------------------------------------------------------------
def _check_norm(norm: torch.nn.Module, what: str, offset: float, rot: Rotation) -> None:
    """InputError unless ``norm`` is an RMSNorm: a per-channel weight, no bias, and, with its weight made
    the identity, commuting with the rotation (a mean subtraction does not)."""
    w = getattr(norm, "weight", None)
    if w is None or w.dim() != 1 or w.numel() != rot.n:
        raise InputError(f"cannot rotate the residual stream: {what} has no per-channel weight of size {rot.n}")
    if getattr(norm, "bias", None) is not None:
        raise InputError(f"cannot rotate the residual stream: {what} has a bias (LayerNorm, not RMSNorm)")
    probe = copy.deepcopy(norm)
    if w.is_meta:  # a precheck on a meta model: the structure is checked on an empty copy
        probe = probe.to_empty(device="cpu")
    probe = probe.to(torch.float32)
    probe.weight.data.fill_(1.0 - offset)
    x = torch.randn(4, rot.n, generator=torch.Generator().manual_seed(0)) * 3 + 1
    got, want = probe(rot.apply(x)), rot.apply(probe(x))
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        raise InputError(f"cannot rotate the residual stream: {what} ({type(norm).__name__}) does not commute with "
                         f"a rotation (it subtracts the mean or is not an RMSNorm)")


def _check_block(block: torch.nn.Module, spec: ArchSpec, where: str) -> None:
    """Every parameter of a block belongs to a linear of the map, a group norm, or the attention module's
    head-space parts (q/k norms): anything else may sit on the residual path unseen."""
    known = set(spec.linears) | {n for n in spec.group_norms if n is not None}
    attention = spec.groups[0][0].rpartition(".")[0]
    for name, _ in block.named_parameters():
        module = name.rpartition(".")[0]
        if module in known or (attention and module.startswith(attention + ".")):
            continue
        raise InputError(f"cannot rotate the residual stream of {spec.name}: {where}.{module} is not a linear or "
                         f"group norm of the architecture map (a norm or router on the residual path)")


def _fold_norm(norm: torch.nn.Module, offset: float) -> torch.Tensor:
    """The norm's effective float64 weight (offset included); the norm becomes the identity."""
    w = norm.weight.detach().to(torch.float64) + offset
    norm.weight.data.fill_(1.0 - offset)
    return w


def _read(lin: torch.nn.Module, rot: Rotation, scale: torch.Tensor | None) -> None:
    """A residual reader's input columns: ``W ← W·diag(scale)·Q``."""
    w = lin.weight.detach().to(torch.float64)
    _set(lin.weight, rot.apply(w if scale is None else w * scale))


def _write(lin: torch.nn.Module, rot: Rotation) -> None:
    """A residual writer's rows (and bias): ``W ← Qᵀ·W``."""
    _set(lin.weight, rot.apply(lin.weight.detach().to(torch.float64).T.contiguous()).T)
    if getattr(lin, "bias", None) is not None:
        _set(lin.bias, rot.apply(lin.bias.detach().to(torch.float64)))


def _check_residual(model: torch.nn.Module, seed: int, untie: bool) -> tuple[ArchSpec, Rotation, bool, bool]:
    """Everything :func:`rotate_residual_` refuses, checked without changing the model: ``(spec, rotation, tied,
    uniform final norm)``.  On a meta model (a precheck from the config and headers) the values are unknown: the
    final norm's uniformity is not checked there (``uniform`` True) and is refused once the weights are loaded."""
    spec = arch_for(model.config)
    if spec.experts is not None:
        raise InputError(f"cannot rotate the residual stream of {spec.name}: the MoE router reads it and the "
                         f"architecture map does not name it")
    emb, head = _get(model, spec.embedding, "the model"), _get(model, spec.lm_head, "the model")
    final = _get(model, spec.final_norm, "the model")
    hidden = int(emb.weight.shape[1])
    rot = Rotation.build(hidden, seed)
    blocks = _blocks(model, spec)
    tops = (spec.blocks, spec.embedding, spec.final_norm, spec.lm_head)
    for name, _ in model.named_parameters():
        if not any(name.startswith(t + ".") for t in tops):
            raise InputError(f"cannot rotate the residual stream: parameter {name} is outside the mapped modules")
    _check_norm(final, spec.final_norm, spec.norm_offset, rot)
    for i, block in enumerate(blocks):
        where = f"{spec.blocks}.{i}"
        _check_block(block, spec, where)
        for norm_name, group in zip(spec.group_norms, spec.groups):
            if norm_name is not None:
                _check_norm(_get(block, norm_name, where), f"{where}.{norm_name}", spec.norm_offset, rot)
            for lin in group:
                if _get(block, lin, where).weight.shape[0 if norm_name is None else 1] != hidden:
                    raise InputError(f"cannot rotate the residual stream: {where}.{lin} does not "
                                     f"{'write' if norm_name is None else 'read'} the {hidden}-wide stream")
    tied = head.weight is emb.weight
    if final.weight.is_meta:
        uniform = True
    else:
        w_final = final.weight.detach().to(torch.float64) + spec.norm_offset
        uniform = bool((w_final == w_final[0]).all())
    if tied and not uniform and not untie:
        raise InputError(f"cannot rotate the residual stream of this tied {spec.name}: the final norm's weight "
                         f"cannot be folded into the shared embedding (untie=True gives lm_head its own copy)")
    return spec, rot, tied, uniform


@torch.no_grad()
def rotate_residual_(model: torch.nn.Module, seed: int = 0, untie: bool = False) -> None:
    """Rotate the residual stream by one randomised Hadamard ``Q`` (order hidden), folding every RMSNorm weight
    into the linears it feeds.  Everything is checked before the first weight changes (InputError, model
    untouched); ``untie`` lets a tied lm_head take its own copy when the final norm is not uniform."""
    spec, rot, tied, uniform = _check_residual(model, seed, untie)
    emb, head = _get(model, spec.embedding, "the model"), _get(model, spec.lm_head, "the model")
    final = _get(model, spec.final_norm, "the model")
    blocks = _blocks(model, spec)
    # --- checked: now fold and rotate
    for i, block in enumerate(blocks):
        where = f"{spec.blocks}.{i}"
        for norm_name, group in zip(spec.group_norms, spec.groups):
            if norm_name is None:  # a group reading no norm writes the residual (o, down)
                for lin in group:
                    _write(_get(block, lin, where), rot)
                continue
            scale = _fold_norm(_get(block, norm_name, where), spec.norm_offset)
            for lin in group:
                _read(_get(block, lin, where), rot, scale)
    if tied and uniform:  # the uniform final norm commutes with Q; the shared matrix becomes E·Q
        _read(emb, rot, None)
    else:
        if tied:
            head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
            for cfg in {id(c): c for c in (model.config, _text_config(model))}.values():
                cfg.tie_word_embeddings = False
        _read(emb, rot, None)
        _read(head, rot, _fold_norm(final, spec.norm_offset))
    log.info("rotated the residual stream of %d blocks (hidden %d, seed=%d%s)", len(blocks), rot.n, seed,
             ", lm_head untied" if tied and not uniform else "")


def rotate_(model: torch.nn.Module, mode: str, seed: int = 0, untie: bool = False) -> None:
    """:func:`rotate_vo_` or :func:`rotate_residual_` by name (``vo`` | ``residual``)."""
    if mode == "vo":
        rotate_vo_(model, seed)
    elif mode == "residual":
        rotate_residual_(model, seed, untie=untie)
    else:
        raise InputError(f"unknown rotation {mode!r} (use {' or '.join(MODES)})")


def parse_rotation(text: str) -> tuple[str, ...]:
    """``--rotate``: ``vo``, ``residual`` or both joined by ``+`` -> the modes in the order they are applied
    (residual first: it checks the whole model before changing a weight).  InputError for anything else."""
    modes = [m.strip().lower() for m in text.split("+")]
    bad = [m for m in modes if m not in MODES]
    if not text.strip() or bad or len(set(modes)) != len(modes):
        raise InputError(f"--rotate {text!r}: use vo, residual or vo+residual")
    return tuple(m for m in ("residual", "vo") if m in modes)


def check_untie(modes: tuple[str, ...], untie: bool) -> None:
    """InputError when ``untie`` is asked for without the residual rotation, the only one it serves."""
    if untie and "residual" not in modes:
        raise InputError("--untie-head only serves the residual rotation (--rotate residual)")


@torch.no_grad()
def check_rotation(model: torch.nn.Module, modes: tuple[str, ...], untie: bool = False) -> None:
    """InputError for whatever :func:`rotate_model_` would refuse, with the model unchanged.  Works on a meta
    model (:func:`bitalloc.models.sources.meta_model`), so the CLI refuses before loading any weight; only the
    refusal that needs values (a tied model whose final norm is not uniform, without ``untie``) waits for them."""
    check_untie(modes, untie)
    if "residual" in modes:
        _check_residual(model, 0, untie)
    if "vo" in modes:
        _check_vo(model)


def rotate_model_(model: torch.nn.Module, modes: tuple[str, ...], seed: int = 0, untie: bool = False) -> None:
    """Every rotation of ``modes`` (:func:`parse_rotation`), folded into ``model`` in place (same function in
    fp32).  ``untie`` only matters for ``residual`` on a tied model (:func:`rotate_residual_`)."""
    check_untie(modes, untie)
    for mode in modes:
        rotate_(model, mode, seed, untie=untie)


__all__ = ["rotate_vo_", "rotate_residual_", "rotate_", "rotate_model_", "parse_rotation", "check_untie",
           "check_rotation", "MODES", "Mode"]
