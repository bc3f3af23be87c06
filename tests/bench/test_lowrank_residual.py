"""bench/lowrank_residual.py: the share of the output error a rank-r correction removes, read from the singular
values of E·L, is what the explicit correction (fp64 factors) leaves; the summary's rates follow from it."""
from __future__ import annotations

import math

import torch

from bench.lowrank_residual import summarise, tensor_rows
from bitalloc.calibrate import stream_blocks
from bitalloc.measure import output_error
from bitalloc.rounding import dequantize, quantize_weight
from tests.conftest import tiny_llama, token_ids

torch.set_num_threads(1)


def test_svd_share_is_the_explicit_corrections_error():
    model = tiny_llama()
    stats = next(iter(stream_blocks(model, None, token_ids(4, 32), progress=False)))
    name = "model.layers.0.mlp.down_proj.weight"
    w, st = model.get_parameter(name).detach(), stats[name]
    got = tensor_rows(w, st, "int2-g32", "int3-g32", [2, 8])
    e = w.double() - dequantize(quantize_weight(w, "int2-g32", hessian=st.hessian, method="gptq")).double()
    lfac = torch.linalg.cholesky(st.hessian.double())
    u, s, vh = torch.linalg.svd(e @ lfac, full_matrices=False)
    for r in (2, 8):
        corr = (u[:, :r] * s[:r]) @ vh[:r] @ torch.linalg.inv(lfac)  # the best rank-r correction under H
        left = output_error((e - corr).float(), st)
        assert math.isclose(left, got["base_error"] * (1 - got["kept"][r] / got["svd_energy"]), rel_tol=1e-3), r
    assert got["kept"][2] < got["kept"][8] <= got["svd_energy"]
    assert got["up_error"] < got["base_error"] and got["up_extra_bytes"] > 0
    s = summarise([got], [2, 8])
    assert 0 < s["error_removed"]["rank 2"] < s["error_removed"]["rank 8"] < 1
    assert math.isclose(s["halvings_per_bpw"]["next format"],
                        math.log2(got["base_error"] / got["up_error"]) / s["bpw_added"]["next format"])
