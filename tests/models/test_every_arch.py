"""Every architecture of the one map, on tiny random models built from a config (no downloads), in both outputs.

For each: the GGUF that the map writes (llama.cpp's names, hyper-parameter keys and converter transforms) loads
back, whole and low-memory, to exactly the original model; measure -> allocate -> quantize -> packed directory ->
``bitalloc.load``; and ``bitalloc gguf`` on that GGUF writes a verified file that loads back to finite logits.
The slow tests prove the map against llama.cpp itself: an F32 export gives llama.cpp's logits equal to
bitalloc's float model (top-1 100 %, KLD < 1e-6), and a quantized export loads and gives finite logits.
"""
from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from bitalloc.cli import main
from bitalloc.export import gguf as gx
from bitalloc.io.gguf import GGUFFile
from bitalloc.models.archs import ARCHS, fused_groups, gguf_model_type
from bitalloc.models.gguf_map import model_names
from bitalloc.models.sources import load_model
from bitalloc.models.view import ModelView
from tests.conftest import ARCH_TIES, measure_quantize_load, tiny_arch, token_ids
from tests.gguf_tiny import finish, gguf_argv, write_arch_gguf
from tests.moe_tiny import tiny_moe

DENSE = sorted(ARCH_TIES)
MOE = ["olmoe", "qwen2_moe", "qwen3_moe"]  # the GGUF-capable MoE rows (measure/quantize/load: test_moe_pipeline)
ARCH_NAMES = DENSE + MOE


def _tiny(arch: str) -> torch.nn.Module:
    return tiny_moe(arch) if arch in MOE else tiny_arch(arch)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("arch_ggufs")


def _gguf_of(arch: str, where: Path) -> tuple[Path, torch.nn.Module]:
    model = _tiny(arch)
    d = where / arch
    d.mkdir(exist_ok=True)
    path = d / f"{arch}.gguf"
    if not path.exists():
        write_arch_gguf(model, path)
    return path, model


def test_the_map_covers_the_issue_architectures() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"} <= set(ARCH_NAMES)
    assert {"qwen2_moe", "qwen3_moe", "olmoe", "mixtral"} <= set(ARCHS)
    assert all(ARCHS[a].gguf is not None for a in ARCH_NAMES)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("low_memory", [False, True])
def test_gguf_loads_back_to_the_same_model(arch, low_memory, gguf_dir) -> None:
    path, model = _gguf_of(arch, gguf_dir)
    loaded, tok = load_model(path, low_memory=low_memory)
    assert loaded.config.model_type == gguf_model_type(ARCHS[arch].gguf.arch) and tok is not None  # mistral: llama
    ids = token_ids(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_f32_export_reproduces_the_input_file(arch, gguf_dir, tmp_path) -> None:
    """HF -> GGUF (the map) -> bitalloc -> GGUF: names, transforms and metadata survive byte for byte."""
    path, model = _gguf_of(arch, gguf_dir)
    out = tmp_path / "again.gguf"
    gx.export_f32_gguf(model, path, out)
    assert out.read_bytes() == path.read_bytes()


def test_converter_transforms_are_in_the_file(gguf_dir) -> None:
    """Gemma's norms are stored as 1 + w, Llama's q rows interleaved, Phi-3's fused linears keep their names."""
    path, model = _gguf_of("gemma2", gguf_dir)
    with GGUFFile(path) as f:
        stored = torch.from_numpy(np.array(f.get("blk.0.attn_norm.weight")))
    assert torch.equal(stored, model.model.layers[0].input_layernorm.weight.detach() + 1)
    path, model = _gguf_of("llama", gguf_dir)
    with GGUFFile(path) as f:
        q = torch.from_numpy(np.array(f.get("blk.1.attn_q.weight")))
    w = model.model.layers[1].self_attn.q_proj.weight.detach()
    d = w.shape[0] // 4  # converter's permutation: head h, row 2i+j is HF row h*d + i + j*d/2
    assert torch.equal(q[1], w[d // 2]) and torch.equal(q[2], w[1])
    names = model_names(tiny_arch("phi3"))
    assert names.to_gguf("model.layers.0.self_attn.qkv_proj.weight") == "blk.0.attn_qkv.weight"
    assert names.to_gguf("model.layers.0.mlp.gate_up_proj.weight") == "blk.0.ffn_up.weight"


@pytest.mark.parametrize("arch", DENSE)
def test_measure_allocate_quantize_load(arch, tmp_path) -> None:
    measure_quantize_load(tiny_arch(arch), tmp_path / "out")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_bitalloc_gguf_on_every_architecture(arch, gguf_dir, tmp_path) -> None:
    path, _ = _gguf_of(arch, gguf_dir)
    out = tmp_path / "out.gguf"
    assert main(gguf_argv(path, out, budget="5.5bpw")) == 0
    with GGUFFile(out) as f:
        types = {i.type.name for i in f.tensors.values()}
        assert f.metadata["general.architecture"] == ARCHS[arch].gguf.arch
    assert types & {"Q8_0", "Q5_0", "Q4_0"}
    if arch in MOE:
        with GGUFFile(out) as f:
            exps = {n: i for n, i in f.tensors.items() if "_exps" in n}
        assert exps and all(len(i.shape) == 3 and i.shape[0] == 4 for i in exps.values())
    back, _ = load_model(out)
    with torch.no_grad():
        assert torch.isfinite(back(token_ids(2)).logits).all()


def test_fused_groups_come_from_the_map() -> None:
    llama = [r.name for r in ModelView(tiny_arch("llama")).quantizable()]
    groups = fused_groups(llama)
    assert ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight") in groups
    assert len(groups) == 4  # q/k/v and gate/up of two blocks
    assert fused_groups([r.name for r in ModelView(tiny_arch("phi3")).quantizable()]) == ()  # fused in the file


def _write_foreign_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    finish(w)
    (path.parent / "calib.txt").write_text("some words " * 200)
    return path


@pytest.mark.parametrize("arch", ["rwkv6", "deepseek2"])
def test_unsupported_gguf_architecture_is_refused_at_once(arch, tmp_path, capsys) -> None:
    path = _write_foreign_gguf(tmp_path / "m.gguf", arch)
    t0 = time.perf_counter()
    assert main(gguf_argv(path, tmp_path / "out.gguf")) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not supported" in err[0] and "gemma2" in err[0] and "qwen3moe" in err[0], err
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.gguf.job").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_llama_cpp_agrees_with_the_map(arch, gguf_dir, tmp_path) -> None:
    """llama.cpp itself runs the map's F32 GGUF with the float model's logits (names, permutation, norm
    convention and hyper-parameters right), and loads a quantized ``bitalloc gguf`` output."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from bench.llamacpp import llama_cpp_logits, model_logits

    path, model = _gguf_of(arch, gguf_dir)
    windows = token_ids(2, ctx=32, seed=3)
    theirs = llama_cpp_logits(llama_cpp, path, windows, threads=2).double()
    ours = model_logits(model, windows).double()
    lp, lq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    top2 = ours.topk(2, -1).values
    decided = (top2[..., 0] - top2[..., 1]) > 1e-3  # an argmax at a float tie is no one's (random tiny models)
    agree = ours.argmax(-1) == theirs.argmax(-1)
    top1 = float(agree[decided].double().mean())
    assert decided.double().mean() > 0.9 and top1 == 1.0 and kld < 1e-6, (arch, top1, kld, float(agree.double().mean()))
    out = tmp_path / "q.gguf"
    assert main(gguf_argv(path, out, budget="5.5bpw")) == 0
    assert torch.isfinite(llama_cpp_logits(llama_cpp, out, windows, threads=2)).all()


@pytest.mark.parametrize("extra,budget,message", [
    ((), "0.001MB", "below the smallest"),
    ((), "40bpw", "above the largest"),
    (("--formats", "q4_k"), "4bpw", "can take none of --formats q4_k"),
])
def test_impossible_requests_are_refused_before_loading(extra, budget, message, gguf_dir, tmp_path, capsys,
                                                        monkeypatch) -> None:
    import bitalloc.models.sources as sources

    path, _ = _gguf_of("qwen3", gguf_dir)
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    argv = gguf_argv(path, tmp_path / "out.gguf", budget=budget)
    if extra:
        argv[argv.index("--formats"):argv.index("--formats") + 2] = list(extra)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out.gguf.job").exists()


@pytest.mark.parametrize("arch", [a for a in DENSE if a != "phi3"])
def test_rescale_preserves_every_dense_architecture(arch) -> None:
    from bitalloc.models.rescale import rescale_llama_

    model, ref = tiny_arch(arch), tiny_arch(arch)
    rescale_llama_(model, seed=1, sigma=0.2)
    ids = token_ids(2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, ref.model.layers[0].mlp.up_proj.weight)


def test_rescale_refuses_fused_linears() -> None:
    from bitalloc.errors import InputError
    from bitalloc.models.rescale import rescale_llama_

    with pytest.raises(InputError, match="fused"):
        rescale_llama_(tiny_arch("phi3"))


def _llama3_factors() -> torch.Tensor:
    return torch.linspace(1.0, 8.0, 8)  # head_dim 16: one factor per rotary pair, as Llama 3's converter writes


def _rope_variants(where: Path) -> tuple[Path, Path, Path]:
    """Tiny GGUFs of RoPE beyond the default: a Llama with rope_freqs factors, a Llama with linear scaling
    (factor 4), a Phi-3 rotating half of each head (partial_rotary_factor 0.5, as Phi-4-mini has 0.75)."""
    d = where / "rope"
    d.mkdir(exist_ok=True)
    paths = d / "freqs.gguf", d / "linear.gguf", d / "partial.gguf"
    if not all(p.exists() for p in paths):
        write_arch_gguf(tiny_arch("llama"), paths[0], rope_freqs=_llama3_factors())
        linear = tiny_arch("llama")
        linear.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
        write_arch_gguf(linear, paths[1])
        cfg = tiny_arch("phi3").config
        cfg.rope_parameters["partial_rotary_factor"] = 0.5
        torch.manual_seed(0)
        write_arch_gguf(AutoModelForCausalLM.from_config(cfg).eval(), paths[2])
    return paths


def test_rope_scaling_is_read_from_the_gguf(gguf_dir) -> None:
    freqs, lin, partial = _rope_variants(gguf_dir)
    model, _ = load_model(freqs, low_memory=True)
    plain = tiny_arch("llama")
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq / _llama3_factors())
    model, _ = load_model(lin)
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0
    with GGUFFile(lin) as f:
        assert f.metadata["llama.rope.scaling.type"] == "linear"
    model, _ = load_model(partial)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert model.model.rotary_emb.inv_freq.numel() == 4  # 8 of 16 dimensions rotate


@pytest.mark.slow
def test_llama_cpp_agrees_on_rope_scaling(gguf_dir) -> None:
    """Each way llama.cpp scales or narrows RoPE (rope_freqs, linear keys, partial rotation) gives the logits of
    bitalloc's model read from the same file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from bench.llamacpp import llama_cpp_logits, model_logits

    windows = token_ids(2, ctx=32, seed=3)
    for path in _rope_variants(gguf_dir):
        model, _ = load_model(path)
        theirs = llama_cpp_logits(llama_cpp, path, windows, threads=2).double()
        ours = model_logits(model, windows).double()
        lp, lq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
        assert float((lp.exp() * (lp - lq)).sum(-1).mean()) < 1e-6, path.name


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("budget,message", [("1bpw", "below the smallest"), ("24bpw", "above the largest")])
def test_unreachable_budgets_are_refused_before_loading(source, budget, message, gguf_dir, tmp_path, capsys,
                                                        monkeypatch) -> None:
    import bitalloc.models.sources as sources

    if source == "hf":
        path = tmp_path / "hf"
        tiny_arch("qwen3").save_pretrained(path)
        capsys.readouterr()  # transformers' progress bars
    else:
        path, _ = _gguf_of("gemma2", gguf_dir)
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    argv = ["quantize", str(path), "--budget", budget, "--formats", "int2-g32,int8-g32", "--calib",
            str(gguf_dir), "--ctx", "16", "--out", str(tmp_path / "out")]
    (gguf_dir / "t.txt").write_text("word " * 500)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.job").exists()
