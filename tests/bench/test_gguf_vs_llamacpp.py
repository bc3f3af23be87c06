"""The GGUF benchmark's report (ratios, sizes run/missing, JSON + PNG) and its option checks (no llama.cpp)."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from bench import gguf_vs_llamacpp as bench

LLAMA = {t: {"bytes": 1000 * (i + 1), "ppl": 50.0, "kld": 0.1 * (i + 1), "top1": 0.7, "pure": False}
         for i, t in enumerate(bench.TABLE_ORDER)}


def test_report_ratios_and_missing_sizes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    ours = {"Q2_K": {"bytes": 990, "ppl": 45.0, "kld": 0.05, "top1": 0.8},
            "Q3_K_M": {"bytes": 1990, "ppl": 49.0, "kld": 0.16, "top1": 0.75}}
    rows = bench.report(Namespace(eval_chunks=8), 42.0, 5000, LLAMA, ours, 12.0)
    by = {r["type"]: r for r in rows}
    assert [r["type"] for r in rows] == list(bench.TABLE_ORDER)
    assert by["Q2_K"]["kld_ratio"] == pytest.approx(0.5) and by["Q2_K"]["goal_met"] is True
    assert by["Q3_K_M"]["kld_ratio"] == pytest.approx(0.8) and by["Q3_K_M"]["goal_met"] is False
    assert by["Q2_K"]["bytes_ratio"] == pytest.approx(0.99) and by["Q4_0"]["bitalloc"] is None
    saved = json.loads((tmp_path / "gguf_vs_llamacpp.json").read_text())
    assert saved["sizes_run"] == ["Q2_K", "Q3_K_M"]
    assert saved["sizes_missing"] == ["Q4_K_M", "Q5_K_M", "IQ4_NL", "Q4_0"]
    assert saved["reference"]["ppl"] == 42.0 and (tmp_path / "gguf_vs_llamacpp.png").stat().st_size > 0


def test_unknown_size_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--sizes", "Q4_0,Q9_X"])
    assert exc.value.code == 2 and "Q9_X" in capsys.readouterr().err


def test_code_lists_exist() -> None:
    assert all(p.is_file() for p in bench.output_code())
    assert set(bench.measure_code()) < set(bench.output_code())


def test_report_ratio_above_the_activation_rounding_floor(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    ours = {"Q2_K": {"bytes": 990, "ppl": 45.0, "kld": 0.06, "top1": 0.8}}  # llama.cpp's Q2_K: KLD 0.1
    floor = {"bytes": 9000, "ppl": 42.5, "kld": 0.02, "top1": 0.95, "pure": True}
    rows = bench.report(Namespace(eval_chunks=8), 42.0, 5000, LLAMA, ours, 1.0, floor)
    assert rows[0]["kld_ratio"] == pytest.approx(0.6)
    assert rows[0]["kld_above_floor_ratio"] == pytest.approx(0.5)  # (0.06 - 0.02) / (0.1 - 0.02)
    saved = json.loads((tmp_path / "gguf_vs_llamacpp.json").read_text())
    assert saved["floor"]["kld"] == 0.02 and saved["floor"]["type"] == "Q8_0 (pure)"
    bench.print_table(42.0, 8, rows, floor)
    out = capsys.readouterr().out
    assert "floor: llama.cpp pure Q8_0" in out and "0.500" in out and "(not run)" in out
    plain = bench.report(Namespace(eval_chunks=8), 42.0, 5000, LLAMA, ours, 1.0)
    assert "kld_above_floor_ratio" not in plain[0]
    bench.print_table(42.0, 8, plain)
    out = capsys.readouterr().out
    assert "floor:" not in out and "0.0600" in out and "0.600" in out  # a row without a floor still prints


def test_a_recovered_size_is_compared_with_the_same_size_without_recovery(capsys) -> None:
    plain = {"bytes": 990, "ppl": 45.0, "kld": 0.05, "top1": 0.8, "gguf_seconds": 3.0}
    better = {"bytes": 990, "ppl": 44.0, "kld": 0.035, "top1": 0.82}
    got = bench.versus_unrecovered(better, plain)
    assert got["kld_vs_unrecovered"] == pytest.approx(0.7) and got["recovery_goal_met"] is True
    assert got["unrecovered"] == {"bytes": 990, "kld": 0.05, "ppl": 45.0, "top1": 0.8}
    worse = bench.versus_unrecovered({**better, "kld": 0.045}, plain)
    assert worse["kld_vs_unrecovered"] == pytest.approx(0.9) and worse["recovery_goal_met"] is False
    assert bench.versus_unrecovered(better, None) == {}
    bench.print_recovery([{"type": "Q2_K", "bitalloc": {**better, **got}}, {"type": "Q4_0", "bitalloc": plain}])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "Q2_K: bitalloc with recovery KLD 0.0350 vs without 0.0500: 0.700x" in out


def test_an_aware_size_is_compared_with_the_same_size_recovered_from_the_plain_allocation(capsys) -> None:
    """--recover-aware against allocate-then-recover at equal bytes (issue #14): the ratio and its printed line."""
    plain = {"bytes": 990, "ppl": 44.0, "kld": 0.04, "top1": 0.82, "mix": {"q5_0": 3}, "gguf_seconds": 9.0}
    aware = {"bytes": 990, "ppl": 43.0, "kld": 0.03, "top1": 0.83}
    got = bench.versus_plain_recovery(aware, plain)
    assert got["kld_vs_allocate_then_recover"] == pytest.approx(0.75)
    assert got["allocate_then_recover"] == {"bytes": 990, "kld": 0.04, "ppl": 44.0, "top1": 0.82, "mix": {"q5_0": 3}}
    assert bench.versus_plain_recovery(aware, None) == {}
    bench.print_recovery([{"type": "Q2_K", "bitalloc": {**aware, **got}}])
    out = capsys.readouterr().out
    assert "Q2_K: recovery-aware allocation KLD 0.0300 vs allocate-then-recover 0.0400: 0.750x" in out
    # the plain recovered result is looked up under the key a run without --recover-aware saves it under
    cfg = bench.RecoverConfig(mode="block+e2e", steps=None, windows=None, aware=True)
    assert bench.replace(cfg, aware=False).fingerprint() == \
        bench.RecoverConfig(mode="block+e2e", steps=None, windows=None).fingerprint()


def test_llama_cpp_side_is_saved_under_one_name_whatever_the_recovery() -> None:
    """Recovery changes bitalloc's side only: a --recover run reuses llama.cpp's saved side."""
    plain = bench.llama_side_path(Namespace(recover="none", quick=False))
    assert plain == bench.llama_side_path(Namespace(recover="block+e2e", quick=False))
    assert plain.name == "gguf_vs_llamacpp_llamaside.json"
    assert bench.llama_side_path(Namespace(recover="block", quick=False), "gguf_vs_llamacpp_floor").name == \
        "gguf_vs_llamacpp_floor.json"
    assert bench.result_path(Namespace(recover="block+e2e", quick=False), "gguf_vs_llamacpp").name == \
        "gguf_vs_llamacpp_recover-block-e2e.json"
    longer = Namespace(recover="block+e2e", quick=False, recover_steps=128, recover_windows=64)
    assert bench.result_path(longer, "gguf_vs_llamacpp").name == "gguf_vs_llamacpp_recover-block-e2e-s128-w64.json"
    assert bench.llama_side_path(longer) == plain  # llama.cpp's side is shared whatever bitalloc's recovery


def test_a_run_that_rounds_otherwise_than_gptq_writes_its_own_files() -> None:
    """An RTN run (both methods, or only the measurement) never replaces the GPTQ results; llama.cpp's side is
    still shared."""
    plain = bench.llama_side_path(Namespace(recover="none", quick=False))
    rtn = Namespace(recover="none", quick=False, method="rtn", measure_method="rtn")
    assert bench.result_path(rtn, "gguf_vs_llamacpp").name == "gguf_vs_llamacpp_rtn.json"
    mixed = Namespace(recover="block", quick=False, method="gptq", measure_method="rtn")
    assert bench.result_path(mixed, "gguf_vs_llamacpp", "png").name == "gguf_vs_llamacpp_gptq-mrtn_recover-block.png"
    gptq = Namespace(recover="none", quick=False, method="gptq", measure_method="gptq")
    assert bench.result_path(gptq, "gguf_vs_llamacpp").name == "gguf_vs_llamacpp.json"
    assert bench.llama_side_path(rtn) == bench.llama_side_path(mixed) == plain
    quick = Namespace(recover="none", quick=True, method="rtn", measure_method="rtn")
    assert bench.result_path(quick, "gguf_vs_llamacpp").name == "gguf_vs_llamacpp-quick.json"


def _timed_rows(reused_size: bool) -> list[dict]:
    """Every size run by both sides, bitalloc's Q2_K reused from an earlier run when ``reused_size``."""
    rows = []
    for t in bench.TABLE_ORDER:
        b = {"bytes": 1, "ppl": 1.0, "kld": 0.1, "top1": 0.9, "target_bytes": LLAMA[t]["bytes"], "gguf_seconds": 10.0,
             "reused": reused_size and t == "Q2_K"}
        rows.append({"type": t, "llamacpp": {**LLAMA[t], "quantize_seconds": 1.0}, "bitalloc": b, "kld_ratio": 0.5})
    return rows


@pytest.mark.parametrize("llama_now, measure_reused, reused_size", [
    (True, False, False), (False, False, False), (True, True, False), (True, False, True)])
def test_a_time_ratio_says_whether_both_sides_were_timed_in_this_run(llama_now, measure_reused, reused_size,
                                                                       capsys) -> None:
    rows = _timed_rows(reused_size)
    shared = {"seconds": 100.0, "measure": {"reused": measure_reused}}
    sweep = bench.add_times(rows, {"imatrix_seconds": 20.0, "timed_this_run": llama_now}, shared)
    per_row = [llama_now and not measure_reused and not (reused_size and r["type"] == "Q2_K") for r in rows]
    assert [r["time"]["same_run"] for r in rows] == per_row
    assert rows[0]["time"]["ratio"] == pytest.approx(110 / 21)
    assert sweep["complete"] and sweep["same_run"] is all(per_row)
    bench.print_table(42.0, 8, rows)
    bench.print_sweep(sweep)
    out = capsys.readouterr().out
    assert ("not both measured in this run" in out) is not all(per_row)
    assert ("were not both timed in this run" in out) is not all(per_row)
    assert out.count("*\n") == per_row.count(False)


def test_a_reused_llama_cpp_side_is_timed_again_and_a_changed_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "WORK", tmp_path)
    sizes = {t: LLAMA[t]["bytes"] for t in LLAMA}

    def tools(args, ref, calib):
        files = {}
        for t, n in sizes.items():
            files[t] = tmp_path / f"{t}.gguf"
            files[t].write_bytes(b"x" * n)
        return {"imatrix_seconds": 3.0, **{t: 0.5 for t in sizes}}, files

    monkeypatch.setattr(bench, "run_llama_tools", tools)
    saved = {t: {**v, "quantize_seconds": 9.0} for t, v in LLAMA.items()}
    llama, timing = bench.retime_llama(Namespace(), tmp_path, tmp_path, saved, {"imatrix_seconds": 30.0,
                                                                                "timed_this_run": False})
    assert timing == {"imatrix_seconds": 3.0, "saved_imatrix_seconds": 30.0, "timed_this_run": True}
    assert all(v["quantize_seconds"] == 0.5 and v["saved_quantize_seconds"] == 9.0 for v in llama.values())
    assert not any(tmp_path.glob("*.gguf"))  # the timing files are not kept
    now = {"imatrix_seconds": 30.0, "timed_this_run": True}
    assert bench.retime_llama(Namespace(), tmp_path, tmp_path, saved, now) == (saved, now)  # timed already
    sizes["Q2_K"] += 1
    with pytest.raises(SystemExit, match="Q2_K file is .* --redo-llamacpp"):
        bench.retime_llama(Namespace(), tmp_path, tmp_path, saved, {"imatrix_seconds": 30.0, "timed_this_run": False})
