"""``bitalloc gguf --rotate``: the GGUF holds the rotated weights (folded norms included), computes the source's
function, and what a GGUF cannot hold (an untied head for a tied input) is refused before any work."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bitalloc.cli import main
from bitalloc.models.sources import load_model
from tests.conftest import tiny_llama
from tests.gguf_tiny import assert_llama_cpp_agrees, gguf_argv, write_arch_gguf, write_loadable_gguf

torch.set_num_threads(1)
IDS = torch.tensor([[3, 70, 101, 200, 9, 42, 7, 18, 250, 64]])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_loadable_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


def _logits(path: Path) -> torch.Tensor:
    model, _ = load_model(path)
    with torch.no_grad():
        return model(IDS).logits[0]


def test_vo_rotated_gguf_holds_rotated_weights_and_the_source_function(src, tmp_path):
    outs = {}
    for name, extra in (("plain", ()), ("vo", ("--rotate", "vo"))):
        outs[name] = tmp_path / f"{name}.gguf"
        assert main(gguf_argv(src, outs[name], *extra, "--formats", "q8_0,q5_0", budget="100KB")) == 0
    ref = _logits(src)
    for name, path in outs.items():
        got = _logits(path)
        assert float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()) > 0.999, name
    v = {k: load_model(p)[0].model.layers[0].self_attn.v_proj.weight for k, p in outs.items()}
    assert not torch.allclose(v["plain"], v["vo"], atol=1e-2)  # the file stores the rotated value heads
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp itself, where it is installed, on a source
        # laid out as llama.cpp's converter writes it (llama.cpp does not load the fixture's minimal GGUF)
        (tmp_path / "arch").mkdir()
        arch_src = write_arch_gguf(tiny_llama(), tmp_path / "arch" / "tiny.gguf")
        out = tmp_path / "arch-vo.gguf"
        assert main(gguf_argv(arch_src, out, "--rotate", "vo", "--formats", "q8_0,q5_0", budget="100KB")) == 0
        assert_llama_cpp_agrees(out)


def test_residual_on_a_tied_input_with_a_non_uniform_final_norm_is_refused_before_measuring(src, tmp_path, capsys):
    out = tmp_path / "r.gguf"
    rc = main(gguf_argv(src, out, "--rotate", "residual"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot rotate the residual stream of this tied llama") and \
        err.count("\n") == 1, err
    assert not out.exists()
    rc = main(gguf_argv(src, out, "--rotate", "residual", "--untie-head"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --untie-head cannot go into a GGUF"), err
    assert not out.exists()
