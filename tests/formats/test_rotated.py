"""Recorded rotations (formats/rotated.py): the Hadamard construction, the had-<format> family, its rounding
under the rotated Hessian, its measurement, packed output and the GGUF refusal."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.formats import FormatError, QTensor, get_format
from bitalloc.formats.rotated import Rotation, hash_signs, small_hadamard
from bitalloc.measure import measure_tensor, output_error
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.stats import LinearStats, TensorStats


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("m", [1, 2, 4, 12, 20, 24, 28, 36, 44, 60, 72, 76, 108])
def test_small_hadamard_matrices_are_exact(m: int) -> None:
    h = small_hadamard(m)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


def test_orders_without_a_construction() -> None:
    assert small_hadamard(6) is None and small_hadamard(9) is None
    r = Rotation.build(11008)  # 43·256: no Paley order 43·2^j up to the cap: blocks of 256
    assert not r.full and r.p == 256


@pytest.mark.parametrize("n", [7, 10, 64, 96, 576, 640, 1536])
def test_rotation_is_orthogonal_and_matches_its_dense_form(n: int) -> None:
    r = Rotation.build(n, seed=3)
    m = r.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # the dense form from an independent construction: diag(s) · (B ⊗ Sylvester) · scale
    b = r.small if r.full else torch.eye(n // r.p, dtype=torch.float64)
    dense = torch.diag(hash_signs(n, 3)) @ torch.kron(b, _sylvester(r.p)) * r.scale
    torch.testing.assert_close(m, dense, rtol=0, atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(r.apply(x), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.apply_t(x), x @ dense.T, rtol=0, atol=1e-12)
    h = torch.randn(n, 2 * n, dtype=torch.float64)
    h = h @ h.T
    torch.testing.assert_close(r.conjugate(h), dense.T @ h @ dense, rtol=1e-10, atol=1e-8)
    imp = torch.rand(n, dtype=torch.float64)
    torch.testing.assert_close(r.importance(imp), torch.diagonal(dense.T @ torch.diag(imp) @ dense),
                               rtol=1e-10, atol=1e-12)


def test_full_rotations_mix_every_column() -> None:
    assert Rotation.build(576).full and Rotation.build(576).small.shape == (36, 36)  # 576 = 36·16 (Paley II, q=17)
    assert (Rotation.build(1536).matrix() != 0).all()  # 1536 = 12·128 (Paley I, q=11)


def test_signs_are_frozen() -> None:
    """Stored tensors decode with these signs: they must never change (SHA-256 counter mode, not torch's RNG)."""
    s = hash_signs(1536, 0)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    bits = "".join("1" if v < 0 else "0" for v in s.tolist())
    assert bits[:256] == "".join(f"{b:08b}"[::-1] for b in hashlib.sha256(b"bitalloc-hadamard/0/1536/0").digest())
    assert hashlib.sha256(bits.encode()).hexdigest()[:16] == _FROZEN_SIGNS


_FROZEN_SIGNS = "a9211ba46c4a9cc6"  # hash_signs(1536, 0) as first written


def test_ids_and_refusals() -> None:
    for fid in ("had-int3-g128", "had-int4-g64", "had-q4_k", "had-iq4_nl", "had-int4-row-sym"):
        f = get_format(fid)
        assert f.id == fid and f.activation_rounding is None
        base = get_format(fid[4:])
        for shape in ((256, 512), (8, 1024), (3, 256)):
            if base.supports(shape):
                assert f.nbytes(shape) == base.nbytes(shape)
    for bad in ("had-fp16", "had-had-q4_k", "had-int9-g128", "had-"):
        with pytest.raises(FormatError):
            get_format(bad)
    with pytest.raises(FormatError):
        get_format("had-q4_k").check_shape((4, 4, 256))


def _laplace_with_outliers(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g).clamp(1e-6, 1 - 1e-6) - 0.5
    w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    w[:, torch.randperm(cols, generator=g)[:4]] *= 8.0  # outlier input channels
    return w


@pytest.mark.parametrize("fid", ["int3-g128", "int4-g64", "iq4_nl", "q4_k"])
def test_stored_parts_are_the_base_format_of_w_r(fid: str) -> None:
    w = _laplace_with_outliers(16, 512)
    f, base = get_format("had-" + fid), get_format(fid)
    q = quantize_weight(w, f, method="rtn")
    assert q.format == f.id and q.nbytes() == f.nbytes(tuple(w.shape))
    r = Rotation.build(512).matrix()
    qb = quantize_weight((w.double() @ r).float(), base, method="rtn")
    assert set(q.parts) == set(qb.parts) and all(torch.equal(q.parts[k], qb.parts[k]) for k in qb.parts)
    # decode = base.decode(the same parts) · Rᵀ
    plain = base.decode(QTensor(base.id, q.shape, q.dtype, q.parts)).double()
    torch.testing.assert_close(dequantize(q).double(), plain @ r.T, rtol=0, atol=1e-5)
    # the rotation spreads the outlier columns: a smaller error than the base format's own
    err = lambda d: float((d - w).square().sum())  # noqa: E731
    assert err(dequantize(q)) < err(dequantize(quantize_weight(w, base, method="rtn")))


def _hessian(cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    return x.T @ x / x.shape[0]


def test_gptq_rounds_under_the_rotated_hessian() -> None:
    w, h = _laplace_with_outliers(32, 256), _hessian(256)
    f = get_format("had-int3-g64")
    r = Rotation.build(256).matrix()
    q = quantize_weight(w, f, hessian=h, method="gptq")
    qb = quantize_weight((w.double() @ r).float(), "int3-g64", hessian=(r.T @ h.double() @ r).float(), method="gptq")
    a = dequantize(q).double()
    b = get_format("int3-g64").decode(qb).double() @ r.T
    stats = TensorStats(roles=(LinearStats(h, 1024, None, {}),))
    ea, eb = output_error((a - w).float(), stats), output_error((b - w).float(), stats)
    assert math.isclose(ea, eb, rel_tol=1e-3)
    # chunked rows are byte-identical to the whole tensor
    qc = quantize_weight(w, f, hessian=h, method="gptq", max_elems=8 * 256)
    assert all(torch.equal(qc.parts[k], q.parts[k]) for k in q.parts)


def test_measurement_batched_equals_per_format_and_the_decoded_error() -> None:
    w, h = _laplace_with_outliers(24, 256, seed=2), _hessian(256, seed=3)
    stats = TensorStats(roles=(LinearStats(h, 1024, torch.rand(24), {}),))
    fmts = ["int3-g64", "had-int3-g64", "q4_k", "had-q4_k", "had-iq4_nl"]
    for method in ("rtn", "gptq"):
        a = {r.format: r for r in measure_tensor("t", w, stats, fmts, method)}
        b = {r.format: r for r in measure_tensor("t", w, stats, fmts, method, batched=False)}
        for fid in fmts:
            assert a[fid].bytes == b[fid].bytes == get_format(fid).nbytes((24, 256))
            assert math.isclose(a[fid].output_error, b[fid].output_error, rel_tol=1e-4), fid
            assert math.isclose(a[fid].fisher_error, b[fid].fisher_error, rel_tol=1e-4), fid
        q = quantize_weight(w, "had-q4_k", hessian=h, method=method)
        assert math.isclose(b["had-q4_k"].output_error, output_error(dequantize(q) - w, stats), rel_tol=1e-6)
    assert a["had-int3-g64"].output_error < a["int3-g64"].output_error  # outlier columns: rotation wins


def test_gguf_target_refuses_recorded_rotations() -> None:
    from bitalloc.targets.gguf import gguf_formats

    with pytest.raises(InputError, match="not a GGUF block type") as e:
        gguf_formats("q4_k,had-q4_k")
    assert "\n" not in str(e.value)


def test_packed_output_loads_the_rotated_formats(tmp_path) -> None:
    from tests.conftest import measure_quantize_load, tiny_llama

    m, _ = measure_quantize_load(tiny_llama(), tmp_path / "out", formats=("had-int2-g32", "had-int4-g32", "int8-g32"))
    assert {r.format for r in m.rows} == {"had-int2-g32", "had-int4-g32", "int8-g32"}
