"""The registry of rounding methods (bitalloc.rounding.methods) and its per-block hook, and the layering it
allows: formats fit their grids without importing the rounding package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import bitalloc
from bitalloc.errors import InputError
from bitalloc.formats import get_format
from bitalloc.formats.base import QTensor
from bitalloc.measure import measure_tensor
from bitalloc.quantize import quantize_model, restore, snapshot, uniform_assignments
from bitalloc.rounding import methods
from bitalloc.rounding.methods import GPTQ, RTN, Rounder, get_rounder, method_names, register_rounder
from bitalloc.stats import LinearStats, TensorStats
from tests.conftest import tiny_llama, token_ids

SRC = Path(bitalloc.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code, as absolute names."""
    pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_formats_never_import_the_rounding_package() -> None:
    """The scale searches and the least-squares refits are the formats' own (formats/fit.py, formats/refit.py):
    no formats module imports bitalloc.rounding, lazily or not, so there is no formats <-> rounding cycle."""
    offenders = {p.name: sorted(m for m in _imports(p) if m.startswith("bitalloc.rounding"))
                 for p in sorted((SRC / "formats").glob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "bitalloc.formats.fit" in _imports(SRC / "formats" / "int.py")  # the scan sees relative imports


def test_the_registry_names_its_methods_and_refuses_others_in_one_line() -> None:
    assert method_names()[0] == "gptq" and set(method_names()) == {"gptq", "rtn"}
    assert isinstance(get_rounder("gptq"), GPTQ) and isinstance(get_rounder("rtn"), RTN)
    r = RTN()
    assert get_rounder(r) is r
    for bad in ("GPTQ", "awq", "", None, 3):
        with pytest.raises(InputError, match=r"unknown rounding method .*; use one of gptq, rtn") as e:
            get_rounder(bad)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        register_rounder(RTN())
    with pytest.raises(ValueError, match="needs a name"):
        register_rounder(Rounder())


class _Floor(Rounder):
    """A method only this test knows: every element to the grid point at or below it (clamped)."""

    name = "floor-test"

    def __init__(self) -> None:
        self.blocks: list[list[list[str]]] = []

    def round(self, w, grid, fmt, hessian):
        codes, _ = grid.snap(w)
        below = grid.values(codes) > w
        return (codes - below.to(codes.dtype)).clamp_min(0), grid

    def quantize_block(self, groups, collect, round_tensors):
        self.blocks.append([list(g) for g in groups])
        return super().quantize_block(groups, collect, round_tensors)


def test_a_registered_method_runs_through_measurement_and_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """One registry entry is all a method needs: measure_tensor and quantize_model call it by name, its
    per-block hook sees each block's sequential groups, and what it rounds is what is stored."""
    monkeypatch.setattr(methods, "_ROUNDERS", dict(methods._ROUNDERS))  # registering here leaks nowhere
    floor = register_rounder(_Floor())
    assert "floor-test" in method_names() and get_rounder("floor-test") is floor

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    stats = TensorStats(roles=(LinearStats(x.T @ x / 256, 256, torch.rand(16, generator=g), {}),))
    (row_floor,), (row_rtn,) = (measure_tensor("w", w, stats, ["int4-g32"], m) for m in ("floor-test", "rtn"))
    assert row_floor.output_error > row_rtn.output_error > 0  # flooring is worse than the nearest point

    model, windows = tiny_llama(), token_ids()
    plan = uniform_assignments(model, "int4-g32")
    saved = snapshot(model)
    q = quantize_model(model, None, plan, windows, "floor-test", progress=False)
    blocks = model.model.layers
    assert len(floor.blocks) == len(blocks)
    assert [n for grp in floor.blocks[0] for n in grp] == [
        n for n in plan if n.startswith("model.layers.0.")]
    name = "model.layers.0.self_attn.q_proj.weight"  # rounded from the original weights
    codes, grid = get_format("int4-g32").unpack(q[name])
    below = grid.values(codes) <= saved[name] + 1e-6
    assert bool((below | (codes == 0)).all())  # what is stored is the floor (or the lowest level)
    assert not bool((grid.values(codes) - saved[name]).abs().le(1e-6).all())
    restore(model, saved)
    q_rtn = quantize_model(model, None, plan, windows, "rtn", progress=False)
    assert any(not torch.equal(q[n].parts["weight_packed"], q_rtn[n].parts["weight_packed"])
               for n in plan if n.startswith("model.layers."))


def test_gptq_hook_collects_each_sequential_group_after_the_ones_before() -> None:
    calls: list[object] = []
    stored: list[list[str]] = []

    def collect(groups):
        calls.append(None if groups is None else list(groups))
        return {n: torch.eye(2) for g in ([["a", "b"], ["c"], ["d"]] if groups is None else
                                          [[["a", "b"], ["c"], ["d"]][i] for i in groups]) for n in g}

    def round_tensors(hs):
        stored.append(list(hs))
        return {name: QTensor("fp16", (1,), "float32", {"weight": torch.zeros(1)}) for name in hs}

    groups = [["a", "b"], ["c"], ["d"]]
    assert set(GPTQ().quantize_block(groups, collect, round_tensors)) == {"a", "b", "c", "d"}
    assert calls == [[0], [1], [2]] and stored == [["a", "b"], ["c"], ["d"]]  # a group's tensors together
    calls.clear(), stored.clear()
    assert set(RTN().quantize_block(groups, collect, round_tensors)) == {"a", "b", "c", "d"}
    assert calls == [None] and stored == [["a", "b", "c", "d"]]  # RTN: one pass over the block, all at once


def _count_factorisations(monkeypatch, module) -> list[int]:
    """Patch ``module.gptq_factor`` to record the column count of every factorisation."""
    calls: list[int] = []
    real = module.gptq_factor

    def counted(h, *a, **k):
        calls.append(int(h.shape[0]))
        return real(h, *a, **k)

    monkeypatch.setattr(module, "gptq_factor", counted)
    return calls


@pytest.mark.parametrize("fmt_id", ["q4_1", "int4-g32", "int3-row"])
def test_a_weight_in_row_blocks_is_factorised_once_with_each_blocks_own_codes(monkeypatch, fmt_id: str) -> None:
    """``quantize_chunks`` factorises the Hessian once (``GPTQ.prepare``) for all of a weight's row blocks, and
    every block's bytes are those of rounding the block alone with its own factorisation (as before)."""
    from bitalloc.rounding import quantize_chunks

    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(96, 64, generator=g), torch.randn(512, 64, generator=g) * torch.rand(64, generator=g) * 3
    h = x.T @ x / 512
    fmt = get_format(fmt_id)
    calls = _count_factorisations(monkeypatch, methods)
    parts = list(quantize_chunks(w, fmt, hessian=h, method="gptq", max_elems=16 * 64))
    assert len(parts) == 6 and calls == [64]
    imp = torch.diagonal(h).to(torch.float32).clamp_min(0)
    for sl, q in parts:
        w32 = w[sl].to(torch.float32)
        codes, grid = GPTQ().round(w32, fmt.fit(w32, imp), fmt, h)  # a raw Hessian: factorised here, per block
        alone = fmt.encode(codes, grid, tuple(w32.shape), "float32")
        assert {k: t.tolist() for k, t in q.parts.items()} == {k: t.tolist() for k, t in alone.parts.items()}
    assert len(calls) == 1 + len(parts)


def test_measurement_factorises_once_per_weight_and_rotation(monkeypatch) -> None:
    """The measurement's row blocks share one factorisation per Hessian: the weight's, and one per recorded
    rotation (``Rᵀ·H·R``); the rows do not change with the number of blocks."""
    from bitalloc.placement import Placement

    g = torch.Generator().manual_seed(12)
    w, x = torch.randn(64, 64, generator=g), torch.randn(256, 64, generator=g)
    st = TensorStats(roles=(LinearStats(x.T @ x / 256, 256, torch.rand(64, generator=g), {}),))
    calls = _count_factorisations(monkeypatch, methods)
    fmts = ["int2-g32", "int4-g32", "had-int4-g32"]
    timer = bitalloc.timing.StageTimer()
    small = measure_tensor("w", w, st, fmts, placement=Placement(stack_elems=2 * 16 * 64), timer=timer)
    assert calls == [64, 64] and timer.calls["measure.factor"] == 1
    whole = measure_tensor("w", w, st, fmts, placement=Placement())
    for a, b in zip(whole, small):
        assert a.format == b.format and a.output_error == pytest.approx(b.output_error, rel=1e-9)


def test_nest_factorises_once_per_weight(monkeypatch) -> None:
    from bitalloc.nest import build

    g = torch.Generator().manual_seed(13)
    w, x = torch.randn(64, 64, generator=g), torch.randn(256, 64, generator=g)
    st = TensorStats(roles=(LinearStats(x.T @ x / 256, 256, torch.rand(64, generator=g), {}),))
    calls = _count_factorisations(monkeypatch, build)
    from bitalloc.nest import codes as codes_mod
    inner = _count_factorisations(monkeypatch, codes_mod)
    build.nest_tensor("w", w, st, 32, 4, max_elems=16 * 64, passes=0)
    assert calls == [64] and inner == []  # four row blocks, one factorisation
