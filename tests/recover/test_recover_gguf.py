"""``bitalloc gguf --recover``: the same tensor types and file size as without recovery, a file closer to the source
on the calibration text, and one llama.cpp loads and runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitalloc.cli import main
from bitalloc.data import text_windows
from bitalloc.models.sources import load_model
from tests.conftest import tiny_llama
from tests.gguf_tiny import assert_llama_cpp_agrees, gguf_argv, write_arch_gguf

torch.set_num_threads(1)
FORMATS = ("--formats", "q4_0,q4_1,q8_0")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("g")
    src = write_arch_gguf(tiny_llama(), root / "src.gguf")
    plain, rec = root / "plain.gguf", root / "rec.gguf"
    assert main(gguf_argv(src, plain, *FORMATS, budget="0.065MB")) == 0
    assert main(gguf_argv(src, rec, *FORMATS, "--recover", "block+e2e", "--recover-steps", "8",
                          "--recover-lr", "0.02", budget="0.065MB")) == 0
    return src, plain, rec


def test_same_types_shapes_and_size(files) -> None:
    from gguf import GGUFReader

    _, plain, rec = files
    a, b = GGUFReader(str(plain)), GGUFReader(str(rec))
    ta = {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape)) for t in a.tensors}
    tb = {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape)) for t in b.tensors}
    assert ta == tb
    assert plain.stat().st_size == rec.stat().st_size
    da = {t.name: bytes(t.data.tobytes()) for t in a.tensors}
    assert any(da[t.name] != bytes(t.data.tobytes()) for t in b.tensors)


def _calib_kl(src: Path, cand: Path) -> float:
    ref, tok = load_model(src)
    model, _ = load_model(cand)
    windows = text_windows(tok, [src.parent / "calib.txt"], 32, 4)
    with torch.no_grad():
        p = torch.log_softmax(ref(windows).logits.float(), -1)
        q = torch.log_softmax(model(windows).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_recovered_file_is_closer_to_the_source_on_the_calibration_text(files) -> None:
    src, plain, rec = files
    assert _calib_kl(src, rec) < _calib_kl(src, plain)


def test_llama_cpp_runs_the_recovered_file(files) -> None:
    assert_llama_cpp_agrees(files[2])
