"""Tiny GGUFs for tests: shared writer pieces, one Llama that transformers loads with a tokenizer (byte-level
BPE, 256 byte tokens, no merges), and :func:`write_arch_gguf` for a tiny model of any architecture in the map."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Sequence

import torch

import gguf
import numpy as np

from bitalloc.models.archs import arch_for
from bitalloc.models.gguf_config import gguf_hparams
from bitalloc.models.gguf_map import model_names
from tests.conftest import tiny_llama

N_HEAD, N_KV = 4, 2


def _byte_tokens() -> list[str]:
    """GPT-2's byte -> printable-character table: token i is byte i."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    return [table[i] for i in range(256)]


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows, written as the reshape it is (independent of gguf_names)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_llama_hparams(w: gguf.GGUFWriter) -> None:
    """The hyper-parameters of tests.conftest's tiny 2-layer Llama."""
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)


def gguf_arrays(model: torch.nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """``(GGUF name, contiguous float32 array)`` of every stored tensor, q/k rows in llama.cpp's order (a tied
    lm_head is skipped)."""
    names = model_names(model)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight":
            continue
        a = t.numpy().astype(np.float32)
        if "q_proj" in hf:
            a = converter_permute(a, N_HEAD)
        elif "k_proj" in hf:
            a = converter_permute(a, N_KV)
        yield names.to_gguf(hf), np.ascontiguousarray(a)


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_byte_tokenizer(w: gguf.GGUFWriter, merge: bool = False) -> None:
    """A byte-level BPE vocabulary of 256 tokens (transformers and llama.cpp both load it).  gguf-py drops an
    empty merge list and llama.cpp then refuses a BPE vocabulary: with ``merge`` the last token (byte 255) is
    ``ab`` and the one merge is ``a b``."""
    tokens = _byte_tokens()
    if merge:
        tokens[-1] = "ab"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_token_merges(["a b"] if merge else [])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def write_calib_text(path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(100)]
    (path.parent / "calib.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)))


def write_loadable_gguf(path: Path, seed: int = 0) -> Path:
    """The tiny 2-layer Llama of tests.conftest as an F32 GGUF, plus ``calib.txt`` beside it."""
    model = tiny_llama(seed=seed)
    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_hparams(w)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(256)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    add_byte_tokenizer(w)
    for name, arr in gguf_arrays(model):
        w.add_tensor(name, arr)
    finish(w)
    write_calib_text(path, seed)
    return path


def write_arch_gguf(model: torch.nn.Module, path: Path, rope_freqs: torch.Tensor | None = None) -> Path:
    """An F32 GGUF of a tiny model of any GGUF architecture in the map, as llama.cpp's converter lays it out:
    the map's hyper-parameter keys, names and value transforms, a byte tokenizer; ``calib.txt`` beside it."""
    spec = arch_for(model.config)
    w = gguf.GGUFWriter(str(path), spec.gguf.arch)
    for key, value in gguf_hparams(model.config).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    w.add_vocab_size(model.config.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    add_byte_tokenizer(w, merge=True)
    names = model_names(model)
    meta = gguf_hparams(model.config)
    params = dict(model.named_parameters())
    for gg in dict.fromkeys(names.to_gguf(hf) for hf in params):  # experts stacked as the converter does
        members = names.members(gg)
        v = torch.stack([params[m].detach().float() for m in members]) if len(members) > 1 else \
            names.to_gguf_value(members[0], params[members[0]].detach().float(), meta)
        w.add_tensor(gg, np.ascontiguousarray(v.numpy()))
    if rope_freqs is not None:  # Llama 3's RoPE scaling, as the converter writes it
        w.add_tensor("rope_freqs.weight", np.ascontiguousarray(rope_freqs.float().numpy()))
    finish(w)
    write_calib_text(path)
    return path


def gguf_argv(src: Path, out: Path, *extra: str, budget: str = "0.06MB") -> list[str]:
    return ["gguf", str(src), "--budget", budget, "--formats", "q8_0,q5_0,q4_0", "--calib",
            str(src.parent / "calib.txt"), "--windows", "4", "--ctx", "32", "--fisher-windows", "2", "-q",
            "-o", str(out), *extra]


def assert_llama_cpp_agrees(path: Path, ids: Sequence[int] = (3, 70, 101, 200, 9, 42)) -> None:
    """llama.cpp loads and runs the GGUF at ``path``, and its logits agree with bitalloc's load of the same file
    (llama.cpp rounds activations to 8 bits: close, not equal; a decoding bug would leave them unrelated)."""
    import pytest

    from bitalloc.models.sources import load_model

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=False, verbose=False, n_ctx=32, logits_all=True,
                          n_threads=1)
    try:
        llm.eval(list(ids))
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()
    model, _ = load_model(path)
    with torch.no_grad():
        ours = model(torch.tensor([list(ids)])).logits[0]
    assert bool(torch.isfinite(theirs).all())
    assert float(torch.nn.functional.cosine_similarity(theirs, ours, dim=-1).min()) > 0.99
