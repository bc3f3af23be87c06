"""Pareto benchmark: allocated mixed precision vs the best uniform format at the same bytes, RTN and GPTQ.

On the function-preserving rescaled SmolLM2-135M-Instruct (weights off every Q4_1/Q8_0 grid), calibrated on
Shakespeare comedies and evaluated on the tragedies (context 512, second half of each window scored):

* one measurement (timed) of every tensor x candidate format per rounding method: the GPTQ points are
  allocated from GPTQ-measured errors and the RTN points from RTN-measured ones (``--measure-method
  per-method``, the default; ``rtn`` or ``gptq`` uses one table for both);
* for every budget (bpw over ALL weights, embedding and norms included): the allocated plan and the uniform
  formats that fit the same bytes (the two largest and the one with the least predicted error), each
  quantized with RTN and with GPTQ; the baseline is the fitting uniform format with the least MEASURED KLD;
* KLD / PPL / top-1 of every model against the fp reference, the ratio allocated KLD / uniform KLD (goal
  <= 0.7, never > 1), the time of each extra budget and the peak RSS.

Methods run one after the other (measure, then all of that method's points), so the first method's results
come early.  ``--cache DIR`` keeps each method's measurement table and every finished point: a rerun (or a
run after a kill) reuses them, and a run with extra ``--formats`` measures only the new formats and merges
them into the cached table (a format's errors do not depend on the others).  The cache is keyed by the
settings and the calibration tokens, not by bitalloc's code: pass ``--fresh`` after changing the code.

Writes bench/results/pareto.json and pareto.png and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import io
import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bitalloc.data import check_disjoint, default_calibration_files, default_eval_files, read_texts, token_windows
from bitalloc.models.rescale import load_reference
from bitalloc.models.view import ModelView
from bitalloc.budget import Budget
from bitalloc.measure import Measurement, write_text_atomic
from bitalloc.pipeline import make_plan, measure_model
from bitalloc.jobs.store import Job
from bitalloc.sweep import best_measured_uniform, format_table, plot, sweep
from bitalloc.jobs.sweep import save_point, saved_points

RESULTS = Path(__file__).resolve().parent / "results"
# 15 candidates: fine groups where bits are few, coarse where they are many, and one scale per row for 2 and
# 3 bits (the cheapest ways to store a tensor: what lets a tight budget protect the sensitive tensors)
FORMATS = ("int2-row,int2-g32,int2-g64,int2-g128,int3-row,int3-g32,int3-g64,int3-g128,int4-g32,int4-g64,"
           "int4-g128,int5-g64,int5-g128,int6-g128,int8-g128")


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.numpy().tobytes() if isinstance(p, torch.Tensor) else repr(p).encode())
    return h.hexdigest()[:16]


def cached_measurement(cache: Path | None, key: str, formats: list[str], measure) -> tuple[Measurement, list]:
    """The table of ``formats``: from the cache, measuring (``measure(missing_formats)``) only what it lacks.

    Returns the table and the timed measurement runs behind it ([{formats, seconds, threads}])."""
    path = None if cache is None else cache / f"measure-{key}.json"
    times_path = None if cache is None else cache / f"measure-{key}.seconds.json"
    table = Measurement.load(path) if path is not None and path.exists() else None
    runs = json.loads(times_path.read_text()) if times_path is not None and times_path.exists() else []
    missing = formats if table is None else [f for f in formats if f not in table.formats()]
    if missing:
        t0 = time.perf_counter()
        new = measure(missing)
        runs.append({"formats": missing, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()})
        table = new if table is None else table.merge(new)
        if path is not None:
            table.save(path)
            write_text_atomic(times_path, json.dumps(runs, indent=1) + "\n")
    return table.subset(formats), runs


def bench_inputs(ctx: int, calib_windows: int, eval_windows: int) -> tuple:
    """``(model, tokenizer, reference, view, calib, evals)`` of the Pareto-style benches: the rescaled SmolLM2, an
    untouched copy as the reference, comedies for calibration and tragedies (disjoint) for evaluation."""
    model, tok = load_reference(rescaled=True)
    reference = copy.deepcopy(model)
    view = ModelView(model)
    check_disjoint(default_calibration_files(), default_eval_files())
    calib = token_windows(tok, read_texts(default_calibration_files()), ctx, calib_windows)
    evals = token_windows(tok, read_texts(default_eval_files()), ctx, eval_windows)
    return model, tok, reference, view, calib, evals


def block_linears(blocks: list[int], ctx: int, calib_windows: int):
    """``(name, weight (float32), stats)`` of every linear of ``blocks`` of the rescaled SmolLM2, its statistics
    calibrated on the comedies as :func:`bench_inputs` does (the fp model's block inputs)."""
    from bitalloc.calibrate.stream import stream_blocks

    model, _tok, _ref, view, calib, _evals = bench_inputs(ctx, calib_windows, 1)
    for b, block in enumerate(stream_blocks(model, view, calib, progress=False)):
        if b in blocks:
            for name, stats in block.items():
                if stats.hessian is not None:
                    yield name, model.get_parameter(name).detach().to(torch.float32), stats
        if b >= max(blocks):
            break


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """``fig`` laid out, rendered as PNG bytes without matplotlib's version stamp, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2.5bpw,3bpw,3.5bpw,4bpw,4.5bpw")
    ap.add_argument("--methods", default="gptq,rtn")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--measure-method", choices=("per-method", "rtn", "gptq"), default="per-method",
                    help="rounding of the measured errors: each method's own (default), or one for both")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--cache", default=str(RESULTS.parent.parent / ".cache" / "pareto"),
                    help="directory for measurement tables and finished points ('' = none)")
    ap.add_argument("--fresh", action="store_true", help="ignore (and replace) what the cache holds")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="pareto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)

    t_start = time.perf_counter()
    model, tok, reference, view, calib, evals = bench_inputs(args.ctx, args.calib_windows, args.eval_windows)
    formats = [f for f in args.formats.split(",") if f]
    budgets = [b for b in args.budgets.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]

    measure_with = {mt: (mt if args.measure_method == "per-method" else args.measure_method) for mt in methods}
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        if args.fresh:
            for f in cache.glob("measure-*.json"):
                f.unlink()
            for d in cache.glob("points-*"):
                shutil.rmtree(d)
    settings = ("rescaled SmolLM2 seed 0 sigma 0.1", args.ctx, args.fisher_windows)
    tables, runs, points = {}, {}, []
    for method in methods:
        mm = measure_with[method]
        if mm not in tables:
            def measure(fmts: list[str], mm: str = mm) -> Measurement:
                return measure_model(model, view, calib, fmts, mm, True, fisher_windows=calib[: args.fisher_windows])
            tables[mm], runs[mm] = cached_measurement(cache, digest(settings, mm, calib), formats, measure)
        table = tables[mm]
        key = digest(settings, method, table.to_json(), budgets, calib, evals)
        with contextlib.ExitStack() as stack:  # finished points: checkpoints of a job in the cache
            job = None if cache is None else stack.enter_context(Job(cache / f"points-{key}", {"points": key}))
            points += sweep(model, view, {method: table}, budgets, [method], calib, evals, reference,
                            done=None if job is None else saved_points(job),
                            on_point=None if job is None else functools.partial(save_point, job))
    t_measure = {mm: sum(r["seconds"] for r in rs) for mm, rs in runs.items()}
    m = next(iter(tables.values()))
    alloc_seconds = {}
    for b in budgets:
        t1 = time.perf_counter()
        make_plan(m, b)
        alloc_seconds[b] = time.perf_counter() - t1

    rows = []
    for method in methods:
        for b in budgets:
            a = next(p for p in points if p.kind == "allocated" and p.budget == b and p.method == method)
            u = best_measured_uniform(points, Budget.parse(b).resolve(m.total_params), method)
            rows.append({"budget": b, "method": method, "uniform_format": u.label,
                         "allocated_bytes": a.bytes, "uniform_bytes": u.bytes,
                         "allocated_kld": a.kld, "uniform_kld": u.kld, "kld_ratio": a.kld / u.kld,
                         "allocated_ppl": a.ppl, "uniform_ppl": u.ppl,
                         "allocated_top1": a.top1, "uniform_top1": u.top1,
                         "extra_budget_seconds": alloc_seconds[b] + a.seconds})
    result = {
        "model": "SmolLM2-135M-Instruct, rescaled (seed 0, sigma 0.1)",
        "calibration": "comedies", "evaluation": "tragedies", "ctx": args.ctx,
        "calib_windows": int(calib.shape[0]), "fisher_windows": args.fisher_windows,
        "eval_windows": int(evals.shape[0]), "eval_tokens": int(evals.shape[0] * (args.ctx - 1 - args.ctx // 2)),
        "formats": formats, "measure_method": measure_with, "objective": m.objectives[0],
        "total_params": m.total_params, "fixed_bytes": m.fixed_bytes,
        "measure_seconds": t_measure, "measure_runs": runs, "allocate_seconds": alloc_seconds,
        "note": "extra_budget_seconds = allocate + quantize + evaluate of one more budget (quantize and evaluate "
                "dominate); the measurement (one per rounding method, measure_seconds) is one-off; measure_runs lists "
                "the timed runs behind each table (more than one when formats were added to a cached table; "
                "each run repeats the Fisher pass)",
        "peak_rss_mib": peak_rss_mib(), "total_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
        "comparison": rows, "points": [asdict(p) for p in points],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(points, out / f"{args.name}.png", "rescaled SmolLM2-135M: allocated vs best uniform (KLD, tragedies)")

    print(format_table(points))
    print()
    print(f"{'budget':<8} {'method':<6} {'uniform':<12} {'alloc KLD':>10} {'unif KLD':>10} {'ratio':>7} {'s/budget':>9}")
    for r in rows:
        print(f"{r['budget']:<8} {r['method']:<6} {r['uniform_format']:<12} {r['allocated_kld']:>10.5f} "
              f"{r['uniform_kld']:>10.5f} {r['kld_ratio']:>7.3f} {r['extra_budget_seconds']:>9.1f}")
    took = ", ".join(f"{k} {v:.0f} s" for k, v in t_measure.items())
    print(f"measurement ({took}); peak RSS {peak_rss_mib():.0f} MiB; "
          f"total {time.perf_counter() - t_start:.0f} s -> {out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
