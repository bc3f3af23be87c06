"""``--reuse-rounding``: the measurement keeps every tensor's rounding into every format, and the quantization is
assembled from them: each stored tensor decodes to exactly what was measured, nothing is rounded after the
measurement, an interrupted job resumes to identical files, and what the option cannot serve is refused in one
line before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitalloc.cli import main
from bitalloc.errors import InputError
from bitalloc.jobs import checkpoints
from bitalloc.jobs.config import default_job_dir
from bitalloc.measure import measure_tensor, output_error
from bitalloc.models.view import ModelView
from bitalloc.pipeline import make_plan, measure_model
from bitalloc.quantize import assemble_rounded, quantize_model, snapshot
from bitalloc.rounding import dequantize, quantize_weight
from bitalloc.stats import LinearStats, TensorStats
from tests.cli_process import kill_at_marks, run_to_end
from tests.conftest import tiny_llama, token_ids
from tests.gguf_tiny import gguf_argv, write_loadable_gguf
from tests.test_resume import make_hf_dir, quantize_argv, read_tree

torch.set_num_threads(1)
BUDGET = "80KB"


def _stats(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, TensorStats]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(512, cols, generator=g) * torch.rand(cols, generator=g)
    return w, TensorStats(roles=(LinearStats(x.T @ x / 512, 512, torch.rand(rows, generator=g), {}),))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_each_kept_rounding_decodes_to_what_its_row_measured(method):
    """Row blocks and stacks of several formats, a rotated format and a pass-through one: every kept QTensor has
    the row's format and bytes, and its error is the row's error."""
    w, st = _stats(48, 64)
    fmts = ["int2-g32", "int4-g32", "q4_0", "iq4_nl", "had-int3-g32", "fp16"]
    kept: dict[str, object] = {}
    rows = measure_tensor("w", w, st, fmts, method, max_elems=16 * 64, keep=kept.__setitem__)
    assert sorted(kept) == sorted(fmts)
    for r in rows:
        q = kept[r.format]
        assert q.format == r.format and q.nbytes() == r.bytes and tuple(q.shape) == (48, 64)
        assert all(t.device.type == "cpu" for t in q.parts.values())
        dw = dequantize(q).reshape(w.shape) - w
        # GPTQ's rows read their error off its float32 feedback (gptq_round_many_measured): equal up to its rounding
        assert output_error(dw, st) == pytest.approx(r.output_error, rel=1e-6 if method == "gptq" else 1e-9,
                                                     abs=1e-12)


def test_a_format_measured_alone_keeps_the_bytes_quantize_weight_writes():
    """One format's stack is GPTQ of that format alone: the kept rounding is byte for byte quantize_weight's."""
    w, st = _stats(40, 96, seed=1)
    for fmt in ("int3-g32", "q5_0"):
        kept: dict[str, object] = {}
        measure_tensor("w", w, st, [fmt], "gptq", keep=kept.__setitem__)
        want = quantize_weight(w, fmt, hessian=st.hessian, method="gptq")
        assert {k: torch.equal(t, want.parts[k]) for k, t in kept[fmt].parts.items()} == \
            {k: True for k in want.parts}


def test_assembled_model_holds_the_measured_roundings_of_the_plan():
    model, windows = tiny_llama(), token_ids()
    view = ModelView(model)
    saved = snapshot(model)
    blocks: list[int] = []
    kept: dict[tuple[str, str], object] = {}

    def on_rounded(b, got):
        blocks.append(b)
        kept.update(got)

    m = measure_model(model, view, windows, ["int2-g32", "int4-g32", "int8-g32"], "gptq", fisher=False,
                      progress=False, on_rounded=on_rounded)
    nblocks = len(view.blocks())
    assert blocks == list(range(nblocks + 1))  # every block, then the head tensors
    assert {(r.tensor, r.format) for r in m.rows} == set(kept)
    plan = make_plan(m, "4bpw")
    rounded = {n: kept[(n, f)] for n, f in plan.assignments.items()}
    q = assemble_rounded(model, view, plan, rounded)
    params = dict(model.named_parameters())
    assert set(q) == set(params)
    for name, f in plan.assignments.items():
        assert q[name] is rounded[name] and q[name].format == f
        assert torch.equal(params[name].detach(), dequantize(q[name]).reshape(params[name].shape))
    assert all(q[f.name].format in ("fp16", "fp32") for f in view.fixed())
    # the sequential quantization of the same plan rounds the later blocks on other inputs: other bytes
    model2 = tiny_llama()
    q_seq = quantize_model(model2, None, plan, windows, "gptq", progress=False)
    assert any(not torch.equal(q_seq[n].parts["weight_packed"], q[n].parts["weight_packed"])
               for n in plan.assignments if ".layers.1." in n)
    lost = dict(rounded)
    name = next(iter(plan.assignments))
    lost.pop(name)
    for name_, v in saved.items():
        params[name_].data.copy_(v)
    with pytest.raises(InputError, match=rf"{name}: the measurement kept no rounding into"):
        assemble_rounded(model, view, plan, lost)


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_loadable_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


@pytest.fixture(scope="module")
def reused(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reused") / "out.gguf"
    assert main(gguf_argv(src, out, "--reuse-rounding", "--keep-job", budget=BUDGET)) == 0
    return out


def test_gguf_with_reused_rounding_writes_a_verified_file_from_the_kept_roundings(src, reused, tmp_path):
    job = default_job_dir(reused)
    kept = sorted(p.name for p in (job / checkpoints.ROUNDED_STAGE).glob("block*.safetensors"))
    assert kept and kept[-1] == f"block{len(kept) - 1:04d}.safetensors"
    assert not (job / checkpoints.QUANT_STAGE).exists()  # nothing was rounded block by block
    plain = tmp_path / "plain.gguf"
    assert main(gguf_argv(src, plain, budget=BUDGET)) == 0
    assert reused.stat().st_size == plain.stat().st_size  # the same plan, the same bytes...
    assert reused.read_bytes() != plain.read_bytes()  # ...other roundings (the fp model's inputs throughout)


def test_interrupted_reuse_job_resumes_to_identical_files(src, reused, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out.gguf"
    real = checkpoints._save_hidden

    def crashing(job, b, hidden, st=checkpoints.QUANT_STAGE):
        real(job, b, hidden, st)
        if b == 1 and st == checkpoints.MEASURE_STAGE:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoints, "_save_hidden", crashing)
        assert main(gguf_argv(src, out, "--reuse-rounding", budget=BUDGET)) == 130
    assert (default_job_dir(out) / checkpoints.ROUNDED_STAGE / "block0000.safetensors").exists()
    caplog.set_level("INFO", logger="bitalloc.resume")
    assert main(gguf_argv(src, out, "--reuse-rounding", budget=BUDGET)) == 0
    assert "resuming measurement at block 1" in caplog.text
    assert out.read_bytes() == reused.read_bytes()
    assert not default_job_dir(out).exists()


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(src, reused, tmp_path):
    out = tmp_path / "out.gguf"
    job = default_job_dir(out)
    marks = [job / "job.json", job / checkpoints.ROUNDED_STAGE / "block0000.safetensors",
             job / checkpoints.MEASURE_STAGE / "rows0001.json", job / "plan.json"]
    argv = gguf_argv(src, out, "--reuse-rounding", budget=BUDGET)
    assert kill_at_marks(argv, marks, out, seed=2929, pause=0.2) >= 2
    if not out.exists():  # the last run, resumed, may have finished before its kill
        run_to_end(argv)
    assert out.read_bytes() == reused.read_bytes()
    assert not job.exists()


def test_quantize_with_reused_rounding(tmp_path):
    model = make_hf_dir(tmp_path / "m")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(quantize_argv(model, a, "--reuse-rounding")) == 0
    assert main(quantize_argv(model, b, "--reuse-rounding")) == 0
    assert read_tree(a) == read_tree(b)  # deterministic


def test_sweep_with_reused_rounding_quantizes_nothing_after_the_measurement(tmp_path, monkeypatch):
    """Every point of a sweep (allocated and uniform) is assembled from the kept roundings: quantize_model never
    runs, and an interrupted sweep resumes to the same results."""
    import json

    import bitalloc.sweep as sweep_mod
    from tests.test_sweep_resume import fixed_clock, interrupt_at_point, sweep_argv

    (tmp_path / "m").mkdir()
    hf = make_hf_dir(tmp_path / "m" / "hf")
    (hf.parent / "eval.txt").write_text((hf.parent / "calib.txt").read_text()[::-1])
    fixed_clock(monkeypatch)
    monkeypatch.setattr(sweep_mod, "quantize_model", lambda *a, **k: pytest.fail("quantize_model ran"))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(sweep_argv(hf, a, "--reuse-rounding")) == 0
    points = json.loads((a / "sweep.json").read_text())["points"]
    assert {p["kind"] for p in points} == {"allocated", "uniform"} and all(p["kld"] >= 0 for p in points)
    with monkeypatch.context() as m:
        interrupt_at_point(m, 1)
        assert main(sweep_argv(hf, b, "--reuse-rounding")) == 130
    assert main(sweep_argv(hf, b, "--reuse-rounding")) == 0
    assert (a / "sweep.json").read_bytes() == (b / "sweep.json").read_bytes()


@pytest.mark.parametrize("extra", [("--screen",), ("--measure-method", "rtn")])
def test_what_reuse_cannot_serve_is_refused_in_one_line(src, tmp_path, capsys, extra):
    out = tmp_path / "x.gguf"
    assert main(gguf_argv(src, out, "--reuse-rounding", *extra, budget=BUDGET)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--reuse-rounding" in err
    assert not out.exists() and not default_job_dir(out).exists()


def test_quantize_refuses_reuse_without_its_own_measurement(tmp_path, capsys):
    model = make_hf_dir(tmp_path / "m")
    argv = quantize_argv(model, tmp_path / "o", "--reuse-rounding")
    argv[argv.index("--budget"):argv.index("--budget") + 2] = ["--format", "int4-g32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--reuse-rounding" in err and "\n" not in err
