"""bench/gptq.py's pieces on tiny tensors: the refit schemes and the three-panel plot."""
from __future__ import annotations

from pathlib import Path

import torch

from bench import gptq as bench
from bitalloc.formats.refit import layer_output_error
from tests.rounding.test_gptq import correlated, weight


def test_refit_triple_never_worse_in_sample_and_plain_is_gptq() -> None:
    """Each scheme beats plain GPTQ in-sample, each row's best round is no worse than the previous scheme's last
    round (three rounds each), and both schemes' seconds are recorded."""
    w = weight(16, 64)
    _, h = correlated(400, 64)
    seconds: dict[str, float] = {}
    for f in ("q5_1", "q8_0"):
        q = bench.refit_triple(w, h, f, seconds)
        assert set(q) == {"gptq", "previous", "refit"}
        assert layer_output_error(w, q["refit"], h) < layer_output_error(w, q["gptq"], h)
        if bench.GPTQ_REFITS >= bench.PREVIOUS_ROUNDS:
            assert layer_output_error(w, q["refit"], h) <= layer_output_error(w, q["previous"], h) * (1 + 1e-6)
        pair = bench.quantize_pair(w, h, f)
        assert torch.equal(pair["gptq"], q["gptq"])
    assert set(seconds) == {"previous", "now"} and all(v > 0 for v in seconds.values())


def test_plot_writes_every_panel(tmp_path: Path) -> None:
    results = [{"tensor": f"model.layers.{i}.mlp.down_proj", "format": f, "ratio": 0.5}
               for i in (0, 1) for f in bench.FORMATS]
    refits = [{"tensor": f"model.layers.{i}.mlp.down_proj", "format": f, "ratio": 0.95, "vs_previous": 0.99}
              for i in (0, 1) for f in bench.REFIT_FORMATS]
    out = tmp_path / "p.png"
    bench.plot(results, refits, out)
    assert out.stat().st_size > 1000
