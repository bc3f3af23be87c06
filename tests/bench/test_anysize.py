"""The any-size bench's plumbing on the tiny Llama: BitStack points fit their budgets and resume from the cache;
the comparison rows, the table and the plot."""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import pytest
import torch

from bench import anysize, anysize_report
from bitalloc.budget import Budget
from bitalloc.jobs.store import Job
from bitalloc.models.view import ModelView
from bitalloc.pipeline import CachedReference
from bitalloc.quantize import snapshot
from bitalloc.sweep import Point
from tests.conftest import tiny_llama, token_ids


def _ctx(budgets: list[str]) -> dict:
    model = tiny_llama()
    view = ModelView(model)
    total = view.total_params
    return {"model": model, "view": view, "saved": snapshot(model), "calib": token_ids(4), "evals": token_ids(2, seed=5),
            "ref": CachedReference(copy.deepcopy(model)), "budgets": budgets, "total_params": total,
            "budget_bytes": {b: Budget.parse(b).resolve(total) for b in budgets}, "key": "k"}


def test_bitstack_points_fit_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(bitstack_blocks=3, bitstack_rank=4, bitstack_sort="ppl", bitstack_sort_windows=2,
                              bitstack_embedding="stack")
    budgets = ["1bpw", "4bpw", "6bpw", "9bpw"]
    ctx = _ctx(budgets)
    fp = {n: p.clone() for n, p in ctx["model"].named_parameters()}
    with Job(tmp_path / "job", {"t": 1}) as job:
        points, info = anysize.run_bitstack(args, ctx, anysize.Cache(job))
    assert [p.budget for p in points] == budgets[1:]  # 1 bpw is below one block of every weight: skipped
    assert all(p.bytes <= ctx["budget_bytes"][p.budget] and p.kind == "bitstack" for p in points)
    assert [p.bytes for p in points] == sorted(p.bytes for p in points) and points[0].kld > points[-1].kld
    assert info["levels_sorted_by_ppl"] >= 1 and info["base_bytes"] <= ctx["budget_bytes"]["4bpw"]
    assert all(torch.equal(p, fp[n]) for n, p in ctx["model"].named_parameters())  # fp weights restored
    monkeypatch.setattr(anysize.bs, "decompose_model", None)  # a resumed run decomposes nothing
    with Job(tmp_path / "job", {"t": 1}) as job:
        again, info2 = anysize.run_bitstack(args, _ctx(budgets), anysize.Cache(job))
    assert str(again) == str(points)  # (NaN predicted errors: compared as text)
    assert info2["base_bytes"] == info["base_bytes"]


def test_direct_and_uniform_points(tmp_path: Path) -> None:
    from bitalloc.pipeline import measure_model

    ctx = _ctx(["4bpw", "6bpw"])
    table = measure_model(ctx["model"], ctx["view"], ctx["calib"], ["int2-g32", "int4-g32", "int8-g32"], "gptq",
                          fisher=False, progress=False)
    args = argparse.Namespace(skip_direct=False, skip_uniform=False)
    with Job(tmp_path / "job", {"t": 1}) as job:
        points = anysize.run_quantized(args, ctx, anysize.Cache(job), table)
    kinds = [(p.kind, p.budget) for p in points]
    assert ("allocated", "4bpw") in kinds and ("allocated", "6bpw") in kinds and ("uniform", "4bpw") in kinds
    assert all(p.bytes <= ctx["budget_bytes"][p.budget] and p.method == "gptq" for p in points)
    rows = anysize_report.comparison(points, ["4bpw", "6bpw"], ctx["budget_bytes"], {})
    assert all(r["direct_kld"] is not None and r["uniform_kld"] is not None for r in rows)
    with Job(tmp_path / "job", {"t": 1}) as job:  # resumed: every point from the cache
        assert str(anysize.run_quantized(args, ctx, anysize.Cache(job), table)) == str(points)


def _pt(kind: str, budget: str, label: str, nbytes: int, kld: float) -> Point:
    return Point(kind, budget, "gptq" if kind in ("allocated", "uniform") else kind, label, nbytes, nbytes / 100,
                 math.nan, 10.0, 9.0, kld, 0.5, 1.0)


def test_comparison_table_and_plot() -> None:
    points = [_pt("allocated", "3bpw", "allocated", 300, 0.2), _pt("nested", "3bpw", "nested", 299, 0.22),
              _pt("uniform", "3bpw", "int3-g64", 290, 0.5), _pt("uniform", "3bpw", "int2-g32", 250, 0.4),
              _pt("uniform", "3bpw", "int4-g64", 420, 0.1), _pt("bitstack", "3bpw", "bitstack-9", 300, 3.0)]
    nest = {"nest_seconds": 5.0, "artifact_bytes": 330, "largest_model_bytes": 299, "artifact_ratio": 330 / 299,
            "largest_budget_model_bytes": 299, "artifact_over_largest_budget": 330 / 299,
            "extract": {"3bpw": {"extract_seconds": 0.5, "load_seconds": 0.1}}}
    (row,) = anysize_report.comparison(points, ["3bpw"], {"3bpw": 300}, nest)
    assert row["uniform_format"] == "int2-g32" and row["nested_beats_uniform"] is True
    assert row["nested_over_direct"] == 0.22 / 0.2 and row["bitstack_kld"] == 3.0 and row["extract_seconds"] == 0.5
    text = anysize_report.table([row], nest)
    assert "int2-g32" in text and "1.100" in text and "goal <= 1.15" in text
    assert anysize_report.plot_png(points, 800, "t")[:8] == b"\x89PNG\r\n\x1a\n"
