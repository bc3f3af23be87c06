"""bitalloc GGUFs vs llama.cpp's own quantizations at the same file sizes, both measured by llama.cpp.

Reference: the rescaled SmolLM2-135M (function-preserving, weights off every GGUF grid) as an F32 GGUF.
llama.cpp side: llama-imatrix on the comedies, then llama-quantize with that imatrix to Q2_K, Q3_K_M,
Q4_K_M, Q5_K_M and (``--pure``) IQ4_NL and Q4_0.  bitalloc side: one measurement on the same comedies,
then for each llama.cpp file a bitalloc GGUF whose FILE size is at most that file's.  Both sides are
evaluated by llama-perplexity on the tragedies (context 512, second half of each chunk scored) against
the F32 model's saved logits: PPL, mean KLD, top-1 ("Same top p") and file bytes; ratios bitalloc/llama.cpp.

    python bench/gguf_vs_llamacpp.py [--eval-chunks 24] [--calib-windows 24] [--sides both|llamacpp] [--threads 1]

Cost: the llama.cpp side is minutes per type.  The bitalloc side fits every candidate type to every tensor
(211 tensors x 11 types, 5-25 s each on one contended core here), i.e. hours: narrow it with --formats.
Needs the tools from bench/build_llamacpp_tools.sh.  Writes bench/results/gguf_vs_llamacpp.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import llamacpp as lc  # noqa: E402
# all of bitalloc is imported up front: a long run is not broken by later edits of the working tree
from bitalloc.data import default_calibration_files, default_eval_files, read_texts, token_windows  # noqa: E402
from bitalloc.export.gguf import export_f32_gguf, read_template  # noqa: E402
from bitalloc.gguf_cmd import GGUF_FORMATS, export_plan, plan_gguf  # noqa: E402
from bitalloc.measure import Measurement  # noqa: E402
from bitalloc.models.rescale import load_reference  # noqa: E402
from bitalloc.models.sources import default_model_path  # noqa: E402
from bitalloc.models.view import ModelView  # noqa: E402
from bitalloc.pipeline import measure_model  # noqa: E402
from bitalloc.quantize import restore, snapshot  # noqa: E402

RESULTS = lc.REPO / "bench" / "results"
WORK = lc.REPO / ".cache" / "gguf_bench"
# (llama-quantize type, --pure)
LLAMA_TYPES = (("Q2_K", False), ("Q3_K_M", False), ("Q4_K_M", False), ("Q5_K_M", False),
               ("IQ4_NL", True), ("Q4_0", True))
log = logging.getLogger("gguf_bench")


def write_texts(files: list[Path], out: Path) -> Path:
    out.write_text("\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files), encoding="utf-8")
    return out


def bitalloc_side(args: argparse.Namespace, ref_gguf: Path, targets: dict[str, int], base: Path,
                  eval_txt: Path) -> dict[str, dict]:
    """Measure once, then one bitalloc GGUF per llama.cpp file size, evaluated by llama-perplexity."""
    torch.set_num_threads(args.threads)
    model, tok = load_reference(rescaled=True)
    view = ModelView(model)
    tpl = read_template(ref_gguf)
    calib = token_windows(tok, read_texts(default_calibration_files()), 512, args.calib_windows)
    fmts = args.formats.split(",") if args.formats else list(GGUF_FORMATS)
    mpath = WORK / f"measurement-{args.measure_method}-{calib.shape[0]}.json"
    t0 = time.perf_counter()
    m = Measurement.load(mpath) if mpath.exists() else None  # reused when the same options made it
    if m is None or set(m.formats()) != set(fmts) or m.fingerprint.get("method") != args.measure_method:
        m = measure_model(model, view, calib, fmts, args.measure_method, fisher=args.fisher,
                          fisher_windows=calib[: args.fisher_windows], progress=True)
        mpath.unlink(missing_ok=True)
        m.save(mpath)
    log.info("measurement ready in %.0f s", time.perf_counter() - t0)
    saved = snapshot(model)
    out: dict[str, dict] = {}
    for name, size in targets.items():
        t1 = time.perf_counter()
        plan, split = plan_gguf(m, view, tpl, f"{size}B")
        path = WORK / f"bitalloc-{name}.gguf"
        written = export_plan(model, view, plan, calib, tpl, path, method=args.method, overwrite=True)
        restore(model, saved)
        res = lc.perplexity_kld(path, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
        mix: dict[str, int] = {}
        for e in plan.entries:
            mix[e.format] = mix.get(e.format, 0) + 1
        out[name] = {"bytes": written.file_size, "ppl": res.ppl, "kld": res.kld, "top1": res.top1, "mix": mix,
                     "seconds": round(time.perf_counter() - t1, 1)}
        log.info("bitalloc at %s: %s", name, out[name])
        if not args.keep:
            path.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-chunks", type=int, default=24, help="llama-perplexity chunks of 512 tokens")
    ap.add_argument("--calib-windows", type=int, default=24, help="calibration windows (and imatrix chunks)")
    ap.add_argument("--fisher-windows", type=int, default=4)
    ap.add_argument("--no-fisher", dest="fisher", action="store_false")
    ap.add_argument("--formats", default=None, help="bitalloc candidate GGUF types (default: all)")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="bitalloc rounding")
    ap.add_argument("--measure-method", choices=("gptq", "rtn"), default="rtn", help="rounding when measuring")
    ap.add_argument("--sides", choices=("both", "llamacpp"), default="both")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and the llama.cpp tools")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files in .cache/gguf_bench")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    calib_txt = write_texts(default_calibration_files(), WORK / "calib.txt")
    eval_txt = write_texts(default_eval_files(), WORK / "eval.txt")
    ref = WORK / "ref-f32.gguf"
    model, _tok = load_reference(rescaled=True)
    export_f32_gguf(model, default_model_path(), ref, overwrite=True)
    del model
    imat = lc.imatrix(ref, calib_txt, WORK / "imatrix.gguf", chunks=args.calib_windows, threads=args.threads)
    base = WORK / "kld-base.bin"
    ref_res = lc.perplexity_base(ref, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
    log.info("reference PPL %.4f", ref_res.ppl)

    llama: dict[str, dict] = {}
    for qtype, pure in LLAMA_TYPES:
        path = WORK / f"llamacpp-{qtype}.gguf"
        lc.quantize(ref, path, qtype, imatrix_file=imat, pure=pure, threads=args.threads)
        res = lc.perplexity_kld(path, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
        llama[qtype] = {"bytes": os.path.getsize(path), "ppl": res.ppl, "kld": res.kld, "top1": res.top1,
                        "pure": pure}
        log.info("llama.cpp %s: %s", qtype, llama[qtype])
        if not args.keep:
            path.unlink()

    ours: dict[str, dict] = {}
    if args.sides == "both":
        ours = bitalloc_side(args, ref, {k: v["bytes"] for k, v in llama.items()}, base, eval_txt)

    rows = []
    for qtype, _pure in LLAMA_TYPES:
        row = {"type": qtype, "llamacpp": llama[qtype], "bitalloc": ours.get(qtype)}
        if row["bitalloc"]:
            b, l_ = row["bitalloc"], llama[qtype]
            row["kld_ratio"] = b["kld"] / l_["kld"] if l_["kld"] > 0 else None
            row["ppl_ratio"] = b["ppl"] / l_["ppl"]
            row["bytes_ratio"] = b["bytes"] / l_["bytes"]
        rows.append(row)
    report = {"reference": {"model": "SmolLM2-135M-Instruct rescaled, F32 GGUF", "ppl": ref_res.ppl,
                            "bytes": os.path.getsize(ref)},
              "settings": {k: v for k, v in vars(args).items()}, "rows": rows,
              "seconds": round(time.perf_counter() - t_start, 1)}
    (RESULTS / "gguf_vs_llamacpp.json").write_text(json.dumps(report, indent=2))

    print(f"reference F32: PPL {ref_res.ppl:.4f}; eval {args.eval_chunks} chunks x 512 (tragedies)")
    print(f"{'type':8} {'llama MiB':>9} {'PPL':>8} {'KLD':>8} {'top1':>6} | {'ours MiB':>8} {'PPL':>8} {'KLD':>8} "
          f"{'top1':>6} | {'KLD ratio':>9}")
    for r in rows:
        l_, b = r["llamacpp"], r["bitalloc"]
        left = f"{r['type']:8} {l_['bytes'] / 2**20:9.2f} {l_['ppl']:8.3f} {l_['kld']:8.4f} {l_['top1']:6.3f}"
        right = (f"{b['bytes'] / 2**20:8.2f} {b['ppl']:8.3f} {b['kld']:8.4f} {b['top1']:6.3f} | {r['kld_ratio']:9.3f}"
                 if b else "       -")
        print(left + " | " + right)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, marker in (("llamacpp", "o"), ("bitalloc", "s")):
        pts = [(r[side]["bytes"] / 2**20, r[side]["kld"], r["type"]) for r in rows if r.get(side)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=side)
            for x, y, t in pts:
                ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GGUF file size (MiB)")
    ax.set_ylabel("mean KLD vs F32 (llama-perplexity)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M (rescaled): bitalloc vs llama.cpp at equal file size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "gguf_vs_llamacpp.png", dpi=120)
    if not args.keep:
        base.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
