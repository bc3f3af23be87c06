"""The compressed-tensors target: written with the library's compressors from bitalloc's grids, loaded by
transformers (with the ``compressed-tensors`` package, on CPU) to the same logits as ``bitalloc.load``, the budget
held to the byte, inexpressible formats refused with one line, its own output recognised, crafted files refused."""
from __future__ import annotations

import json

import pytest
import torch

from bitalloc.budget import Budget
from bitalloc.errors import BitallocError, BudgetError, InputError
from bitalloc.formats import FormatError
from bitalloc.models.view import ModelView
from bitalloc.pipeline import make_plan, measure_model, plan_for_assignments
from bitalloc.quantize import quantize_model
from bitalloc.targets.base import Capacity
from bitalloc.targets.compressed_tensors import CompressedTensorsTarget

from conftest import tiny_llama, token_ids

pytest.importorskip("compressed_tensors")

MIX = ("int2-g32-sym", "int4-g32-sym", "int3-g64-sym", "int8-row-sym", "int4-row-sym", "fp16")


def _kld_top1(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return kld, float((ref.argmax(-1) == cand.argmax(-1)).double().mean())


def _quantized_mix(model, assignments=None):
    """A plan mixing every mapped family (embedding fp16), GPTQ-rounded."""
    view = ModelView(model)
    refs = view.quantizable()
    a = assignments or {r.name: ("fp16" if r.kind == "embedding" else MIX[i % (len(MIX) - 1)])
                        for i, r in enumerate(refs)}
    plan = plan_for_assignments(view, a, "mix")
    return view, plan, quantize_model(model, view, plan, token_ids(2), "gptq", progress=False)


def _write(model, out, tie_note=""):
    view, plan, q = _quantized_mix(model)
    target = CompressedTensorsTarget(out)
    prepared = target.prepare(model, view, plan, q, {}, None)
    written = target.write_verified(prepared, Capacity("x", prepared.sizes["weights"], 0, 0, "weights"),
                                    overwrite=False)
    return view, plan, q, target, prepared, written


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_it_to_bitalloc_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from bitalloc import load

    model = tiny_llama(tie=tie)
    out = tmp_path / "ct"
    _, plan, q, _, prepared, written = _write(model, out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert set(cfg["config_groups"]) == {qt.format for qt in q.values() if qt.format != "fp16"}
    for fid, g in cfg["config_groups"].items():  # explicit module names, every one stored in that format
        assert g["targets"] and all(not t.startswith("re:") and q[t + ".weight"].format == fid for t in g["targets"])
    assert written.info["bytes"] == prepared.sizes["weights"]
    ours = load(out)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = token_ids(3, seed=5)
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    kld, top1 = _kld_top1(a, b)
    assert top1 == 1.0 and kld < 1e-6
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # weights decompress bit for bit alike
    for n, qt in q.items():  # bitalloc.load reads back exactly bitalloc's decode
        from bitalloc.rounding import dequantize

        torch.testing.assert_close(ours.get_parameter(n), dequantize(qt).reshape(ours.get_parameter(n).shape),
                                   rtol=0, atol=0)


def test_budget_to_the_byte_and_the_allocator_restricted(tmp_path):
    model = tiny_llama(tie=True)
    view = ModelView(model)
    m = measure_model(model, view, token_ids(2), list(MIX) + ["int4-g128-sym"], "rtn", progress=False)
    target = CompressedTensorsTarget(tmp_path / "ct")
    cap = target.capacity(Budget.parse("7bpw"), m, view)
    nquant = sum(1 for r in view.quantizable() if r.kind != "embedding")
    assert cap.overhead == view.fixed_bytes + 16 * nquant and cap.allocatable == cap.limit - cap.overhead
    plan = make_plan(m, cap.plan_budget(m.fixed_bytes), target.constraints(view))
    fmts = {e.tensor: e.format for e in plan.entries}
    assert fmts["model.embed_tokens.weight"] in ("fp16", "bf16", "fp32")  # transformers quantizes linears only
    assert all(f != "int4-g128-sym" for f in fmts.values())  # 64 columns: a group of 128 does not divide them
    q = quantize_model(model, view, plan, token_ids(2), "rtn", progress=False)
    prepared = target.prepare(model, view, plan, q, {}, None)
    grid = sum(1 for f in fmts.values() if f != "fp16")
    assert prepared.sizes["weights"] == plan.total_bytes + 16 * grid <= cap.limit
    with pytest.raises(BudgetError, match="over its budget"):
        target.write_verified(prepared, Capacity("x", prepared.sizes["weights"] - 1, 0, 0, "weights"),
                              overwrite=False)
    assert not target.out.exists()
    written = target.write_verified(prepared, cap, overwrite=False)
    on_disk = sum(t.numel() * t.element_size() for t in _stored(target.out).values())
    assert on_disk == written.info["bytes"] == prepared.sizes["weights"] <= cap.limit


def _stored(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_packed_codes_are_bitalloc_codes(tmp_path):
    """The library's int32 words unpack (with the library) to exactly the codes bitalloc chose."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from bitalloc.formats import get_format
    from bitalloc.formats.packing import unpack_bits

    model = tiny_llama(tie=False)
    _, _, q, _, _, _ = _write(model, tmp_path / "ct")
    stored = _stored(tmp_path / "ct")
    checked = 0
    for n, qt in q.items():
        fmt = get_format(qt.format)
        if not fmt.is_grid:
            assert torch.equal(stored[n], qt.parts["weight"])
            continue
        rows, cols = qt.shape
        m = n[: -len(".weight")]
        gs, ng = fmt.group_size(cols), fmt.ngroups(cols)
        codes = unpack_bits(qt.parts["weight_packed"], fmt.bits, rows * ng * gs).reshape(rows, -1)[:, :cols]
        lib = unpack_from_int32(stored[m + ".weight_packed"], fmt.bits, torch.Size((rows, cols)))
        assert torch.equal(lib.to(torch.int64), fmt.levels.to(torch.int64)[codes])
        assert torch.equal(stored[m + ".weight_scale"], qt.parts["weight_scale"])
        assert stored[m + ".weight_shape"].tolist() == [rows, cols]
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("fid, match", [("int4-g32", "integer zero point"), ("q4_0", "no format"),
                                        ("nf4", "no format"), ("q8_0", "no format")])
def test_inexpressible_formats_refused_in_one_line(tmp_path, fid, match):
    from bitalloc.export.ct_schemes import check_expressible

    with pytest.raises(FormatError, match=match) as e:
        check_expressible(["fp16", fid])
    assert "\n" not in str(e.value)
    model = tiny_llama(tie=False)
    view = ModelView(model)
    a = {r.name: ("fp16" if r.kind == "embedding" else "int4-g32-sym") for r in view.quantizable()}
    a["model.layers.0.mlp.down_proj.weight"] = fid
    _, plan, q = _quantized_mix(model, a)
    with pytest.raises(BitallocError, match=match):
        CompressedTensorsTarget(tmp_path / "ct").prepare(model, view, plan, q, {}, None)


def test_quantized_embedding_refused(tmp_path):
    model = tiny_llama(tie=True)
    view = ModelView(model)
    a = {r.name: "int4-g32-sym" for r in view.quantizable()}
    _, plan, q = _quantized_mix(model, a)
    with pytest.raises(InputError, match="not a linear module"):
        CompressedTensorsTarget(tmp_path / "ct").prepare(model, view, plan, q, {}, None)


def test_is_ours_overwrite_and_crafted_files(tmp_path):
    from bitalloc import load

    model = tiny_llama(tie=True)
    out = tmp_path / "ct"
    view, plan, q, target, prepared, written = _write(model, out)
    again = target.is_ours(prepared.expected)
    assert again is not None and again.info == written.info
    other = dict(prepared.expected)
    other[sorted(other)[0]] = "0" * 64
    assert target.is_ours(other) is None
    with pytest.raises(InputError, match="already exists"):
        target.write_verified(prepared, Capacity("x", 10**9, 0, 0, "weights"), overwrite=False)
    target.write_verified(prepared, Capacity("x", 10**9, 0, 0, "weights"), overwrite=True)  # its own output
    # a flipped byte in the weights: refused by the manifest, in one line
    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(InputError) as e:
        load(out)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError):  # unverified, the crafted value is still bounded by the strict checks or the
        (out / "model.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))  # truncated file
        load(out, verify=False)


def test_crafted_quantization_config_refused(tmp_path):
    from bitalloc import load

    model = tiny_llama(tie=False)
    out = tmp_path / "ct"
    _write(model, out)
    cfg = json.loads((out / "config.json").read_text())
    g = next(iter(cfg["quantization_config"]["config_groups"].values()))
    g["weights"]["num_bits"] = 3  # the packed words then mean other codes
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load(out, verify=False)
    assert "\n" not in str(e.value)


def _have(fid: str) -> bool:
    from bitalloc.formats import get_format

    try:
        get_format(fid)
    except FormatError:
        return False
    return True


@pytest.mark.parametrize("floats", [("nvfp4",), ("fp8",), ("mxfp4",), ("nvfp4", "mxfp4"),
                                    ("fp8", "int4-g32-sym", "int8-row-sym")])
def test_float_formats_in_the_library_layout(tmp_path, floats):
    """``formats/fp.py``'s nvfp4 / fp8 / mxfp4 as the library's nvfp4-pack-quantized / float-quantized /
    mxfp4-pack-quantized: transformers' logits equal ``bitalloc.load``'s, a mix of compressors included."""
    if not all(_have(f) for f in floats):
        pytest.skip("formats/fp.py is not in this tree")
    _through_transformers(tmp_path, floats)


@pytest.mark.parametrize("fmts", [("int4-g32-zp",), ("int3-g64-zp",), ("int5-row-zp",)])
def test_integer_zero_point_formats(tmp_path, fmts):
    """``intB-gG-zp`` as asymmetric pack-quantized (packed zero points): bitalloc reads back exactly its own values
    (the library's decompressor, in float32), and transformers gives the same logits to < 1e-6 KLD.  transformers
    5.25 loads asymmetric pack-quantized checkpoints only with ``run_compressed=False``, and that path rounds every
    weight to fp16 and decodes a mix of formats with one group's parameters (wrong values, or a failure on mixed
    group sizes, symmetric mixes too), so each case is one format."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    _through_transformers(tmp_path, fmts, {"quantization_config": CompressedTensorsConfig(run_compressed=False)},
                          exact=False)


def test_zero_point_scheme_is_the_library_decompressor(tmp_path):
    """The scheme's parts, decompressed by compressed-tensors itself in float32, are bitalloc's decode bit for bit
    (zero groups, constant rows and every width), and its bytes are bitalloc's plus ``weight_shape``."""
    from bitalloc.export.ct_schemes import ct_bytes, scheme_for
    from bitalloc.formats import get_format
    from bitalloc.rounding import dequantize, quantize_weight

    gen = torch.Generator().manual_seed(3)
    for fid, shape in [("int4-g64-zp", (64, 256)), ("int3-g32-zp", (32, 96)), ("int8-row-zp", (8, 64)),
                       ("int2-g128-zp", (16, 256)), ("int5-row-zp", (96, 64)), ("int6-g32-zp", (16, 64))]:
        w = torch.randn(*shape, generator=gen)
        w[0, :32] = 0.0
        w[1] = 0.37
        x = torch.randn(128, shape[1], generator=gen)
        fmt = get_format(fid)
        q = quantize_weight(w, fmt, hessian=x.T @ x / 128)
        scheme = scheme_for(fmt)
        assert scheme.fits(fmt, shape) and ct_bytes(fmt, shape) == fmt.nbytes(shape) + 16
        parts = scheme.to_library(q)
        assert {k: (t.dtype, tuple(t.shape)) for k, t in parts.items()} == scheme.layout(fmt, shape)
        assert torch.equal(scheme.from_library(fmt, parts), dequantize(q)), fid
    assert not scheme_for("int4-g32-zp").fits(get_format("int4-g32-zp"), (12, 64))  # 48 bits of zeros per column


def _through_transformers(tmp_path, floats, hf_kwargs=None, exact=True):
    """Every linear in one of ``floats`` (round robin, embedding fp16), written as compressed-tensors: the bytes are
    bitalloc's plus ``weight_shape`` per int tensor, and transformers (``hf_kwargs``) loads the same logits and,
    when ``exact``, the same weights bit for bit (else within fp16 rounding of them)."""
    from transformers import AutoModelForCausalLM

    from bitalloc import load

    model = tiny_llama(tie=True)
    view = ModelView(model)
    a = {r.name: "fp16" if r.kind == "embedding" else floats[i % len(floats)]
         for i, r in enumerate(view.quantizable())}
    _, plan, q = _quantized_mix(model, a)
    target = CompressedTensorsTarget(tmp_path / "ct")
    prepared = target.prepare(model, view, plan, q, {}, None)
    assert prepared.sizes["weights"] == plan.total_bytes + 16 * sum(1 for f in a.values() if f.startswith("int"))
    target.write_verified(prepared, Capacity("x", prepared.sizes["weights"], 0, 0, "weights"), overwrite=False)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert set(cfg["config_groups"]) == set(floats)
    # the library decompresses fp4 weights in bfloat16 (exact there: 2-bit mantissas times E4M3/E8M0 scales), which
    # a float32 model cannot multiply: those checkpoints are compared in bfloat16, both sides
    dtype = torch.bfloat16 if {"nvfp4", "mxfp4"} & set(floats) else torch.float32
    ours = load(tmp_path / "ct", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=dtype, **(hf_kwargs or {})).eval()
    ids = token_ids(3, seed=5)
    with torch.no_grad():
        a_, b_ = ours(ids).logits, hf(ids).logits
    kld, top1 = _kld_top1(a_, b_)
    assert top1 == 1.0 and kld < 1e-6
    for n, p in ours.named_parameters():  # the same weights, bit for bit (or within one fp16 rounding)
        h = hf.get_parameter(n).to(p.dtype)
        assert torch.equal(p, h) if exact else torch.equal(p.to(torch.float16), h.to(torch.float16)), n
