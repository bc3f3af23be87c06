"""Hostile and careless tokenizer files (#16): tokenizer files that are present but unusable, or that load and then
fail on every text, are one InputError naming the folder, raised before any weight is read; never a warning
followed by a later "no tokenizer", nor an internal error from inside the tokenizer at calibration."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from bitalloc.cli import main
from bitalloc.errors import InputError
from bitalloc.models import sources
from bitalloc.models.sources import load_model
from test_resume import make_hf_dir


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("tok") / "m")


def _json_edit(name: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        fn(data)
        (d / name).write_text(json.dumps(data))
    return edit


def _no_weights(monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("weights read before the tokenizer was refused")
    monkeypatch.setattr("bitalloc.models.spill_load.load_hf_spilled", fail)


@pytest.mark.parametrize("edit, words", [
    (lambda d: (d / "tokenizer.json").write_text("{ not json"), ["tokenizer.json", "cannot load the tokenizer"]),
    (lambda d: (d / "tokenizer.json").write_bytes(b"\0" * 64), ["cannot load the tokenizer"]),
    (_json_edit("tokenizer.json", lambda t: t["model"].update(type="Bogus")), ["cannot load the tokenizer"]),
    (_json_edit("tokenizer_config.json", lambda t: t.update(tokenizer_class=7)), ["cannot load the tokenizer"]),
    # these load, then fail on any text: found by the probe, not at calibration as an internal error
    (_json_edit("tokenizer_config.json", lambda t: t.update(model_max_length="big")), ["cannot encode text"]),
    (_json_edit("tokenizer.json", lambda t: t["model"].update(vocab={})), ["cannot encode text", "UNK"]),
    (_json_edit("tokenizer.json", lambda t: t["model"].update(unk_token="NOPE")), ["cannot encode text"]),
])
def test_unusable_tokenizer_files_refused_before_weights(hf_tok, tmp_path, monkeypatch, edit, words):
    d = Path(shutil.copytree(hf_tok, tmp_path / "m"))
    edit(d)
    _no_weights(monkeypatch)
    with pytest.raises(InputError) as e:
        load_model(d, low_memory=True)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg and all(w in msg for w in words), msg


def test_folder_without_tokenizer_files_still_loads(hf_tok, tmp_path):
    d = Path(shutil.copytree(hf_tok, tmp_path / "m"))
    for name in sources._TOKENIZER_FILES:
        (d / name).unlink(missing_ok=True)
    model, tokenizer = load_model(d, low_memory=True)
    assert tokenizer is None and model is not None


def test_cli_broken_tokenizer_is_one_line_exit_2(hf_tok, tmp_path, capsys):
    d = Path(shutil.copytree(hf_tok, tmp_path / "m"))
    _json_edit("tokenizer_config.json", lambda t: t.update(model_max_length="big"))(d)
    rc = main(["measure", str(d), "--calib", str(hf_tok.parent / "calib.txt"), "--windows", "2", "--ctx", "16",
               "--formats", "int4-g32", "--method", "rtn", "--no-fisher", "-q", "--out", str(tmp_path / "t.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: the tokenizer of"), err


# --------------------------------------------------------------------------------------------------- GGUF
def _gguf_with_vocab(path: Path, **change) -> Path:
    """The tiny Llama as an F32 GGUF whose byte tokenizer arrays are replaced by ``change`` (tokens, types,
    scores, bos)."""
    import gguf
    import gguf_tiny as gt
    from conftest import tiny_llama

    t = {"tokens": gt._byte_tokens(), "types": [1] * 256, "scores": [0.0] * 256, "bos": 0, **change}
    w = gguf.GGUFWriter(str(path), "llama")
    gt.add_llama_hparams(w)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(256)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(t["tokens"])
    w.add_token_types(t["types"])
    w.add_token_scores(t["scores"])
    w.add_bos_token_id(t["bos"])
    w.add_eos_token_id(1)
    for name, a in gt.gguf_arrays(tiny_llama()):
        w.add_tensor(name, a)
    gt.finish(w)
    return path


@pytest.mark.parametrize("change, words", [
    ({"scores": [0.0] * 10}, ["tokenizer.ggml.scores has 10 entries", "256"]),
    ({"types": [1] * 300}, ["tokenizer.ggml.token_type has 300 entries"]),
    ({"bos": 10**6}, ["tokenizer.ggml.bos_token_id = 1000000", "256 tokens"]),
])
def test_gguf_tokenizer_arrays_that_disagree_are_refused_from_the_metadata(tmp_path, change, words):
    from bitalloc.models.sources import meta_model

    path = _gguf_with_vocab(tmp_path / "m.gguf", **change)
    for load in (lambda: meta_model(path), lambda: load_model(path, low_memory=True)):
        with pytest.raises(InputError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and all(w in msg for w in words), msg


def test_gguf_with_agreeing_vocab_loads_and_real_file_passes(tmp_path):
    from bitalloc.io.gguf import GGUFFile
    from bitalloc.models.sources import check_gguf_vocab, default_model_path

    model, tok = load_model(_gguf_with_vocab(tmp_path / "m.gguf"), low_memory=True)
    assert tok is not None
    with GGUFFile(default_model_path()) as g:
        check_gguf_vocab(g.metadata)
