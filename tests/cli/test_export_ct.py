"""``bitalloc quantize --to compressed-tensors`` and ``bitalloc export PACKED_DIR --to compressed-tensors``: the
formats restricted before any load, the checkpoint written, read by ``bitalloc eval`` / ``bitalloc.load`` and by
transformers to the same logits; a packed directory holding a format compressed-tensors cannot express refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitalloc.cli import build_parser, main
from bitalloc.errors import InputError
from bitalloc.formats import FormatError
from tests.cli.ct_cli import quantize_argv as _argv
from tests.cli.ct_cli import refused_before_loading
from tests.test_resume import make_hf_dir

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("ct") / "model")


def test_default_formats_become_the_expressible_ones():
    args = build_parser().parse_args(["quantize", "--budget", "4bpw", "--to", "compressed-tensors", "--out", "o"])
    fmts = args.formats.split(",")
    assert "fp16" in fmts and all(f == "fp16" or f.endswith("-sym") for f in fmts)
    args = build_parser().parse_args(["quantize", "--budget", "4bpw", "--out", "o"])
    assert "int4-g128" in args.formats.split(",")  # the packed default is unchanged
    explicit = build_parser().parse_args(["quantize", "--budget", "4bpw", "--formats", "int4-g32,fp16", "--to",
                                          "compressed-tensors", "--out", "o"])
    assert explicit.formats == "int4-g32,fp16"  # kept: the run config refuses it


def test_default_formats_leave_out_what_has_no_scheme():
    from bitalloc.targets.compressed_tensors import default_formats

    assert default_formats("int4-g32-dq,int4-g64,q4_0,nvfp4,fp16") == "int4-g64-sym,nvfp4,fp16"


@pytest.mark.parametrize("formats, budget, match", [("int4-g32,fp16", "6bpw", "integer zero point"),
                                                    ("q4_0,fp16", "6bpw", "no format"),
                                                    ("int4-g32-sym", "4.57bpw", "fp16, bf16 or fp32")])
def test_inexpressible_formats_refused_before_loading(hf, tmp_path, capsys, formats, budget, match, monkeypatch):
    err = refused_before_loading(hf, tmp_path / "o", capsys, monkeypatch,
                                 "--budget", budget, "--to", "compressed-tensors", "--formats", formats)
    assert match in err


def test_quantize_to_compressed_tensors_then_eval_and_transformers(hf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from bitalloc import load

    out = tmp_path / "ct"
    fmts = "int2-g32-sym,int4-g32-sym,int8-row-sym,int4-g64-sym,fp16"
    assert main(_argv(hf, out, "--budget", "8bpw", "--to", "compressed-tensors", "--formats", fmts)) == 0
    assert "wrote" in capsys.readouterr().out
    info = json.loads((out / "bitalloc.json").read_text())
    limit = int(8 * info["total_params"] / 8)  # 8 bpw over every stored weight
    assert info["bytes"] <= limit
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ours = load(out)
    hf_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_model(ids).logits, rtol=0, atol=0)
    calib = str(hf.parent / "calib.txt")
    assert main(["eval", str(out), "--reference", str(hf), "--text", calib, "--windows", "2", "--ctx", "16", "-q",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bytes"] == info["bytes"] and res["top1"] > 0.5
    # the same command again: refused as an existing output; with --overwrite, replaced (it holds a manifest)
    assert main(_argv(hf, out, "--budget", "8bpw", "--to", "compressed-tensors", "--formats", fmts)) == 2
    assert main(_argv(hf, out, "--budget", "8bpw", "--to", "compressed-tensors", "--formats", fmts,
                      "--overwrite")) == 0


def test_export_a_packed_directory(hf, tmp_path, capsys):
    from bitalloc import load

    packed, out = tmp_path / "packed", tmp_path / "ct"
    assert main(_argv(hf, packed, "--format", "int4-g32-sym")) == 0  # every tensor, the embedding included
    assert main(["export", str(packed), "--to", "compressed-tensors", "--out", str(out)]) == 2
    assert "not a linear module" in capsys.readouterr().err
    assert not out.exists()
    packed2 = tmp_path / "packed2"
    _packed_with_fp16_embedding(packed2)
    assert main(["export", str(packed2), "--to", "compressed-tensors", "--out", str(out)]) == 0
    a, b = load(packed2), load(out)
    for n, p in a.named_parameters():
        assert torch.equal(p, b.get_parameter(n))
    ct = json.loads((out / "bitalloc.json").read_text())
    assert ct["plan"] == json.loads((packed2 / "bitalloc.json").read_text())["plan"]
    asym = tmp_path / "asym"
    assert main(_argv(hf, asym, "--format", "int4-g32")) == 0
    capsys.readouterr()
    assert main(["export", str(asym), "--to", "compressed-tensors", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "integer zero point" in err and len(err.strip().splitlines()) == 1


def _packed_with_fp16_embedding(out: Path) -> None:
    from bitalloc.export.packed import save_packed
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import plan_for_assignments
    from bitalloc.quantize import quantize_model
    from conftest import tiny_llama, token_ids

    model = tiny_llama(tie=True)
    view = ModelView(model)
    mix = ("int4-g32-sym", "int2-g64-sym", "int8-row-sym", "int3-g32-sym")
    a = {r.name: "fp16" if r.kind == "embedding" else mix[i % len(mix)] for i, r in enumerate(view.quantizable())}
    plan = plan_for_assignments(view, a, "mix")
    save_packed(out, model, view, quantize_model(model, view, plan, token_ids(2), "gptq", progress=False), plan)


def test_export_paths_checked(hf, tmp_path, capsys):
    packed = tmp_path / "packed"
    assert main(_argv(hf, packed, "--format", "int4-g32-sym")) == 0
    assert main(["export", str(packed), "--to", "compressed-tensors", "--out", str(packed / "inside")]) == 2
    assert "error:" in capsys.readouterr().err


def test_library_callers_get_the_same_refusal(hf, tmp_path):
    from bitalloc.budget import Budget
    from bitalloc.jobs.config import RunConfig

    base = dict(model=hf, calib_texts=(hf.parent / "calib.txt",), windows=2, ctx=16, job_dir=tmp_path / "job",
                budgets=(Budget.parse("8bpw"),), output="compressed-tensors")
    with pytest.raises(FormatError):
        RunConfig(formats=("int4-g128", "fp16"), **base)
    with pytest.raises(InputError, match="--format"):
        RunConfig(formats=("int4-g32-sym", "fp16"), uniform_format="int4-g32-sym", **base)


def test_help(capsys):
    for argv in (["export", "--help"], ["quantize", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--to" in out and "compressed-tensors" in out
    assert "export" in build_parser().format_help()
