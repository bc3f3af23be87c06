"""Format.unpack (the codes and grid of a stored tensor) and with_scales (learned scales rounded to what the
format stores): the recovery seam.  For every format that offers them: ``encode(*unpack(q))`` gives back q's
parts byte for byte, ``grid.values(codes)`` equals ``decode(q)``, and ``with_scales`` is the identity on the
grid's own scales and gives encodable, finite grids for any finite learned values."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bitalloc.formats import FormatError, QTensor, get_format
from bitalloc.formats.base import Grid
from bitalloc.rounding import quantize_weight

#: format id -> a shape it stores (K-quants: two super-blocks per row; padded shapes where the format pads)
SHAPES: dict[str, tuple[int, int]] = {
    **{f: (6, 96) for f in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")},
    **{f: (4, 512) for f in ("q6_k", "q5_k", "q4_k", "q3_k", "q2_k")},
    "int4-g32-dq": (5, 100), "int3-g16-dq8": (4, 64), "int2-g64-dq4": (3, 200), "int6-g32-dq5": (4, 96),
    "int4-g32": (5, 100), "int3-row-sym": (4, 72), "int8-g64-sym": (3, 128),
    "nf4": (4, 128),
    "fp4-g32": (6, 96), "fp6-e2m3-g32": (6, 96), "fp3-e1m1-g64": (4, 128), "mxfp4": (6, 96), "nvfp4": (6, 96),
    "fp8": (6, 96),
    "mix4-g32": (6, 96), "mix3-g64": (5, 100), "mix4-g16-dq5": (5, 100), "mix4-g32-dq": (4, 96),
    "mix3-g16-dq5": (5, 100),
    "int3-g32+o2": (6, 96), "q4_0+o2": (6, 96), "q4_k+o1": (4, 512), "mix4-g64+o1": (4, 128), "nf4+o4": (4, 128),
    "fp4-g32+o1": (6, 96),
}
FORMATS = sorted(SHAPES)
LEARNS = [f for f in FORMATS if get_format(f).learns_scales]
GPTQ = ["q4_1", "iq4_nl", "q4_k", "q6_k", "q2_k", "int4-g32-dq", "nvfp4", "mix4-g32", "int3-g32+o2", "nf4",
        "mix4-g16-dq5"]


def _weights(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=g) * (0.02 + torch.rand(rows, 1, generator=g))
    return torch.where(torch.rand(rows, cols, generator=g) < 0.02, 6 * w, w)


def _hessian(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * cols, cols, generator=g) * (0.1 + torch.rand(cols, generator=g))
    x = x + 0.5 * x.roll(1, 1)
    return x.T @ x / (2 * cols)


def _quantized(fid: str, method: str = "rtn", seed: int = 0) -> QTensor:
    shape = SHAPES[fid]
    w = _weights(shape, seed)
    if method == "rtn":
        return quantize_weight(w, fid, method="rtn")
    return quantize_weight(w, fid, hessian=_hessian(shape[1], seed + 1), method="gptq")


def _same_bytes(a: QTensor, b: QTensor) -> None:
    assert a.format == b.format and tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
    assert set(a.parts) == set(b.parts)
    for name in a.parts:
        x, y = a.parts[name], b.parts[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype in (torch.float8_e4m3fn,):
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), name


def _roundtrip(fid: str, q: QTensor) -> tuple[torch.Tensor, Grid]:
    fmt = get_format(fid)
    codes, grid = fmt.unpack(q)
    assert codes.dtype == torch.int64 and tuple(codes.shape) == tuple(q.shape)
    assert torch.equal(grid.values(codes), fmt.decode(q))
    _same_bytes(fmt.encode(codes, grid, q.shape, q.dtype), q)
    return codes, grid


@pytest.mark.parametrize("fid", FORMATS)
def test_unpack_roundtrip_rtn(fid: str) -> None:
    q = _quantized(fid)
    codes, grid = _roundtrip(fid, q)
    fitted = get_format(fid).fit(_weights(SHAPES[fid], 0))  # the same kind of grid as fit builds
    assert grid.group_size == fitted.group_size and torch.equal(grid.levels, fitted.levels)
    assert grid.scale.shape == fitted.scale.shape and grid.offset.shape == fitted.offset.shape
    assert set(grid.extra) == set(fitted.extra)
    for k, v in fitted.extra.items():
        if isinstance(v, torch.Tensor):
            assert grid.extra[k].shape == v.shape and grid.extra[k].dtype == v.dtype, k
        else:
            assert type(grid.extra[k]) is type(v), k
    for name in ("set_index", "exact_mask", "exact_values"):
        a, b = getattr(grid, name), getattr(fitted, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name


@pytest.mark.parametrize("fid", GPTQ)
def test_unpack_roundtrip_gptq(fid: str) -> None:
    _roundtrip(fid, _quantized(fid, "gptq", seed=3))


def _check_encodable(fid: str, q: QTensor, codes: torch.Tensor, grid: Grid, new: Grid) -> None:
    fmt = get_format(fid)
    assert new.group_size == grid.group_size and torch.equal(new.levels, grid.levels)
    assert new.scale.shape == grid.scale.shape and new.offset.shape == grid.offset.shape
    assert new.set_index is grid.set_index and new.exact_mask is grid.exact_mask
    vals = new.values(codes)
    assert bool(torch.isfinite(vals).all())
    q2 = fmt.encode(codes, new, q.shape, q.dtype)
    assert torch.equal(fmt.decode(q2), vals)
    c2, g2 = fmt.unpack(q2)  # and the stored grid is the new one
    assert torch.equal(c2, codes) and torch.equal(g2.scale, new.scale) and torch.equal(g2.offset, new.offset)


@pytest.mark.parametrize("fid", LEARNS)
def test_with_scales_identity(fid: str) -> None:
    fmt = get_format(fid)
    q = _quantized(fid)
    codes, grid = fmt.unpack(q)
    new = fmt.with_scales(grid, grid.scale.clone(), grid.offset.clone())
    assert torch.equal(new.scale, grid.scale) and torch.equal(new.offset, grid.offset)
    for k, v in grid.extra.items():
        assert torch.equal(new.extra[k], v) if isinstance(v, torch.Tensor) else new.extra[k] == v
    _same_bytes(fmt.encode(codes, new, q.shape, q.dtype), q)


def _learned(grid: Grid, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, o = grid.scale, grid.offset

    def noise(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g)
    if kind == "perturbed":
        return s * (1 + 0.2 * noise(s)), o + 0.2 * s.abs() * noise(o)
    if kind == "scaled":
        return 3.0 * s, 3.0 * o
    if kind == "random":
        return noise(s) * 10.0 ** (6 * noise(s)).round(), noise(o) * 10.0 ** (6 * noise(o)).round()
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 3e38, -3e38, 70000.0, -1.0, 1e-8, 65504.0])

    def pick(t: torch.Tensor) -> torch.Tensor:
        return extremes[torch.randint(len(extremes), t.shape, generator=g)]
    return pick(s), pick(o)


@pytest.mark.parametrize("kind", ["perturbed", "scaled", "random", "extremes"])
@pytest.mark.parametrize("fid", LEARNS)
def test_with_scales_learned(fid: str, kind: str) -> None:
    fmt = get_format(fid)
    q = _quantized(fid, seed=5)
    codes, grid = fmt.unpack(q)
    scale, offset = _learned(grid, kind, seed=7)
    new = fmt.with_scales(grid, scale, offset)
    _check_encodable(fid, q, codes, grid, new)
    if kind in ("perturbed", "scaled"):  # nearer the learned values than the old grid
        target = Grid(scale, offset, grid.levels, grid.group_size, {}, grid.set_index).values(codes)
        assert float((new.values(codes) - target).square().sum()) < float((grid.values(codes) - target).square().sum())

@pytest.mark.parametrize("fid", ["q4_k", "q3_k", "int4-g32-dq"])
def test_with_scales_zero_super_scale_keeps_integers(fid: str) -> None:
    """A super-scale of 0 with learned scales of 0 keeps the old integer sub-scales (nothing fits better)."""
    fmt = get_format(fid)
    q = _quantized(fid)
    codes, grid = fmt.unpack(q)
    extra = dict(grid.extra, d=torch.zeros_like(grid.extra["d"]))
    zero = fmt.with_scales(dataclasses.replace(grid, extra=extra), torch.zeros_like(grid.scale), grid.offset)
    assert torch.equal(zero.extra["sc"], grid.extra["sc"]) and bool((zero.scale == 0).all())
    fmt.encode(codes, zero, q.shape, q.dtype)


def test_with_scales_symmetric_offsets_stay_zero() -> None:
    for fid in ("q4_0", "q8_0", "iq4_nl", "q6_k", "q3_k", "int8-g64-sym"):
        fmt = get_format(fid)
        codes, grid = fmt.unpack(_quantized(fid))
        new = fmt.with_scales(grid, grid.scale * 1.1, torch.ones_like(grid.offset))
        assert bool((new.offset == 0).all()), fid


def test_outliers_unpack_exact_parts() -> None:
    fmt = get_format("q4_0+o2")
    q = _quantized("q4_0+o2")
    codes, grid = fmt.unpack(q)
    assert grid.exact_mask is not None and grid.exact_values is not None
    assert bool((grid.exact_mask.sum(1) == 2).all())
    assert torch.equal(grid.exact_values[grid.exact_mask].reshape(-1, 2), q.parts["weight_outlier_values"].float())
    assert bool((grid.exact_values[~grid.exact_mask] == 0).all())
    base = QTensor("q4_0", q.shape, q.dtype, {"weight_packed": q.parts["weight_packed"]})
    base_codes, base_grid = fmt.base.unpack(base)
    assert torch.equal(codes, base_codes) and torch.equal(grid.scale, base_grid.scale)


@pytest.mark.parametrize("fid", ["had-int4-g64", "had-q4_k", "fp16", "bf16", "fp32"])
def test_formats_without_unpack_refuse(fid: str) -> None:
    fmt = get_format(fid)
    shape = (4, 256)
    q = quantize_weight(_weights(shape, 1), fmt, method="rtn")
    with pytest.raises(FormatError):
        fmt.unpack(q)
    assert not fmt.learns_scales


def _bad_variants(q: QTensor) -> list[QTensor]:
    """Tensors that must not unpack: an extra part, a missing part, a part of the wrong dtype / shape, the wrong
    format name."""
    out = [QTensor(q.format, q.shape, q.dtype, {**q.parts, "weight_extra": torch.zeros(3)})]
    name = next(iter(q.parts))
    out.append(QTensor(q.format, q.shape, q.dtype, {k: v for k, v in q.parts.items() if k != name}))
    for k, v in q.parts.items():
        as_f32 = v.view(torch.uint8).to(torch.float32) if v.dtype == torch.float8_e4m3fn else v.to(torch.float32)
        wrong = as_f32 if v.dtype != torch.float32 else v.to(torch.float16)
        out.append(QTensor(q.format, q.shape, q.dtype, {**q.parts, k: wrong}))
        out.append(QTensor(q.format, q.shape, q.dtype, {**q.parts, k: v.reshape(-1)[:-1] if v.numel() > 1
                                                         else torch.cat([v.reshape(-1), v.reshape(-1)])}))
        if v.dim() == 2 and v.shape[0] > 1:
            out.append(QTensor(q.format, q.shape, q.dtype, {**q.parts, k: v.reshape(-1)}))
    out.append(QTensor("int4-g128" if q.format != "int4-g128" else "q4_0", q.shape, q.dtype, q.parts))
    return out


@pytest.mark.parametrize("fid", FORMATS)
def test_unpack_wrong_parts_raise_format_error(fid: str) -> None:
    fmt = get_format(fid)
    q = _quantized(fid)
    for bad in _bad_variants(q):
        with pytest.raises(FormatError):
            fmt.unpack(bad)
