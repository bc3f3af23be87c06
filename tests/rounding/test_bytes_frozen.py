"""The stored bytes of ``quantize_weight`` are frozen: SHA-256 digests of every part of its output for
seeded tensors, recorded with the code as it was before the batched GPTQ and the faster kernels.

Speed work in rounding/ and formats/ must not move a single byte of what the final files store.  The
cases cover every format family (int grouped/row, sym/asym; GGUF 32-wide; K-quants), GPTQ with refits and
RTN, a Hessian with dead input columns, one that needs more damping, the RTN fallback, a bf16 weight and
row-chunked quantization.

The digests of the formats that refit their scales to GPTQ's codes (the 32-wide GGUF types here) were recorded
again, on purpose, when GPTQ began to keep each row's best of its three rounds instead of the last
(:func:`bitalloc.rounding.gptq_refit_many_measured`); every other case kept its digest through that change.

The digests hold for the environment they were recorded in (torch 2.13 on an x86-64 CPU; see
:data:`RECORDED_WITH`): another torch build or CPU may round some float reductions differently in the scale
search, for the old code and the new alike (on the H200 machine's CPU with torch 2.11, 9 of the 46 cases give
other digests, identical between the code before and after this change).  With another torch minor version
the test is skipped rather than failed.  MKL's AVX-512 kernels are one such difference (an AVX-512 machine gave
other digests for 9 cases); the digests are therefore computed in a child process held to MKL's AVX2 kernels."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitalloc.formats import QTensor
from bitalloc.rounding import quantize_weight

FORMATS = ["int4-g32", "int4-g128", "int3-g64-sym", "int3-row", "int5-row-sym", "int8-row-sym", "int2-g32",
           "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]


def _data(rows: int, cols: int, seed: int, dead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    x = torch.randn(2 * cols, cols, generator=g) * torch.rand(cols, generator=g)
    x = x + 0.5 * x.roll(1, 1)
    x[:, :dead] = 0
    return w, x.T @ x / (2 * cols)


def _quantize(case: str) -> QTensor:
    fid, kind = case.split("/")
    if kind in ("gptq", "rtn"):
        w, h = _data(16, 256, 0, dead=3)
        return quantize_weight(w, fid, hessian=h, method=kind)  # type: ignore[arg-type]
    if kind == "bf16-chunked":
        w, h = _data(40, 256, 1)
        return quantize_weight(w.to(torch.bfloat16), fid, hessian=h, max_elems=16 * 256)
    if kind == "indefinite":  # needs damping raised twice before the Cholesky factorisation succeeds
        w, h = _data(16, 256, 2)
        h = h - 0.05 * float(torch.diagonal(h).mean()) * torch.eye(256)
        return quantize_weight(w, fid, hessian=h)
    if kind == "rtn-fallback":  # cannot be factorised at all: GPTQ falls back to nearest rounding
        w, h = _data(16, 256, 3)
        h = h.clone()
        h[0, 1] = h[1, 0] = 1e6
        return quantize_weight(w, fid, hessian=h)
    raise AssertionError(case)


def _digest(q: QTensor) -> str:
    h = hashlib.sha256(f"{q.format}|{tuple(q.shape)}|{q.dtype}".encode())
    for name in sorted(q.parts):
        t = q.parts[name].detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _case_digest(case: str) -> str:
    return _digest(_quantize(case))


CASES = [f"{f}/{m}" for f in FORMATS for m in ("gptq", "rtn")] + \
    [f"{f}/bf16-chunked" for f in ("int4-g128", "q4_0", "q4_k", "q5_1")] + \
    [f"{f}/{k}" for f in ("q4_1", "int4-g64-sym", "q3_k") for k in ("indefinite", "rtn-fallback")]

#: torch major.minor the digests were recorded with
RECORDED_WITH = "2.13"

DIGESTS: dict[str, str] = {
    "int4-g32/gptq": "994a1c19cb3c24f19570",
    "int4-g32/rtn": "381273aec0fcb2ecfc59",
    "int4-g128/gptq": "184f1c95c8d901b21a1c",
    "int4-g128/rtn": "56d58f6bca8cfd7d8ca8",
    "int3-g64-sym/gptq": "cfdced0f927986e53f84",
    "int3-g64-sym/rtn": "6f6b176c0a5240e4948e",
    "int3-row/gptq": "38bd96f1653bca1c404a",
    "int3-row/rtn": "cb1229125552cce40389",
    "int5-row-sym/gptq": "b32e00d5f1da225991d0",
    "int5-row-sym/rtn": "82830ee96e5464022d08",
    "int8-row-sym/gptq": "31c53648550088d6fd47",
    "int8-row-sym/rtn": "a40ad1a8f9f4de6402aa",
    "int2-g32/gptq": "134b08090f952cda77f4",
    "int2-g32/rtn": "7bbddf6562f6d8f259e5",
    "q8_0/gptq": "b5bb824696647a044d9f",
    "q8_0/rtn": "1792cc1a53710ea5a025",
    "q5_1/gptq": "b60394d8dcdf1f319d67",
    "q5_1/rtn": "a7a8cf088bc17669cbfc",
    "q5_0/gptq": "284d25ffe61723678ae0",
    "q5_0/rtn": "d0d934eacb16b7b5c36c",
    "q4_1/gptq": "0744d78e61502c48e6ee",
    "q4_1/rtn": "fc1c37296b449a80721f",
    "q4_0/gptq": "1348dcc63b0d6e9ae18b",
    "q4_0/rtn": "f7fd82221f5b09e58c86",
    "iq4_nl/gptq": "fd2bc54cf02af6126b4a",
    "iq4_nl/rtn": "edfc6382090ed8b548c9",
    "q6_k/gptq": "c660c805b4fa63baae5e",
    "q6_k/rtn": "037651501e36923b96ac",
    "q5_k/gptq": "9d5a0cb0f9cfe72ed948",
    "q5_k/rtn": "14b13ed51f586a1a1206",
    "q4_k/gptq": "c878a906065bd265c53f",
    "q4_k/rtn": "b2fd4a62d9dcfbb02a07",
    "q3_k/gptq": "47a2e3612df635300073",
    "q3_k/rtn": "68ba46b95f7e5aaeecee",
    "q2_k/gptq": "4e0ac799e3fab5657e25",
    "q2_k/rtn": "aebddca407e0ea9b056e",
    "int4-g128/bf16-chunked": "115a2bff69f36a82d01f",
    "q4_0/bf16-chunked": "dfb92d069f6026085fd4",
    "q4_k/bf16-chunked": "56fff1e04f4697cb1a52",
    "q5_1/bf16-chunked": "c69db8632a9231cb82ed",
    "q4_1/indefinite": "28b7b97710f4b254d802",
    "q4_1/rtn-fallback": "8d2b3014db82fdc40560",
    "int4-g64-sym/indefinite": "77c91acd37657b11153c",
    "int4-g64-sym/rtn-fallback": "68da2e88231c91ed9cb8",
    "q3_k/indefinite": "3147cc1f935073fd4ed4",
    "q3_k/rtn-fallback": "972bc028b89bb39cb9fd",
}


@pytest.fixture(scope="module")
def digests_here() -> dict[str, str]:
    """Every case's digest, computed in a child process whose MKL is held to its AVX2 kernels
    (``MKL_ENABLE_INSTRUCTIONS=AVX2``, MKL's own switch): the digests were recorded with those, and MKL's AVX-512
    kernels round some matrix products differently, so on an AVX-512 machine 9 cases would differ for the old code
    and the new alike."""
    code = ("import json; from tests.rounding.test_bytes_frozen import CASES, _case_digest; "
            "print(json.dumps({c: _case_digest(c) for c in CASES}))")
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_quantize_weight_bytes_are_unchanged(case: str, digests_here: dict[str, str]) -> None:
    if ".".join(torch.__version__.split(".")[:2]) != RECORDED_WITH:
        pytest.skip(f"digests recorded with torch {RECORDED_WITH}, running {torch.__version__}")
    assert digests_here[case] == DIGESTS[case]
