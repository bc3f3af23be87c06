"""Resumable ``bitalloc quantize``: interrupted runs (in-process and a real subprocess killed with SIGKILL at
random points) continue from their checkpoints and write a byte-identical output directory."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitalloc.io.atomic import TEMP_SUFFIX
from bitalloc.jobs import checkpoints
from bitalloc.jobs.config import default_job_dir
from tests.cli_process import kill_at_marks, run_to_end
from bitalloc.cli import main

torch.set_num_threads(1)

FORMATS = "int2-g32,int3-g32,int4-g32"


def make_hf_dir(path: Path, *, layers: int = 2, seed: int = 0, norm_value: float | None = None) -> Path:
    """A tiny Llama saved as safetensors with a WordLevel tokenizer trained here; writes ``calib.txt`` beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(180)]
    text = " ".join(rng.choice(words) for _ in range(3000))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
                      initializer_range=0.05)
    model = LlamaForCausalLM(cfg).float().eval()
    if norm_value is not None:
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[3] = norm_value
    path.mkdir(parents=True)
    model.save_pretrained(str(path), safe_serialization=True)
    fast.save_pretrained(str(path))
    (path.parent / "calib.txt").write_text(text)
    return path


def quantize_argv(model: Path, out: Path, *extra: str, budget: str = "3.5bpw") -> list[str]:
    return ["quantize", str(model), "--budget", budget, "--formats", FORMATS, "--calib",
            str(model.parent / "calib.txt"), "--windows", "4", "--ctx", "32", "--fisher-windows", "2", "-q",
            "--out", str(out), *extra]


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = read_tree(a), read_tree(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name] == tb[name], f"{name} differs"


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("m") / "model", layers=3)


@pytest.fixture(scope="module")
def reference(hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(quantize_argv(hf, out)) == 0
    return out


def test_uninterrupted_run_is_deterministic_and_cleans_its_job(hf, reference, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(quantize_argv(hf, out)) == 0
    assert_same_tree(reference, out)
    assert not default_job_dir(out).exists()
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["files"]) == set(read_tree(out)) - {"manifest.json"}
    assert "peak memory:" in capsys.readouterr().err


def _crash_at(monkeypatch, block: int) -> None:
    real = checkpoints._save_hidden

    def crashing(job, b, hidden, stage=checkpoints.QUANT_STAGE):
        real(job, b, hidden, stage)
        if b == block and stage == checkpoints.QUANT_STAGE:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_save_hidden", crashing)


def test_interrupted_run_resumes_to_identical_output(hf, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        _crash_at(m, 2)  # two of three blocks checkpointed
        assert main(quantize_argv(hf, out)) == 130
    assert not out.exists()
    assert {"measure", "plan"} <= set(json.loads((job / "job.json").read_text())["stages_done"])
    assert (job / "quantize" / "block0001.safetensors").exists()
    debris = tmp_path / f".out.killed{TEMP_SUFFIX}"  # what a kill during the export leaves
    debris.mkdir()
    caplog.set_level("INFO", logger="bitalloc.resume")
    assert main(quantize_argv(hf, out)) == 0
    assert not debris.exists()
    assert "resuming quantization at block 2" in caplog.text
    assert_same_tree(reference, out)
    assert not job.exists()


def _crash_measure_at(monkeypatch, block: int) -> None:
    real = checkpoints._save_hidden

    def crashing(job, b, hidden, stage=checkpoints.QUANT_STAGE):
        real(job, b, hidden, stage)
        if b == block and stage == checkpoints.MEASURE_STAGE:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_save_hidden", crashing)


def test_quantize_resumes_inside_the_measurement(hf, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    job = default_job_dir(out)
    with monkeypatch.context() as m:
        _crash_measure_at(m, 2)
        assert main(quantize_argv(hf, out)) == 130
    assert "measure" not in json.loads((job / "job.json").read_text())["stages_done"]
    assert (job / checkpoints.MEASURE_STAGE / "rows0001.json").exists()
    caplog.set_level("INFO", logger="bitalloc.resume")
    assert main(quantize_argv(hf, out)) == 0
    assert "resuming measurement at block 2" in caplog.text
    assert_same_tree(reference, out)


def measure_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["measure", str(model), "--formats", FORMATS, "--calib", str(model.parent / "calib.txt"),
            "--windows", "4", "--ctx", "32", "--fisher-windows", "2", "-q", "--out", str(out), *extra]


def test_measure_command_resumes_to_identical_table(hf, tmp_path, monkeypatch, caplog, capsys):
    ref = tmp_path / "ref.json"
    assert main(measure_argv(hf, ref)) == 0
    assert not default_job_dir(ref).exists()
    out = tmp_path / "m.json"
    job = default_job_dir(out)
    for block in (1, 2):  # two interruptions, the second one after resuming
        with monkeypatch.context() as m:
            _crash_measure_at(m, block)
            assert main(measure_argv(hf, out)) == 130
        assert not out.exists() and (job / checkpoints.MEASURE_STAGE / f"rows{block - 1:04d}.json").exists()
    caplog.set_level("INFO", logger="bitalloc.resume")
    assert main(measure_argv(hf, out)) == 0
    assert "resuming measurement at block 2" in caplog.text
    assert out.read_bytes() == ref.read_bytes() and not job.exists()
    # killed after writing the table, before removing the job: the rerun recognises its own output
    assert main(measure_argv(hf, out, "--overwrite", "--keep-job")) == 0
    assert main(measure_argv(hf, out)) == 0
    assert out.read_bytes() == ref.read_bytes() and not job.exists()
    capsys.readouterr()
    assert main(measure_argv(hf, out, "--method", "rtn")) == 2  # an existing table, no job: refused
    assert "already exists" in capsys.readouterr().err


def test_changed_budget_is_refused_naming_it(hf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_at(m, 1)
        assert main(quantize_argv(hf, out)) == 130
    capsys.readouterr()
    assert main(quantize_argv(hf, out, budget="4bpw")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "budget" in err and "3.5bpw" in err


def test_kill_after_export_rename_is_recognised(hf, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(quantize_argv(hf, out, "--keep-job")) == 0  # as if killed before the job was removed
    job = default_job_dir(out)
    assert job.exists()
    assert main(quantize_argv(hf, out)) == 0
    assert not job.exists()
    assert_same_tree(reference, out)
    # a tampered output is not accepted as the job's result
    assert main(quantize_argv(hf, out, "--keep-job")) == 2
    capsys.readouterr()
    assert main(quantize_argv(hf, tmp_path / "o2", "--keep-job")) == 0
    data = bytearray((tmp_path / "o2" / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "o2" / "model.safetensors").write_bytes(bytes(data))
    assert main(quantize_argv(hf, tmp_path / "o2")) == 2
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- real kill -9
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path):
    model = make_hf_dir(tmp_path / "model", layers=8, seed=3)
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "bitalloc.cli", *quantize_argv(model, ref)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=lambda: os.nice(19))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    job = default_job_dir(out)
    # kill during measurement, early in quantization, later in quantization
    marks = [job / "job.json", job / "quantize" / "block0001.safetensors", job / "quantize" / "block0004.safetensors"]
    assert kill_at_marks(quantize_argv(model, out), marks, out, seed=1234, pause=0.4) >= 2
    if not out.exists():
        run_to_end(quantize_argv(model, out))
    assert_same_tree(ref, out)
    assert not job.exists()
