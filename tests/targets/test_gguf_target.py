"""The GGUF as a job target: a file budget or a bpw budget resolved into tensor bytes, the exact size asserted
before anything is written, its own finished output recognised from the manifest saved before the write."""
from __future__ import annotations

from pathlib import Path

import pytest

from bitalloc.budget import Budget
from bitalloc.errors import BudgetError
from bitalloc.export.gguf import read_template
from bitalloc.export.gguf_manifest import manifest_path
from bitalloc.models.sources import load_model
from bitalloc.models.view import ModelView
from bitalloc.pipeline import plan_for_assignments
from bitalloc.quantize import quantize_model
from bitalloc.targets.base import Capacity
from bitalloc.targets.gguf import GGUFTarget, allocated_gguf_names, split_budget
from tests.conftest import token_ids
from tests.gguf_tiny import write_loadable_gguf


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_loadable_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


def test_split_budget_file_and_bpw(src):
    tpl = read_template(src)
    model, _ = load_model(src)
    view = ModelView(model)
    alloc = list(allocated_gguf_names(view, tpl).values())
    file_cap = split_budget(tpl, alloc, Budget.parse("80KB"), view.total_params)
    assert file_cap.unit == "file" and file_cap.limit == 80_000
    assert file_cap.allocatable + file_cap.overhead == file_cap.limit and file_cap.overhead > 0
    bpw_cap = split_budget(tpl, alloc, Budget.parse("5bpw"), view.total_params)
    assert bpw_cap.unit == "tensor data" and bpw_cap.limit == Budget.parse("5bpw").resolve(view.total_params)
    assert bpw_cap.overhead < file_cap.overhead  # tensor data only: no header, no padding
    assert file_cap.plan_budget(0).text == str(file_cap.allocatable)


def test_writer_asserts_the_size_and_recognises_its_output(src, tmp_path):
    tpl = read_template(src)
    model, _ = load_model(src)
    view = ModelView(model)
    plan = plan_for_assignments(view, {r.name: "q8_0" for r in view.quantizable()}, "uniform q8_0")
    originals = {f.name: model.get_parameter(f.name).detach().clone() for f in view.fixed()}
    q = quantize_model(model, view, plan, token_ids(2, 16), "rtn", progress=False)
    target = GGUFTarget(tmp_path / "o.gguf", tpl)
    prepared = target.prepare(model, view, plan, q, originals, None)
    size, data = prepared.sizes["file"], prepared.sizes["tensor data"]
    assert data < size
    for unit, n in (("file", size), ("tensor data", data)):
        with pytest.raises(BudgetError, match="over its budget"):
            target.write_verified(prepared, Capacity("x", n - 1, 0, 0, unit), overwrite=False)
    assert not target.out.exists() and not manifest_path(target.out).exists()
    assert target.is_ours(prepared.expected) is None
    written = target.write_verified(prepared, Capacity("x", size, 0, 0, "file"), overwrite=False)
    assert written.file_size == size == target.out.stat().st_size
    assert target.is_ours(prepared.expected) is not None
    assert target.is_ours({**prepared.expected, "files": {"o.gguf": "0" * 64}}) is None
