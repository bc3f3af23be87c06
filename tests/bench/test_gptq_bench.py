"""bench/gptq.py's pieces on tiny tensors: the refit pair and the two-panel plot."""
from __future__ import annotations

from pathlib import Path

import torch

from bench import gptq as bench
from bitalloc.formats.refit import layer_output_error
from tests.rounding.test_gptq import correlated, weight


def test_refit_pair_never_worse_in_sample_and_plain_is_gptq() -> None:
    w = weight(16, 64)
    _, h = correlated(400, 64)
    for f in ("q5_1", "q8_0"):
        q = bench.refit_pair(w, h, f)
        assert set(q) == {"gptq", "refit"}
        assert layer_output_error(w, q["refit"], h) < layer_output_error(w, q["gptq"], h)
        pair = bench.quantize_pair(w, h, f)
        assert torch.equal(pair["gptq"], q["gptq"])


def test_plot_writes_both_panels(tmp_path: Path) -> None:
    results = [{"tensor": f"model.layers.{i}.mlp.down_proj", "format": f, "ratio": 0.5}
               for i in (0, 1) for f in bench.FORMATS]
    refits = [{"tensor": f"model.layers.{i}.mlp.down_proj", "format": f, "ratio": 0.95}
              for i in (0, 1) for f in bench.REFIT_FORMATS]
    out = tmp_path / "p.png"
    bench.plot(results, refits, out)
    assert out.stat().st_size > 1000
