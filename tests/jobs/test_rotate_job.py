"""``--rotate`` through the staged job: the model is rotated once it is loaded, every stage and the output see the
rotated weights (the same function), and what cannot be rotated or stored is refused before any measurement."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bitalloc.api import load_packed
from bitalloc.budget import Budget
from bitalloc.errors import InputError
from bitalloc.evaluate import check_same_architecture, evaluate
from bitalloc.jobs.config import RunConfig
from bitalloc.jobs.run import run_export
from bitalloc.models.rotate import parse_rotation
from bitalloc.models.sources import load_model
from bitalloc.targets.packed import PackedTarget
from tests.conftest import token_ids
from tests.test_resume import make_hf_dir


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    """A tied tiny Llama whose final norm is NOT uniform (so the residual rotation needs an untied head) and whose
    block norms are random (so folding them is exercised)."""
    path = make_hf_dir(tmp_path_factory.mktemp("rot") / "model")
    model, _ = load_model(path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _config(hf: Path, tmp_path: Path, **kw) -> RunConfig:
    base = dict(model=hf, calib_texts=(hf.parent / "calib.txt",), windows=2, ctx=16, job_dir=tmp_path / "job",
                formats=("int4-g32", "int8-g32"), method="gptq", fisher=False, progress=False,
                budgets=(Budget.parse("8.5bpw"),))
    return RunConfig(**{**base, **kw})


def test_parse_rotation_orders_the_modes_and_refuses_the_rest() -> None:
    assert parse_rotation("vo") == ("vo",)
    assert parse_rotation("vo+residual") == parse_rotation("Residual+VO") == ("residual", "vo")
    for bad in ("", "qk", "vo+vo", "vo,residual", "+"):
        with pytest.raises(InputError, match="--rotate"):
            parse_rotation(bad)


def test_untie_is_refused_without_residual_and_for_gguf(hf, tmp_path) -> None:
    with pytest.raises(InputError, match="only serves the residual"):
        _config(hf, tmp_path, rotate=("vo",), untie=True)
    with pytest.raises(InputError, match="cannot go into a GGUF"):
        _config(hf, tmp_path, rotate=("residual",), untie=True, output="gguf")


def test_rotation_changes_the_fingerprint_only_when_asked(hf, tmp_path) -> None:
    plain = _config(hf, tmp_path).fingerprint()
    assert "rotate" not in plain["options"]  # unrotated jobs keep their fingerprints
    rotated = _config(hf, tmp_path, rotate=("vo",)).fingerprint()
    assert rotated["options"]["rotate"] == "vo" and rotated["options"]["untie"] is False


def test_tied_head_with_a_non_uniform_final_norm_is_refused_before_measuring(hf, tmp_path) -> None:
    config = _config(hf, tmp_path, rotate=("residual",), keep_job=True)
    with pytest.raises(InputError, match="untie"):
        run_export(config, PackedTarget(tmp_path / "out"))
    assert not (config.job_dir / "measurement.json").exists()
    assert not (tmp_path / "out").exists()


def test_rotated_job_writes_the_rotated_model_with_the_source_function(hf, tmp_path) -> None:
    """vo+residual with an untied head at ~8 bits: the output's norms are folded (ones), its head is its own, it
    compares with the tied source (same architecture up to tying) and computes nearly its function; the
    unrotated job at the same budget writes other weights."""
    source, _ = load_model(hf)
    ids = token_ids(2, ctx=16, vocab=200)
    outs = {}
    for name, kw in (("plain", {}), ("rotated", {"rotate": ("residual", "vo"), "untie": True})):
        res = run_export(_config(hf, tmp_path / name, **kw), PackedTarget(tmp_path / name / "out"))
        assert res.plan is not None and res.written.info["bytes"] <= res.capacity.limit
        outs[name], _info = load_packed(tmp_path / name / "out")
    rot = outs["rotated"]
    assert not rot.config.tie_word_embeddings
    assert rot.lm_head.weight.data_ptr() != rot.model.embed_tokens.weight.data_ptr()
    for name, p in rot.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name
    check_same_architecture(rot, source, "rotated output")  # tying is storage: no refusal
    assert not torch.equal(rot.model.layers[0].self_attn.v_proj.weight,
                           outs["plain"].model.layers[0].self_attn.v_proj.weight)
    for name in ("plain", "rotated"):
        r = evaluate(outs[name], source, ids)
        assert r.kld < 1e-2, (name, r.kld)


def test_recovery_teacher_is_rotated_like_the_student(hf, tmp_path) -> None:
    """block recovery after a residual rotation: the teacher is loaded through the same rotation (an unrotated
    teacher's block outputs live in another basis, and training toward them would wreck the model)."""
    from bitalloc.recover.config import RecoverConfig

    from bitalloc.data import text_windows

    source, tok = load_model(hf)
    ids = text_windows(tok, [hf.parent / "calib.txt"], 16, 2)  # the windows recovery trains on
    base = _config(hf, tmp_path, rotate=("residual",), untie=True, formats=("int2-g32", "int3-g32"),
                   budgets=(Budget.parse("4bpw"),))
    klds = {}
    for name, config in (("none", base), ("block", dataclasses.replace(
            base, job_dir=tmp_path / "job2", recover=RecoverConfig(mode="block", steps=8)))):
        run_export(config, PackedTarget(tmp_path / name))
        klds[name] = evaluate(load_packed(tmp_path / name)[0], source, ids).kld
    assert klds["block"] < klds["none"], klds
