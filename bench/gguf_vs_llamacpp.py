"""bitalloc GGUFs vs llama.cpp's own quantizations at the same file sizes, both measured by llama.cpp.

Reference: the rescaled SmolLM2-135M (function-preserving, weights off every GGUF grid) as an F32 GGUF.
llama.cpp side: llama-imatrix on the comedies, then llama-quantize with that imatrix to Q2_K, Q3_K_M,
Q4_K_M, Q5_K_M and (``--pure``) IQ4_NL and Q4_0.  bitalloc side: one measurement on the same comedies,
then for each llama.cpp file a bitalloc GGUF whose FILE size is at most that file's.  Both sides are
evaluated by llama-perplexity on the tragedies (context 512, second half of each chunk scored) against
the F32 model's saved logits: PPL, mean KLD, top-1 ("Same top p") and file bytes; ratios bitalloc/llama.cpp.

    python bench/gguf_vs_llamacpp.py [--eval-chunks 24] [--calib-windows 24] [--sides both|llamacpp|bitalloc]
                                     [--sizes IQ4_NL,Q4_K_M,...] [--threads 1]

Reuse and resume (state in .cache/gguf_bench, see bench/gguf_bench_state.py): llama.cpp's side is skipped when
bench/results/gguf_vs_llamacpp_llamaside.json holds it for the same settings and the reference GGUF and logits
still exist (``--redo-llamacpp`` forces it); the measurement is a job directory keyed by the model, calibration,
options and the source of the fit/measure code (per-block checkpoints: a killed run continues); each size's
result is saved when done, so a rerun skips finished sizes.  Sizes run in the order of ``--sizes`` (default: the
pure 4-bit size first, shared by IQ4_NL and Q4_0, then Q4_K_M, Q3_K_M, Q5_K_M, Q2_K).

The measurement rounds with GPTQ by default (``--measure-method``; rtn is about half the time but its errors
overrate some types against others) and counts llama.cpp's CPU activation rounding (Q8_0 / Q8_K) for each type;
each output is quantized with the full scale search and GPTQ (``--method``).  ``--check-errors`` (default on,
first size computed) compares each tensor's measured error with the error of its final quantization under the
same fp statistics.  Cost on a free core (8 calibration windows): GPTQ measurement ~12 min (RTN ~7), then
~4 min per size (quantize ~2.5 min, llama-perplexity 8 chunks ~0.5 min).
Needs the tools from bench/build_llamacpp_tools.sh.  Writes bench/results/gguf_vs_llamacpp.{json,png}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import gguf_bench_state as st  # noqa: E402
from bench import llamacpp as lc  # noqa: E402
# all of bitalloc is imported up front: a long run is not broken by later edits of the working tree
from bitalloc.activations import roundings_for  # noqa: E402
from bitalloc.calibrate import stream_blocks  # noqa: E402
from bitalloc.data import default_calibration_files, default_eval_files, read_texts, token_windows  # noqa: E402
from bitalloc.export.gguf import export_f32_gguf, read_template  # noqa: E402
from bitalloc.targets.gguf import GGUF_FORMATS, export_plan, plan_gguf  # noqa: E402
from bitalloc.jobs.store import Job  # noqa: E402
from bitalloc.formats import get_format  # noqa: E402
from bitalloc.measure import Measurement, activation_error, output_error  # noqa: E402
from bitalloc.models.rescale import load_reference  # noqa: E402
from bitalloc.models.sources import default_model_path  # noqa: E402
from bitalloc.models.view import ModelView  # noqa: E402
from bitalloc.pipeline import measure_model, model_fingerprint  # noqa: E402
from bitalloc.quantize import restore, snapshot  # noqa: E402
from bitalloc.jobs.stages import measure_stage  # noqa: E402

RESULTS = lc.REPO / "bench" / "results"
WORK = lc.REPO / ".cache" / "gguf_bench"
SRC = lc.REPO / "src" / "bitalloc"
# (llama-quantize type, --pure), in the order the bitalloc side runs them
LLAMA_TYPES = (("IQ4_NL", True), ("Q4_0", True), ("Q4_K_M", False), ("Q3_K_M", False), ("Q5_K_M", False),
               ("Q2_K", False))
TABLE_ORDER = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_NL", "Q4_0")
FLOOR_TYPE = "Q8_0"  # pure: nearly exact weights, so its KLD is mostly llama.cpp's 8-bit activation rounding
log = logging.getLogger("gguf_bench")


def measure_code() -> list[Path]:
    """Sources whose edits change measured errors (the measurement cache key)."""
    return [*sorted((SRC / "formats").glob("gguf*.py")), SRC / "formats" / "base.py",
            *sorted((SRC / "rounding").glob("*.py")), SRC / "measure.py", SRC / "activations.py",
            *sorted((SRC / "calibrate").glob("*.py")), SRC / "fisher.py", SRC / "placement.py", SRC / "stats.py"]


def output_code() -> list[Path]:
    """Sources whose edits change a written file (part of each size's key)."""
    return measure_code() + [SRC / "quantize.py", SRC / "allocate.py", SRC / "targets" / "gguf.py",
                             SRC / "export" / "gguf.py"]


def write_texts(files: list[Path], out: Path) -> Path:
    out.write_text("\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files), encoding="utf-8")
    return out


def measure_cached(args: argparse.Namespace, model: torch.nn.Module, view: ModelView,
                   calib: torch.Tensor) -> Measurement:
    """The measurement for these options: read from its job directory, continued, or made."""
    fmts = args.formats.split(",") if args.formats else list(GGUF_FORMATS)
    fw = calib[: args.fisher_windows]
    fp = {"model": model_fingerprint(model), "calibration": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
          "windows": list(calib.shape), "fisher_windows": args.fisher_windows if args.fisher else 0, "formats": fmts,
          "method": args.measure_method, "code": st.code_digest(measure_code())}
    t0 = time.perf_counter()
    with Job(WORK / f"measure-{st.digest(fp)}", fp) as job:
        m = measure_stage(job, lambda ck: measure_model(
            model, view, calib, fmts, args.measure_method, fisher=args.fisher,
            fisher_windows=fw if args.fisher else None, progress=True, **ck.kwargs()))
    log.info("measurement ready in %.0f s (%d rows)", time.perf_counter() - t0, len(m.rows))
    return m


def final_errors(model: torch.nn.Module, view: ModelView, saved: dict[str, torch.Tensor], calib: torch.Tensor,
                 m: Measurement, plan: Any) -> dict[str, Any]:
    """Measured vs final error per tensor: the model holds the final (dequantized) weights; it is restored to
    ``saved`` and the fp statistics are recomputed to evaluate ``output_error`` of each final ΔW (plus the
    activation rounding's error, which the measurement adds for the same format)."""
    chosen = {e.tensor: e.format for e in plan.entries}
    delta = {n: (model.get_parameter(n).detach() - saved[n]) for n in chosen}
    restore(model, saved)
    roundings = roundings_for(chosen.values())
    pairs: dict[str, tuple[str, float, float]] = {}
    for block in stream_blocks(model, view, calib, progress=False, roundings=roundings):
        for name, stats in block.items():
            predicted = next(r.output_error for r in m.rows_for(name) if r.format == chosen[name])
            dw = delta.pop(name)
            act = activation_error(stats, get_format(chosen[name]).activation_rounding, int(dw.shape[0]))[0]
            pairs[name] = (chosen[name], predicted, output_error(dw, stats) + act)
    return st.error_agreement(pairs)


def bitalloc_side(args: argparse.Namespace, ref_gguf: Path, targets: dict[str, int], base: Path,
                  eval_txt: Path, on_size: Any) -> dict[str, dict]:
    """Measure once (cached), then one bitalloc GGUF per distinct llama.cpp file size (saved results reused),
    evaluated by llama-perplexity."""
    torch.set_num_threads(args.threads)
    model, tok = load_reference(rescaled=True)
    view = ModelView(model)
    tpl = read_template(ref_gguf)
    calib = token_windows(tok, read_texts(default_calibration_files()), 512, args.calib_windows)
    m = measure_cached(args, model, view, calib)
    saved = snapshot(model)
    store = st.SizeResults(WORK / "bitalloc-sizes.json")
    code = st.code_digest(output_code())
    out: dict[str, dict] = {}
    check = args.check_errors
    for name, size in targets.items():
        key = st.digest({"measurement": m.fingerprint, "bytes": size, "method": args.method, "code": code,
                         "eval_chunks": args.eval_chunks, "threads": args.threads})
        done = store.get(key)
        if done is not None:
            log.info("bitalloc at %s (%d B): saved result reused", name, size)
            out[name] = done
            on_size(out)
            continue
        t1 = time.perf_counter()
        plan, _split = plan_gguf(m, view, tpl, f"{size}B")
        path = WORK / f"bitalloc-{size}.gguf"
        written = export_plan(model, view, plan, calib, tpl, path, method=args.method, overwrite=True)
        t_quant = time.perf_counter() - t1
        agreement = final_errors(model, view, saved, calib, m, plan) if check else None
        restore(model, saved)
        res = lc.perplexity_kld(path, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
        mix: dict[str, int] = {}
        for e in plan.entries:
            mix[e.format] = mix.get(e.format, 0) + 1
        result = {"bytes": written.file_size, "target_bytes": size, "ppl": res.ppl, "kld": res.kld, "top1": res.top1,
                  "mix": mix, "quantize_seconds": round(t_quant, 1), "seconds": round(time.perf_counter() - t1, 1)}
        if agreement is not None:
            result["error_check"] = agreement
            check = False  # one size is enough to judge the measurement
        store.put(key, result)
        out[name] = result
        log.info("bitalloc at %s: %s", name, {k: v for k, v in result.items() if k != "error_check"})
        on_size(out)
        if not args.keep:
            path.unlink(missing_ok=True)
            Path(f"{path}.manifest.json").unlink(missing_ok=True)
    return out


def llama_side(args: argparse.Namespace, ref: Path, calib_txt: Path, eval_txt: Path,
               base: Path) -> tuple[float, dict[str, dict]]:
    """Reference PPL and llama.cpp's results: reused when saved for the same settings, else run (and saved)."""
    settings = st.llama_settings(args)
    saved_path = RESULTS / "gguf_vs_llamacpp_llamaside.json"
    types = [t for t, _ in LLAMA_TYPES]
    if not args.redo_llamacpp:
        found = st.load_llama_side(saved_path, settings, types, [ref, base])
        if found is not None:
            log.info("llama.cpp side reused from %s (%s)", saved_path, settings)
            return found
    model, _tok = load_reference(rescaled=True)
    export_f32_gguf(model, default_model_path(), ref, overwrite=True)
    del model
    imat = lc.imatrix(ref, calib_txt, WORK / "imatrix.gguf", chunks=args.calib_windows, threads=args.threads)
    ref_ppl = lc.perplexity_base(ref, eval_txt, base, chunks=args.eval_chunks, threads=args.threads).ppl
    llama: dict[str, dict] = {}
    for qtype, pure in LLAMA_TYPES:
        path = WORK / f"llamacpp-{qtype}.gguf"
        lc.quantize(ref, path, qtype, imatrix_file=imat, pure=pure, threads=args.threads)
        res = lc.perplexity_kld(path, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
        llama[qtype] = {"bytes": os.path.getsize(path), "ppl": res.ppl, "kld": res.kld, "top1": res.top1, "pure": pure}
        log.info("llama.cpp %s: %s", qtype, llama[qtype])
        if not args.keep:
            path.unlink()
    st.save_llama_side(saved_path, settings, ref_ppl, llama)
    return ref_ppl, llama


def llama_floor(args: argparse.Namespace, ref: Path, eval_txt: Path, base: Path, ref_ppl: float) -> dict:
    """llama.cpp's pure Q8_0 file of the reference, scored like the others (saved per settings and reused).

    Every quantized type makes llama.cpp round the matmul inputs to 8 bits (bitalloc.activations); Q8_0 weights
    are nearly exact, so this file's KLD is close to the part of every file's KLD that no weight rounding can
    remove (only F16/F32 weights avoid it)."""
    path, settings = RESULTS / "gguf_vs_llamacpp_floor.json", st.llama_settings(args)
    found = st.load_llama_side(path, settings, [FLOOR_TYPE], [ref, base])
    if found is not None:
        return found[1][FLOOR_TYPE]
    out = WORK / f"llamacpp-{FLOOR_TYPE}.gguf"
    lc.quantize(ref, out, FLOOR_TYPE, pure=True, threads=args.threads)
    res = lc.perplexity_kld(out, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
    floor = {"bytes": os.path.getsize(out), "ppl": res.ppl, "kld": res.kld, "top1": res.top1, "pure": True}
    out.unlink()
    st.save_llama_side(path, settings, ref_ppl, {FLOOR_TYPE: floor})
    log.info("llama.cpp %s (activation-rounding floor): %s", FLOOR_TYPE, floor)
    return floor


def report(args: argparse.Namespace, ref_ppl: float, ref_bytes: int, llama: dict[str, dict],
           ours: dict[str, dict], seconds: float, floor: dict | None = None) -> list[dict]:
    """Rows of both sides with the bitalloc/llama.cpp ratios (also of the KLD above ``floor``'s, when given);
    writes the JSON and the plot."""
    rows = []
    for qtype in TABLE_ORDER:
        row: dict[str, Any] = {"type": qtype, "llamacpp": llama[qtype], "bitalloc": ours.get(qtype)}
        if row["bitalloc"]:
            b, l_ = row["bitalloc"], llama[qtype]
            row["kld_ratio"] = b["kld"] / l_["kld"] if l_["kld"] > 0 else None
            if floor is not None and l_["kld"] > floor["kld"]:
                row["kld_above_floor_ratio"] = (b["kld"] - floor["kld"]) / (l_["kld"] - floor["kld"])
            row["ppl_ratio"] = b["ppl"] / l_["ppl"]
            row["bytes_ratio"] = b["bytes"] / l_["bytes"]
            row["goal_met"] = row["kld_ratio"] is not None and row["kld_ratio"] <= 0.7
        rows.append(row)
    settings = {k: v for k, v in vars(args).items()}
    body = {"reference": {"model": "SmolLM2-135M-Instruct rescaled, F32 GGUF", "ppl": ref_ppl, "bytes": ref_bytes},
            "settings": settings, "sizes_run": [r["type"] for r in rows if r["bitalloc"]],
            "sizes_missing": [r["type"] for r in rows if not r["bitalloc"]], "rows": rows,
            "floor": None if floor is None else {"type": f"{FLOOR_TYPE} (pure)", **floor},
            "seconds_this_run": round(seconds, 1)}
    st.write_text_atomic(RESULTS / "gguf_vs_llamacpp.json", json.dumps(body, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, marker in (("llamacpp", "o"), ("bitalloc", "s")):
        pts = [(r[side]["bytes"] / 2**20, r[side]["kld"], r["type"]) for r in rows if r.get(side)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=side)
            for x, y, t in pts:
                ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if floor is not None:
        ax.axhline(floor["kld"], ls="--", color="grey", lw=1, label=f"floor: llama.cpp pure {FLOOR_TYPE}")
    ax.set_xlabel("GGUF file size (MiB)")
    ax.set_ylabel("mean KLD vs F32 (llama-perplexity)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M (rescaled): bitalloc vs llama.cpp at equal file size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "gguf_vs_llamacpp.png", dpi=120)
    plt.close(fig)
    return rows


def print_table(ref_ppl: float, chunks: int, rows: list[dict], floor: dict | None = None) -> None:
    print(f"reference F32: PPL {ref_ppl:.4f}; eval {chunks} chunks x 512 (tragedies)")
    if floor is not None:
        print(f"floor: llama.cpp pure {FLOOR_TYPE}, {floor['bytes'] / 2**20:.2f} MiB, KLD {floor['kld']:.4f}, "
              f"top1 {floor['top1']:.3f} (the 8-bit activation rounding every quantized type shares)")
    print(f"{'type':8} {'llama MiB':>9} {'PPL':>8} {'KLD':>8} {'top1':>6} | {'ours MiB':>8} {'PPL':>8} {'KLD':>8} "
          f"{'top1':>6} | {'KLD ratio':>9} {'above floor':>11}")
    for r in rows:
        l_, b = r["llamacpp"], r["bitalloc"]
        left = f"{r['type']:8} {l_['bytes'] / 2**20:9.2f} {l_['ppl']:8.3f} {l_['kld']:8.4f} {l_['top1']:6.3f}"
        above = r.get("kld_above_floor_ratio")
        right = "       -  (not run)"
        if b:
            right = f"{b['bytes'] / 2**20:8.2f} {b['ppl']:8.3f} {b['kld']:8.4f} {b['top1']:6.3f} | {r['kld_ratio']:9.3f}"
            right += f" {above:11.3f}" if above is not None else ""
        print(left + " | " + right)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-chunks", type=int, default=24, help="llama-perplexity chunks of 512 tokens")
    ap.add_argument("--calib-windows", type=int, default=24, help="calibration windows (and imatrix chunks)")
    ap.add_argument("--fisher-windows", type=int, default=8,
                    help="calibration windows of the Fisher (gradient) pass; 8 as `bitalloc gguf`")
    ap.add_argument("--no-fisher", dest="fisher", action="store_false")
    ap.add_argument("--formats", default=None, help="bitalloc candidate GGUF types (default: all)")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="bitalloc rounding of the outputs")
    ap.add_argument("--measure-method", choices=("gptq", "rtn"), default="gptq",
                    help="rounding when measuring (gptq: predicts the final errors exactly; rtn: faster)")
    ap.add_argument("--sides", choices=("both", "llamacpp", "bitalloc"), default="both",
                    help="bitalloc: only reuse llama.cpp's saved side (error when there is none)")
    ap.add_argument("--sizes", default=",".join(t for t, _ in LLAMA_TYPES),
                    help="llama.cpp types whose file sizes the bitalloc side matches, in this order")
    ap.add_argument("--redo-llamacpp", action="store_true", help="run llama.cpp's side even when it is saved")
    ap.add_argument("--no-check-errors", dest="check_errors", action="store_false",
                    help="skip the measured-vs-final error comparison")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and the llama.cpp tools")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files in .cache/gguf_bench")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help=f"skip llama.cpp's pure {FLOOR_TYPE} file (the activation-rounding floor)")
    args = ap.parse_args(argv)
    known = {t for t, _ in LLAMA_TYPES}
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in known]
    if bad:
        ap.error(f"--sizes: unknown type(s) {', '.join(bad)} (use {', '.join(sorted(known))})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    calib_txt = write_texts(default_calibration_files(), WORK / "calib.txt")
    eval_txt = write_texts(default_eval_files(), WORK / "eval.txt")
    # the saved F32 logits cover --eval-chunks chunks: one file per count, so a saved side never pairs with others
    ref, base = WORK / "ref-f32.gguf", WORK / f"kld-base-{args.eval_chunks}.bin"
    if args.sides == "bitalloc":
        found = st.load_llama_side(RESULTS / "gguf_vs_llamacpp_llamaside.json", st.llama_settings(args),
                                   [t for t, _ in LLAMA_TYPES], [ref, base])
        if found is None:
            ap.error("--sides bitalloc: no saved llama.cpp side for these settings (run with --sides both)")
        ref_ppl, llama = found
    else:
        ref_ppl, llama = llama_side(args, ref, calib_txt, eval_txt, base)
    log.info("reference PPL %.4f", ref_ppl)
    floor = llama_floor(args, ref, eval_txt, base, ref_ppl) if args.floor else None

    def on_size(ours: dict[str, dict]) -> None:
        report(args, ref_ppl, os.path.getsize(ref), llama, ours, time.perf_counter() - t_start, floor)

    ours: dict[str, dict] = {}
    if args.sides != "llamacpp":
        ours = bitalloc_side(args, ref, {t: llama[t]["bytes"] for t in sizes}, base, eval_txt, on_size)
    rows = report(args, ref_ppl, os.path.getsize(ref), llama, ours, time.perf_counter() - t_start, floor)
    print_table(ref_ppl, args.eval_chunks, rows, floor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
