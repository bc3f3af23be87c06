"""Recovery (``--recover``): training lowers the calibration loss, the file decodes exactly to the trained values,
formats and bytes never change, a resumed run is byte-identical, bad options are refused in one line."""
from __future__ import annotations

import copy
import json
import pytest
import torch

from bitalloc.cli import main
from bitalloc.errors import InputError
from bitalloc.formats import get_format
from bitalloc.jobs import checkpoints
from bitalloc.jobs.config import default_job_dir
from bitalloc.quantize import quantize_model, uniform_assignments
from bitalloc.recover import RecoverConfig, recover_model
from bitalloc.recover.params import QWeight
from bitalloc.recover.train import _kl, _logits
from bitalloc.layout import layout_of
from bitalloc.rounding import dequantize, quantize_weight
from tests.conftest import tiny_llama, token_ids
from tests.test_resume import assert_same_tree, make_hf_dir, quantize_argv

torch.set_num_threads(1)


def _calib_kl(student, teacher, windows) -> float:
    """Mean KL(teacher ‖ student) over the calibration windows, through the same path recovery trains."""
    from bitalloc.calibrate import BlockRunner

    with torch.no_grad(), BlockRunner(student, windows) as rs, BlockRunner(teacher, windows) as rt:
        return float(_kl(_logits(layout_of(teacher), rt.kwargs, rt.hidden, False),
                         _logits(layout_of(student), rs.kwargs, rs.hidden, False)))


@pytest.fixture(scope="module")
def quantized():
    teacher = tiny_llama()
    windows = token_ids(8)
    student = copy.deepcopy(teacher)
    q = quantize_model(student, None, uniform_assignments(student, "int2-g32"), windows, progress=False)
    return teacher, student, windows, q


def test_qweight_untrained_is_the_stored_tensor():
    w = torch.randn(16, 64)
    for fid in ("int3-g32", "int4-row-sym", "int2-g64"):
        q = quantize_weight(w, get_format(fid), method="rtn")
        qw = QWeight(q)
        assert torch.equal(qw(), dequantize(q))
        back = qw.stored()
        assert all(torch.equal(back.parts[k], q.parts[k]) for k in q.parts)


@pytest.mark.parametrize("fid", ["int4-g32", "int3-row-sym", "q4_0", "q4_1", "q8_0", "iq4_nl", "q2_k", "q3_k", "q4_k",
                                 "q6_k", "int3-g32-dq", "nf4", "mxfp4", "nvfp4", "mix4-g32", "int3-g32+o2",
                                 "int4-g32-zp", "int3-row-zp"])
def test_every_unpacking_format_trains_and_stores_in_its_own_bytes(fid):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 256, generator=g)
    fmt = get_format(fid)
    q = quantize_weight(w, fmt, method="rtn")
    qw = QWeight(q)
    assert torch.equal(qw(), dequantize(q))
    with torch.no_grad():  # a trained state: codes moved, scales and offsets changed
        qw.u.add_(torch.randn(qw.u.shape, generator=g) * 0.7)
        qw.clamp_()
        qw.a.add_(torch.randn(qw.a.shape, generator=g) * 0.05)
        qw.b.add_(torch.randn(qw.b.shape, generator=g) * 0.05)
    back = qw.stored()
    assert back.format == q.format and back.nbytes() == q.nbytes() == fmt.nbytes(tuple(w.shape))
    assert {k: (t.dtype, tuple(t.shape)) for k, t in back.parts.items()} == \
        {k: (t.dtype, tuple(t.shape)) for k, t in q.parts.items()}
    decoded = dequantize(back)
    assert bool(torch.isfinite(decoded).all())
    assert not torch.equal(decoded, dequantize(q))
    if fmt.learns_scales:  # what the forward computes, up to the rounding of the scales to storage
        assert float((decoded - qw().detach()).abs().mean()) < 0.25 * float(dequantize(q).abs().mean())


@pytest.mark.parametrize("mode", ["block", "e2e", "block+e2e"])
def test_recovery_lowers_calibration_loss_keeps_bytes_and_decodes_exactly(quantized, mode):
    teacher, base, windows, q = quantized
    student = copy.deepcopy(base)
    before = _calib_kl(student, teacher, windows)
    q2, values = recover_model(student, teacher, windows, q, RecoverConfig(mode=mode, steps=30, lr=2e-2),
                               progress=False)
    after = _calib_kl(student, teacher, windows)
    assert after < before
    assert set(q2) == set(q)
    changed = 0
    for name, t in q2.items():
        assert t.format == q[name].format and t.nbytes() == q[name].nbytes()
        p = student.get_parameter(name)
        assert torch.equal(dequantize(t).reshape(p.shape), p.detach().float()), name  # the file is the model
        changed += any(not torch.equal(t.parts[k], q[name].parts[k]) for k in t.parts)
    assert changed > 0
    for name, v in values.items():  # trained fixed tensors: stored at their format's precision
        assert torch.equal(student.get_parameter(name).detach().float(), dequantize(q2[name]))
        assert torch.allclose(v, dequantize(q2[name]), rtol=1e-3, atol=1e-6)


def test_e2e_returns_to_its_best_and_halves_the_rate_when_a_check_finds_the_loss_higher(quantized, monkeypatch,
                                                                                       caplog):
    """A rate far too large for the end-to-end stage: its checks see the calibration KL rise, go back to the best
    state and halve the rate, so the stage never ends worse than it started."""
    import logging

    from bitalloc.recover import train

    teacher, base, windows, q = quantized
    student = copy.deepcopy(base)
    before = _calib_kl(student, teacher, windows)
    monkeypatch.setattr(train, "E2E_FLOAT_SHARE", 200.0)  # every scale and norm moves by its whole size a step
    with caplog.at_level(logging.INFO, logger="bitalloc.recover.train"):
        recover_model(student, teacher, windows, q, RecoverConfig(mode="e2e", steps=8, lr=0.5), progress=False)
    assert "rates halved" in caplog.text
    assert _calib_kl(student, teacher, windows) <= before * (1 + 1e-3)  # the stored scales round to fp16


def test_recovery_is_deterministic(quantized):
    teacher, base, windows, q = quantized
    outs = []
    for _ in range(2):
        student = copy.deepcopy(base)
        q2, _ = recover_model(student, teacher, windows, q, RecoverConfig(mode="block+e2e", steps=5),
                              progress=False)
        outs.append(q2)
    for name in outs[0]:
        assert all(torch.equal(outs[0][name].parts[k], outs[1][name].parts[k]) for k in outs[0][name].parts)


def test_mode_none_is_the_identity(quantized):
    teacher, base, windows, q = quantized
    q2, values = recover_model(copy.deepcopy(base), teacher, windows, q, RecoverConfig(), progress=False)
    assert values == {} and all(q2[n] is q[n] for n in q)


@pytest.mark.parametrize("kwargs, msg", [
    ({"mode": "all"}, "unknown recovery"),
    ({"mode": "block", "steps": 2, "tokens": 10}, "not both"),
    ({"mode": "block", "steps": 0}, "positive integer"),
    ({"mode": "block", "lr": 0.0}, "learning rate"),
    ({"mode": "block", "lr": float("nan")}, "learning rate"),
    ({"mode": "block", "windows": 0}, "recovery windows"),
])
def test_bad_config_is_refused(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        RecoverConfig(**kwargs)


def test_steps_from_tokens():
    assert RecoverConfig(mode="block", tokens=1000).steps_for("block", 100) == 5  # 2 windows of 100 a step
    assert RecoverConfig(mode="e2e", tokens=1000).steps_for("e2e", 100) == 10
    assert RecoverConfig(mode="e2e", steps=7).steps_for("block", 100) == 7


# --------------------------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("m") / "model", layers=3)


RECOVER = ("--recover", "block+e2e", "--recover-steps", "4")


@pytest.fixture(scope="module")
def plain_and_recovered(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(quantize_argv(hf, root / "plain")) == 0
    assert main(quantize_argv(hf, root / "rec", *RECOVER)) == 0
    return root / "plain", root / "rec"


def test_quantize_with_recovery_keeps_every_format_and_byte(plain_and_recovered):
    from bitalloc.export.packed import read_packed

    plain, rec = plain_and_recovered
    (_, a), (_, b) = read_packed(plain), read_packed(rec)
    assert set(a) == set(b)
    assert all(a[n].format == b[n].format and a[n].nbytes() == b[n].nbytes() for n in a)
    assert any(any(not torch.equal(a[n].parts[k], b[n].parts[k]) for k in a[n].parts) for n in a)
    assert sum(q.nbytes() for q in a.values()) == sum(q.nbytes() for q in b.values())


BLOCK_ONLY = ("--recover", "block", "--recover-steps", "4")


def test_recovery_resumes_byte_identical(hf, tmp_path, monkeypatch, caplog):
    rec = tmp_path / "rec"  # block only: no e2e stage rewrites every tensor after a resume
    assert main(quantize_argv(hf, rec, *BLOCK_ONLY)) == 0
    out = tmp_path / "out"
    real = checkpoints.RecoverCheckpoints.on_block

    def crashing(self, b, *args):
        real(self, b, *args)
        if b == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoints.RecoverCheckpoints, "on_block", crashing)
        assert main(quantize_argv(hf, out, *BLOCK_ONLY)) == 130
    job = default_job_dir(out)
    assert (job / checkpoints.RECOVER_STAGE / "block0001.safetensors").exists()
    caplog.set_level("INFO", logger="bitalloc.resume")
    from bitalloc.jobs.stages import Stages

    def stop(*args, **kwargs):  # the recovery finishes, then a kill before the export
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Stages, "export", stop)
        assert main(quantize_argv(hf, out, *BLOCK_ONLY)) == 130
    assert "resuming recovery at block 2" in caplog.text
    assert "recover" in json.loads((job / "job.json").read_text())["stages_done"]
    assert main(quantize_argv(hf, out, *BLOCK_ONLY)) == 0  # from the saved recovery: every block, not the last one
    assert_same_tree(rec, out)


def test_changed_recovery_is_refused_by_the_job(hf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def stop(self, b, *args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoints.RecoverCheckpoints, "on_block", stop)
        assert main(quantize_argv(hf, out, *RECOVER)) == 130
    capsys.readouterr()
    assert main(quantize_argv(hf, out, "--recover", "block", "--recover-steps", "4")) == 2
    err = capsys.readouterr().err
    assert "recover" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, msg", [
    (("--recover", "bogus"), "invalid choice"),
    (("--recover", "block", "--recover-steps", "0"), "at least 1"),
    (("--recover", "block", "--recover-steps", "3", "--recover-tokens", "9"), "not allowed with"),
    (("--recover", "block", "--recover-lr", "2"), "(0, 1]"),
    (("--recover", "block", "--recover-windows", "0"), "at least 1"),
])
def test_cli_refuses_bad_recovery_options(hf, tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as exc:
        main(quantize_argv(hf, tmp_path / "o", *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", [("--recover-steps", "8"), ("--recover-tokens", "900"), ("--recover-lr", "0.05"),
                                    ("--recover-windows", "12")])
def test_a_recovery_option_without_recover_is_refused(hf, tmp_path, capsys, option):
    """Without ``--recover`` nothing trains: a length, rate or text for it is a mistake, not something to ignore."""
    assert main(quantize_argv(hf, tmp_path / "o", *option)) == 2
    err = capsys.readouterr().err
    assert option[0] in err and "--recover block" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ recovery-aware allocation
def test_format_gains_and_scaled_table():
    from bitalloc.models.view import ModelView
    from bitalloc.recover.aware import block_tensors, format_gains, sample_blocks, scaled_table
    from bitalloc.table import MeasureRow, TensorInfo
    from bitalloc.measure import Measurement

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gains = format_gains(model, token_ids(6), ["int2-g32", "int4-g32", "fp16"],
                         RecoverConfig(mode="block", steps=20, lr=2e-2), progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the fp model is put back
    assert gains["fp16"] == 1.0
    assert 0 < gains["int2-g32"] < 1 and 0 < gains["int4-g32"] <= 1
    assert sample_blocks(30) == [9, 19] and sample_blocks(2) == [0, 1]
    m = Measurement((TensorInfo("w", (2, 32), 64, ("linear",)), TensorInfo("head", (2, 32), 64, ("linear",))),
                    (MeasureRow("w", "int2-g32", 10, 4.0, 2.0), MeasureRow("w", "fp16", 128, 0.0, 0.0),
                     MeasureRow("head", "int2-g32", 10, 4.0, 2.0)), 0, 128)
    s = scaled_table(m, {"int2-g32": 0.5}, {"w"})  # "head" is not trained by block recovery: its errors stay
    assert [(r.tensor, r.format, r.output_error, r.fisher_error) for r in s.rows] == [
        ("w", "int2-g32", 2.0, 1.0), ("w", "fp16", 0.0, 0.0), ("head", "int2-g32", 4.0, 2.0)]
    view = ModelView(model)
    names = block_tensors(view)
    assert names == {n for b in view.blocks() for g in b.groups for n in g}  # every block linear, nothing else
    assert not names & {r.name for r in view.quantizable() if r.block is None} and len(names) > 0


def test_recovery_aware_job_runs_and_saves_its_gains(hf, tmp_path, monkeypatch):
    import bitalloc.recover as rec

    reads, real = [], rec.training_windows

    def training_windows(*a, **k):
        reads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(rec, "training_windows", training_windows)
    out = tmp_path / "aware"
    assert main(quantize_argv(hf, out, "--recover", "block", "--recover-steps", "3", "--recover-aware",
                              "--keep-job")) == 0
    job = default_job_dir(out)
    assert (out / "manifest.json").exists()
    assert any("recovery_gains" in p.name for p in (job / "plan").iterdir())
    assert len(reads) == 1  # the gains and the recovery stage train on the same windows, read once


def test_recovery_aware_needs_block_recovery(hf, tmp_path, capsys):
    assert main(quantize_argv(hf, tmp_path / "o", "--recover", "e2e", "--recover-aware")) == 2
    err = capsys.readouterr().err
    assert "block" in err and len(err.strip().splitlines()) == 1


def test_recovery_aware_without_an_allocation_is_refused_before_loading(hf, tmp_path, capsys, monkeypatch):
    """``--format`` allocates nothing, so ``--recover-aware`` would be silently ignored: refused in one line."""
    import bitalloc.jobs.stages as stages

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stages.Stages, "load_source", no_load)
    argv = [a for a in quantize_argv(hf, tmp_path / "o", "--recover", "block", "--recover-aware", "--format",
                                     "int4-g32") if a != "--budget" and a != "3.5bpw"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--recover-aware" in err and "--format" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("reuse", [(), ("--reuse-rounding",)])
def test_sweep_recovers_every_point(hf, tmp_path, monkeypatch, reuse):
    """``sweep --recover``: every point's model is recovered after its quantization (on DEFAULT_WINDOW_FACTOR times
    the calibration windows, then the held-out guard windows, as quantize does), also when the points are assembled
    from the measurement's roundings (the demo's default)."""
    from bitalloc.recover.config import DEFAULT_GUARD_WINDOWS, DEFAULT_WINDOW_FACTOR
    import bitalloc.recover as rec_pkg
    from tests.test_sweep_resume import sweep_argv

    (hf.parent / "eval.txt").write_text((hf.parent / "calib.txt").read_text()[::-1])
    calls = []
    real = rec_pkg.recover_model

    def spy(student, teacher, windows, q, cfg, **kw):
        calls.append((cfg.mode, tuple(windows.shape), kw["guard"]))
        return real(student, teacher, windows, q, cfg, **kw)

    monkeypatch.setattr(rec_pkg, "recover_model", spy)
    assert main(sweep_argv(hf, tmp_path / "s", "--recover", "block", "--recover-steps", "2", *reuse,
                           budgets="3.5bpw")) == 0
    g = DEFAULT_GUARD_WINDOWS
    assert calls and all(c == ("block", (4 * DEFAULT_WINDOW_FACTOR + g, 32), g) for c in calls)
    assert (tmp_path / "s" / "sweep.json").exists()


def test_recover_windows_train_on_more_of_the_calibration_text(hf, tmp_path, monkeypatch):
    """``--recover-windows N``: recovery trains on N windows of the same text, the quantization's first, and checks
    on the DEFAULT_GUARD_WINDOWS after them; the windows are in the job's fingerprint (another N is refused), and
    without it recovery trains on DEFAULT_WINDOW_FACTOR times the quantization's windows."""
    from bitalloc.recover.config import DEFAULT_GUARD_WINDOWS as G, DEFAULT_WINDOW_FACTOR
    import bitalloc.recover as rec_pkg
    from bitalloc.data import text_windows
    from bitalloc.models.sources import load_model

    seen = []
    real = rec_pkg.recover_model

    def spy(student, teacher, windows, q, cfg, **kw):
        seen.append((windows.clone(), kw["guard"]))
        return real(student, teacher, windows, q, cfg, **kw)

    monkeypatch.setattr(rec_pkg, "recover_model", spy)
    out = tmp_path / "w"
    assert main(quantize_argv(hf, out, *BLOCK_ONLY, "--recover-windows", "7", "--keep-job")) == 0
    tok = load_model(str(hf))[1]
    want = text_windows(tok, [hf.parent / "calib.txt"], 32, 7 + G)
    assert want.shape == (7 + G, 32) and torch.equal(seen[-1][0], want) and seen[-1][1] == G
    assert main(quantize_argv(hf, tmp_path / "d", *BLOCK_ONLY)) == 0
    n = DEFAULT_WINDOW_FACTOR * 4  # the quantization's 4, x4
    default = text_windows(tok, [hf.parent / "calib.txt"], 32, n + G)
    assert default.shape[0] == n + G and torch.equal(seen[-1][0], default) and seen[-1][1] == G
    assert torch.equal(seen[-1][0][:7], want[:7])
    assert RecoverConfig().train_windows(24) == DEFAULT_WINDOW_FACTOR * 24 and RecoverConfig(windows=7).train_windows(24) == 7
    fps = {str(RecoverConfig(mode="block", windows=w).fingerprint()) for w in (None, 7, 4 * DEFAULT_WINDOW_FACTOR)}
    assert len(fps) == 3  # a job made with other windows (or before the default changed) is not resumed
    assert RecoverConfig(guard_windows=0).fingerprint() != RecoverConfig().fingerprint()


@pytest.mark.parametrize("available, expect", [
    (200, (96, 16)),  # the text holds both: 4 x 24 training windows and the 16 held out
    (100, (84, 16)),  # short: training shrinks, the held-out windows stay
    (40, (24, 16)),   # just the quantization's windows left to train on
    (39, (39, 0)),    # shorter: nothing held out, the checks use training windows
])
def test_split_holds_the_guard_windows_out(available, expect):
    assert RecoverConfig(mode="block").split(available, 24) == expect
    assert RecoverConfig(mode="block", guard_windows=0).split(available, 24) == (min(available, 96), 0)
    assert RecoverConfig(mode="block", windows=7).split(available, 24) == (7, 16)
    with pytest.raises(InputError, match="guard_windows"):
        RecoverConfig(guard_windows=-1)


def test_training_windows_reads_the_guard_after_the_training_text(caplog):
    """The training windows start with the quantization's, then more of the text; the held-out windows follow
    them; a text too short is logged in one line (a warning when the windows were asked for)."""
    from bitalloc.recover import training_windows

    text = torch.arange(50 * 4).reshape(50, 4)  # a "text" of 50 windows
    calib = text[:6]
    asked = []

    def read(n):
        asked.append(n)
        return text[:n]

    w, guard = training_windows(RecoverConfig(mode="block", guard_windows=5), calib, read)
    assert asked == [29] and guard == 5 and torch.equal(w, text[:29])
    w, guard = training_windows(RecoverConfig(mode="block", windows=3, guard_windows=2), calib, read)
    assert asked == [29] and guard == 2 and torch.equal(w, calib[:5])  # inside the quantization's windows
    with caplog.at_level("INFO", logger="bitalloc.recover.run"):
        w, guard = training_windows(RecoverConfig(mode="block", windows=60, guard_windows=5), calib, read)
    assert (w.shape[0], guard) == (50, 5) and "trains on 45 (not 60)" in caplog.text
    assert caplog.records[-1].levelname == "WARNING"


def _spy_on_windows(monkeypatch) -> tuple[list, list]:
    """``(drawn, checked)``: filled with ``(windows drawn from, highest window drawn)`` of every training schedule
    and the window range of every check."""
    import bitalloc.recover.train as tr

    drawn, checked = [], []
    real_picks, real_range = tr._picks, tr.guard_range

    def picks(n, per_step, steps, seed):
        out = real_picks(n, per_step, steps, seed)
        drawn.append((n, max(int(i.max()) for i in out)))
        return out

    def guard_range(n, guard):
        checked.append(real_range(n, guard))
        return checked[-1]

    monkeypatch.setattr(tr, "_picks", picks)
    monkeypatch.setattr(tr, "guard_range", guard_range)
    return drawn, checked


def test_a_format_that_stores_some_of_a_blocks_linears_gets_its_gain_measured_on_them():
    """q4_k takes only the 256-wide down_proj of a 64-wide model: its gain is measured there (the other linears at
    full precision), not left at 1, which made the allocator count no recovery for the K-quants."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.recover.aware import format_gains

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=128, initializer_range=0.05)).float().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gains = format_gains(model, token_ids(6), ["q4_k", "q2_k", "fp16"], RecoverConfig(mode="block", steps=20, lr=2e-2),
                         progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert 0 < gains["q2_k"] < 1 and 0 < gains["q4_k"] <= 1 and gains["fp16"] == 1.0


def test_format_gains_train_on_the_training_windows_and_check_on_the_held_out_ones(monkeypatch):
    """The recovery-aware gains are measured as recovery runs: the samples' GPTQ Hessians from the quantization's
    windows, training steps from the training windows only, before/after on the held-out windows."""
    import bitalloc.calibrate.runner as runner
    from bitalloc.recover.aware import format_gains

    firsts = []
    real_collect = runner.BlockRunner.collect

    def collect(self, groups=None, advance=False, first=None):
        firsts.append(first)
        return real_collect(self, groups, advance, first)

    drawn, checked = _spy_on_windows(monkeypatch)
    monkeypatch.setattr(runner.BlockRunner, "collect", collect)
    gains = format_gains(tiny_llama(), token_ids(9), ["int2-g32"], RecoverConfig(mode="block", steps=3),
                         guard=3, quant=4, progress=False)
    assert 0 < gains["int2-g32"] <= 1
    assert drawn and all(n == 6 and top < 6 for n, top in drawn)
    assert checked and all(r == range(6, 9) for r in checked)
    assert firsts and all(f == 4 for f in firsts)
    with pytest.raises(ValueError):
        format_gains(tiny_llama(), token_ids(3), ["int2-g32"], RecoverConfig(mode="block", steps=1), guard=3)


def test_collect_on_the_first_windows_equals_a_runner_of_those_windows():
    from bitalloc.calibrate import BlockRunner

    model, ids = tiny_llama(), token_ids(7)
    with torch.no_grad(), BlockRunner(model, ids, batch_size=2) as full, \
            BlockRunner(model, ids[:5], batch_size=2) as part:
        full.advance(), part.advance()
        got, want = full.collect(first=5), part.collect()
        assert got.keys() == want.keys()
        for n in got:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(full.collect()[n], want[n], rtol=1e-3, atol=0)  # the 2 other windows count there
        for bad in (dict(first=0), dict(first=8), dict(first=3, advance=True)):
            with pytest.raises(ValueError):
                full.collect(**bad)


def test_the_guard_windows_are_never_trained_on(quantized, monkeypatch):
    """With ``guard`` held-out windows, both stages draw their steps from the others only, and their checks
    measure on the held-out ones."""
    import bitalloc.recover.train as tr

    teacher, _, windows, q = quantized
    student = copy.deepcopy(teacher)
    for n, t in q.items():
        with torch.no_grad():
            student.get_parameter(n).copy_(dequantize(t).reshape(student.get_parameter(n).shape))
    drawn, checked = _spy_on_windows(monkeypatch)
    recover_model(student, teacher, windows, q, RecoverConfig(mode="block+e2e", steps=3), progress=False, guard=3)
    assert drawn and all(n == 5 and top < 5 for n, top in drawn)
    assert checked and all(r == range(5, 8) for r in checked)
    assert tr.guard_range(8, 0) == range(8) and tr.guard_range(40, 0) == range(16)
    with pytest.raises(ValueError):
        tr.guard_range(8, 8)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_e2e_path_gives_the_models_own_logits(arch):
    """The distillation forward (blocks, final norm, lm_head, then the model's final logit soft cap) is the
    model's own next-token distribution, so e2e recovery trains toward what the model really outputs."""
    from bitalloc.calibrate import BlockRunner
    from bitalloc.fisher import final_logit_cap
    from tests.conftest import tiny_arch

    model = tiny_arch(arch)
    if arch == "gemma2":
        model.config.final_logit_softcapping = 2.0  # small: the cap changes the logits a lot
        assert final_logit_cap(model) == 2.0
    ids = token_ids(2)
    with torch.no_grad(), BlockRunner(model, ids) as r:
        got = _logits(layout_of(model), r.kwargs, r.hidden, False, final_logit_cap(model))
        want = model(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_integer_zero_points_are_kept_and_the_offset_follows_the_scale():
    """An ``-zp`` tensor trains its codes and scales; its zero points stay, so what the forward computes is what the
    file stores up to the fp16 rounding of the scales alone (no offset is snapped to an integer zero afterwards)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 128, generator=g) * 0.03 + 0.01
    fmt = get_format("int4-g32-zp")
    q = quantize_weight(w, fmt, method="rtn")
    qw = QWeight(q)
    assert qw.a.requires_grad and not qw.b.requires_grad
    with torch.no_grad():
        qw.a.add_(torch.randn(qw.a.shape, generator=g) * 0.05)
    back = qw.stored()
    assert torch.equal(fmt.zeros_of(fmt.unpack(back)[1]), fmt.zeros_of(fmt.unpack(q)[1]))
    s = fmt.unpack(back)[1].scale
    assert torch.equal(s, qw.scale_offset()[0].half().float())
    err = (dequantize(back) - qw().detach()).abs().max()
    assert float(err) <= float(s.abs().max()) * 2 ** -10 * 2 ** fmt.bits  # one fp16 rounding of the scale



def test_recovery_of_zero_point_formats_lowers_the_loss_and_is_the_file():
    teacher = tiny_llama()
    windows = token_ids(8)
    student = copy.deepcopy(teacher)
    q = quantize_model(student, None, uniform_assignments(student, "int2-g32-zp"), windows, progress=False)
    before = _calib_kl(student, teacher, windows)
    q2, _ = recover_model(student, teacher, windows, q, RecoverConfig(mode="block+e2e", steps=30, lr=2e-2),
                          progress=False)
    assert _calib_kl(student, teacher, windows) < before
    for name, t in q2.items():
        assert t.format == q[name].format and t.nbytes() == q[name].nbytes()
        p = student.get_parameter(name)
        assert torch.equal(dequantize(t).reshape(p.shape), p.detach().float()), name


@pytest.mark.parametrize("tie", [True, False])
def test_e2e_trains_the_output_projection_and_the_embedding(tie):
    """End to end, the stored floats of the output projection and of the embedding are recovered too (no block
    holds them, so the block stage never sees them; the embedding's through block 0's inputs), their codes kept;
    a tied head stays the stored embedding."""
    teacher = tiny_llama(tie=tie)
    windows = token_ids(8)
    student = copy.deepcopy(teacher)
    q = quantize_model(student, None, uniform_assignments(student, "int2-g32"), windows, progress=False)
    lay = layout_of(student)
    assert lay.tied == tie and {lay.lm_head_name, lay.embedding_name} <= set(q)
    before = _calib_kl(student, teacher, windows)
    q2, _ = recover_model(student, teacher, windows, q, RecoverConfig(mode="e2e", steps=30, lr=5e-2),
                          progress=False)
    assert _calib_kl(student, teacher, windows) < before
    for name in {lay.lm_head_name, lay.embedding_name}:
        assert any(not torch.equal(q2[name].parts[k], q[name].parts[k]) for k in q[name].parts), name
        p = student.get_parameter(name)
        assert torch.equal(dequantize(q2[name]).reshape(p.shape), p.detach().float()), name
        fmt = get_format(q[name].format)
        assert torch.equal(fmt.unpack(q2[name])[0], fmt.unpack(q[name])[0]), name  # e2e keeps every code
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in student.modules())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_block0_inputs_are_the_models_own(arch):
    """e2e recovery computes block 0's inputs from the (trained) embedding with the model's own forward: equal to
    the calibration runner's states, embedding scale included (Gemma multiplies by sqrt(hidden))."""
    from bitalloc.calibrate import BlockRunner
    from bitalloc.layout import block0_inputs
    from tests.conftest import tiny_arch

    model = tiny_arch(arch)
    ids = token_ids(2)
    with torch.no_grad(), BlockRunner(model, ids) as r:
        torch.testing.assert_close(block0_inputs(model, layout_of(model), input_ids=ids), r.hidden, rtol=0,
                                   atol=0)


def test_e2e_scale_rates_follow_how_far_each_grid_reaches():
    """A relative change of a scale moves a grid's outermost level by its reach in steps: 3 for int2 (levels 0..3),
    16 for q5_0 (-16..15); e2e moves each tensor's scales at the int2 rate times 3 / reach, its offsets and the
    norms at the full rate."""
    from bitalloc.recover.attach import Attached

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    reach = {f: QWeight(quantize_weight(w, get_format(f), method="rtn")).reach
             for f in ("int2-g32", "int4-g32", "q5_0", "q8_0", "iq4_nl")}
    assert reach["int2-g32"] == pytest.approx(3) and reach["int4-g32"] == pytest.approx(15)
    assert reach["q5_0"] == pytest.approx(16) and reach["q8_0"] == pytest.approx(128)
    assert 7 < reach["iq4_nl"] < 9  # a codebook: its mean spacing is the step
    model = tiny_llama()
    qs = {n: quantize_weight(model.get_parameter(n).detach(), get_format(f), method="rtn") for n, f in
          (("model.layers.0.mlp.up_proj.weight", "int2-g32"), ("model.layers.0.mlp.down_proj.weight", "q5_0"))}
    att = Attached(model, qs, {"model.norm.weight": "fp32"}, codes=False, scales=True)
    try:
        groups = att.float_groups(3.0)
        assert sorted(r for _, r in groups) == pytest.approx([3 / 16, 1.0, 1.0])
        assert sum(len(ps) for ps, _ in groups) == len(att.parameters()[1])  # every float once
    finally:
        att.finish()


def test_a_tie_by_shared_storage_is_parametrized_on_both_modules():
    """A head tied by sharing the embedding's storage (another Parameter object: what layout_of calls tied) computes
    with the trained embedding during recovery, as an identical-object tie does."""
    from bitalloc.recover.attach import Attached

    model = tiny_llama()
    emb = model.model.embed_tokens.weight
    model.lm_head.weight = torch.nn.Parameter(emb.data, requires_grad=False)
    assert model.lm_head.weight is not emb and layout_of(model).tied
    name = "model.embed_tokens.weight"
    q = {name: quantize_weight(emb.detach(), get_format("int4-g32"), method="rtn")}
    att = Attached(model, q, {}, codes=False, scales=True)
    try:
        with torch.no_grad():
            att.q[name].a.add_(0.1)
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        assert torch.equal(model.lm_head.weight, att.q[name]())
    finally:
        att.finish()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_the_teacher_copy_does_not_parse_the_tokenizer_again(hf, tmp_path, monkeypatch):
    """Recovery's teacher is a second load of the model: the student's tokenizer serves, it is not parsed again."""
    from bitalloc.models import sources

    real, calls = sources._tokenizer, []
    monkeypatch.setattr(sources, "_tokenizer", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(quantize_argv(hf, tmp_path / "o", *BLOCK_ONLY)) == 0
    assert len(calls) == 1
