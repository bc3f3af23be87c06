"""``bitalloc gguf --measure-method``: the measurement's rounding is its own option (default: ``--method``),
is part of the job fingerprint, and reaches the measurement."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitalloc.cli import gguf as gguf_cmd
from bitalloc.cli import build_parser, main
from tests.gguf_tiny import gguf_argv, write_loadable_gguf

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_loadable_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


def test_measure_method_defaults_to_method_and_is_fingerprinted(src, tmp_path):
    out = tmp_path / "out.gguf"
    parse = build_parser().parse_args
    plain = parse(gguf_argv(src, out))
    assert gguf_cmd.measure_method(plain) == "gptq"
    assert gguf_cmd.measure_method(parse(gguf_argv(src, out, "--method", "rtn"))) == "rtn"
    fast = parse(gguf_argv(src, out, "--measure-method", "rtn"))
    assert gguf_cmd.measure_method(fast) == "rtn" and fast.method == "gptq"
    assert gguf_cmd.gguf_fingerprint(plain)["options"]["measure_method"] == "gptq"
    assert gguf_cmd.gguf_fingerprint(fast)["options"]["measure_method"] == "rtn"


def test_measure_method_reaches_the_measurement(src, tmp_path, monkeypatch):
    import bitalloc.pipeline as pipeline

    seen: list[str] = []
    real = pipeline.measure_model

    def spy(model, view, windows, formats, method="gptq", *a, **k):
        seen.append(method)
        return real(model, view, windows, formats, method, *a, **k)

    monkeypatch.setattr(pipeline, "measure_model", spy)
    out = tmp_path / "out.gguf"
    assert main(gguf_argv(src, out, "--measure-method", "rtn", budget="80KB")) == 0
    assert seen == ["rtn"] and out.is_file()


@pytest.mark.parametrize("flag, expected", [((), True), (("--activations", "none"), False)])
def test_activation_rounding_is_measured_unless_switched_off_and_is_fingerprinted(src, tmp_path, monkeypatch,
                                                                                  flag, expected):
    import bitalloc.pipeline as pipeline

    seen: list[bool] = []
    real = pipeline.measure_model

    def spy(*a, **k):
        seen.append(k["activation_noise"])
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "measure_model", spy)
    out = tmp_path / "out.gguf"
    argv = gguf_argv(src, out, *flag, "--measure-method", "rtn", budget="80KB")
    assert gguf_cmd.gguf_fingerprint(build_parser().parse_args(argv))["options"]["activations"] == \
        ("cpu" if expected else "none")
    assert main(argv) == 0
    assert seen == [expected] and out.is_file()
