"""``nest_model``: write the nested artifact of a model -- calibrate once, round every tensor at every depth, measure
every depth's errors with the statistics ``measure`` uses, store the bit-planes (:mod:`bitalloc.nest.artifact`).

Streamed block by block like the measurement (:func:`bitalloc.calibrate.stream.stream_blocks`, the fp model's
inputs): one block's statistics, codes and planes are resident at a time, and each block's tensors go to their own
shard as soon as they are rounded.  The output directory is written under a temporary name, every stored tensor
re-read and hashed against the manifest, then renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import InputError
from ..export.packed import save_config
from ..formats import get_format
from ..io.atomic import atomic_write_dir, compare_digests, file_digest, tensor_digest
from ..io.safetensors import SafetensorsFile, write_safetensors_atomic
from ..measure import MeasureRow, Measurement, fisher_error, output_error
from ..placement import Placement
from ..rounding import ROW_CHUNK_ELEMS, row_chunks
from ..rounding.gptq import gptq_factor
from ..stats import TensorStats
from .artifact import (GROUPS, MANIFEST_FILE, OUTLIERS, META_FILE, TABLE_FILE, Artifact, depth_of, nest_json,
                       offered)
from .codes import (DESCENT_PASSES, MAX_DEPTH, MIN_DEPTH, depth_grid, depth_weights, nested_codes, nested_grid,
                    pick_outliers, to_planes, without_outliers)
from .descent import DEPTH_EMPHASIS
from .refit import IDENTITY, default_refit, refit_codes, refit_depth_grid

log = logging.getLogger(__name__)
#: Most sweeps of coordinate descent a nest takes.
MAX_PASSES = 16


def check_options(group: int, depth: int, outliers: int = 0, passes: int = DESCENT_PASSES, refit: int = 0) -> None:
    """One-line refusals of a group, depth, outlier count, descent passes or refit depths the artifact cannot hold
    (before any work)."""
    if not isinstance(passes, int) or isinstance(passes, bool) or not 0 <= passes <= MAX_PASSES:
        raise InputError(f"nest: --descent-passes must be an integer in 0..{MAX_PASSES}, got {passes!r}")
    if outliers not in OUTLIERS or isinstance(outliers, bool):
        raise InputError(f"nest: --outliers must be one of {', '.join(map(str, OUTLIERS))}, got {outliers!r}")
    if group not in GROUPS or isinstance(group, bool):
        raise InputError(f"nest: --group must be one of {', '.join(map(str, GROUPS))}, got {group!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or not MIN_DEPTH <= depth <= MAX_DEPTH:
        raise InputError(f"nest: --max-bits must be an integer in {MIN_DEPTH}..{MAX_DEPTH}, got {depth!r}")
    if not isinstance(refit, int) or isinstance(refit, bool) or not 0 <= refit <= depth - MIN_DEPTH:
        raise InputError(f"nest: --refit-depths must be an integer in 0..{depth - MIN_DEPTH} (the depths below the "
                         f"deepest), got {refit!r}")


def nest_tensor(name: str, w: torch.Tensor, stats: TensorStats, group: int, depth: int,
                weights: Mapping[int, float] | None = None, max_elems: int | None = ROW_CHUNK_ELEMS,
                outliers: int = 0, passes: int = DESCENT_PASSES, refit: int = 0,
                emphasis: float = DEPTH_EMPHASIS, placement: Placement | None = None
                ) -> tuple[dict[str, torch.Tensor], list[MeasureRow]]:
    """The stored parts of one tensor (planes, step, low, outliers, refit bytes) and its measurement rows (every
    offered depth); ``passes``: sweeps of coordinate descent after the joint rounding
    (:func:`~bitalloc.nest.codes.nested_codes`), weighing each depth ``emphasis`` times the one above
    (:func:`~bitalloc.nest.descent.relative_weights`); ``refit``: how many of the shallowest depths get their own scale
    and zero per group (:mod:`bitalloc.nest.refit`; without a Hessian, none is fit and they store the lattice).
    ``placement``: the run's policy (default: that of ``w``'s device), whose memory release follows each block of
    rows."""
    import dataclasses

    from ..measure import rows_of

    rows, cols = (int(d) for d in w.shape)
    place = placement if placement is not None else Placement.for_device(w.device)
    if outliers > cols:
        raise InputError(f"nest: {name} has {cols} columns, fewer than --outliers {outliers}")
    hessian = stats.hessian
    importance = None if hessian is None else torch.diagonal(hessian).to(torch.float32).clamp_min(0)
    fmts = offered(group, depth, outliers)
    errs = {f: [0.0, 0.0] for f in fmts}
    leaf, steps, lows, ovals, oidx = [], [], [], [], []
    refit_ks = list(range(MIN_DEPTH, MIN_DEPTH + refit))
    free = refit_ks if hessian is not None else []  # depths with their own scale and zero (none without a Hessian)
    corrs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in refit_ks}
    factor = None if hessian is None else gptq_factor(hessian, device=w.device)  # once for every row block
    for sl in row_chunks(rows, cols, max_elems):
        w32 = w[sl].detach().to(torch.float32)
        exact = None
        if outliers:
            exact = pick_outliers(w32, outliers, importance)
            imp = torch.ones_like(w32) if importance is None else importance.reshape(1, cols).expand_as(w32).clone()
            imp[exact[0]] = 0
            step, low = nested_grid(without_outliers(w32, exact[0]), group, depth, imp, free)
        else:
            step, low = nested_grid(w32, group, depth, importance, free)
        codes = nested_codes(w32, step, low, group, depth, hessian, dict(weights) if weights else None, exact=exact,
                             passes=passes, emphasis=emphasis, factor=factor)
        corr = {}
        if hessian is not None:
            lam = weights if weights else depth_weights(depth)
            new_leaf, step, low, corr = refit_codes(
                w32, hessian, codes[depth], step, low, group, depth, refit_ks,
                [k for k in range(MIN_DEPTH, depth + 1) if lam.get(k, 0.0) > 0], exact, passes=passes,
                emphasis=emphasis)
            codes = {k: new_leaf >> (depth - k) for k in codes}
        for k in refit_ks:
            ident = torch.full(step.shape, IDENTITY, dtype=torch.uint8, device=step.device)
            corr.setdefault(k, (ident, ident))
            corrs[k].append(tuple(t.cpu() for t in corr[k]))  # type: ignore[arg-type]
        part = rows_of(stats, sl)
        for f in fmts:
            k = depth_of(f)
            if k in corr:
                grid = refit_depth_grid(step, low, depth, k, group, *corr[k])
            else:
                grid = depth_grid(step, low, depth, k, group)
            if exact is not None:
                grid = dataclasses.replace(grid, exact_mask=exact[0], exact_values=exact[1])
            dw = grid.values(codes[k]) - w32
            errs[f][0] += output_error(dw, part)
            fe = fisher_error(dw, part)
            errs[f][1] = None if fe is None or errs[f][1] is None else errs[f][1] + fe  # type: ignore[operator]
        leaf.append(codes[depth].to(torch.uint8).cpu())
        steps.append(step.to(torch.float16).cpu())
        lows.append(low.to(torch.float16).cpu())
        if exact is not None:
            n = exact[0].shape[0]
            idx = torch.arange(cols, device=w32.device).expand(n, cols)[exact[0]].reshape(n, outliers)
            oidx.append(idx.cpu().to(torch.uint16 if cols <= 65536 else torch.int32))
            ovals.append(exact[1][exact[0]].reshape(n, outliers).to(torch.float16).cpu())
        del codes, w32
        place.release()
    stored = {f"{name}.plane{j}": p for j, p in enumerate(to_planes(torch.cat(leaf).to(torch.int64), depth))}
    stored[f"{name}.step"] = torch.cat(steps).contiguous()
    stored[f"{name}.low"] = torch.cat(lows).contiguous()
    for k in refit_ks:
        stored[f"{name}.mu{k}"] = torch.cat([c[0] for c in corrs[k]]).contiguous()
        stored[f"{name}.tau{k}"] = torch.cat([c[1] for c in corrs[k]]).contiguous()
    if outliers:
        stored[f"{name}.ovalue"] = torch.cat(ovals).contiguous()
        stored[f"{name}.oindex"] = torch.cat(oidx).contiguous()
    out = [MeasureRow(name, f, get_format(f).nbytes((rows, cols)), e[0], e[1]) for f, e in errs.items()]
    return stored, out


@dataclass(frozen=True, eq=False)
class NestBlock:
    """What one block (or the head) of the model adds to an artifact: its shard's tensors (``stored``), its
    measurement rows and its tensors' entries in ``nest.json`` (shape, shard, dtype)."""

    stored: dict[str, torch.Tensor]
    rows: tuple[MeasureRow, ...]
    entries: dict[str, dict[str, Any]]


@dataclass(frozen=True, eq=False)
class NestStart:
    """Where a resumed :func:`nest_model` continues (:mod:`bitalloc.jobs.nest`): ``block``, the first block still to
    nest, with its inputs ``hidden`` (the fp model's); ``load(b)`` gives a finished block's :class:`NestBlock`."""

    block: int
    hidden: torch.Tensor
    load: Callable[[int], NestBlock]

    def __post_init__(self) -> None:
        if self.block < 1:
            raise InputError(f"a nest resumes after a finished block, not at block {self.block}")


def _shard(b: int) -> str:
    return f"tensors-{b:04d}.safetensors"


def _nest_block(model: nn.Module, block: Mapping[str, TensorStats], shard: str, place: Placement, group: int,
                max_bits: int, weights: Mapping[int, float] | None, outliers: int, passes: int,
                refit: int) -> NestBlock:
    """Every tensor of one block of statistics nested (:func:`nest_tensor`); each weight leaves memory once done."""
    from ..models.spill import release_parameter

    stored: dict[str, torch.Tensor] = {}
    rows: list[MeasureRow] = []
    entries: dict[str, dict[str, Any]] = {}
    for name, stats in block.items():
        w = place.to_device(model.get_parameter(name).detach())
        parts, got = nest_tensor(name, w, stats, group, max_bits, weights, outliers=outliers, passes=passes,
                                 refit=refit, placement=place)
        stored.update(parts)
        rows.extend(got)
        entries[name] = {"shape": list(w.shape), "shard": shard, "dtype": str(w.dtype).removeprefix("torch.")}
        del w
        release_parameter(model, name)
    return NestBlock(stored, tuple(rows), entries)


def nest_model(
    model: nn.Module,
    view: Any,
    windows: torch.Tensor,
    out: str | os.PathLike,
    *,
    group: int = 64,
    max_bits: int = 6,
    outliers: int = 0,
    fisher: bool = True,
    fisher_windows: torch.Tensor | None = None,
    tokenizer: Any = None,
    template: Any = None,
    weights: Mapping[int, float] | None = None,
    progress: bool = True,
    placement: Placement | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    batch_size: int = 8,
    passes: int = DESCENT_PASSES,
    refit: int | None = None,
    fisher_stats: Any = None,
    on_fisher: Callable[[Any], None] | None = None,
    start: NestStart | None = None,
    on_block: Callable[[int, NestBlock, torch.Tensor], None] | None = None,
    before_publish: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write the nested artifact of ``model`` to ``out`` (see :mod:`bitalloc.nest`); returns its ``nest.json``.

    ``group``: columns per scale (32, 64, 128); ``max_bits``: the deepest depth (2..8; every ``int{k}-g{group}``
    with ``k ≤ max_bits`` is offered); ``outliers``: elements per row every depth stores exactly (0, 1, 2, 4, 8, 16;
    :func:`bitalloc.nest.codes.pick_outliers`: offered as ``int{k}-g{group}+o{outliers}``); ``windows``: calibration (Hessians), ``fisher_windows`` the gradient pass
    (default: the same); ``template``: a GGUF source's :class:`~bitalloc.export.gguf.GGUFTemplate`, kept so the
    artifact can extract GGUFs; ``weights``: each depth's weight in the joint rounding
    (:func:`bitalloc.nest.codes.depth_weights` by default); ``passes``: sweeps of coordinate descent on every
    depth's output error after it (:mod:`bitalloc.nest.descent`; 0 = the joint rounding alone); ``refit``: how many
    of the shallowest depths get their own scale and zero per group (:mod:`bitalloc.nest.refit`; default
    :func:`~bitalloc.nest.refit.default_refit`).

    Resuming (:mod:`bitalloc.jobs.nest`, as :func:`bitalloc.pipeline.measure_model`): ``fisher_stats`` replaces the
    gradient pass (``on_fisher`` receives the statistics when it runs); ``start`` continues at its block, the
    blocks before it read back with ``start.load``; ``on_block(b, nested, hidden)`` is called once block ``b`` is
    nested, with the inputs of block ``b + 1``; ``before_publish(tmp)`` once the artifact is written and verified
    under its temporary name ``tmp``, before it is renamed into place.  Every block's shard holds the same bytes
    whether it was nested now or read back."""
    from ..calibrate.stream import stream_blocks
    from ..fisher import fisher_pass
    from ..io.paths import check_new_dir
    from ..models.view import ModelView
    from ..pipeline import _hash_tensors, fixed_bytes, model_fingerprint, tensor_infos

    refit = default_refit(group, max_bits) if refit is None else refit
    check_options(group, max_bits, outliers, passes, refit)
    dest = Path(out)
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    inputs = [*inputs, *([source] if source and Path(source).exists() else [])]
    check_new_dir(dest, inputs, overwrite, "artifact")
    view = view if view is not None else ModelView(model)
    place = placement if placement is not None else Placement()
    fw = windows if fisher_windows is None else fisher_windows
    grads = fisher_stats if fisher else None
    if fisher and grads is None:
        grads = fisher_pass(model, view, fw, batch_size=max(1, batch_size // 4), progress=progress,
                            placement=placement)
        if on_fisher is not None:
            on_fisher(grads)
    fp = {"model": model_fingerprint(model),
          "calibration": _hash_tensors([("windows", windows)] + ([("fisher_windows", fw)] if fisher else [])),
          "method": "nested-gptq" + (f"+descent{passes}" if passes else "") + (f"+refit{refit}" if refit else ""),
          "formats": ",".join(offered(group, max_bits, outliers)),
          "windows": f"{windows.shape[0]}x{windows.shape[1]}",
          "fisher_windows": f"{fw.shape[0]}x{fw.shape[1]}" if fisher else "none"}
    fixed_values = {f.name: model.get_parameter(f.name).detach().to(torch.float32).cpu().clone() for f in view.fixed()}
    rows: list[MeasureRow] = []
    entries: dict[str, Any] = {}
    digests: dict[str, str] = {}

    def verify(tmp: Path) -> None:
        with Artifact(tmp, verify=True) as art:  # structure, small files, table against the tensors
            for shard in sorted({e["shard"] for e in [*art.tensors.values(), *art.fixed.values()]}):
                with SafetensorsFile(tmp / shard) as sf:
                    compare_digests({k: v for k, v in digests.items() if k.startswith(shard + "/")},
                                    {f"{shard}/{k}": tensor_digest(sf.get(k)) for k in sf.keys()}, str(tmp / shard))
        if before_publish is not None:
            before_publish(tmp)

    def add(tmp: Path, b: int, nested: NestBlock) -> None:
        _write_shard(tmp, _shard(b), nested.stored, digests)
        rows.extend(nested.rows)
        entries.update(nested.entries)

    first = start.block if start is not None else 0
    current: list[NestBlock] = []

    def after(b: int, hidden: torch.Tensor) -> None:
        if on_block is not None:
            on_block(b, current[-1], hidden)

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_dir(dest, overwrite=overwrite, inputs=inputs, verify=verify) as tmp:
        for b in range(first):  # finished before an interruption: read back
            add(tmp, b, start.load(b))  # type: ignore[union-attr]
        for b, block in enumerate(stream_blocks(model, view, windows, fisher=grads, batch_size=batch_size,
                                                progress=progress, placement=placement, start_block=first,
                                                start_hidden=None if start is None else start.hidden,
                                                after_block=after), start=first):
            current[:] = [_nest_block(model, block, _shard(b), place, group, max_bits, weights, outliers, passes,
                                      refit)]
            del block
            add(tmp, b, current[0])
        shard = "tensors-9999.safetensors"
        _write_shard(tmp, shard, fixed_values, digests)
        fixed_entries = {n: {"shape": list(v.shape), "shard": shard} for n, v in fixed_values.items()}
        infos = tensor_infos(view)
        table = Measurement(tuple(infos), tuple(rows), fixed_bytes(view), view.total_params, fp)
        table.save(tmp / TABLE_FILE)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        text = nest_json(group, max_bits, outliers, refit, view.total_params, tied, entries, fixed_entries, fp,
                         {"gguf_template": template is not None})
        (tmp / META_FILE).write_text(text)
        save_config(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if template is not None:
            from .gguf import template_to_files

            template_to_files(template, tmp)
        files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())
                 if p.is_file() and not p.name.startswith("tensors-")}
        man = {"version": 1, "kind": "bitalloc.manifest", "files": files, "tensors": dict(sorted(digests.items()))}
        (tmp / MANIFEST_FILE).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    size = artifact_bytes(dest)
    log.info("wrote nested artifact %s: %d tensors, depths %d..%d, %d B", dest, len(entries), MIN_DEPTH, max_bits, size)
    return json.loads(text)


def _write_shard(tmp: Path, shard: str, tensors: dict[str, torch.Tensor], digests: dict[str, str]) -> None:
    got = write_safetensors_atomic(tmp / shard, tensors, {"format": "bitalloc-nest"}, manifest=False)
    digests.update({f"{shard}/{k}": v for k, v in got.items()})


def artifact_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file of an artifact on disk."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


__all__ = ["NestBlock", "NestStart", "artifact_bytes", "check_options", "nest_model", "nest_tensor"]
