"""bitalloc GGUFs vs llama.cpp's own quantizations at the same file sizes, both measured by llama.cpp.

Reference: the rescaled SmolLM2-135M (function-preserving, weights off every GGUF grid) as an F32 GGUF.
llama.cpp side: llama-imatrix on the comedies, then llama-quantize with that imatrix to Q2_K, Q3_K_M,
Q4_K_M, Q5_K_M and (``--pure``) IQ4_NL and Q4_0.  bitalloc side: one measurement on the same comedies,
then for each llama.cpp file a bitalloc GGUF whose FILE size is at most that file's.  Both sides are
evaluated by llama-perplexity on the tragedies (context 512, second half of each chunk scored) against
the F32 model's saved logits: PPL, mean KLD, top-1 ("Same top p") and file bytes; ratios bitalloc/llama.cpp.

    python bench/gguf_vs_llamacpp.py [--eval-chunks 24] [--calib-windows 24] [--sides both|llamacpp|bitalloc]
                                     [--sizes IQ4_NL,Q4_K_M,...] [--threads 1] [--fresh] [--quick]

Time (goal: bitalloc at most 5x llama.cpp's wall time at every size). Both sides start from the same F32 GGUF,
calibrate on the same comedies with the same number of 512-token windows (``--calib-windows``: bitalloc's windows,
llama-imatrix's chunks) and run on ``--threads`` threads (torch and every llama.cpp tool). llama.cpp's time for a
size is ``llama-imatrix`` + that type's ``llama-quantize``; bitalloc's is what ``bitalloc gguf`` does for one
file, timed in-process stage by stage (a :class:`bitalloc.timing.StageTimer`): load the F32 GGUF (low-memory, as
the command), read its template, tokenize the calibration windows, hash the model (the job key), measure, plan,
quantize and write + verify the file. The 6-size sweep compares one imatrix + six quantizes with one load + one
measurement + a plan/quantize/write per distinct file size (IQ4_NL and Q4_0 share one size, so one file serves
both). Evaluation (llama-perplexity) and the measured-vs-final error check are timed too but counted on neither
side. Library functions that accept ``timer=`` get a second StageTimer whose finer stages (calibration forwards,
Hessians, Fisher pass, per-format measurement, refits...) are stored as ``library_stages``. A measurement or size
reused from an earlier run reports the time saved when it was made (flagged ``reused``, and the ratio's
``same_run`` is false, marked ``*`` in the table); ``--fresh`` recomputes the measurement, every size and llama.cpp's
side for a clean timing.
``--recover MODE`` trains each bitalloc file back toward the reference (``bitalloc gguf --recover``; same bytes);
its results go to ``gguf_vs_llamacpp_recover-<mode>.*`` and each size is also compared with the same size without
recovery when a run without ``--recover`` saved it (same measurement, method and evaluation): KLD ratio, goal
<= 0.8.  llama.cpp's side is shared by both.
``--quick`` is a plumbing smoke test (2 calibration windows, 2 evaluation chunks, 3 GGUF types, RTN, one
size); its results go to ``gguf_vs_llamacpp-quick.*`` and never replace the full ones.

Reuse and resume (state in .cache/gguf_bench, see bench/gguf_bench_state.py): llama.cpp's side is skipped when
bench/results/gguf_vs_llamacpp_llamaside.json holds it for the same settings and the reference GGUF and logits
still exist (``--redo-llamacpp`` forces it), and then its imatrix and quantizes are run once more, unevaluated,
for their wall times in this run (about a minute; ``--no-retime`` takes the saved times); the measurement is a job
directory keyed by the model, calibration, options and the source of the fit/measure code (per-block checkpoints: a
killed run continues); each size's result is saved when done, so a rerun skips finished sizes.  Sizes run in the
order of ``--sizes`` (default: the pure 4-bit size first, shared by IQ4_NL and Q4_0, then Q4_K_M, Q3_K_M, Q5_K_M,
Q2_K).

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
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
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
from bitalloc.data import default_calibration_files, default_eval_files, text_windows  # noqa: E402
from bitalloc.export.gguf import export_f32_gguf, read_template  # noqa: E402
from bitalloc.targets.gguf import GGUF_FORMATS, plan_gguf, quantize_for_gguf  # noqa: E402
from bitalloc.export.gguf_manifest import write_gguf_verified  # noqa: E402
from bitalloc.jobs.store import Job  # noqa: E402
from bitalloc.formats import get_format  # noqa: E402
from bitalloc.measure import Measurement, activation_error, output_error  # noqa: E402
from bitalloc.models.rescale import load_reference  # noqa: E402
from bitalloc.models.sources import default_model_path, load_model  # noqa: E402
from bitalloc.models.view import ModelView  # noqa: E402
from bitalloc.pipeline import measure_model, model_fingerprint  # noqa: E402
from bitalloc.placement import Placement  # noqa: E402
from bitalloc.quantize import restore, snapshot  # noqa: E402
from bitalloc.recover import RecoverConfig, training_windows  # noqa: E402
from bitalloc.jobs.checkpoints import load_rounded, save_rounded  # noqa: E402
from bitalloc.jobs.stages import measure_stage  # noqa: E402
from bitalloc.timing import StageTimer  # noqa: E402

RESULTS = lc.REPO / "bench" / "results"
WORK = lc.REPO / ".cache" / "gguf_bench"
SRC = lc.REPO / "src" / "bitalloc"
# (llama-quantize type, --pure), in the order the bitalloc side runs them
LLAMA_TYPES = (("IQ4_NL", True), ("Q4_0", True), ("Q4_K_M", False), ("Q3_K_M", False), ("Q5_K_M", False),
               ("Q2_K", False))
TABLE_ORDER = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_NL", "Q4_0")
FLOOR_TYPE = "Q8_0"  # pure: nearly exact weights, so its KLD is mostly llama.cpp's 8-bit activation rounding
TIME_GOAL = 5.0  # bitalloc's wall time at most this many times llama.cpp's (imatrix + quantize)
KLD_GOAL = 0.7
RECOVER_GOAL = 0.8  # --recover: KLD at most this many times the same size's without recovery
# what one `bitalloc gguf` run does before its per-size work (bench stages), and that per-size work
SHARED_STAGES = ("load", "template", "calibration", "fingerprint", "measure")
SIZE_STAGES = ("plan", "quantize", "write")
LLAMA_KEYS = (*st.RESULT_KEYS, "quantize_seconds")
# --quick: a plumbing smoke test (minutes), results under their own names
QUICK = {"calib_windows": 2, "fisher_windows": 1, "eval_chunks": 2, "formats": "q8_0,q5_0,q4_0", "method": "rtn",
         "measure_method": "rtn", "sizes": "Q4_K_M", "check_errors": False, "floor": False}
log = logging.getLogger("gguf_bench")


def measure_code() -> list[Path]:
    """Sources whose edits change measured errors (the measurement cache key)."""
    return [*sorted((SRC / "formats").glob("gguf*.py")), SRC / "formats" / "base.py", SRC / "formats" / "refit.py",
            *sorted((SRC / "rounding").glob("*.py")), SRC / "measure.py", SRC / "activations.py",
            *sorted((SRC / "calibrate").glob("*.py")), SRC / "fisher.py", SRC / "placement.py", SRC / "stats.py",
            SRC / "measure_pool.py", SRC / "pipeline.py"]


def output_code() -> list[Path]:
    """Sources whose edits change a written file (part of each size's key; recovery's too, for a ``--recover``
    size)."""
    return measure_code() + [SRC / "quantize.py", SRC / "allocate.py", SRC / "targets" / "gguf.py",
                             SRC / "export" / "gguf.py", *sorted((SRC / "recover").glob("*.py"))]


def write_texts(files: list[Path], out: Path) -> Path:
    out.write_text("\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files), encoding="utf-8")
    return out


def measure_cached(args: argparse.Namespace, model: torch.nn.Module, view: ModelView, calib: torch.Tensor,
                   timer: StageTimer | None = None, lib_timer: StageTimer | None = None) -> tuple[Measurement, dict[str, Any]]:
    """The measurement for these options: read from its job directory, continued, or made; with what it cost
    (``seconds``: this run's when made from scratch here, else the time saved when it was made, None when it
    was continued from a killed run's checkpoints)."""
    fmts = args.formats.split(",") if args.formats else list(GGUF_FORMATS)
    fw = calib[: args.fisher_windows]
    timer = timer if timer is not None else StageTimer()
    with timer.stage("fingerprint"):  # the job key (`bitalloc gguf` hashes its input file for its own)
        model_fp = model_fingerprint(model)
    fp = {"model": model_fp, "calibration": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
          "windows": list(calib.shape), "fisher_windows": args.fisher_windows if args.fisher else 0, "formats": fmts,
          "method": args.measure_method, "code": st.code_digest(measure_code())}
    reuse = getattr(args, "reuse_rounding", False)
    if reuse:  # the measurement also keeps every rounding (a job of its own: the plain one has none)
        fp["reuse_rounding"] = True
    job_dir = WORK / f"measure-{st.digest(fp)}"
    seconds_file = job_dir.with_name(job_dir.name + ".seconds.json")
    if getattr(args, "fresh", False) and job_dir.exists():
        shutil.rmtree(job_dir)
        seconds_file.unlink(missing_ok=True)
    made_here = not job_dir.exists()
    placement = Placement.for_device("cpu", model=model)  # as `bitalloc gguf` places it (measurement workers)
    t0 = time.perf_counter()
    with timer.stage("measure"), Job(job_dir, fp) as job:
        m = measure_stage(job, lambda ck: measure_model(
            model, view, calib, fmts, args.measure_method, fisher=args.fisher,
            fisher_windows=fw if args.fisher else None, progress=True, timer=lib_timer, placement=placement,
            on_rounded=(lambda b, r: save_rounded(job, b, r)) if reuse else None, **ck.kwargs()))
    seconds = time.perf_counter() - t0
    if made_here:
        st.save_seconds(seconds_file, seconds, rows=len(m.rows))
    info = {"seconds": seconds if made_here else st.load_seconds(seconds_file), "reused": not made_here,
            "this_run_seconds": round(seconds, 3), "job": (job_dir, fp) if reuse else None,
            "workers": placement.workers, "worker_threads": placement.worker_threads}
    log.info("measurement ready in %.0f s (%d rows%s)", seconds, len(m.rows), "" if made_here else ", reused")
    return m, info


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


def versus_unrecovered(result: dict, unrecovered: dict | None) -> dict[str, Any]:
    """For a ``--recover`` size: the same size's result without recovery (same measurement, bytes, method and
    evaluation; saved by a run without ``--recover``) and the KLD ratio recovered / unrecovered (goal
    ``RECOVER_GOAL``); empty when there is no such result."""
    if not unrecovered or "kld" not in unrecovered:
        return {}
    ratio = result["kld"] / unrecovered["kld"] if unrecovered["kld"] > 0 else None
    return {"unrecovered": {k: unrecovered[k] for k in ("bytes", "kld", "ppl", "top1") if k in unrecovered},
            "kld_vs_unrecovered": ratio, "recovery_goal_met": ratio is not None and ratio <= RECOVER_GOAL}


def versus_plain_recovery(result: dict, plain: dict | None) -> dict[str, Any]:
    """For a ``--recover-aware`` size: the same size recovered from the plain allocation (same measurement, bytes,
    recovery and evaluation; saved by the run without ``--recover-aware``) and the KLD ratio aware / plain, the
    issue's "recovery-aware allocation against allocate-then-recover at equal bytes"; empty when there is none."""
    if not plain or "kld" not in plain:
        return {}
    ratio = result["kld"] / plain["kld"] if plain["kld"] > 0 else None
    return {"allocate_then_recover": {k: plain[k] for k in ("bytes", "kld", "ppl", "top1", "mix") if k in plain},
            "kld_vs_allocate_then_recover": ratio}


def stage_seconds(stages: dict[str, dict], names: tuple[str, ...]) -> float:
    """Sum of the seconds of ``names`` in a ``StageTimer.as_dict()`` (absent stages count 0)."""
    return sum(float(stages.get(n, {}).get("seconds", 0.0)) for n in names)


def bitalloc_side(args: argparse.Namespace, ref_gguf: Path, targets: dict[str, int], base: Path,
                  eval_txt: Path, on_size: Any, shared: dict[str, Any] | None = None) -> dict[str, dict]:
    """What ``bitalloc gguf`` does, timed stage by stage: load the F32 reference GGUF, measure once (cached),
    then one bitalloc GGUF per distinct llama.cpp file size (saved results reused), each evaluated by
    llama-perplexity.  ``shared`` receives the stages done once (load, template, calibration, measure)."""
    torch.set_num_threads(args.threads)
    shared = shared if shared is not None else {}
    timer, lib_timer = StageTimer(), StageTimer()
    with timer.stage("load"):  # as `bitalloc gguf`: weights in a spill file, one block resident
        model, tok = load_model(ref_gguf, low_memory=True)
    view = ModelView(model)
    with timer.stage("template"):
        tpl = read_template(ref_gguf)
    with timer.stage("calibration"):
        calib = text_windows(tok, default_calibration_files(), 512, args.calib_windows)
    m, minfo = measure_cached(args, model, view, calib, timer, lib_timer)
    mjob = minfo.pop("job")  # --reuse-rounding: (job directory, fingerprint) holding the kept roundings
    stages = timer.as_dict()
    if minfo["seconds"] is not None:  # a reused measurement counts what it cost when it was made
        stages["measure"] = {"seconds": round(minfo["seconds"], 3), "calls": 1}
    shared.update({"stages": stages, "library_stages": lib_timer.as_dict(), "measure": minfo,
                   "seconds": stage_seconds(stages, SHARED_STAGES) if minfo["seconds"] is not None else None})
    saved = snapshot(model)
    recover = RecoverConfig(mode=args.recover, steps=args.recover_steps, windows=args.recover_windows,
                            aware=getattr(args, "recover_aware", False))
    # as `bitalloc gguf`: the calibration windows first, then more of the same text, then the held-out guard windows
    train_on = training_windows(recover, calib, lambda n: text_windows(tok, default_calibration_files(), 512, n)) \
        if recover.active else None
    teacher = copy.deepcopy(model) if recover.active else None  # the full-precision model recovery trains toward
    store = st.SizeResults(WORK / "bitalloc-sizes.json")
    code = st.code_digest(output_code())
    table = aware_table(m, model, view, calib, recover, code, train_on) if recover.aware else m
    out: dict[str, dict] = {}
    made: set[str] = set()
    check = args.check_errors
    for name, size in targets.items():
        plain_key = {"measurement": m.fingerprint, "bytes": size, "method": args.method, "code": code,
                     "eval_chunks": args.eval_chunks, "threads": args.threads,
                     **({"reuse_rounding": True} if mjob else {})}
        key = st.digest({**plain_key, **({"recover": recover.fingerprint()} if recover.active else {})})
        unrecovered = store.get(st.digest(plain_key)) if recover.active else None
        plain_recovered = store.get(st.digest({**plain_key, "recover": replace(recover, aware=False).fingerprint()})) \
            if recover.aware else None
        # --fresh: a saved result counts only when this run made it (a second type of the same size)
        done = store.get(key) if not getattr(args, "fresh", False) or key in made else None
        if done is not None and "gguf_seconds" in done:
            log.info("bitalloc at %s (%d B): saved result reused", name, size)
            out[name] = {**done, "reused": key not in made, "same_file_as_earlier_type": key in made,
                         **versus_unrecovered(done, unrecovered), **versus_plain_recovery(done, plain_recovered)}
            on_size(out)
            continue
        t1 = time.perf_counter()
        size_timer, size_lib = StageTimer(), StageTimer()
        with size_timer.stage("plan"):
            plan, _split = plan_gguf(table, view, tpl, f"{size}B")
        path = WORK / f"bitalloc-{size}.gguf"
        with size_timer.stage("quantize"):  # export_plan's two steps, timed apart
            rounded = None
            if mjob:  # --reuse-rounding: the measurement's roundings of this plan, read from its job
                with Job(*mjob) as job:
                    rounded = load_rounded(job, plan.assignments)
            tensors = quantize_for_gguf(model, view, plan, calib, tpl, method=args.method, progress=True,
                                        timer=size_lib, recover=recover, teacher=teacher, recover_windows=train_on,
                                        rounded=rounded)
            del rounded
        with size_timer.stage("write"):
            written = write_gguf_verified(path, tpl, tensors, overwrite=True)
        del tensors
        gguf_s = stage_seconds(size_timer.as_dict(), SIZE_STAGES)
        agreement = None
        if check:
            with size_timer.stage("error_check"):
                agreement = final_errors(model, view, saved, calib, m, plan)
        restore(model, saved)
        with size_timer.stage("evaluate"):
            res = lc.perplexity_kld(path, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
        mix: dict[str, int] = {}
        for e in plan.entries:
            mix[e.format] = mix.get(e.format, 0) + 1
        result = {"bytes": written.file_size, "target_bytes": size, "ppl": res.ppl, "kld": res.kld, "top1": res.top1,
                  "mix": mix, "quantize_seconds": round(gguf_s, 1), "gguf_seconds": round(gguf_s, 3),
                  "stages": size_timer.as_dict(), "library_stages": size_lib.as_dict(),
                  "seconds": round(time.perf_counter() - t1, 1)}
        if agreement is not None:
            result["error_check"] = agreement
            check = False  # one size is enough to judge the measurement
        store.put(key, result)
        made.add(key)
        out[name] = {**result, **versus_unrecovered(result, unrecovered),
                     **versus_plain_recovery(result, plain_recovered)}
        log.info("bitalloc at %s: %s", name, {k: v for k, v in result.items()
                                               if k not in ("error_check", "stages", "library_stages")})
        on_size(out)
        if not args.keep:
            path.unlink(missing_ok=True)
            Path(f"{path}.manifest.json").unlink(missing_ok=True)
    return out


def aware_table(m: Any, model: torch.nn.Module, view: ModelView, calib: torch.Tensor, recover: RecoverConfig,
                code: str, train_on: tuple[torch.Tensor, int]) -> Any:
    """``--recover-aware``: the table the allocator reads, its block linears' errors scaled by each format's
    measured recovery gain (:func:`aware_gains`)."""
    from bitalloc.recover.aware import block_tensors, scaled_table

    return scaled_table(m, aware_gains(m, model, calib, recover, code, train_on), block_tensors(view))


def aware_gains(m: Any, model: torch.nn.Module, calib: torch.Tensor, recover: RecoverConfig, code: str,
                train_on: tuple[torch.Tensor, int]) -> dict[str, float]:
    """Each format's block-recovery gain, as ``bitalloc gguf --recover-aware`` measures it (trained on recovery's
    windows ``train_on``, checked on its held-out ones); saved in .cache/gguf_bench and read back from there."""
    from bitalloc.recover.aware import format_gains

    windows, guard = train_on
    key = {'measurement': m.fingerprint, 'recover': recover.fingerprint(), 'code': code, 'held_out': guard}
    path = WORK / f"recovery-gains-{st.digest(key)}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    gains = format_gains(model, windows, m.formats(), recover, guard=guard, quant=int(calib.shape[0]), progress=True)
    log.info("recovery gains measured in %.0f s", time.perf_counter() - t0)
    path.write_text(json.dumps(gains, indent=1))
    return gains


def result_path(args: argparse.Namespace, name: str, ext: str = "json") -> Path:
    """``bench/results/<name>.<ext>``; ``_<method>`` (``_rtn``, or ``_<method>-m<measure method>`` when the two
    differ) is added when bitalloc does not round with GPTQ throughout, ``_recover-<mode>`` for a ``--recover`` run
    (with ``-s<steps>`` and ``-w<windows>`` when those are given), ``-quick`` for a ``--quick`` run's files."""
    rec = getattr(args, "recover", "none")
    method, measure = getattr(args, "method", "gptq"), getattr(args, "measure_method", "gptq")
    tag = "" if (method, measure) == ("gptq", "gptq") or getattr(args, "quick", False) else \
        f"_{method}" if method == measure else f"_{method}-m{measure}"
    tag += "" if rec == "none" else f"_recover-{rec.replace('+', '-')}"
    for flag, key in (("s", "recover_steps"), ("w", "recover_windows")):
        if rec != "none" and getattr(args, key, None) is not None:
            tag += f"-{flag}{getattr(args, key)}"
    if rec != "none" and getattr(args, "recover_aware", False):
        tag += "-aware"
    if getattr(args, "reuse_rounding", False):
        tag += "_reuse-rounding"
    return RESULTS / f"{name}{tag}{'-quick' if getattr(args, 'quick', False) else ''}.{ext}"


def llama_side_path(args: argparse.Namespace, name: str = "gguf_vs_llamacpp_llamaside") -> Path:
    """Where llama.cpp's side (or its floor) is saved: one file whatever bitalloc's ``--recover`` and rounding
    (they are bitalloc's side only)."""
    return result_path(argparse.Namespace(**{**vars(args), "recover": "none", "method": "gptq",
                                             "measure_method": "gptq"}), name)


def saved_llama_side(args: argparse.Namespace, ref: Path, base: Path) -> tuple[float, dict[str, dict], dict] | None:
    """llama.cpp's side saved for these settings, with its wall times (None when any is missing)."""
    path = llama_side_path(args)
    found = st.load_llama_side(path, st.llama_settings(args), [t for t, _ in LLAMA_TYPES], [ref, base], LLAMA_KEYS)
    timing = st.load_llama_timing(path)
    if found is None or timing is None or "imatrix_seconds" not in timing:
        return None
    return found[0], found[1], timing


def run_llama_tools(args: argparse.Namespace, ref: Path, calib_txt: Path) -> tuple[dict[str, float], dict[str, Path]]:
    """What llama.cpp's side times: ``llama-imatrix`` on the comedies, then ``llama-quantize`` of every type with
    that imatrix; ``({"imatrix_seconds": s, <type>: its quantize seconds...}, {type: file})``."""
    t0 = time.perf_counter()
    imat = lc.imatrix(ref, calib_txt, WORK / "imatrix.gguf", chunks=args.calib_windows, threads=args.threads)
    timing = {"imatrix_seconds": round(time.perf_counter() - t0, 3)}
    files: dict[str, Path] = {}
    for qtype, pure in LLAMA_TYPES:
        files[qtype] = WORK / f"llamacpp-{qtype}.gguf"
        t1 = time.perf_counter()
        lc.quantize(ref, files[qtype], qtype, imatrix_file=imat, pure=pure, threads=args.threads)
        timing[qtype] = round(time.perf_counter() - t1, 3)
    return timing, files


def llama_side(args: argparse.Namespace, ref: Path, calib_txt: Path, eval_txt: Path,
               base: Path) -> tuple[float, dict[str, dict], dict[str, Any]]:
    """Reference PPL, llama.cpp's results (each with its ``llama-quantize`` wall time) and ``{"imatrix_seconds":
    s, "timed_this_run": bool}``: reused when saved for the same settings, else run (and saved)."""
    settings = st.llama_settings(args)
    saved_path = llama_side_path(args)
    if not args.redo_llamacpp:
        found = saved_llama_side(args, ref, base)
        if found is not None:
            log.info("llama.cpp side reused from %s (%s)", saved_path, settings)
            return found[0], found[1], {**found[2], "timed_this_run": False}
    model, _tok = load_reference(rescaled=True)
    export_f32_gguf(model, default_model_path(), ref, overwrite=True)
    del model
    tools, files = run_llama_tools(args, ref, calib_txt)
    timing = {"imatrix_seconds": tools["imatrix_seconds"]}
    ref_ppl = lc.perplexity_base(ref, eval_txt, base, chunks=args.eval_chunks, threads=args.threads).ppl
    llama: dict[str, dict] = {}
    for qtype, pure in LLAMA_TYPES:
        path = files[qtype]
        res = lc.perplexity_kld(path, eval_txt, base, chunks=args.eval_chunks, threads=args.threads)
        llama[qtype] = {"bytes": os.path.getsize(path), "ppl": res.ppl, "kld": res.kld, "top1": res.top1, "pure": pure,
                        "quantize_seconds": tools[qtype]}
        log.info("llama.cpp %s: %s", qtype, llama[qtype])
        if not args.keep:
            path.unlink()
    st.save_llama_side(saved_path, settings, ref_ppl, llama, timing)
    return ref_ppl, llama, {**timing, "timed_this_run": True}


def retime_llama(args: argparse.Namespace, ref: Path, calib_txt: Path, llama: dict[str, dict],
                 timing: dict[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """llama.cpp's side reused from an earlier run, its wall times measured again now (imatrix + every quantize,
    no evaluation: about a minute), so every time ratio compares two sides timed on this machine in this run.
    The saved times are kept under ``saved_*``; a file whose size differs from the saved one is an error (the
    tools changed: rerun with --redo-llamacpp)."""
    if timing.get("timed_this_run"):
        return llama, timing
    tools, files = run_llama_tools(args, ref, calib_txt)
    sizes = {qtype: os.path.getsize(path) for qtype, path in files.items()}
    for path in files.values():
        path.unlink()
    out: dict[str, dict] = {}
    for qtype, info in llama.items():
        size = sizes[qtype]
        if size != info["bytes"]:
            raise SystemExit(f"error: llama.cpp's {qtype} file is {size} B now against {info['bytes']} B saved: "
                             "its tools changed; rerun with --redo-llamacpp")
        out[qtype] = {**info, "quantize_seconds": tools[qtype], "saved_quantize_seconds": info.get("quantize_seconds")}
    log.info("llama.cpp timed again in this run: imatrix %.1f s (saved %.1f s)", tools["imatrix_seconds"],
             timing.get("imatrix_seconds") or float("nan"))
    return out, {"imatrix_seconds": tools["imatrix_seconds"], "saved_imatrix_seconds": timing.get("imatrix_seconds"),
                 "timed_this_run": True}


def llama_floor(args: argparse.Namespace, ref: Path, eval_txt: Path, base: Path, ref_ppl: float) -> dict:
    """llama.cpp's pure Q8_0 file of the reference, scored like the others (saved per settings and reused).

    Every quantized type makes llama.cpp round the matmul inputs to 8 bits (bitalloc.activations); Q8_0 weights
    are nearly exact, so this file's KLD is close to the part of every file's KLD that no weight rounding can
    remove (only F16/F32 weights avoid it)."""
    path, settings = llama_side_path(args, "gguf_vs_llamacpp_floor"), st.llama_settings(args)
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


def add_times(rows: list[dict], llama_timing: dict[str, float] | None, shared: dict[str, Any] | None) -> dict | None:
    """Give each row with both sides a ``time`` entry (seconds of one ``bitalloc gguf`` run vs llama-imatrix +
    that type's llama-quantize, their ratio and the goal) and return the whole-sweep comparison (one bitalloc
    load + measurement + each distinct file size vs one imatrix + every llama.cpp type), or None without times."""
    imatrix_s = (llama_timing or {}).get("imatrix_seconds")
    shared_s = (shared or {}).get("seconds")
    if imatrix_s is None or shared_s is None:
        return None
    files: dict[int, float] = {}
    llama_sum, ran = imatrix_s, []
    # both sides timed in this run: llama.cpp's tools, bitalloc's measurement and the size itself
    now = bool((llama_timing or {}).get("timed_this_run")) and not (shared or {}).get("measure", {}).get("reused", True)
    sweep_now = now
    for r in rows:
        b, l_ = r.get("bitalloc"), r["llamacpp"]
        if "quantize_seconds" not in l_:
            return None
        llama_sum += l_["quantize_seconds"]
        if not b or "gguf_seconds" not in b:
            continue
        ran.append(r["type"])
        files.setdefault(int(b["target_bytes"]), float(b["gguf_seconds"]))
        ours_s, theirs_s = shared_s + float(b["gguf_seconds"]), imatrix_s + float(l_["quantize_seconds"])
        ratio = ours_s / theirs_s if theirs_s > 0 else None
        same = now and not b.get("reused", False)
        sweep_now = sweep_now and same
        r["time"] = {"bitalloc_seconds": round(ours_s, 3), "llamacpp_seconds": round(theirs_s, 3), "ratio": ratio,
                     "goal_met": ratio is not None and ratio <= TIME_GOAL, "same_run": same}
    if len(ran) < len(rows):  # the sweep compares whole sweeps only
        return {"complete": False, "sizes_timed": ran}
    ours_sweep = shared_s + sum(files.values())
    ratio = ours_sweep / llama_sum if llama_sum > 0 else None
    return {"complete": True, "bitalloc_seconds": round(ours_sweep, 3), "bitalloc_files": len(files),
            "llamacpp_seconds": round(llama_sum, 3), "llamacpp_files": len(rows), "ratio": ratio,
            "goal_met": ratio is not None and ratio <= TIME_GOAL, "same_run": sweep_now,
            "bitalloc_shared_seconds": round(shared_s, 3), "llamacpp_imatrix_seconds": imatrix_s}


def report(args: argparse.Namespace, ref_ppl: float, ref_bytes: int, llama: dict[str, dict],
           ours: dict[str, dict], seconds: float, floor: dict | None = None, *,
           llama_timing: dict[str, float] | None = None, shared: dict[str, Any] | None = None) -> list[dict]:
    """Rows of both sides with the bitalloc/llama.cpp ratios (also of the KLD above ``floor``'s, when given, and
    of the wall times when ``llama_timing`` and ``shared`` -- bitalloc's stages done once -- are given);
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
            row["goal_met"] = row["kld_ratio"] is not None and row["kld_ratio"] <= KLD_GOAL
        rows.append(row)
    sweep = add_times(rows, llama_timing, shared)
    settings = {k: v for k, v in vars(args).items()}
    body = {"reference": {"model": "SmolLM2-135M-Instruct rescaled, F32 GGUF", "ppl": ref_ppl, "bytes": ref_bytes},
            "settings": settings, "sizes_run": [r["type"] for r in rows if r["bitalloc"]],
            "sizes_missing": [r["type"] for r in rows if not r["bitalloc"]], "rows": rows,
            "floor": None if floor is None else {"type": f"{FLOOR_TYPE} (pure)", **floor},
            "goals": {"kld_ratio_max": KLD_GOAL, "time_ratio_max": TIME_GOAL,
                      "recovered_vs_unrecovered_max": RECOVER_GOAL},
            "time": {"llamacpp": llama_timing, "bitalloc_shared": shared, "sweep": sweep,
                     "note": "bitalloc per size = load + template + calibration + fingerprint + measure + plan + "
                             "quantize + write; "
                             "llama.cpp per size = llama-imatrix + llama-quantize; evaluation counted on neither"},
            "seconds_this_run": round(seconds, 1)}
    st.write_text_atomic(result_path(args, "gguf_vs_llamacpp"), json.dumps(body, indent=2) + "\n")
    timed = [r for r in rows if r.get("time")]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13 if timed else 7, 4.5), squeeze=False)
    ax = axes[0][0]
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
    if timed:
        ax2 = axes[0][1]
        xs = range(len(timed))
        ax2.bar([x - 0.2 for x in xs], [r["time"]["llamacpp_seconds"] for r in timed], 0.4,
                label="llama.cpp: imatrix + quantize")
        ax2.bar([x + 0.2 for x in xs], [r["time"]["bitalloc_seconds"] for r in timed], 0.4,
                label="bitalloc gguf (one size)")
        for x, r in zip(xs, timed):
            ax2.annotate(f"{r['time']['ratio']:.1f}x", (x + 0.2, r["time"]["bitalloc_seconds"]), fontsize=7,
                         ha="center", xytext=(0, 2), textcoords="offset points")
        ax2.set_xticks(list(xs), [r["type"] for r in timed])
        ax2.set_ylabel(f"wall seconds ({getattr(args, 'threads', '?')} threads)")
        title = "time per size"
        if sweep and sweep.get("complete"):
            title += f"; 6-size sweep {sweep['ratio']:.1f}x"
        ax2.set_title(title)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(result_path(args, "gguf_vs_llamacpp", "png"), dpi=120)
    plt.close(fig)
    return rows


def print_table(ref_ppl: float, chunks: int, rows: list[dict], floor: dict | None = None) -> None:
    print(f"reference F32: PPL {ref_ppl:.4f}; eval {chunks} chunks x 512 (tragedies)")
    if floor is not None:
        print(f"floor: llama.cpp pure {FLOOR_TYPE}, {floor['bytes'] / 2**20:.2f} MiB, KLD {floor['kld']:.4f}, "
              f"top1 {floor['top1']:.3f} (the 8-bit activation rounding every quantized type shares)")
    timed = any(r.get("time") for r in rows)
    print(f"{'type':8} {'llama MiB':>9} {'PPL':>8} {'KLD':>8} {'top1':>6} | {'ours MiB':>8} {'PPL':>8} {'KLD':>8} "
          f"{'top1':>6} | {'KLD ratio':>9} {'above floor':>11}" + (f" | {'llama s':>8} {'ours s':>8} {'time x':>6}"
                                                                     if timed else ""))
    for r in rows:
        l_, b = r["llamacpp"], r["bitalloc"]
        left = f"{r['type']:8} {l_['bytes'] / 2**20:9.2f} {l_['ppl']:8.3f} {l_['kld']:8.4f} {l_['top1']:6.3f}"
        above = r.get("kld_above_floor_ratio")
        right = "       -  (not run)"
        if b:
            right = (f"{b['bytes'] / 2**20:8.2f} {b['ppl']:8.3f} {b['kld']:8.4f} {b['top1']:6.3f} | "
                     f"{r['kld_ratio']:9.3f}")
            right += f" {above:11.3f}" if above is not None else f" {'':11}"
            t = r.get("time")
            if t:
                right += f" | {t['llamacpp_seconds']:8.1f} {t['bitalloc_seconds']:8.1f} {t['ratio']:6.2f}"
                right += "" if t.get("same_run") else "*"
        print(left + " | " + right)
    if any(r.get("time") and not r["time"].get("same_run") for r in rows):
        print("* times of the two sides not both measured in this run (a saved side or size reused): "
              "rerun with --fresh for a clean ratio")


def print_recovery(rows: list[dict]) -> None:
    """One line per size with a recovered and an unrecovered bitalloc result."""
    for r in rows:
        b = r.get("bitalloc") or {}
        if b.get("kld_vs_unrecovered") is not None:
            print(f"{r['type']}: bitalloc with recovery KLD {b['kld']:.4f} vs without {b['unrecovered']['kld']:.4f}: "
                  f"{b['kld_vs_unrecovered']:.3f}x (goal <= {RECOVER_GOAL:g}x: "
                  f"{'met' if b['recovery_goal_met'] else 'NOT met'}); bytes {b['bytes']} vs "
                  f"{b['unrecovered'].get('bytes')}")
        if b.get("kld_vs_allocate_then_recover") is not None:
            p = b["allocate_then_recover"]
            print(f"{r['type']}: recovery-aware allocation KLD {b['kld']:.4f} vs allocate-then-recover {p['kld']:.4f}: "
                  f"{b['kld_vs_allocate_then_recover']:.3f}x; bytes {b['bytes']} vs {p.get('bytes')}")


def print_sweep(sweep: dict | None) -> None:
    if not sweep or not sweep.get("complete"):
        return
    print(f"sweep: llama.cpp {sweep['llamacpp_seconds']:.1f} s (imatrix + {sweep['llamacpp_files']} quantizes) vs "
          f"bitalloc {sweep['bitalloc_seconds']:.1f} s (one load + measurement, {sweep['bitalloc_files']} files): "
          f"{sweep['ratio']:.2f}x (goal <= {TIME_GOAL:g}x: {'met' if sweep['goal_met'] else 'NOT met'})"
          + ("" if sweep.get("same_run") else "; the sides were not both timed in this run"))


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
    ap.add_argument("--fresh", action="store_true",
                    help="recompute everything that is timed: the measurement, every size and llama.cpp's side")
    ap.add_argument("--quick", action="store_true",
                    help="plumbing smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                    + "; results in gguf_vs_llamacpp-quick.*")
    ap.add_argument("--no-check-errors", dest="check_errors", action="store_false",
                    help="skip the measured-vs-final error comparison")
    ap.add_argument("--recover", choices=("none", "block", "e2e", "block+e2e"), default="none",
                    help="bitalloc's side trains each quantized model back toward the reference (bitalloc gguf --recover)")
    ap.add_argument("--recover-steps", type=int, default=None, help="recovery steps (default bitalloc's)")
    ap.add_argument("--recover-windows", type=int, default=None,
                    help="comedy windows recovery trains on (default: bitalloc's, 4x the calibration windows)")
    ap.add_argument("--recover-aware", action="store_true",
                    help="allocate from the errors scaled by each format's measured block-recovery gain "
                    "(bitalloc gguf --recover-aware; needs --recover block or block+e2e)")
    ap.add_argument("--reuse-rounding", action="store_true",
                    help="as `bitalloc gguf --reuse-rounding`: the measurement keeps every rounding and each size is "
                    "assembled from them (no rounding per size); results in *_reuse-rounding.*")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and the llama.cpp tools (both sides)")
    ap.add_argument("--no-retime", dest="retime", action="store_false",
                    help="take llama.cpp's wall times from its saved side instead of timing its imatrix and quantizes "
                    "again in this run (the time ratios then compare runs made at different times)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files in .cache/gguf_bench")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help=f"skip llama.cpp's pure {FLOOR_TYPE} file (the activation-rounding floor)")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.fresh:
        args.redo_llamacpp = True
    known = {t for t, _ in LLAMA_TYPES}
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in known]
    if bad:
        ap.error(f"--sizes: unknown type(s) {', '.join(bad)} (use {', '.join(sorted(known))})")
    if args.reuse_rounding and args.method != args.measure_method:
        ap.error("--reuse-rounding quantizes with the measurement's roundings: --method must equal --measure-method")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    calib_txt = write_texts(default_calibration_files(), WORK / "calib.txt")
    eval_txt = write_texts(default_eval_files(), WORK / "eval.txt")
    # the saved F32 logits cover --eval-chunks chunks: one file per count, so a saved side never pairs with others
    ref, base = WORK / "ref-f32.gguf", WORK / f"kld-base-{args.eval_chunks}.bin"
    if args.sides == "bitalloc":
        found = saved_llama_side(args, ref, base)
        if found is None:
            ap.error("--sides bitalloc: no saved llama.cpp side (with its times) for these settings "
                     "(run with --sides both)")
        ref_ppl, llama, llama_timing = found[0], found[1], {**found[2], "timed_this_run": False}
    else:
        ref_ppl, llama, llama_timing = llama_side(args, ref, calib_txt, eval_txt, base)
    if args.sides != "llamacpp" and args.retime:
        llama, llama_timing = retime_llama(args, ref, calib_txt, llama, llama_timing)
    log.info("reference PPL %.4f", ref_ppl)
    floor = llama_floor(args, ref, eval_txt, base, ref_ppl) if args.floor else None
    shared: dict[str, Any] = {}

    def on_size(ours: dict[str, dict]) -> None:
        report(args, ref_ppl, os.path.getsize(ref), llama, ours, time.perf_counter() - t_start, floor,
               llama_timing=llama_timing, shared=shared)

    ours: dict[str, dict] = {}
    if args.sides != "llamacpp":
        ours = bitalloc_side(args, ref, {t: llama[t]["bytes"] for t in sizes}, base, eval_txt, on_size, shared)
    rows = report(args, ref_ppl, os.path.getsize(ref), llama, ours, time.perf_counter() - t_start, floor,
                  llama_timing=llama_timing, shared=shared)
    print_table(ref_ppl, args.eval_chunks, rows, floor)
    print_recovery(rows)
    print_sweep(add_times(rows, llama_timing, shared))
    return 0


if __name__ == "__main__":
    sys.exit(main())
