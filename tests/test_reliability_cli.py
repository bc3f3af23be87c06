"""Hostile and broken inputs through the CLI (in-process): exit status 2, exactly one ``error:`` line on stderr,
no traceback, nothing written.  Also: fixed tensors beyond the fp16 range, and the peak-memory line."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from bitalloc.cli import main

from test_resume import make_hf_dir, quantize_argv

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("good") / "model")


def _copy(good: Path, dest: Path) -> Path:
    shutil.copytree(good, dest)
    shutil.copy(good.parent / "calib.txt", dest.parent / "calib.txt")
    return dest


def _refused(capsys, argv: list[str], *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("error:") and "Traceback" not in cap.err
    for w in words:
        assert w in lines[0], lines[0]
    out = Path(argv[argv.index("--out") + 1])
    assert not out.exists() and not out.with_name(out.name + ".job").exists()
    return lines[0]


def _fmt_argv(model: Path, out: Path, calib: Path | None = None) -> list[str]:
    return ["quantize", str(model), "--format", "int4-g32", "--calib", str(calib or model.parent / "calib.txt"),
            "--windows", "2", "--ctx", "16", "-q", "--out", str(out)]


def _write_st(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def test_safetensors_with_huge_header_length(good, tmp_path, capsys):
    m = _copy(good, tmp_path / "m")
    _write_st(m / "model.safetensors", {}, b"", header_len=200 * 2**20)
    _refused(capsys, _fmt_argv(m, tmp_path / "o"), "invalid safetensors", "header")


def test_safetensors_with_overlapping_offsets(good, tmp_path, capsys):
    m = _copy(good, tmp_path / "m")
    hdr = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    _write_st(m / "model.safetensors", hdr, bytes(24))
    _refused(capsys, _fmt_argv(m, tmp_path / "o"), "invalid safetensors")


def test_safetensors_with_trailing_bytes(good, tmp_path, capsys):
    m = _copy(good, tmp_path / "m")
    with open(m / "model.safetensors", "ab") as f:
        f.write(b"\0" * 24)
    _refused(capsys, _fmt_argv(m, tmp_path / "o"), "invalid safetensors")


def test_nan_weight_is_named(good, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    m = _copy(good, tmp_path / "m")
    tensors = load_file(str(m / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    _refused(capsys, _fmt_argv(m, tmp_path / "o"), "model.layers.1.mlp.up_proj.weight", "NaN")


def test_gguf_with_huge_tensor_count(tmp_path, capsys):
    g = tmp_path / "evil.gguf"
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(64))
    (tmp_path / "calib.txt").write_text("some text " * 100)
    _refused(capsys, _fmt_argv(g, tmp_path / "o"), "invalid GGUF", "tensor")


def test_pickle_checkpoint_is_refused(good, tmp_path, capsys):
    m = _copy(good, tmp_path / "m")
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    _refused(capsys, _fmt_argv(m, tmp_path / "o"), "pickle")


def test_unknown_architecture(good, tmp_path, capsys):
    m = _copy(good, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "foo"}))
    _refused(capsys, _fmt_argv(m, tmp_path / "o"), "unsupported architecture", "'foo'")


def test_empty_calibration_text(good, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _refused(capsys, _fmt_argv(good, tmp_path / "o", empty), "empty")


def test_malformed_and_impossible_budgets(good, tmp_path, capsys):
    _refused(capsys, quantize_argv(good, tmp_path / "o", budget="3xx"), "budget")
    line = _refused(capsys, quantize_argv(good, tmp_path / "o", budget="0.5bpw"))
    assert "0.5bpw" in line or "budget" in line.lower()


def test_existing_output_path(good, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    capsys.readouterr()
    assert main(_fmt_argv(good, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "already exists" in err
    assert list(out.iterdir()) == [] and not (tmp_path / "o.job").exists()


def test_norm_beyond_fp16_range_is_stored_fp32_and_counted(tmp_path, capsys):
    from safetensors import safe_open

    from bitalloc.api import load

    m = make_hf_dir(tmp_path / "big", norm_value=1e6)
    out = tmp_path / "o"
    assert main(_fmt_argv(m, out)) == 0
    err = capsys.readouterr().err
    assert sum(line.startswith("peak memory: ") and line.endswith(" MiB") for line in err.splitlines()) == 1
    info = json.loads((out / "bitalloc.json").read_text())
    name = "model.layers.0.input_layernorm.weight"
    assert info["tensors"][name]["format"] == "fp32" and info["tensors"][name]["bytes"] == 64 * 4
    assert info["tensors"]["model.layers.1.input_layernorm.weight"]["format"] == "fp16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert info["bytes"] == stored == info["plan"]["total_bytes"]
    w = load(out).get_parameter(name)
    assert torch.isfinite(w).all() and float(w[3]) == 1e6


def test_model_folder_without_tokenizer_is_refused_before_loading(good, tmp_path, capsys, monkeypatch):
    """A folder of weights and config but no tokenizer files: one line before any weight is read."""
    from bitalloc.models import sources

    model = _copy(good, tmp_path / "model")
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    _refused(capsys, _fmt_argv(model, tmp_path / "out"), "no tokenizer files")
