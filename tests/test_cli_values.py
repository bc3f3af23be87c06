"""Option values the model cannot honour are refused at the precheck, before any weight or text is read."""
from __future__ import annotations

from pathlib import Path

import pytest

from bitalloc.cli import main
from tests.test_resume import make_hf_dir

SMALL = ["--windows", "2", "--formats", "int4-g32,int8-g128", "--method", "rtn", "--no-fisher", "-q"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("ctx") / "m")  # max_position_embeddings 128


def _no_load(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("bitalloc.cli.common._load_model", refuse)


@pytest.mark.parametrize("argv", [
    lambda m, t: ["measure", str(m), *SMALL, "--calib", str(m.parent / "calib.txt"), "--out", str(t / "t.json")],
    lambda m, t: ["quantize", str(m), "--format", "int4-g32", *SMALL, "--calib", str(m.parent / "calib.txt"),
                  "--out", str(t / "q")],
    lambda m, t: ["sweep", str(m), "--budgets", "6bpw", *SMALL, "--calib", str(m.parent / "calib.txt"),
                  "--out", str(t / "sw")],
])
@pytest.mark.parametrize("ctx", ["129", "99999999999999999999"])
def test_ctx_beyond_the_models_context_is_refused_before_loading(tiny, tmp_path, monkeypatch, capsys, argv, ctx):
    _no_load(monkeypatch)
    rc = main([*argv(tiny, tmp_path), "--ctx", ctx])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --ctx {ctx} is longer than the model's context of 128 tokens"), err
    assert list(tmp_path.iterdir()) == []


def test_eval_ctx_is_checked_against_the_reference(tiny, tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    packed = tmp_path / "packed"
    packed.mkdir()
    rc = main(["eval", str(packed), "--reference", str(tiny), "--text", str(tiny.parent / "calib.txt"),
               "--ctx", "200", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--ctx 200 is longer than the model's context of 128 tokens" in err, err
