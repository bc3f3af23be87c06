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
    monkeypatch.setattr("bitalloc.models.sources.load_model", refuse)


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


def _sweep(m: Path, t: Path, *extra: str) -> list[str]:
    return ["sweep", str(m), *SMALL, "--ctx", "16", "--calib", str(m.parent / "calib.txt"), "--out", str(t / "sw"),
            *extra]


@pytest.mark.parametrize("budgets, first, second", [("6bpw,6bpw", "6bpw", "6bpw"), ("6bpw, 6.0bpw", "6bpw", "6.0bpw"),
                                                    ("60000B,60000", "60000B", "60000")])
def test_a_budget_listed_twice_is_refused_before_loading(tiny, tmp_path, monkeypatch, capsys, budgets, first, second):
    _no_load(monkeypatch)
    rc = main(_sweep(tiny, tmp_path, "--budgets", budgets))
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: --budgets lists the same budget twice: {first!r} and {second!r}\n", err


@pytest.mark.parametrize("uniform, message", [
    ("int2-g32", "error: --uniform int2-g32 not among --formats"),
    ("int4-g32,fp32", "error: --uniform fp32 not among --formats"),
    (",", "error: --uniform is empty")])
def test_a_uniform_baseline_that_was_not_measured_is_refused_before_loading(tiny, tmp_path, monkeypatch, capsys,
                                                                            uniform, message):
    _no_load(monkeypatch)
    rc = main(_sweep(tiny, tmp_path, "--budgets", "6bpw", "--uniform", uniform))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message), err


def test_a_format_given_twice_is_measured_once():
    from bitalloc.cli.common import _formats

    assert _formats("int4-g32, INT4-G32,int8-g128,int4-g32") == ["int4-g32", "int8-g128"]


def test_eval_against_the_reference_of_another_model_is_refused(tiny, tmp_path, capsys):
    other = make_hf_dir(tmp_path / "o" / "m", layers=3, seed=1)
    packed = tmp_path / "packed"
    assert main(["quantize", str(other), "--format", "int4-g32", *SMALL, "--ctx", "16",
                 "--calib", str(other.parent / "calib.txt"), "--out", str(packed)]) == 0
    capsys.readouterr()
    rc = main(["eval", str(packed), "--reference", str(tiny), "--text", str(other.parent / "calib.txt"),
               "--windows", "2", "--ctx", "16", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: the packed directory's model and the reference are different models "
                                      "(30 vs 21 tensors; 'model.layers.2."), err
    assert main(["eval", str(packed), "--reference", str(other), "--text", str(other.parent / "calib.txt"),
                 "--windows", "2", "--ctx", "16", "-q"]) == 0


def test_an_output_another_run_wrote_meanwhile_is_not_replaced(tiny, tmp_path, monkeypatch, capsys):
    """Two runs with one --out and different --job directories: the later one refuses, never replaces."""
    import bitalloc.pipeline as pipeline

    out = tmp_path / "t.json"
    real = pipeline.measure_model

    def measure_while_another_run_writes(*a, **k):
        out.write_text("the other run's table")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "measure_model", measure_while_another_run_writes)
    rc = main(["measure", str(tiny), *SMALL, "--ctx", "16", "--calib", str(tiny.parent / "calib.txt"),
               "--out", str(out), "--job", str(tmp_path / "j2")])
    err = capsys.readouterr().err
    assert rc == 2 and f"output {out} already exists" in err, err
    assert out.read_text() == "the other run's table"


def test_atomic_write_without_overwrite_never_replaces_a_file_that_appeared(tmp_path):
    from bitalloc.errors import InputError
    from bitalloc.io.atomic import atomic_write

    dest = tmp_path / "out.bin"
    with pytest.raises(InputError, match="appeared while writing"):
        with atomic_write(dest) as f:
            f.write(b"new")
            dest.write_bytes(b"theirs")
    assert dest.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with atomic_write(tmp_path / "fresh.bin") as f:
        f.write(b"ok")
    assert (tmp_path / "fresh.bin").read_bytes() == b"ok" and len(list(tmp_path.iterdir())) == 2


def test_atomic_write_without_overwrite_is_atomic_against_a_racing_writer(tmp_path, monkeypatch):
    """The file appears between the last check and the move (another process): still refused, never replaced."""
    import os

    from bitalloc.errors import InputError
    from bitalloc.io import atomic

    dest = tmp_path / "out.bin"
    real_replace, real_link = os.replace, os.link

    def racing(move):
        def wrapper(src, dst, *a, **k):
            if Path(dst) == dest:
                dest.write_bytes(b"theirs")
            return move(src, dst, *a, **k)
        return wrapper

    monkeypatch.setattr(atomic.os, "replace", racing(real_replace))
    monkeypatch.setattr(atomic.os, "link", racing(real_link))
    with pytest.raises(InputError, match="appeared while writing"):
        with atomic.atomic_write(dest) as f:
            f.write(b"new")
    assert dest.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_plan_objective_fisher_on_a_table_without_fisher_errors_is_refused(tiny, tmp_path, capsys):
    table = tmp_path / "t.json"
    assert main(["measure", str(tiny), *SMALL, "--ctx", "16", "--calib", str(tiny.parent / "calib.txt"),
                 "--out", str(table)]) == 0  # --no-fisher
    capsys.readouterr()
    rc = main(["plan", str(table), "--budget", "6bpw", "--objective", "fisher", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: objective 'fisher' needs errors the measurement table lacks"), err
    assert not (tmp_path / "p.json").exists()
    assert main(["plan", str(table), "--budget", "6bpw", "--out", str(tmp_path / "p.json")]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--rotate", "qk"], "error: --rotate 'qk': use vo, residual or vo+residual"),
    (["--untie-head"], "error: --untie-head only serves the residual rotation"),
    (["--rotate", "vo", "--untie-head"], "error: --untie-head only serves the residual rotation"),
])
def test_bad_rotations_are_refused_before_loading(tiny, tmp_path, monkeypatch, capsys, extra, message):
    _no_load(monkeypatch)
    rc = main(["quantize", str(tiny), "--budget", "6bpw", *SMALL, "--calib", str(tiny.parent / "calib.txt"),
               "--ctx", "16", "--out", str(tmp_path / "q"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_cannot_be_rotated_is_refused_before_loading(tiny, tmp_path, monkeypatch, capsys):
    """Gemma 2's post-attention norm sits on the residual path: ``--rotate residual`` is refused from the config
    and headers, before any weight is read."""
    import shutil

    from tests.conftest import tiny_arch

    gemma = tmp_path / "gemma2"
    tiny_arch("gemma2").save_pretrained(str(gemma), safe_serialization=True)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, gemma / f.name)
    _no_load(monkeypatch)
    rc = main(["quantize", str(gemma), "--budget", "6bpw", *SMALL, "--calib", str(tiny.parent / "calib.txt"),
               "--ctx", "16", "--out", str(tmp_path / "q"), "--rotate", "residual"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot rotate the residual stream") and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()


def test_the_prechecks_read_the_model_headers_once(tiny, tmp_path, monkeypatch, capsys):
    """The budget and rotation prechecks share one meta model (one read of the config and tensor headers)."""
    import bitalloc.models.sources as sources
    from bitalloc.errors import InputError

    calls = []
    real = sources.meta_model

    def counted(source):
        calls.append(source)
        return real(source)

    def stop(*a, **k):
        raise InputError("stopped at the load")

    monkeypatch.setattr(sources, "meta_model", counted)
    monkeypatch.setattr("bitalloc.cli.common._load_model", stop)
    monkeypatch.setattr("bitalloc.models.sources.load_model", stop)
    rc = main(["quantize", str(tiny), "--budget", "6bpw", *SMALL, "--calib", str(tiny.parent / "calib.txt"),
               "--ctx", "16", "--out", str(tmp_path / "q"), "--rotate", "vo"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: stopped at the load"), err  # both prechecks passed
    assert len(calls) == 1
