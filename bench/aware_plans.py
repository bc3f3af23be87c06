"""How far recovery-aware allocation moves bitalloc's GGUF plans (issue #14), without quantizing anything.

For each llama.cpp size of the GGUF bench, the plan allocated from the measurement as it is and the plan allocated
from the same table scaled by each format's measured block-recovery gain (``bitalloc gguf --recover-aware``), at
the same bytes: which tensors change format, and the gains.  The gains come from the GGUF bench's own
``aware_table`` (trained on recovery's windows, checked on its held-out ones; cached in .cache/gguf_bench, so a
later ``bench/gguf_vs_llamacpp.py --recover block+e2e --recover-aware`` run reuses them).

    python bench/aware_plans.py [--measurement TABLE.json] [--sizes Q2_K,IQ4_NL] [--threads 2]

``--measurement``: a GGUF measurement table of the bench's reference (e.g. the measurement.json of a
.cache/gguf_bench/measure-* job); without it the bench's measurement is made or reused.  Writes
bench/results/aware_plans.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import gguf_bench_state as st  # noqa: E402
from bench import gguf_vs_llamacpp as gb  # noqa: E402
from bitalloc.recover.aware import block_tensors, scaled_table  # noqa: E402

log = logging.getLogger("aware_plans")


def plan_changes(m, table, view, tpl, size: int) -> dict:
    """The plans of ``m`` and of ``table`` (its aware scaling) at ``size`` file bytes, and the tensors they differ on."""
    plain, _ = gb.plan_gguf(m, view, tpl, f"{size}B")
    aware, _ = gb.plan_gguf(table, view, tpl, f"{size}B")
    a = {e.tensor: e.format for e in plain.entries}
    b = {e.tensor: e.format for e in aware.entries}
    moves: dict[str, int] = {}
    for t in a:
        if a[t] != b[t]:
            moves[f"{a[t]} -> {b[t]}"] = moves.get(f"{a[t]} -> {b[t]}", 0) + 1
    return {"bytes": [plain.total_bytes, aware.total_bytes], "tensors": len(a),
            "changed": sum(moves.values()), "moves": dict(sorted(moves.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurement", type=Path, default=None, help="a GGUF measurement table of the reference")
    ap.add_argument("--sizes", default="Q2_K,IQ4_NL", help="llama.cpp types whose file sizes to plan for")
    ap.add_argument("--calib-windows", type=int, default=24)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    known = {t for t, _ in gb.LLAMA_TYPES}
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or any(s not in known for s in sizes):
        ap.error(f"--sizes: use some of {', '.join(sorted(known))}")
    if args.measurement is not None and not args.measurement.is_file():
        ap.error(f"--measurement: no file {args.measurement}")
    saved = json.loads((gb.RESULTS / "gguf_vs_llamacpp_llamaside.json").read_text()) \
        if (gb.RESULTS / "gguf_vs_llamacpp_llamaside.json").exists() else None
    ref = gb.WORK / "ref-f32.gguf"
    if saved is None or not ref.exists():
        ap.error("run bench/gguf_vs_llamacpp.py first: it makes the reference GGUF and llama.cpp's file sizes")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, tok = gb.load_model(ref, low_memory=True)
    view, tpl = gb.ModelView(model), gb.read_template(ref)
    calib = gb.text_windows(tok, gb.default_calibration_files(), 512, args.calib_windows)
    if args.measurement is not None:
        m = gb.Measurement.load(args.measurement)
    else:
        ns = argparse.Namespace(formats=None, fisher=True, fisher_windows=args.fisher_windows, measure_method="gptq",
                                fresh=False)
        m, _ = gb.measure_cached(ns, model, view, calib)
    recover = gb.RecoverConfig(mode="block+e2e", aware=True)
    train_on = gb.training_windows(recover, calib, lambda n: gb.text_windows(tok, gb.default_calibration_files(),
                                                                           512, n))
    gains = gb.aware_gains(m, model, calib, recover, st.code_digest(gb.output_code()), train_on)
    table = scaled_table(m, gains, block_tensors(view))
    llama = saved["llamacpp"]
    out = {"measurement": str(args.measurement) if args.measurement else "the GGUF bench's (made or reused)",
           "measurement_fingerprint": m.fingerprint, "recover": recover.fingerprint(), "gains": gains, "sizes": {}}
    for s in sizes:
        size = int(llama[s]["bytes"])
        out["sizes"][s] = {"file_bytes": size, **plan_changes(m, table, view, tpl, size)}
        r = out["sizes"][s]
        print(f"{s}: {r['changed']} of {r['tensors']} tensors change format at {size} B; "
              + ", ".join(f"{k} x{v}" for k, v in r["moves"].items()))
    print("gains (error kept after block recovery): " + ", ".join(f"{f} {g:.3f}" for f, g in sorted(gains.items())))
    st.write_text_atomic(gb.RESULTS / "aware_plans.json", json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
