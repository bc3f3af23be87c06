"""``--to vllm``: the compressed-tensors checkpoint made only of formats vLLM has kernels for (the table of
:mod:`bitalloc.targets.vllm`), the others refused in one line before the model is loaded; ``export --to vllm``
refuses a packed directory holding one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitalloc.cli import build_parser, main
from bitalloc.targets.vllm import VLLM_DEFAULT_FORMATS, check_runs, why_not
from tests.cli.ct_cli import quantize_argv as _argv
from tests.cli.ct_cli import refused_before_loading
from tests.test_resume import make_hf_dir

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("vllm") / "model")


@pytest.mark.parametrize("fmt, ok", [("int4-g32-sym", True), ("int4-g128-sym", True), ("int8-row-sym", True),
                                     ("int4-row-sym", True), ("int8-g64-sym", True), ("fp8", True), ("nvfp4", True),
                                     ("fp16", True), ("bf16", True),
                                     ("int3-g64-sym", False), ("int2-g32-sym", False), ("int5-g64-sym", False),
                                     ("int6-g128-sym", False), ("int4-g32", False), ("int4-g32-zp", False),
                                     ("mxfp4", False), ("fp32", False), ("q4_0", False),
                                     ("int4-g32-dq", False)])
def test_the_table(fmt, ok):
    assert (why_not(fmt) is None) == ok


def test_defaults_are_runnable_and_expressible():
    from bitalloc.export.ct_schemes import check_expressible

    check_runs(VLLM_DEFAULT_FORMATS.split(","))
    check_expressible(VLLM_DEFAULT_FORMATS.split(","))
    args = build_parser().parse_args(["quantize", "--budget", "5bpw", "--to", "vllm", "--out", "o"])
    assert args.formats == VLLM_DEFAULT_FORMATS
    explicit = build_parser().parse_args(["quantize", "--budget", "5bpw", "--formats", "int3-g32-sym,fp16", "--to",
                                          "vllm", "--out", "o"])
    assert explicit.formats == "int3-g32-sym,fp16"  # kept: the run config refuses it


@pytest.mark.parametrize("formats, match", [("int3-g32-sym,int4-g32-sym,fp16", "no kernel for 3-bit"),
                                            ("int4-g32-zp,fp16", "zero points"),
                                            ("int4-g32-dq,fp16", "no format")])
def test_unrunnable_formats_refused_before_loading(hf, tmp_path, capsys, formats, match, monkeypatch):
    err = refused_before_loading(hf, tmp_path / "o", capsys, monkeypatch,
                                 "--budget", "6bpw", "--to", "vllm", "--formats", formats)
    assert match in err


def test_quantize_to_vllm_writes_runnable_formats(hf, tmp_path, capsys):
    out = tmp_path / "v"
    fmts = "int4-g32-sym,int8-row-sym,int4-g64-sym,fp16"
    assert main(_argv(hf, out, "--budget", "7bpw", "--to", "vllm", "--formats", fmts)) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    for g in cfg["config_groups"].values():
        assert g["weights"]["num_bits"] in (4, 8) and g["weights"]["symmetric"] and g["input_activations"] is None
    stored = json.loads((out / "bitalloc.json").read_text())["formats"]
    assert "int4-g32-sym" in stored.values() and all(why_not(f) is None for f in stored.values())
    default = tmp_path / "d"  # the default candidates, fp8 and nvfp4 among them
    assert main(_argv(hf, default, "--budget", "8bpw", "--to", "vllm")) == 0
    stored = json.loads((default / "bitalloc.json").read_text())["formats"]
    assert len(set(stored.values())) > 2 and all(why_not(f) is None for f in stored.values())


def test_export_to_vllm_refuses_an_unrunnable_tensor(hf, tmp_path, capsys):
    packed = tmp_path / "packed"
    assert main(_argv(hf, packed, "--budget", "6bpw", "--formats", "int3-g32-sym,int4-g32-sym,fp16")) == 0
    capsys.readouterr()
    stored = json.loads((packed / "bitalloc.json").read_text())["tensors"]
    assert "int3-g32-sym" in {m["format"] for m in stored.values()}  # the allocator used the 3-bit format
    assert main(["export", str(packed), "--to", "vllm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot be run by vLLM" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _packed(out: Path, mix: tuple[str, ...]) -> None:
    """A packed directory of a tiny Llama: embedding fp16, the linears in ``mix`` taken in turn."""
    from bitalloc.export.packed import save_packed
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import plan_for_assignments
    from bitalloc.quantize import quantize_model
    from conftest import tiny_llama, token_ids

    model = tiny_llama(tie=True)
    view = ModelView(model)
    refs = [r for r in view.quantizable() if r.kind != "embedding"]
    a = {r.name: "fp16" for r in view.quantizable()} | {r.name: mix[i % len(mix)] for i, r in enumerate(refs)}
    plan = plan_for_assignments(view, a, "mix")
    save_packed(out, model, view, quantize_model(model, view, plan, token_ids(2), "rtn", progress=False), plan)


def test_fused_groups_share_a_format(hf, tmp_path, capsys):
    out = tmp_path / "v"
    assert main(_argv(hf, out, "--budget", "7bpw", "--to", "vllm", "--formats",
                      "int4-g32-sym,int8-row-sym,int4-g64-sym,fp16")) == 0
    stored = json.loads((out / "bitalloc.json").read_text())["formats"]
    for b in range(2):
        p = f"model.layers.{b}."
        assert len({stored[p + f"self_attn.{x}_proj.weight"] for x in "qkv"}) == 1
        assert len({stored[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up")}) == 1
    mixed, ct = tmp_path / "mixed", tmp_path / "ct"
    _packed(mixed, ("int4-g32-sym", "int8-row-sym"))  # q and k in different formats
    capsys.readouterr()
    assert main(["export", str(mixed), "--to", "vllm", "--out", str(ct)]) == 2
    err = capsys.readouterr().err
    assert "one fused layer" in err and "q_proj int4-g32-sym" in err and len(err.strip().splitlines()) == 1
    assert not ct.exists()
    assert main(["export", str(mixed), "--to", "compressed-tensors", "--out", str(ct)]) == 0  # transformers: fine
    same = tmp_path / "same"
    _packed(same, ("int4-g32-sym",))
    assert main(["export", str(same), "--to", "vllm", "--out", str(tmp_path / "ct2")]) == 0


def test_library_callers_need_the_fused_constraint(hf, tmp_path):
    from bitalloc.budget import Budget
    from bitalloc.errors import InputError
    from bitalloc.jobs.config import RunConfig

    kw = dict(model=hf, calib_texts=(hf.parent / "calib.txt",), windows=2, ctx=16, job_dir=tmp_path / "job",
              formats=("int4-g32-sym", "fp16"), method="rtn", fisher=False, progress=False,
              budgets=(Budget.parse("7bpw"),), output="vllm")
    with pytest.raises(InputError, match="--constraints fused"):
        RunConfig(**kw)
    RunConfig(**kw, constraints="fused")
    with pytest.raises(InputError, match="no kernel for 3-bit"):
        RunConfig(**(kw | {"formats": ("int3-g32-sym", "fp16")}), constraints="fused")


def test_config_names_the_model_class(tmp_path):
    """A model built from a config (or read from a GGUF) has no ``architectures``; the outputs name its class, as
    ``save_pretrained`` does (vLLM picks the model class from it: Gemma2Model, without its head, otherwise)."""
    packed = tmp_path / "p"
    _packed(packed, ("int4-g32-sym",))
    assert json.loads((packed / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert main(["export", str(packed), "--to", "vllm", "--out", str(tmp_path / "ct")]) == 0
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
