"""Shared by the compressed-tensors / vLLM CLI tests: the ``bitalloc quantize`` command line over a tiny HF model
folder (:func:`tests.test_resume.make_hf_dir`, with its calibration text): 2 windows of 16 tokens, RTN; and the
check that a command is refused before the model is loaded."""
from __future__ import annotations

from pathlib import Path

import pytest

from bitalloc.cli import main


def quantize_argv(hf: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(hf), "--calib", str(hf.parent / "calib.txt"), "--windows", "2", "--ctx", "16",
            "--fisher-windows", "2", "--method", "rtn", "-q", "--out", str(out), *extra]


def refused_before_loading(hf: Path, out: Path, capsys, monkeypatch, *extra: str) -> str:
    """Run ``quantize`` with ``extra`` (the model loader fails the test if called); assert a one-line ``error:``
    with exit status 2 and no output written; return that line."""
    import bitalloc.models.sources as sources

    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(quantize_argv(hf, out, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert not out.exists()
    return err
