"""Shared by the compressed-tensors / vLLM CLI tests: the ``bitalloc quantize`` command line over a tiny HF model
folder (:func:`tests.test_resume.make_hf_dir`, with its calibration text): 2 windows of 16 tokens, RTN."""
from __future__ import annotations

from pathlib import Path


def quantize_argv(hf: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(hf), "--calib", str(hf.parent / "calib.txt"), "--windows", "2", "--ctx", "16",
            "--fisher-windows", "2", "--method", "rtn", "-q", "--out", str(out), *extra]
