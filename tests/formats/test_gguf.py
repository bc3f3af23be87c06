"""GGUF block types: bit-exact bytes both ways (gguf-py, llama.cpp's own quantizer), exact sizes, fit quality."""
from __future__ import annotations

import ctypes
import logging
import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import quants as gq

from bitalloc.formats import FormatError, Grid, QTensor, get_format
from bitalloc.formats.gguf import GGUF_TYPES, KQUANT_TYPES, LEGACY_TYPES
from bitalloc.formats.fit import minmax_affine
from bitalloc.rounding.rtn import rtn_round

log = logging.getLogger(__name__)


def _weights(rows: int = 8, cols: int = 512, seed: int = 0, laplace: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if laplace:
        u = torch.rand(rows, cols, generator=g) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:
        w = torch.randn(rows, cols, generator=g)
    w[1] = 0.0  # all-zero row
    w[2] = 0.37  # constant row
    w[3, 5] = 40.0  # outliers
    w[4, 300] = -25.0
    w[5, :40] = 1e-3 * w[5, :40]  # a block of tiny values
    w[6, 64:96] = 0.0  # one zero block in a live row
    return w


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _gguf_decode(fmt, raw: torch.Tensor) -> np.ndarray:
    return gq.dequantize(raw.numpy(), fmt.gguf_type)


@pytest.mark.parametrize("fid", GGUF_TYPES)
@pytest.mark.parametrize("importance", [False, True])
def test_roundtrip_bit_exact(fid: str, importance: bool) -> None:
    fmt = get_format(fid)
    w = _weights()
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) ** 3 if importance else None
    grid = fmt.fit(w, imp)
    codes, values = rtn_round(w, grid)
    q = fmt.encode(codes, grid, tuple(w.shape), "bfloat16")
    dec = fmt.decode(q)
    assert dec.dtype == torch.float32 and tuple(dec.shape) == tuple(w.shape)
    assert torch.equal(dec, grid.values(codes))  # (1) our decode == the grid
    assert torch.equal(dec, values)
    raw = q.parts["weight_packed"]
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == (w.shape[0], fmt.row_bytes(w.shape[1]))
    np.testing.assert_array_equal(_bits(_gguf_decode(fmt, raw)), _bits(dec.numpy()))  # (2) bit for bit
    block, type_size = GGML_QUANT_SIZES[fmt.gguf_type]  # (4) exact sizes
    assert q.nbytes() == fmt.nbytes(tuple(w.shape)) == raw.numel() == w.shape[0] * w.shape[1] // block * type_size
    assert q.format == fid and q.shape == tuple(w.shape) and q.dtype == "bfloat16"
    assert torch.equal(dec[1], torch.zeros(w.shape[1]))  # a zero row stays exactly zero


@pytest.mark.parametrize("fid", GGUF_TYPES)
def test_every_code_is_representable(fid: str) -> None:
    """GPTQ may pick any code on the grid: random codes (incl. both ends) round-trip through the bytes."""
    fmt = get_format(fid)
    w = _weights(seed=3, laplace=True)
    grid = fmt.fit(w)
    n = grid.levels.numel()
    codes = torch.randint(0, n, w.shape, generator=torch.Generator().manual_seed(4))
    codes[0, :n] = torch.arange(n)[: w.shape[1]]
    codes[0, -1], codes[1, 0] = n - 1, 0
    q = fmt.encode(codes, grid, tuple(w.shape))
    dec = fmt.decode(q)
    assert torch.equal(dec, grid.values(codes))
    np.testing.assert_array_equal(_bits(_gguf_decode(fmt, q.parts["weight_packed"])), _bits(dec.numpy()))


# --- the reverse direction: bytes written by independent quantizers ---------------------------------------
def _ggml():
    try:
        import llama_cpp
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.exists(path):
        return None
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def llama_quantize(lib, w: np.ndarray, fmt, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own quantizer (``ggml_quantize_chunk``, what llama-quantize calls) -> raw block bytes."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    out = np.zeros((rows, fmt.row_bytes(cols)), np.uint8)
    lib.ggml_quantize_init(int(fmt.gguf_type))
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    n = lib.ggml_quantize_chunk(int(fmt.gguf_type), w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                None if im is None else im.ctypes.data)
    assert n == out.size
    return out


def _decode_raw(fmt, raw: np.ndarray, shape) -> torch.Tensor:
    return fmt.decode(QTensor(fmt.id, tuple(shape), "float32", {"weight_packed": torch.from_numpy(raw.copy())}))


@pytest.mark.parametrize("fid", GGUF_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_decodes_llama_cpp_blocks(fid: str, weighted: bool) -> None:
    lib = _ggml()
    if lib is None:
        pytest.skip("llama-cpp-python (libggml-base) is not installed")
    fmt = get_format(fid)
    w = _weights(seed=5, laplace=weighted).numpy()
    im = np.random.default_rng(6).random(w.shape[1]).astype(np.float32) if weighted else None
    raw = llama_quantize(lib, w, fmt, im)
    ours = _decode_raw(fmt, raw, w.shape).numpy()
    np.testing.assert_array_equal(_bits(ours), _bits(gq.dequantize(raw, fmt.gguf_type)))
    assert np.abs(ours - w).max() < np.abs(w).max()  # sanity: it is a quantization of w


@pytest.mark.parametrize("fid", GGUF_TYPES)
def test_decode_by_blocks_is_bitwise_the_whole_decode_and_gguf_py(fid: str) -> None:
    """Decoding a few blocks at a time (down to one) gives every value decoding all blocks at once gives, and
    gguf-py's dequantization of the same bytes."""
    fmt = get_format(fid)
    w = _weights(rows=9, cols=768, seed=3)
    grid = fmt.fit(w, None)
    q = fmt.encode(rtn_round(w, grid)[0], grid, tuple(w.shape), "float32")
    whole = fmt.decode(q, max_elems=1 << 30)
    ref = _gguf_decode(fmt, q.parts["weight_packed"])
    np.testing.assert_array_equal(_bits(whole.numpy()), _bits(ref.reshape(whole.shape)))
    for max_elems in (1, fmt.block_size * 3, 1000):
        assert torch.equal(fmt.decode(q, max_elems=max_elems).view(torch.int32), whole.view(torch.int32))


@pytest.mark.parametrize("fid", LEGACY_TYPES)
def test_decodes_gguf_py_blocks(fid: str) -> None:
    fmt = get_format(fid)
    w = _weights(seed=7).numpy()
    try:
        raw = gq.quantize(w, fmt.gguf_type)
    except NotImplementedError:
        pytest.skip(f"gguf-py cannot quantize {fid}")
    ours = _decode_raw(fmt, raw, w.shape).numpy()
    np.testing.assert_array_equal(_bits(ours), _bits(gq.dequantize(raw, fmt.gguf_type)))


# --- fit quality -------------------------------------------------------------------------------------------
def _minmax_grid(fmt, w: torch.Tensor) -> Grid:
    """Plain min-max RTN on the same type (the baseline every scale search must beat)."""
    if fid_is_legacy(fmt.id):
        s, o = minmax_affine(w.reshape(-1, 32), fmt.levels, symmetric=fmt.spec.symmetric)
        return Grid(s.reshape(w.shape[0], -1), o.reshape(w.shape[0], -1), fmt.levels, 32)
    sp = fmt.spec
    x = w.reshape(-1, 256 // sp.sub, sp.sub)
    s, o = minmax_affine(x.reshape(-1, sp.sub), fmt.levels, symmetric=not fmt.affine, round_params=None)
    s, o = s.reshape(x.shape[:2]), o.reshape(x.shape[:2])
    if fmt.affine:
        s, m = (x.amax(2) - x.amin(2).clamp_max(0)) / (sp.nlev - 1), (-x.amin(2)).clamp_min(0)
    else:
        m = torch.zeros_like(s)
    big = s.gather(1, s.abs().argmax(1, keepdim=True))
    d = (big / (sp.sc_lo if not fmt.affine else sp.sc_hi)).to(torch.float16).float()
    dm = (m.amax(1, keepdim=True) / max(sp.m_hi, 1)).to(torch.float16).float()
    sc = torch.where(d == 0, 0.0, s / torch.where(d == 0, 1.0, d)).round().clamp(sp.sc_lo, sp.sc_hi)
    mn = torch.where(dm == 0, 0.0, m / torch.where(dm == 0, 1.0, dm)).round().clamp(0, sp.m_hi)
    return Grid((d * sc).reshape(w.shape[0], -1), (-(dm * mn)).reshape(w.shape[0], -1), fmt.levels, sp.sub)


def fid_is_legacy(fid: str) -> bool:
    return fid in LEGACY_TYPES


def _sqnr(w: torch.Tensor, v: torch.Tensor, imp: torch.Tensor | None = None) -> float:
    wt = torch.ones(w.shape[1]) if imp is None else imp
    return float(10 * torch.log10((w * w * wt).sum() / ((w - v) ** 2 * wt).sum()))


@pytest.mark.parametrize("fid", GGUF_TYPES)
def test_fit_beats_minmax_and_uses_importance(fid: str) -> None:
    fmt = get_format(fid)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(16, 512, generator=g)
    imp = torch.rand(512, generator=g) ** 4 + 1e-3
    fitted = _sqnr(w, rtn_round(w, fmt.fit(w))[1])
    baseline = _sqnr(w, rtn_round(w, _minmax_grid(fmt, w))[1])
    assert fitted > baseline + 0.05, (fitted, baseline)
    weighted = _sqnr(w, rtn_round(w, fmt.fit(w, imp))[1], imp)
    unweighted = _sqnr(w, rtn_round(w, fmt.fit(w))[1], imp)
    assert weighted > unweighted, (weighted, unweighted)
    lib = _ggml()
    if lib is not None:  # reported, not asserted
        ref = _decode_raw(fmt, llama_quantize(lib, w.numpy(), fmt, imp.numpy()), w.shape)
        log.info("%s weighted SQNR: bitalloc %.2f dB, llama.cpp %.2f dB", fid, weighted, _sqnr(w, ref, imp))


# --- shapes, ids, bad input ---------------------------------------------------------------------------------
def test_ids_types_and_sizes() -> None:
    for fid in GGUF_TYPES:
        fmt = get_format(fid.upper())
        assert fmt.id == fid and fmt.gguf_type.name.lower() == fid
        assert get_format(fid) is fmt
        block, type_size = GGML_QUANT_SIZES[fmt.gguf_type]
        assert fmt.block_size == block and fmt.nbytes((3, 4 * block)) == 3 * 4 * type_size
        assert fmt.bpw((3, 4 * block)) == pytest.approx(8 * type_size / block)
    assert get_format("q4_k").nbytes((576, 1536)) == 576 * 6 * 144
    assert get_format("q8_0").nbytes((49152, 576)) == 49152 * 18 * 34


@pytest.mark.parametrize("fid", GGUF_TYPES)
def test_shape_errors(fid: str) -> None:
    fmt = get_format(fid)
    b = fmt.block_size
    for shape in [(b,), (2, 3, b), (4, b + 16), (4, b // 2), (0, b)]:
        assert not fmt.supports(shape)
        with pytest.raises(FormatError):
            fmt.nbytes(shape)
    with pytest.raises(FormatError):
        fmt.fit(torch.randn(4, b + 16))
    assert fmt.supports((4, 2 * b))
    assert get_format("q4_k").supports((1536, 576)) is False and get_format("q4_0").supports((1536, 576))


def test_bad_inputs() -> None:
    fmt = get_format("q4_k")
    w = torch.randn(2, 256)
    grid = fmt.fit(w)
    codes, _ = rtn_round(w, grid)
    with pytest.raises(FormatError):
        fmt.encode(codes + 16, grid, (2, 256))  # codes beyond the grid
    with pytest.raises(FormatError):
        fmt.encode(codes, Grid(grid.scale, grid.offset, grid.levels, 32), (2, 256))  # no super-scales
    q = fmt.encode(codes, grid, (2, 256))
    short = QTensor("q4_k", (2, 256), "float32", {"weight_packed": q.parts["weight_packed"][:, :-1]})
    with pytest.raises(FormatError):
        fmt.decode(short)
    with pytest.raises(FormatError):
        get_format("q4_0").decode(q)
    with pytest.raises(FormatError):
        fmt.fit(w, torch.ones(7))
    with pytest.raises(Exception):
        fmt.fit(torch.full((2, 256), float("nan")))
    assert set(KQUANT_TYPES) <= set(GGUF_TYPES)


_LLAMA_FTYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1", "q2_k": "Q2_K",
                 "q3_k": "Q3_K_S", "q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL"}


@pytest.mark.slow
def test_decodes_llama_quantize_model(tmp_path) -> None:
    """An F32 GGUF written by gguf-py, quantized by llama.cpp (``--pure``) to each type: decode == gguf-py."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    src = str(tmp_path / "f32.gguf")
    hid, ffn, vocab = 256, 512, 256
    wr = gguf.GGUFWriter(src, "llama")
    wr.add_block_count(1)
    wr.add_context_length(64)
    wr.add_embedding_length(hid)
    wr.add_feed_forward_length(ffn)
    wr.add_head_count(4)
    wr.add_head_count_kv(4)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_vocab_size(vocab)
    shapes = {"token_embd.weight": (vocab, hid), "output_norm.weight": (hid,), "output.weight": (vocab, hid),
              "blk.0.attn_norm.weight": (hid,), "blk.0.ffn_norm.weight": (hid,),
              "blk.0.attn_q.weight": (hid, hid), "blk.0.attn_k.weight": (hid, hid),
              "blk.0.attn_v.weight": (hid, hid), "blk.0.attn_output.weight": (hid, hid),
              "blk.0.ffn_gate.weight": (ffn, hid), "blk.0.ffn_up.weight": (ffn, hid),
              "blk.0.ffn_down.weight": (hid, ffn)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        wr.add_tensor(name, rng.laplace(size=shape).astype(np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    for fid, ftype in _LLAMA_FTYPES.items():
        fmt = get_format(fid)
        dst = str(tmp_path / f"{fid}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.pure = True
        assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0
        seen = 0
        for t in gguf.GGUFReader(dst).tensors:
            if t.tensor_type != fmt.gguf_type:
                continue
            cols, rows = (int(n) for n in t.shape)
            raw = np.ascontiguousarray(t.data).reshape(rows, fmt.row_bytes(cols))
            ours = _decode_raw(fmt, raw, (rows, cols)).numpy()
            np.testing.assert_array_equal(_bits(ours), _bits(gq.dequantize(raw, fmt.gguf_type)))
            seen += 1
        assert seen >= 7, (fid, seen)


@pytest.mark.parametrize("codebook", ["int4", "int8sym", "iq4_nl", "irregular"])
@pytest.mark.parametrize("weighted", [False, True])
def test_grid_error_matches_decoding(codebook: str, weighted: bool) -> None:
    """The code-unit error kernel of the scale search equals decoding the nearest levels and summing."""
    from bitalloc.formats.gguf_common import grid_error, level_values, nearest_fn
    from bitalloc.formats.gguf_legacy import IQ4NL_VALUES

    levels = {"int4": torch.arange(16.0), "int8sym": torch.arange(-128.0, 128.0),
              "iq4_nl": torch.tensor(IQ4NL_VALUES, dtype=torch.float32),
              "irregular": torch.tensor([-3.0, -1.3, 0.0, 0.4, 2.9])}[codebook]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 1, 32, generator=g).double().float()
    s = torch.rand(64, 5, generator=g) * 0.3 + 0.01
    s[:, 1] *= -1  # negative scales (signed symmetric extremes)
    s[3] = 0.0  # zero scales: every value decodes to the offset
    o = torch.randn(64, 5, generator=g) * 0.1
    wt = torch.rand(64, 1, 32, generator=g) if weighted else None
    near = nearest_fn(levels)
    u = torch.randn(4, 9, generator=g) * 40
    u0 = u.clone()
    v = near(u)
    assert torch.equal(u, u0)  # the argument is kept
    ref_near = levels[(u0.unsqueeze(-1) - levels).abs().argmin(-1)]
    assert ((v - u0).abs() <= (ref_near - u0).abs() + 1e-4).all()  # the nearest level (ties either way)
    assert ((v >= levels[0]) & (v <= levels[-1])).all() and torch.isin(v, levels).all()
    q = level_values(x, s, o, near)
    assert torch.equal(q[3], near(torch.zeros(5, 32)))  # zero scale -> the level nearest 0
    r = (q * s.unsqueeze(-1) + o.unsqueeze(-1) - x) ** 2
    ref = (r if wt is None else r * wt).sum(-1)
    got = grid_error(x, wt, s, o, near)
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(got[3], ((o[3].unsqueeze(-1) - x[3]) ** 2 * (1 if wt is None else wt[3])).sum(-1))


@pytest.mark.parametrize("fid", GGUF_TYPES)
def test_fit_of_row_blocks_is_identical(fid: str) -> None:
    """quantize_chunks relies on it: fitting row blocks (odd sizes) gives exactly the whole tensor's grid."""
    fmt = get_format(fid)
    w = _weights(rows=37, cols=512, seed=11, laplace=True)
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(12)) ** 2
    whole = fmt.fit(w, imp)
    for step in (1, 7, 13):
        parts = [fmt.fit(w[a:a + step], imp) for a in range(0, w.shape[0], step)]
        assert torch.equal(torch.cat([p.scale for p in parts]), whole.scale)
        assert torch.equal(torch.cat([p.offset for p in parts]), whole.offset)


def test_rowsum_does_not_depend_on_the_row_position() -> None:
    """The search's reductions round every row alike however the rows are blocked (no BLAS tail paths)."""
    from bitalloc.formats.gguf_common import rowsum

    t = torch.randn(1000, 32, generator=torch.Generator().manual_seed(5))
    whole = rowsum(t)
    torch.testing.assert_close(whole, t.double().sum(-1).float())
    for step in (1, 7, 13):
        assert torch.equal(torch.cat([rowsum(t[a:a + step]) for a in range(0, t.shape[0], step)]), whole)
