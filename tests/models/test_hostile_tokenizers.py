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
