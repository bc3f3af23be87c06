"""``bitalloc nest`` / ``bitalloc extract`` end to end on a tiny GGUF: a packed directory and a GGUF from one
artifact, refusals in one line before work."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bitalloc
from bitalloc.cli import main
from bitalloc.rounding import dequantize
from tests.gguf_tiny import write_loadable_gguf

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("nestcli")
    src = write_loadable_gguf(d / "tiny.gguf")
    out = d / "art"
    assert main(["nest", str(src), "--calib", str(d / "calib.txt"), "--windows", "4", "--ctx", "32",
                 "--fisher-windows", "2", "--group", "32", "--max-bits", "5", "--outliers", "0", "-q", "--out",
                 str(out)]) == 0
    return out


def test_extract_packed_and_load(art: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert main(["extract", str(art), "--budget", "4.5bpw", "--out", str(out), "-q"]) == 0
    info = bitalloc.load(out)
    same = bitalloc.load(art, budget="4.5bpw")
    assert all(torch.equal(p, dict(same.named_parameters())[n]) for n, p in info.named_parameters())


def test_extract_gguf_decodes_to_the_extracted_model(art: Path, tmp_path: Path) -> None:
    from bitalloc.models.sources import load_model
    from bitalloc.nest import extract

    out = tmp_path / "m.gguf"
    assert main(["extract", str(art), "--budget", "6bpw", "--gguf", str(out), "-q"]) == 0
    ex = extract(art, "6bpw", gguf=True)
    assert set(ex.plan.assignments.values()) <= {"int4-g32", "int5-g32"}
    model, _ = load_model(out, dtype=torch.float32)
    params = dict(model.named_parameters())
    for name in ex.plan.assignments:
        assert torch.equal(params[name], dequantize(ex.qtensors[name]).reshape(params[name].shape)), name
    for name, v in ex.fixed.items():
        assert torch.equal(params[name], v), name


def test_refusals_are_one_line(art: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ["extract", str(art), "--budget", "4bpw"],  # no output
        ["extract", str(art), "--budget", "4bpw", "--out", str(tmp_path / "a"), "--gguf", str(tmp_path / "a.gguf")],
        ["extract", str(art), "--budget", "1bpw", "--out", str(tmp_path / "b")],  # below the smallest model
        ["extract", str(art), "--budget", "3bpw", "--gguf", str(tmp_path / "c.gguf")],  # below Q4_1 everywhere
        ["extract", str(tmp_path), "--budget", "4bpw", "--out", str(tmp_path / "d")],  # not an artifact
        ["extract", str(art), "--budget", "4bpw", "--out", str(art / "inside")],  # output inside the input
        ["nest", "--group", "48", "--out", str(tmp_path / "e")],  # before the model is loaded
        ["nest", "--max-bits", "9", "--out", str(tmp_path / "f")],
        ["nest", "--descent-passes", "-1", "--out", str(tmp_path / "f")],
        ["nest", "--out", str(art)],  # exists
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, (argv, err)
    assert not any((tmp_path / n).exists() for n in "abcdef")


def test_eval_reads_an_artifact_at_a_budget(art: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    src = art.parent / "tiny.gguf"
    assert main(["eval", str(art), "--budget", "5bpw", "--reference", str(src), "--text", str(art.parent / "calib.txt"),
                 "--windows", "2", "--ctx", "32", "-q", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kld"] >= 0 and res["bpw"] <= 5.0
    assert main(["eval", str(art), "--reference", str(src), "--text", str(art.parent / "calib.txt"), "--ctx", "32",
                 "-q"]) == 2
    assert "budget" in capsys.readouterr().err


def test_the_gguf_target_resolves_an_extraction_budget(art: Path, tmp_path: Path) -> None:
    """As for ``bitalloc gguf``: a size is the whole file's (header and padding included), bits per weight count
    all tensor data; either way the target asserts it before writing."""
    from bitalloc.export.gguf_manifest import manifest_path
    from bitalloc.nest import extract

    big = tmp_path / "big.gguf"
    assert main(["extract", str(art), "--budget", "6bpw", "--gguf", str(big), "-q"]) == 0
    ex = extract(art, "6bpw", gguf=True)
    assert ex.capacity.unit == "tensor data" and ex.capacity.limit >= sum(
        q.nbytes() for n, q in ex.qtensors.items() if n in ex.plan.assignments) + 4 * sum(
        v.numel() for v in ex.fixed.values())
    budget = big.stat().st_size - 600  # a file size between the Q4_1-only and the 6 bpw models
    out = tmp_path / "sized.gguf"
    assert main(["extract", str(art), "--budget", f"{budget}B", "--gguf", str(out), "-q"]) == 0
    assert extract(art, f"{budget}B", gguf=True).capacity.unit == "file"
    assert out.stat().st_size <= budget < big.stat().st_size and manifest_path(out).is_file()


def test_a_moe_artifact_extracts_one_gguf_type_per_stacked_expert_tensor(tmp_path: Path) -> None:
    """A GGUF stores each layer's experts as one stacked tensor of one type: the extraction ties them, as
    ``bitalloc gguf`` does, and the file decodes to the extracted model."""
    from bitalloc.models.sources import load_model
    from bitalloc.nest import extract
    from bitalloc.nest.gguf import template_from_files
    from tests.gguf_tiny import write_arch_gguf
    from tests.moe_tiny import tiny_moe

    src = write_arch_gguf(tiny_moe("qwen3_moe"), tmp_path / "moe.gguf")
    art = tmp_path / "art"
    assert main(["nest", str(src), "--calib", str(tmp_path / "calib.txt"), "--windows", "4", "--ctx", "32",
                 "--fisher-windows", "2", "--group", "32", "--max-bits", "5", "-q", "--out", str(art)]) == 0
    stacks = [m for m in template_from_files(art).names.stacks.values() if len(m) > 1]
    assert stacks
    mixed = 0
    for budget in ("5.4bpw", "5.6bpw", "5.8bpw"):
        ex = extract(art, budget, gguf=True)
        for members in stacks:
            assert len({ex.plan.assignments[m] for m in members}) == 1, (budget, members)
        mixed += len(set(ex.plan.assignments.values())) > 1
    assert mixed  # the budgets do split the tensors between the two types
    out = tmp_path / "moe-out.gguf"
    assert main(["extract", str(art), "--budget", "5.6bpw", "--gguf", str(out), "-q"]) == 0
    ex = extract(art, "5.6bpw", gguf=True)
    model, _ = load_model(out, dtype=torch.float32)
    params = dict(model.named_parameters())
    for name in ex.plan.assignments:
        if name in params:  # experts come back fused or unfused as the loader builds them
            assert torch.equal(params[name], dequantize(ex.qtensors[name]).reshape(params[name].shape)), name


def test_a_gguf_budget_out_of_reach_is_refused_as_bitalloc_gguf_refuses_it(art: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for budget, word in (("3bpw", "smallest"), ("20bpw", "largest"), ("10KB", "smallest")):
        assert main(["extract", str(art), "--budget", budget, "--gguf", str(tmp_path / "g.gguf"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and word in err, (budget, err)
    assert not (tmp_path / "g.gguf").exists()
