"""Text read on demand (issue #16, class 8): windows identical to tokenizing the whole text, bounded reading of
huge files, and one-line refusals of texts that are not text (FIFOs, devices, binary, UTF-16, empty, short)."""
from __future__ import annotations

import os
import random
import signal
import tracemalloc
from pathlib import Path

import pytest
import torch

from bitalloc import data
from bitalloc.errors import InputError

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
PIECES = [" ", "  ", "   ", "\n", "\n\n", "\t", "word", "Word", "123456", ".", "!?", "é", "日本語", "'s", "\ufeff",
          "\r\n", " \n", "x", "--", "“quote”", "a.b", "😀"]


def _train(kind: str, corpus: list[str]):
    """A small trained tokenizer of each pre-tokenizer family: GPT-2 byte-level (SmolLM2), Llama-3's regex,
    SentencePiece-style Metaspace, word level (the test models' tokenizer)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[UNK]"]))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    meta = kind == "metaspace"
    tok = Tokenizer(models.BPE(byte_fallback=meta, unk_token="<unk>" if meta else None))
    tok.pre_tokenizer = {
        "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), "isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "metaspace": pre_tokenizers.Metaspace(prepend_scheme="first"),
    }[kind]
    alphabet = [] if meta else pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"] if meta else [],
                                                        initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    rng = random.Random(0)
    corpus = ["".join(rng.choice(PIECES) for _ in range(200)) for _ in range(100)]
    corpus.append(data.read_texts(data.default_eval_files()[1])[:60000])
    return {k: _train(k, corpus) for k in ("gpt2", "llama3", "metaspace", "wordlevel")}


def _expected(tok, files, ctx: int, n: int | None) -> torch.Tensor:
    return data.token_windows(tok, data.read_texts(files), ctx, n)


def test_windows_identical_on_the_packaged_texts(tokenizers):
    for files in (data.default_calibration_files(), data.default_eval_files()):
        text = data.read_texts(files)
        for name in ("gpt2", "wordlevel"):
            tok = tokenizers[name]
            whole = data.encode(tok, text)
            for ctx, n in ((4, 1), (17, 3), (64, 40), (512, 8)):
                m = min(len(whole) // ctx, n)
                got = data.text_windows(tok, files, ctx, n)
                assert torch.equal(got, torch.tensor(whole[: m * ctx]).reshape(m, ctx)), (name, ctx, n)


def test_windows_identical_on_hostile_white_space_and_encodings(tokenizers, tmp_path):
    """Runs of spaces and line breaks, BOMs inside and at the ends, Latin-1 files, files joined: every cut."""
    rng = random.Random(1)
    for trial in range(8):
        files = []
        for k in range(rng.randint(1, 3)):
            text = "".join(rng.choice(PIECES) for _ in range(rng.randint(100, 2500)))
            f = tmp_path / f"{trial}_{k}.txt"
            f.write_bytes(text.encode("latin-1", "replace") if rng.random() < 0.25 else text.encode())
            files.append(f)
        for name, tok in tokenizers.items():
            for ctx, n in ((2, 1), (3, 5), (7, 60), (5, 10**5)):
                assert torch.equal(data.text_windows(tok, files, ctx, n), _expected(tok, files, ctx, n)), \
                    (name, trial, ctx, n)


@pytest.mark.slow
def test_windows_identical_with_the_smollm2_tokenizer():
    from bitalloc.models.sources import _tokenizer, default_model_path

    tok = _tokenizer(default_model_path(), gguf=True)
    for files in (data.default_calibration_files(), data.default_eval_files()):
        for ctx, n in ((4, 1), (17, 3), (512, 32), (512, 10**6)):
            assert torch.equal(data.text_windows(tok, files, ctx, n), _expected(tok, files, ctx, n))


class _Counting(data.TextReader):
    most = 0

    def read(self, nbytes: int) -> None:
        super().read(nbytes)
        _Counting.most = max(_Counting.most, self.nbytes)


def test_huge_file_is_read_only_as_far_as_needed(tokenizers, tmp_path, monkeypatch):
    """600 MB: real text, then a sparse hole (NUL bytes, refused if ever read): a few KB are read."""
    f = tmp_path / "huge.txt"
    text = data.read_texts(data.default_eval_files()[:1])
    with open(f, "wb") as out:
        out.write(text.encode())
        out.truncate(600 << 20)
    monkeypatch.setattr(data, "TextReader", _Counting)
    tracemalloc.start()
    try:
        w = data.text_windows(tokenizers["gpt2"], [f], 64, 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert w.shape == (16, 64)
    assert torch.equal(w, data.token_windows(tokenizers["gpt2"], text, 64, 16))
    assert 0 < _Counting.most < 64 << 10 and peak < 16 << 20, (_Counting.most, peak)


def test_text_without_tokens_is_refused_after_a_bounded_read(tokenizers, tmp_path, monkeypatch):
    f = tmp_path / "spaces.txt"
    f.write_bytes(b" \n" * (1 << 20))  # 2 MB of white space: the word-level tokenizer gives no token
    monkeypatch.setattr(data, "TextReader", _Counting)
    monkeypatch.setattr(data, "MIN_READ_CAP", 256 << 10)
    _Counting.most = 0
    with pytest.raises(InputError, match=r"spaces.txt: the first \d+ bytes of text give only 0 tokens"):
        data.text_windows(tokenizers["wordlevel"], [f], 64, 4)
    assert _Counting.most <= 2 * data.MIN_READ_CAP


def _no_hang(seconds: int = 5):
    def alarm(*_):
        raise TimeoutError("blocked on a special file")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_and_devices_are_refused_without_opening(tmp_path):
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    _no_hang()
    try:
        for path in (fifo, Path("/dev/zero"), Path("/dev/null")):
            for call in (data.expand_paths, data.read_texts, lambda p: data.text_windows(None, p, 4, 1)):
                with pytest.raises(InputError, match=r"is a (FIFO|character device)\b.*, not a regular file"):
                    call(path)
        (tmp_path / "d").mkdir()
        os.mkfifo(tmp_path / "d" / "pipe.txt")  # a FIFO inside a directory is not one of its .txt files
        with pytest.raises(InputError, match="no .txt files in the directory"):
            data.expand_paths(tmp_path / "d")
    finally:
        signal.alarm(0)


def test_not_text_is_refused_in_one_line(tmp_path):
    binary = tmp_path / "model.txt"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(100))
    with pytest.raises(InputError, match=r"model.txt is not text: a NUL byte at offset 5"):
        data.expand_paths(binary)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(("hello world, " * 10).encode("utf-16"))
    with pytest.raises(InputError, match="utf16.txt is not text.*UTF-16"):
        data.read_texts(utf16)
    late = tmp_path / "late.txt"  # text first, a NUL past the sniffed bytes: refused when reached
    late.write_bytes(b"word " * 4000 + b"\x00")
    with pytest.raises(InputError, match=r"late.txt is not text: a NUL byte at offset 20000"):
        data.read_texts(late)


def test_latin1_fallback_and_boms_as_before(tokenizers, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"plain ascii words " * 600 + "caf\xe9 ".encode("latin-1") + b"more words " * 50)
    b.write_bytes("\ufeff\ufeffbom start \ufeff inside and end\ufeff\ufeff".encode())
    assert data.read_texts([a, b]).endswith("café " + "more words " * 50 + "\n\nbom start \ufeff inside and end")
    for ctx, n in ((2, 1), (3, 700), (4, 10**5)):
        assert torch.equal(data.text_windows(tokenizers["gpt2"], [a, b], ctx, n),
                           _expected(tokenizers["gpt2"], [a, b], ctx, n))


def test_empty_and_short_texts_name_the_files(tokenizers, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\ufeff \n\n ")
    with pytest.raises(InputError, match=r"the text in .*empty.txt is empty"):
        data.text_windows(tokenizers["gpt2"], [empty], 4, 2)
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(InputError, match=r"text too short \(.*short.txt\): \d+ tokens found, at least 512"):
        data.text_windows(tokenizers["gpt2"], [short], 512, 2)
    unreadable = tmp_path / "secret.txt"
    unreadable.write_text("words")
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # (root reads anything)
        with pytest.raises(InputError, match="cannot read the text file .*secret.txt"):
            data.text_windows(tokenizers["gpt2"], [unreadable], 4, 1)
