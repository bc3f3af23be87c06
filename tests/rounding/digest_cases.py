"""Seeded weights for the int-format digest test (tests/rounding/test_rtn_digests.py) and bench/demo_profile.py.

Every int width and group (sym and asym), without importance, with a per-column importance (zeros included),
with a per-element importance, and through ``quantize_weight(method="rtn", hessian=H)``; the weights mix
normal, Laplace and outlier-heavy rows with edge rows (constant, zero, huge, tiny, one non-zero)."""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from bitalloc.formats.int import BITS, GROUPS, IntFormat

FORMAT_IDS = [IntFormat(b, g, s).id for b in BITS for g in GROUPS for s in (False, True)]


def weights(rows: int = 21, cols: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g) * 0.02
    u = torch.rand(rows, cols, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
    lap = -torch.sign(u) * torch.log1p(-2 * u.abs())
    outl = torch.where(torch.rand(rows, cols, generator=g) < 0.01, lap * 20, lap)
    edge = torch.zeros(8, cols)
    edge[0] = 0.5  # constant
    edge[2] = torch.linspace(-1e6, 1e6, cols)  # huge: fp16 scale clamp
    edge[3] = torch.linspace(-1e-9, 2e-9, cols)  # tiny: scale below fp16 subnormals
    edge[4, 7] = 3.0  # one non-zero
    edge[5] = torch.linspace(0.1, 0.2, cols)  # one-signed
    edge[6] = -torch.linspace(0.1, 0.2, cols)
    edge[7] = torch.randn(cols, generator=g) * 1e-30
    return torch.cat([normal, lap, outl, edge])


def importances(rows: int, cols: int, seed: int = 1) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    col = torch.rand(cols, generator=g) ** 4
    col[::17] = 0.0
    elem = torch.rand(rows, cols, generator=g)
    elem[3] = 0.0
    return {"none": None, "col": col, "elem": elem}


def _digest(h: "hashlib._Hash", t: torch.Tensor) -> None:
    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    h.update(t.contiguous().numpy().tobytes())


def cases() -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(name, w, importance, hessian) for every digest case of one format."""
    w = weights()
    rows, cols = w.shape
    for name, imp in importances(rows, cols).items():
        yield name, w, imp, None
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, cols, generator=g) * torch.rand(cols, generator=g)
    yield "hessian", w, None, x.T @ x / 64


def format_digest(fid: str) -> str:
    """SHA-256 over every case's fit (scale, offset) and RTN-quantized parts for format ``fid``."""
    from bitalloc.formats import get_format
    from bitalloc.rounding import quantize_weight

    fmt = get_format(fid)
    h = hashlib.sha256()
    for name, w, imp, hess in cases():
        h.update(name.encode())
        if hess is None:
            grid = fmt.fit(w, imp)
            _digest(h, grid.scale)
            _digest(h, grid.offset)
        else:
            q = quantize_weight(w, fmt, hessian=hess, method="rtn")
            for part in sorted(q.parts):
                _digest(h, q.parts[part])
    return h.hexdigest()
