"""The nested artifact's GGUF side: exact GGUF types of int formats, the weight-free template, the extracted
model written as a GGUF that bitalloc and llama.cpp load with exactly the int values."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.export.gguf import read_template
from bitalloc.export.gguf_manifest import manifest_path
from bitalloc.formats.base import FormatError, QTensor
from bitalloc.io.atomic import file_digest
from bitalloc.io.gguf import GGUFFile
from bitalloc.models.sources import load_model
from bitalloc.models.view import ModelView
from bitalloc.nest.gguf import (TEMPLATE_GGUF, TEMPLATE_JSON, as_gguf, extracted_gguf, gguf_type_of,
                                template_from_files, template_to_files)
from bitalloc.targets.base import Capacity, Written
from bitalloc.rounding import dequantize, quantize_weight
from tests.conftest import tiny_arch, tiny_llama
from tests.gguf_tiny import assert_llama_cpp_agrees, write_arch_gguf


def write_extracted_gguf(out: Path, tpl, cfg: Path, q, fixed, *, overwrite: bool = False) -> Written:
    """The checked, prepared extraction written by its GGUF target (no budget: the size is not what is tested)."""
    target, prepared = extracted_gguf(out, tpl, cfg, q, fixed)
    return target.write_verified(prepared, Capacity("any", 1 << 40, 1 << 40, 0, "tensor data"), overwrite=overwrite)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# --- exact types -------------------------------------------------------------------------------------------
def test_gguf_type_of() -> None:
    assert gguf_type_of("int4-g32") == gguf_type_of("int4-g32-asym") == "q4_1"
    assert gguf_type_of("int5-g32") == "q5_1"
    assert gguf_type_of("int4-g128") == gguf_type_of("int4-row") == "q4_1"  # exact, one pair per block
    assert gguf_type_of("int4-g32-sym") == "q4_0" and gguf_type_of("int5-g64-sym") == "q5_0"
    assert gguf_type_of("int8-g32-sym") == "q8_0"
    for fid in ("int8-g32", "int3-g32", "int2-g64", "int6-g32", "int3-g32-sym", "q4_1", "nf4-g64", "fp16",
                "int9-g32", "int4-g7", "", "garbage"):
        assert gguf_type_of(fid) is None, fid


SHAPES = [(1, 32), (3, 64), (7, 128), (2, 96), (5, 256)]
IDS = ["int4-g32", "int5-g32", "int4-g64", "int5-g128", "int4-row", "int4-g32-sym", "int5-g32-sym",
       "int8-g32-sym", "int8-g128-sym"]


@pytest.mark.parametrize("fid", IDS)
def test_as_gguf_is_bit_exact(fid: str) -> None:
    g = torch.Generator().manual_seed(7)
    for i, (rows, cols) in enumerate(SHAPES):
        w = torch.randn(rows, cols, generator=g) * (10.0 ** (i - 2)) + (i - 2)  # scales and offsets of all sizes
        q = quantize_weight(w, fid, method="rtn")
        out = as_gguf(q)
        assert out.format == gguf_type_of(fid) and tuple(out.shape) == (rows, cols) and out.dtype == q.dtype
        assert torch.equal(dequantize(out), dequantize(q)), (fid, rows, cols)
        if "-g32" in fid:  # one group per block: the same bytes
            assert out.nbytes() == q.nbytes()


def test_as_gguf_refuses_in_one_line() -> None:
    w = torch.randn(3, 40)
    with pytest.raises(FormatError) as e:
        as_gguf(quantize_weight(w, "int4-g32", method="rtn"))  # padded to 64: not whole GGUF blocks
    assert "multiple of 32" in _one_line(e)
    for fid in ("int3-g64", "int8-g32", "q4_1"):
        with pytest.raises(FormatError) as e:
            as_gguf(quantize_weight(torch.randn(2, 64), fid, method="rtn"))
        assert fid in _one_line(e)
    q = quantize_weight(torch.randn(2, 64), "int4-g32", method="rtn")
    bad = QTensor(q.format, q.shape, q.dtype, {k: v for k, v in q.parts.items() if k != "weight_zero"})
    with pytest.raises(FormatError) as e:
        as_gguf(bad)
    _one_line(e)


# --- the template ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("src")
    return {"llama": write_arch_gguf(tiny_llama(), d / "llama.gguf"),
            "llama-freqs": write_arch_gguf(tiny_arch("llama"), d / "freqs.gguf",
                                           rope_freqs=torch.linspace(1.0, 8.0, 8)),
            "qwen2-untied": write_arch_gguf(tiny_arch("qwen2", tie=False), d / "qwen2.gguf")}


@pytest.mark.parametrize("which", ["llama", "llama-freqs"])
def test_template_round_trip(sources, which: str, tmp_path: Path) -> None:
    tpl = read_template(sources[which])
    template_to_files(tpl, tmp_path / "art")
    back = template_from_files(tmp_path / "art")
    assert (back.version, back.alignment, back.kv, back.metadata, back.tensors) == \
        (tpl.version, tpl.alignment, tpl.kv, tpl.metadata, tpl.tensors)
    assert back.path == tmp_path / "art" / TEMPLATE_GGUF
    small = back.path.stat().st_size
    assert small < sources[which].stat().st_size / 5  # no weights
    with GGUFFile(back.path) as f:
        assert list(f.tensors) == (["rope_freqs.weight"] if which == "llama-freqs" else [])
    with pytest.raises(InputError, match="already exists"):
        template_to_files(tpl, tmp_path / "art")
    template_to_files(tpl, tmp_path / "art", overwrite=True)


def _crafted(d: Path) -> list[tuple[str, object]]:
    """(what, change) pairs: bytes for a file name or a function of the JSON document."""
    def edit(f):
        def changed(doc):
            f(doc)
            return doc
        return changed

    def rename(doc):
        doc["tensors"][3][0] = "blk.0.attn_nonsense.weight"

    def digest_of(raw: bytes):
        import hashlib
        return lambda doc: doc.__setitem__("gguf_sha256", hashlib.sha256(raw).hexdigest()) or doc

    gg = (d / TEMPLATE_GGUF).read_bytes()
    return [
        ("truncated json", b'{"kind": "bitalloc.gguf_template", "format_ver'),
        ("not json", b"\x00\xff" * 10),
        ("wrong kind", edit(lambda doc: doc.__setitem__("kind", "bitalloc.plan"))),
        ("extra key", edit(lambda doc: doc.__setitem__("x", 1))),
        ("bad type", edit(lambda doc: doc["tensors"][0].__setitem__(2, "Q99"))),
        ("zero dim", edit(lambda doc: doc["tensors"][0].__setitem__(1, [0, 64]))),
        ("huge dim", edit(lambda doc: doc["tensors"][0].__setitem__(1, [2 ** 62, 2 ** 62]))),
        ("not blocks", edit(lambda doc: doc["tensors"][0].__setitem__(2, "Q4_K"))),
        ("duplicate", edit(lambda doc: doc["tensors"].append(doc["tensors"][0]))),
        ("short row", edit(lambda doc: doc["tensors"][0].pop())),
        ("bool version", edit(lambda doc: doc.__setitem__("version", True))),
        ("alignment", edit(lambda doc: doc.__setitem__("alignment", 64))),
        ("renamed tensor", edit(rename)),
        ("digest", edit(lambda doc: doc.__setitem__("gguf_sha256", "0" * 64))),
        ("truncated gguf + its digest", (gg[: len(gg) // 2], digest_of(gg[: len(gg) // 2]))),
        ("bad magic + its digest", (b"GGUX" + gg[4:], digest_of(b"GGUX" + gg[4:]))),
    ]


def test_crafted_templates_are_refused_in_one_line(sources, tmp_path: Path) -> None:
    good = tmp_path / "good"
    template_to_files(read_template(sources["llama-freqs"]), good)
    doc0 = json.loads((good / TEMPLATE_JSON).read_text())
    for i, (what, change) in enumerate(_crafted(good)):
        d = tmp_path / f"bad{i}"
        shutil.copytree(good, d)
        if isinstance(change, bytes):
            (d / TEMPLATE_JSON).write_bytes(change)
        else:
            gguf_bytes, fix = change if isinstance(change, tuple) else (None, change)
            if gguf_bytes is not None:
                (d / TEMPLATE_GGUF).write_bytes(gguf_bytes)
            (d / TEMPLATE_JSON).write_text(json.dumps(fix(json.loads(json.dumps(doc0)))))
        with pytest.raises(InputError) as e:
            template_from_files(d)
        _one_line(e)
    (tmp_path / "bad0" / TEMPLATE_GGUF).unlink()
    shutil.copy(good / TEMPLATE_JSON, tmp_path / "bad0" / TEMPLATE_JSON)
    with pytest.raises(InputError, match="missing"):
        template_from_files(tmp_path / "bad0")
    with pytest.raises(InputError) as e:
        template_from_files(tmp_path / "nowhere")
    _one_line(e)


# --- the extracted model as a GGUF -------------------------------------------------------------------------
def _extracted(src: Path, where: Path, fids=("int4-g32", "int5-g32")):
    """The int model of ``src`` as the nest's extraction gives it: QTensors, fixed floats, a config dir."""
    model, _ = load_model(src)
    view = ModelView(model)
    q = {r.name: quantize_weight(model.get_parameter(r.name).detach(), fids[i % len(fids)], method="rtn")
         for i, r in enumerate(view.quantizable())}
    fixed = {f.name: model.get_parameter(f.name).detach().clone() for f in view.fixed()}
    model.config.save_pretrained(where / "cfg")
    return q, fixed, where / "cfg"


@pytest.mark.parametrize("which", ["llama", "llama-freqs", "qwen2-untied"])
def test_extracted_gguf_decodes_to_the_int_values(sources, which: str, tmp_path: Path) -> None:
    q, fixed, cfg = _extracted(sources[which], tmp_path)
    template_to_files(read_template(sources[which]), tmp_path / "art")
    tpl = template_from_files(tmp_path / "art")
    out = tmp_path / "out.gguf"
    written = write_extracted_gguf(out, tpl, cfg, q, fixed)
    assert written.path == out and written.file_size == out.stat().st_size and manifest_path(out).is_file()
    model, _ = load_model(out)
    params = dict(model.named_parameters())
    for name, qt in q.items():
        assert torch.equal(params[name], dequantize(qt)), name
    for name, t in fixed.items():
        assert torch.equal(params[name], t), name
    with GGUFFile(out) as f:
        types = {t.type.name for t in f.tensors.values() if len(t.shape) == 2}
        assert types == {"Q4_1", "Q5_1"}
        assert written.n_tensors == len(f.tensors)
    # the template read back from its files writes the very file the source's own template writes
    same = write_extracted_gguf(tmp_path / "same.gguf", read_template(sources[which]), cfg, q, fixed)
    assert file_digest(same.path) == file_digest(out)
    with pytest.raises(InputError, match="already exists"):
        write_extracted_gguf(out, tpl, cfg, q, fixed)
    write_extracted_gguf(out, tpl, cfg, q, fixed, overwrite=True)


def test_llama_cpp_loads_and_runs_the_extracted_gguf(sources, tmp_path: Path) -> None:
    q, fixed, cfg = _extracted(sources["llama"], tmp_path)
    template_to_files(read_template(sources["llama"]), tmp_path / "art")
    out = tmp_path / "out.gguf"
    write_extracted_gguf(out, template_from_files(tmp_path / "art"), cfg, q, fixed)
    assert_llama_cpp_agrees(out)


def test_a_tensor_without_an_exact_type_is_refused_before_writing(sources, tmp_path: Path) -> None:
    q, fixed, cfg = _extracted(sources["llama"], tmp_path)
    tpl = read_template(sources["llama"])
    name = sorted(q)[2]
    w = dequantize(q[name])
    out = tmp_path / "out.gguf"
    for bad in ("int3-g64", "int8-g32"):
        q2 = dict(q, **{name: quantize_weight(w, bad, method="rtn")})
        with pytest.raises(InputError) as e:
            write_extracted_gguf(out, tpl, cfg, q2, fixed)
        msg = _one_line(e)
        assert name in msg and bad in msg
        assert list(tmp_path.glob("out.gguf*")) == [] and list(tmp_path.glob(".out.gguf*")) == []
    with pytest.raises(InputError) as e:  # a missing tensor, a wrong shape, a missing norm
        write_extracted_gguf(out, tpl, cfg, {k: v for k, v in q.items() if k != name}, fixed)
    assert name in _one_line(e)
    with pytest.raises(InputError) as e:
        write_extracted_gguf(out, tpl, cfg, q, {k: v for k, v in fixed.items() if "norm" not in k})
    _one_line(e)
    with pytest.raises(InputError) as e:
        write_extracted_gguf(out, tpl, cfg, q, dict(fixed, **{"model.extra.weight": torch.ones(3)}))
    assert "model.extra.weight" in _one_line(e)
    (cfg / "config.json").write_text("{")
    with pytest.raises(InputError) as e:
        write_extracted_gguf(out, tpl, cfg, q, fixed)
    _one_line(e)
    assert not out.exists() and not manifest_path(out).exists()
