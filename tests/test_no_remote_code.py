"""Class 1 of the hostile-input issue: no code from a model folder ever runs, and bitalloc never asks.

Each hostile folder holds Python modules that write a marker file when imported, named by ``auto_map`` entries
of ``config.json`` and ``tokenizer_config.json``; the CLI runs as a real subprocess with "y" lines on standard
input (what a driver piping ``yes`` or a person answering transformers' prompt would give).  The marker must
never appear, the process must not wait on standard input, and the outcome is either success (the built-in
architecture's own code) or one ``error:`` line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_resume import make_hf_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _plant(folder: Path, marker: Path, model_type: str | None = None) -> None:
    """Custom-code modules and ``auto_map`` entries naming them in the folder's configs."""
    for mod in ("evil_config", "evil_model", "evil_tok"):
        (folder / f"{mod}.py").write_text(MODULE.format(marker=str(marker)))
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {"model_type": "evil"}
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    if model_type is not None:
        cfg["model_type"] = model_type
    cfg_path.write_text(json.dumps(cfg))
    tok_path = folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text()) if tok_path.exists() else {}
    tok["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    tok["tokenizer_class"] = "EvilTokenizer"
    tok_path.write_text(json.dumps(tok))


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitalloc.cli", *argv], input="y\n" * 50, text=True,
                          capture_output=True, env=ENV, cwd=cwd, timeout=300)


def _measure_argv(model: Path, calib: Path, out: Path) -> list[str]:
    return ["measure", str(model), "--calib", str(calib), "--windows", "2", "--ctx", "16", "--method", "rtn",
            "--no-fisher", "--formats", "int4-g32", "-q", "--out", str(out)]


def _assert_safe(proc: subprocess.CompletedProcess, marker: Path) -> None:
    assert not marker.exists(), "code from the model folder ran"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr and "trust_remote_code" not in proc.stdout, proc.stdout
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("remote") / "model")


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_known_architecture_with_custom_code_uses_built_in_code(model_dir, tmp_path):
    """A llama folder whose configs also name custom classes: the built-in Llama code runs, never the folder's."""
    model = _copy(model_dir, tmp_path / "model")
    marker = tmp_path / "marker"
    _plant(model, marker)
    proc = _run(_measure_argv(model, model_dir.parent / "calib.txt", tmp_path / "table.json"), tmp_path)
    _assert_safe(proc, marker)


def test_unknown_architecture_with_custom_code_is_refused(model_dir, tmp_path):
    """An architecture that exists only as the folder's code: one line, and nothing imported from it."""
    model = _copy(model_dir, tmp_path / "model")
    marker = tmp_path / "marker"
    _plant(model, marker, model_type="evil")
    proc = _run(_measure_argv(model, model_dir.parent / "calib.txt", tmp_path / "table.json"), tmp_path)
    _assert_safe(proc, marker)
    assert proc.returncode == 2 and not (tmp_path / "table.json").exists()


def test_gguf_beside_custom_code_takes_its_tokenizer_from_the_gguf(tmp_path):
    """A .gguf whose folder holds configs naming custom code: the tokenizer and config come from the GGUF."""
    from tests.conftest import tiny_arch
    from tests.gguf_tiny import write_arch_gguf

    folder = tmp_path / "dl"
    folder.mkdir()
    path = write_arch_gguf(tiny_arch("llama"), folder / "model.gguf")
    marker = tmp_path / "marker"
    _plant(folder, marker)
    proc = _run(_measure_argv(path, path.parent / "calib.txt", tmp_path / "table.json"), tmp_path)
    _assert_safe(proc, marker)
    assert proc.returncode == 0, proc.stderr


def test_packed_output_with_custom_code_config_loads_without_running_it(model_dir, tmp_path):
    """``bitalloc.load`` of a packed directory whose config names custom code builds the built-in model."""
    import bitalloc
    from bitalloc.cli import main

    out = tmp_path / "q"
    argv = ["quantize", str(model_dir), "--format", "int4-g32", "--calib", str(model_dir.parent / "calib.txt"),
            "--windows", "2", "--ctx", "16", "-q", "--out", str(out)]
    assert main(argv) == 0
    marker = tmp_path / "marker"
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "evil_config.py").write_text(MODULE.format(marker=str(marker)))
    (out / "evil_model.py").write_text(MODULE.format(marker=str(marker)))
    try:
        model = bitalloc.load(out, verify=False) if "verify" in bitalloc.load.__code__.co_varnames \
            else bitalloc.load(out)
    except bitalloc.BitallocError:
        model = None  # a refusal (the edited config breaks the manifest) is as safe as a load
    assert not marker.exists()
    if model is not None:
        assert type(model).__module__.startswith("transformers.")
        assert torch.isfinite(next(model.parameters())).all()
