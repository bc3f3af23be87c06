"""Saved state of the GGUF benchmark: llama.cpp side reuse, per-size results, cache keys, error agreement."""
from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

from bench import gguf_bench_state as st

TYPES = ("Q4_0", "Q2_K")
RESULT = {"bytes": 100, "ppl": 50.0, "kld": 0.3, "top1": 0.6, "pure": True}


def _files(tmp_path: Path) -> list[Path]:
    files = [tmp_path / "ref.gguf", tmp_path / "base.bin"]
    for f in files:
        f.write_bytes(b"x")
    return files


def test_llama_side_round_trip_and_mismatch(tmp_path: Path) -> None:
    path, needed = tmp_path / "side.json", _files(tmp_path)
    settings = st.llama_settings(Namespace(eval_chunks=8, calib_windows=8, threads=1, other=3))
    assert settings == {"eval_chunks": 8, "calib_windows": 8, "threads": 1}
    assert st.load_llama_side(path, settings, TYPES, needed) is None  # nothing saved yet
    st.save_llama_side(path, settings, 42.5, {t: RESULT for t in TYPES})
    ppl, res = st.load_llama_side(path, settings, TYPES, needed)
    assert ppl == 42.5 and res == {t: RESULT for t in TYPES}
    assert st.load_llama_side(path, {**settings, "eval_chunks": 24}, TYPES, needed) is None
    assert st.load_llama_side(path, settings, (*TYPES, "Q5_K_M"), needed) is None  # a type not saved
    needed[1].unlink()
    assert st.load_llama_side(path, settings, TYPES, needed) is None  # the saved logits are gone


def test_llama_side_legacy_settings_string(tmp_path: Path) -> None:
    path, needed = tmp_path / "side.json", _files(tmp_path)
    body = {"reference_ppl": 42.7, "settings": "--threads 1 --eval-chunks 8 --calib-windows 8 (imatrix 8 chunks)",
            "llamacpp": {t: RESULT for t in TYPES}}
    path.write_text(json.dumps(body))
    assert st.load_llama_side(path, {"eval_chunks": 8, "calib_windows": 8, "threads": 1}, TYPES, needed)[0] == 42.7
    assert st.load_llama_side(path, {"eval_chunks": 8, "calib_windows": 8, "threads": 2}, TYPES, needed) is None
    path.write_text("{not json")
    assert st.load_llama_side(path, {"eval_chunks": 8, "calib_windows": 8, "threads": 1}, TYPES, needed) is None


def test_size_results_persist(tmp_path: Path) -> None:
    store = st.SizeResults(tmp_path / "sizes.json")
    assert store.get("k1") is None
    store.put("k1", {"kld": 0.1})
    again = st.SizeResults(tmp_path / "sizes.json")
    assert again.get("k1") == {"kld": 0.1} and again.get("k2") is None
    (tmp_path / "sizes.json").write_text("[1, 2")  # a corrupt file starts empty instead of failing
    assert st.SizeResults(tmp_path / "sizes.json").get("k1") is None


def test_digests_change_with_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    d1 = st.code_digest([a, b])
    assert d1 == st.code_digest([b, a])  # order-independent
    b.write_text("y = 3\n")
    assert st.code_digest([a, b]) != d1
    assert st.digest({"a": 1, "b": [2]}) == st.digest({"b": [2], "a": 1}) != st.digest({"a": 2, "b": [2]})


def test_spearman() -> None:
    assert st.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert st.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert st.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties: mean ranks
    assert math.isnan(st.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        st.spearman([1, 2], [1])


def test_error_agreement() -> None:
    pairs = {"a": ("q4_0", 1.0, 0.5), "b": ("q4_0", 2.0, 1.0), "c": ("q8_0", 4.0, 4.0), "d": ("q8_0", 0.0, 0.1)}
    got = st.error_agreement(pairs)
    assert got["tensors"] == 4 and got["predicted_sum"] == 7.0 and got["final_sum"] == pytest.approx(5.6)
    assert got["ratio"]["n"] == 3 and got["ratio"]["median"] == pytest.approx(0.5)  # predicted 0 is left out
    assert got["ratio_by_format"]["q4_0"]["median"] == pytest.approx(0.5)
    assert got["ratio_by_format"]["q8_0"]["p90"] == pytest.approx(1.0)
    assert got["spearman"] == pytest.approx(st.spearman([1, 2, 4, 0], [0.5, 1, 4, 0.1]))
    with pytest.raises(ValueError):
        st.error_agreement({})
