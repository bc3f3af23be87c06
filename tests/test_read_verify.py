"""Reading is verified: ``bitalloc.load`` / ``read_packed`` / ``bitalloc eval`` check ``manifest.json`` before
using the weights (a flipped bit, a missing or extra file, a missing manifest: one line), and validate a crafted
``bitalloc.json`` and ``config.json`` strictly even with ``verify=False``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from bitalloc.api import load
from bitalloc.cli import main
from bitalloc.errors import BitallocError, InputError
from bitalloc.export.packed import read_packed, save_packed
from bitalloc.models.view import ModelView
from bitalloc.pipeline import plan_for_assignments
from bitalloc.quantize import quantize_model, uniform_assignments

from conftest import tiny_llama, token_ids

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    model = tiny_llama()
    view = ModelView(model)
    plan = plan_for_assignments(view, uniform_assignments(model, "int4-g32", view), "uniform int4-g32")
    q = quantize_model(model, view, plan, token_ids(2), "rtn", progress=False)
    out = tmp_path_factory.mktemp("packed") / "o"
    save_packed(out, model, view, q, plan, None)
    return out


def _copy(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "o"))


def _flip(path: Path, offset: int = -1) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_intact_directory_loads_verified(packed):
    model = load(packed)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert read_packed(packed)[0]["kind"] == "bitalloc.packed"


@pytest.mark.parametrize("damage, words", [
    (lambda d: _flip(d / "model.safetensors"), ["model.safetensors differs"]),
    (lambda d: _flip(d / "bitalloc.json", 5), ["bitalloc.json differs"]),
    (lambda d: _flip(d / "config.json", 3), ["config.json differs"]),
    (lambda d: (d / "notes.txt").write_text("x"), ["unexpected notes.txt"]),
    (lambda d: (d / "config.json").unlink(), ["missing config.json"]),
    (lambda d: (d / "manifest.json").unlink(), ["manifest.json is missing", "verify=False"]),
    (lambda d: (d / "manifest.json").write_bytes(b"{\"files\": \xff}"), ["manifest", "not UTF-8"]),
    (lambda d: (d / "manifest.json").write_text("[1, 2"), ["manifest", "not valid JSON"]),
])
def test_damage_is_one_line_before_any_weight_is_used(packed, tmp_path, damage, words):
    d = _copy(packed, tmp_path)
    damage(d)
    with pytest.raises(InputError) as e:
        load(d)
    msg = _one_line(e)
    for w in words:
        assert w in msg, msg


def test_tensor_digest_mismatch_in_manifest(packed, tmp_path):
    d = _copy(packed, tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    key = sorted(man["tensors"])[0]
    man["tensors"][key] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(InputError, match=f"{key} differs"):
        read_packed(d)
    man["tensors"][key] = "not-a-digest"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(InputError, match="not a SHA-256 digest"):
        read_packed(d)


def test_no_verify_reads_a_changed_file(packed, tmp_path):
    d = _copy(packed, tmp_path)
    (d / "manifest.json").unlink()
    (d / "notes.txt").write_text("x")
    assert load(d, verify=False) is not None
    import bitalloc

    with pytest.raises(InputError, match="manifest.json is missing"):
        bitalloc.load(d)
    assert bitalloc.load(d, verify=False) is not None


def _meta_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        info = json.loads((d / "bitalloc.json").read_text())
        fn(info)
        (d / "bitalloc.json").write_text(json.dumps(info))
    return edit


def _first(info: dict) -> dict:
    return info["tensors"]["model.layers.0.self_attn.q_proj.weight"]


def _set(info: dict, key: str, value) -> None:
    _first(info)[key] = value


@pytest.mark.parametrize("edit, words", [
    (_meta_edit(lambda i: _set(i, "format", "int9-g7")), ["q_proj.weight", "format", "int9"]),
    (_meta_edit(lambda i: _set(i, "format", "q4_k")), ["q_proj.weight", "q4_k"]),  # rows not a multiple of 256
    (_meta_edit(lambda i: _set(i, "format", "int8-g32")), ["q_proj.weight", "takes exactly"]),
    (_meta_edit(lambda i: _set(i, "shape", [64, 0])), ["q_proj.weight", "shape"]),
    (_meta_edit(lambda i: _set(i, "shape", "64x64")), ["q_proj.weight", "shape", "JSON array"]),
    (_meta_edit(lambda i: _set(i, "shape", [32, 128])), ["q_proj.weight"]),
    (_meta_edit(lambda i: _set(i, "bytes", 1e309)), []),  # json.dumps writes Infinity: refused as not a number
    (_meta_edit(lambda i: _set(i, "dtype", {"a": 1})), ["dtype"]),
    (_meta_edit(lambda i: _first(i)["parts"].__setitem__("weight_scale", "nope")), ["no stored tensor 'nope'"]),
    (_meta_edit(lambda i: _first(i)["parts"].pop("weight_zero")), ["q_proj.weight"]),
    (_meta_edit(lambda i: i["tensors"].pop("model.norm.weight")), ["no entry describes", "model.norm.weight"]),
    (_meta_edit(lambda i: i.__setitem__("bytes", "many")), ["bytes"]),
    (_meta_edit(lambda i: i.__setitem__("bpw", 1.0)), ["bpw", "disagrees"]),
    (_meta_edit(lambda i: i.__setitem__("tensors", [])), ["tensors", "JSON object"]),
    (_meta_edit(lambda i: i.pop("total_params")), ["total_params"]),
    (lambda d: (d / "bitalloc.json").write_bytes(b"{\"kind\": \"\xfe\"}"), ["bitalloc.json", "not UTF-8"]),
    (lambda d: (d / "bitalloc.json").write_text("{" * 100000), ["bitalloc.json", "not valid JSON"]),
])
def test_crafted_description_is_refused_without_verification(packed, tmp_path, edit, words):
    d = _copy(packed, tmp_path)
    edit(d)
    with pytest.raises(BitallocError) as e:
        load(d, verify=False)
    msg = _one_line(e)
    assert "bitalloc.json" in msg or "does not match its config" in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("change, words", [
    ({"hidden_size": 128}, ["does not match its config"]),
    ({"num_attention_heads": 0}, ["config.json"]),
    ({"num_hidden_layers": 1}, ["does not match its config", "unknown"]),
    ({"vocab_size": "many"}, ["config"]),
])
def test_crafted_config_is_refused_before_the_model_is_built(packed, tmp_path, change, words):
    d = _copy(packed, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BitallocError) as e:
        load(d, verify=False)
    msg = _one_line(e)
    for w in words:
        assert w in msg, msg


def test_eval_refuses_a_flipped_bit_in_one_line(packed, tmp_path, capsys):
    d = _copy(packed, tmp_path)
    _flip(d / "model.safetensors")
    ref = tmp_path / "no-such-model"  # the same architecture (checked before any work), a broken tokenizer
    tiny_llama().save_pretrained(ref)
    (ref / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    assert main(["eval", str(d), "--reference", str(ref), "--ctx", "16", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "model.safetensors differs" in err[0], err
    # --no-verify skips the manifest: the failure is now the (absent) reference model, not the weights
    assert main(["eval", str(d), "--no-verify", "--reference", str(ref), "--ctx", "16", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs" not in err[0] and "no-such-model" in err[0], err
