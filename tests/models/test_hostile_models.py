"""Hostile and careless model inputs (#16): every one is one InputError line, raised from the headers before any
weight is allocated; never random weights, a traceback, a blocked read or a scratch file sized by metadata."""
from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitalloc.errors import BitallocError, InputError
from bitalloc.models.sources import load_model, meta_model
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src") / "m"
    tiny_llama().save_pretrained(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _refuses(path: Path, *words: str) -> str:
    """Every load path refuses ``path`` with one line containing ``words``, before anything is spilled."""
    msgs = []
    for load in (lambda: meta_model(path), lambda: load_model(path), lambda: load_model(path, low_memory=True)):
        with pytest.raises(InputError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg
        msgs.append(msg)
    return msgs[0]


def _edit_tensors(d: Path, edit) -> None:
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def test_missing_tensor_is_refused_not_randomly_initialised(hf_src, tmp_path):
    d = _copy(hf_src, tmp_path / "m")
    _edit_tensors(d, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    _refuses(d, "model.layers.0.mlp.up_proj.weight", str(d))


def test_unexpected_misshaped_and_integer_tensors(hf_src, tmp_path):
    d = _copy(hf_src, tmp_path / "extra")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    _refuses(d, "model.layers.0.mlp.extra.weight", "model.safetensors")
    d = _copy(hf_src, tmp_path / "shape")
    _edit_tensors(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    _refuses(d, "model.norm.weight", "(65,)", "(64,)")
    d = _copy(hf_src, tmp_path / "int")
    _edit_tensors(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    _refuses(d, "model.norm.weight", "I32", "floating point")


def test_untied_head_required_tied_head_optional(tmp_path):
    tiny_llama(tie=False).save_pretrained(tmp_path / "u")
    _edit_tensors(tmp_path / "u", lambda t: t.pop("lm_head.weight"))
    _refuses(tmp_path / "u", "lm_head.weight")
    tiny_llama(tie=True).save_pretrained(tmp_path / "t")
    _edit_tensors(tmp_path / "t", lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model, _ = load_model(tmp_path / "t", low_memory=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_config_with_a_different_stored_lm_head_is_refused(tmp_path):
    """tie_word_embeddings true and an lm_head.weight of other values: which one the file means is unknowable, and
    tying would silently drop the stored head; refused naming both (an identical copy loads, as above)."""
    tiny_llama(tie=True).save_pretrained(tmp_path / "t")
    _edit_tensors(tmp_path / "t", lambda t: t.__setitem__("lm_head.weight", torch.randn(256, 64)))
    _refuses(tmp_path / "t", "tie_word_embeddings", "lm_head.weight", "model.embed_tokens.weight")


def _shard(d: Path) -> dict:
    """Split model.safetensors into two shards with an index (as save_pretrained does for big models)."""
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for fname, part in parts.items():
        save_file({n: tensors[n] for n in part}, d / fname)
    index = {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_sharded_checkpoint_loads_and_bad_indexes_are_refused(hf_src, tmp_path):
    d = _copy(hf_src, tmp_path / "ok")
    index = _shard(d)
    whole, _ = load_model(hf_src)
    sharded, _ = load_model(d, low_memory=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), sharded.state_dict().values()))
    first = next(iter(index["weight_map"]))
    for i, (target, words) in enumerate([("../outside.safetensors", ("points at", "outside")),
                                         ("/etc/passwd", ("points at",)),
                                         ("model-00009-of-00009.safetensors", ("model-00009-of-00009",)),
                                         ("model-00002-of-00002.safetensors", (first, "places"))]):
        bad = _copy(d, tmp_path / f"bad{i}")
        (bad / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {**index["weight_map"], first: target}}))
        _refuses(bad, *words)
    bad = _copy(d, tmp_path / "notlisted")
    wm = dict(index["weight_map"])
    wm["model.layers.9.mlp.up_proj.weight"] = wm.pop(first)  # the shard holds a tensor the index lacks
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    _refuses(bad, first, "places")
    bad = _copy(d, tmp_path / "noobject")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    _refuses(bad, "weight_map")


@pytest.mark.parametrize("edit, words", [
    ({"num_hidden_layers": 100000}, ("num_hidden_layers", "100000")),
    ({"num_hidden_layers": 3}, ("model.layers.2.",)),
    ({"num_hidden_layers": 900}, ("num_hidden_layers = 900", "only")),
    ({"vocab_size": 10**9}, ("vocab_size",)),
    ({"vocab_size": 4096}, ("model.embed_tokens.weight", "(4096, 64)")),
    ({"hidden_size": "64"}, ("hidden_size", "'64'")),
    ({"num_attention_heads": 0}, ("num_attention_heads",)),
    ({"num_attention_heads": 3}, ("num_attention_heads 3",)),
    ({"rms_norm_eps": -1.0}, ("rms_norm_eps",)),
    ({"tie_word_embeddings": "false"}, ("tie_word_embeddings",)),
    ({"model_type": {"a": 1}}, ("unsupported architecture",)),
    ({"rope_scaling": "linear"}, ("rope_scaling",)),
    ({"rope_scaling": {"type": "bogus", "factor": 2.0}}, ("rope_scaling.type", "'bogus'", "RoPE type")),
    ({"rope_scaling": {"rope_type": ["linear"], "factor": 2.0}}, ("rope_scaling.rope_type", "RoPE type")),
    ({"rope_parameters": {"rope_type": "nope"}}, ("rope_parameters.rope_type", "'nope'")),
    ({"eos_token_id": -3}, ("eos_token_id",)),
])
def test_config_values_checked_before_anything_is_built(hf_src, tmp_path, edit, words):
    d = _copy(hf_src, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    _refuses(d, str(d), *words)


@pytest.mark.parametrize("raw, words", [
    (b'{"model_type": "llama", "hidden_size": 1e400}', ("1e400", "beyond the float range")),
    (b'{"model_type": "llama", "rms_norm_eps": NaN}', ("NaN",)),
    (b'{"model_type": "llama", "x": "\xff\xfe"}', ("not UTF-8",)),
    (b'{"model_type": "llama", "model_type": "llama"}', ("appears twice",)),
    (b'["llama"]', ("JSON object",)),
])
def test_malformed_config_json(hf_src, tmp_path, raw, words):
    d = _copy(hf_src, tmp_path / "m")
    (d / "config.json").write_bytes(raw)
    _refuses(d, "config.json", *words)


def _never_blocks(fn) -> BaseException | None:
    out: list = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the load blocked on a FIFO"
    return out[0] if out else None


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_fifo_in_model_directory_refused_without_blocking(hf_src, tmp_path, name):
    d = _copy(hf_src, tmp_path / "m")
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name)
    e = _never_blocks(lambda: load_model(d, low_memory=True))
    assert isinstance(e, InputError) and "FIFO" in str(e) and name in str(e), e


def test_fifo_gguf_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "m.gguf")
    for fn in (lambda: load_model(tmp_path / "m.gguf"), lambda: meta_model(tmp_path / "m.gguf")):
        e = _never_blocks(fn)
        assert isinstance(e, InputError) and "FIFO" in str(e), e


def test_cli_refuses_missing_tensor_before_calibrating(tmp_path, capsys):
    from tests.test_reliability_cli import _fmt_argv, _refused
    from tests.test_resume import make_hf_dir

    d = make_hf_dir(tmp_path / "m")
    _edit_tensors(d, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    _refused(capsys, _fmt_argv(d, tmp_path / "out"), "model.layers.0.mlp.up_proj.weight")


# --------------------------------------------------------------------------------------------------- GGUF
def _gguf_fields(model: torch.nn.Module) -> dict:
    from gguf import GGUFValueType as T

    return {"general.architecture": (T.STRING, "llama"), "llama.block_count": (T.UINT32, 2),
            "llama.context_length": (T.UINT32, 128), "llama.embedding_length": (T.UINT32, 64),
            "llama.feed_forward_length": (T.UINT32, 128), "llama.attention.head_count": (T.UINT32, 4),
            "llama.attention.head_count_kv": (T.UINT32, 2), "llama.attention.layer_norm_rms_epsilon":
            (T.FLOAT32, 1e-5), "llama.rope.dimension_count": (T.UINT32, 16), "llama.rope.freq_base": (T.FLOAT32, 1e4)}


def _write_gguf(path: Path, fields: dict, arrays: dict) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.kv_data[0].pop("general.architecture")  # the test writes (or omits, or corrupts) every key itself
    for key, (vtype, value) in fields.items():
        w.add_key_value(key, value, vtype, sub_type=gguf.GGUFValueType.INT32 if isinstance(value, list) else None)
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_parts() -> tuple[dict, dict]:
    from tests.gguf_tiny import gguf_arrays

    model = tiny_llama()
    return _gguf_fields(model), dict(gguf_arrays(model))


def test_gguf_headers_checked_against_metadata(gguf_parts, tmp_path):
    from gguf import GGUFValueType as T

    fields, arrays = gguf_parts
    assert meta_model(_write_gguf(tmp_path / "ok.gguf", fields, arrays)).config.num_hidden_layers == 2
    cases = [
        ({}, {"blk.1.ffn_up.weight": None}, ("blk.1.ffn_up.weight",)),
        ({}, {"blk.0.attn_norm.weight": np.ones(65, np.float32)}, ("blk.0.attn_norm.weight", "(65,)")),
        ({}, {"blk.0.attn_norm.weight": np.ones(64, np.int32)}, ("blk.0.attn_norm.weight", "I32")),
        ({}, {"blk.0.extra.weight": np.ones(4, np.float32)}, ("blk.0.extra.weight",)),
        ({"llama.block_count": (T.UINT32, 1_000_000)}, {}, ("block_count",)),
        ({"llama.block_count": (T.UINT32, 3)}, {}, ("block_count", "blocks 0..1")),
        ({"llama.embedding_length": (T.UINT32, 4096)}, {}, ("shape",)),
        ({"llama.attention.head_count": (T.UINT32, 0)}, {}, ("head_count",)),
        ({"llama.attention.head_count": (T.FLOAT64, float("nan"))}, {}, ("head_count", "finite")),
        ({"llama.context_length": (T.FLOAT64, 1e300)}, {}, ("context_length",)),
        ({"llama.feed_forward_length": (T.STRING, "128")}, {}, ("feed_forward_length",)),
        ({"general.architecture": (T.UINT32, 7)}, {}, ("general.architecture",)),
    ]
    for i, (fedit, aedit, words) in enumerate(cases):
        a = {k: v for k, v in {**arrays, **aedit}.items() if v is not None}
        path = _write_gguf(tmp_path / f"bad{i}.gguf", {**fields, **fedit}, a)
        _refuses(path, *words)


# ------------------------------------------------------------------------------------------ random edits
_JUNK = ["64", "", None, True, [], {}, [1, 2], {"a": 1}, 0, -1, -(2**40), 2**70, 1e-300, 3.5, "NaN!"]


def _mutate(value, rng: random.Random):
    choice = rng.randrange(6)
    if choice == 0:
        return rng.choice(_JUNK)
    if choice == 1:
        return 0
    if choice == 2:
        return -value if isinstance(value, (int, float)) and not isinstance(value, bool) else -7
    if choice == 3:
        return rng.choice([10**9, 2**62, 1e308])
    if choice == 4:
        return str(value)
    return float("nan")


def _one_line_or_success(fn, where: Path) -> str:
    try:
        fn()
        return "ok"
    except BitallocError as e:
        assert "\n" not in str(e).strip() and str(where) in str(e), str(e)
        return type(e).__name__


def test_random_config_json_edits_never_crash(hf_src, tmp_path):
    rng = random.Random(1616)
    base = json.loads((hf_src / "config.json").read_text())
    outcomes = []
    for case in range(100):
        cfg = dict(base)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(sorted(cfg))
            if rng.random() < 0.2:
                cfg.pop(key)
            else:
                cfg[key] = _mutate(cfg[key], rng)
        raw = json.dumps(cfg, allow_nan=True).encode()
        if rng.random() < 0.5:  # past the parser: numbers JSON allows that overflow to inf
            raw = raw.replace(b"NaN", b"1e999")
        if rng.random() < 0.1:
            raw = raw.replace(b'"', b'"\xff', 1) if rng.random() < 0.5 else raw.replace(b"1e+308", b"1e999")
        d = tmp_path / f"c{case}"
        d.mkdir()
        for f in ("model.safetensors", "generation_config.json"):
            os.symlink(hf_src / f, d / f)
        (d / "config.json").write_bytes(raw)
        outcome = _one_line_or_success(lambda: meta_model(d), d)
        if outcome == "ok":
            outcome = _one_line_or_success(lambda: load_model(d, low_memory=True), d)
        outcomes.append(outcome)
    assert outcomes.count("ok") < 60 and outcomes.count("InputError") > 40, outcomes


def test_random_gguf_metadata_edits_never_crash(gguf_parts, tmp_path):
    from gguf import GGUFValueType as T

    fields, arrays = gguf_parts
    rng = random.Random(6161)
    outcomes = []
    for case in range(60):
        f = dict(fields)
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(sorted(f))
            if rng.random() < 0.2:
                f.pop(key)
                continue
            v = _mutate(f[key][1], rng)
            if isinstance(v, bool):
                f[key] = (T.BOOL, v)
            elif isinstance(v, int):
                f[key] = (T.INT64, v) if -(2**63) <= v < 2**63 else (T.FLOAT64, float(v))
            elif isinstance(v, float):
                f[key] = (T.FLOAT64, v)
            elif isinstance(v, str):
                f[key] = (T.STRING, v.encode() + (b"\xff" if rng.random() < 0.3 else b""))
            elif isinstance(v, list) and v:
                f[key] = (T.ARRAY, v)
            else:
                f.pop(key)
        path = _write_gguf(tmp_path / f"g{case}.gguf", f, arrays)
        outcome = _one_line_or_success(lambda: meta_model(path), path)
        if outcome == "ok":
            outcome = _one_line_or_success(lambda: load_model(path, low_memory=True), path)
        outcomes.append(outcome)
    assert outcomes.count("InputError") > 30, outcomes


def test_legacy_checkpoint_names_load_through_transformers_table(tmp_path):
    """Mixtral checkpoints name experts block_sparse_moe.experts.N.w1/w3/w2: renamed by transformers' own
    conversion table, not left to a fallback that could initialise what it cannot find."""
    from tests.moe_tiny import tiny_moe

    model = tiny_moe("mixtral", unfuse=False)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    for low in (False, True):
        loaded, _ = load_model(tmp_path / "m", low_memory=low)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-5, atol=1e-5)
    _edit_tensors(tmp_path / "m", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    _refuses(tmp_path / "m", "model.layers.1.mlp.experts.2.up_proj.weight")
