"""Any-size benchmark: one nested artifact vs a model quantized for each budget, the best uniform format and a
BitStack-style stack, at 2.5 .. 6 bpw over ALL weights (bitalloc's count: embedding and norms included).

On the rescaled SmolLM2-135M-Instruct (as bench/pareto.py: calibration = comedies, evaluation = tragedies,
context 512, KLD against the fp reference), per budget:

* **direct**: one GPTQ measurement over the default candidate formats, then plan + GPTQ-quantize + evaluate
  (bitalloc.sweep.run_point); the measurement is shared with bench/pareto.py when ``--cache`` is its cache;
* **uniform**: the fitting uniform formats (bitalloc.pipeline.fitting_uniforms), GPTQ, the best by measured KLD;
* **nested**: ONE artifact written by ``bitalloc.nest.nest_model`` (timed once), each budget extracted from it
  (timed) and loaded with ``bitalloc.load``; its size on disk against the largest extracted model (goal <= 1.15);
* **bitstack**: bench/bitstack.py, the largest prefix of its sorted stack that fits the budget's exact bytes
  (``--bitstack-blocks`` 8 per weight, rank 16, embedding/lm_head decomposed too: ``--bitstack-embedding fp16``
  is the paper's choice, which cannot fit 2.5 or 3 bpw of SmolLM2).  The paper's perplexity sort costs one
  forward of ``--bitstack-sort-windows`` windows per weight (211) and level, only for the levels the largest
  budget reaches (about 3 at 6 bpw: ~600 forwards); ``--bitstack-sort proxy`` is the cheap substitute.

Goals printed per budget: nested KLD / direct KLD <= 1.15, nested KLD < best uniform KLD.  ``--cache DIR``
keeps every finished point (and the measurement, the artifact, BitStack's sort scores): a rerun resumes.
The cache is keyed by the settings and tokens, not by the code: pass ``--fresh`` after changing the code.
Writes bench/results/anysize.json and anysize.png and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/anysize.py` finds bench.*
from bench import bitstack as bs  # noqa: E402
from bench.anysize_report import comparison, plot_png, table  # noqa: E402
from bench.pareto import bench_inputs, cached_measurement, digest, peak_rss_mib  # noqa: E402
from bitalloc.budget import Budget  # noqa: E402
from bitalloc.errors import BudgetError  # noqa: E402
from bitalloc.cli.common import DEFAULT_FORMATS  # noqa: E402
from bitalloc.evaluate import evaluate  # noqa: E402
from bitalloc.io.atomic import atomic_write  # noqa: E402
from bitalloc.jobs.store import Job  # noqa: E402
from bitalloc.jobs.sweep import save_point, saved_points  # noqa: E402
from bitalloc.measure import Measurement  # noqa: E402
from bitalloc.models.view import ModelView  # noqa: E402
from bitalloc.pipeline import CachedReference, fitting_uniforms, make_plan, measure_model  # noqa: E402
from bitalloc.quantize import restore, snapshot  # noqa: E402
from bitalloc.sweep import Point, format_table, run_point  # noqa: E402

log = logging.getLogger("bench.anysize")
RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = "2.5bpw,3bpw,3.5bpw,4bpw,5bpw,6bpw"


# ---------------------------------------------------------------- the nested API (adapt here if it changes)
@dataclass
class Nested:
    model: Any  # the dequantized transformers model
    bytes: int  # stored bytes of the extracted model (all weights)
    extract_seconds: float
    load_seconds: float


def build_nested(model: torch.nn.Module, view: ModelView, calib: torch.Tensor, out_dir: Path,
                 fisher_windows: int, nest: dict) -> None:
    from bitalloc.nest import nest_model

    nest_model(model, view, calib, out_dir, fisher_windows=calib[:fisher_windows], progress=True, **nest)


def load_nested(out_dir: Path, budget: str) -> Nested:
    import bitalloc
    from bitalloc.nest import extract

    t0 = time.perf_counter()
    ex = extract(out_dir, budget)
    t1 = time.perf_counter()
    model = bitalloc.load(out_dir, budget=budget)
    return Nested(model, int(ex.plan.total_bytes), t1 - t0, time.perf_counter() - t1)


def largest_nested_bytes(out_dir: Path) -> int:
    """Bytes of the largest model the artifact holds (every tensor at its deepest depth)."""
    from bitalloc.nest import extract

    return int(extract(out_dir, "32bpw").plan.total_bytes)


# ----------------------------------------------------------------------------------------------- helpers
def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def pkey(kind: str, label: str, budget: str, tag: str) -> str:
    """The cache key of a finished point (``tag``: the digest of what the point depends on)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{kind}_{label}_{budget}_{tag}")[:128]


def point(kind: str, budget: str, label: str, nbytes: int, total_params: int, r: Any, seconds: float) -> Point:
    return Point(kind, budget, kind, label, nbytes, 8.0 * nbytes / total_params, math.nan, r.ppl, r.ref_ppl,
                 r.kld, r.top1, seconds)


class Cache:
    """Finished points and small JSON items in a Job (or nowhere without ``--cache``)."""

    def __init__(self, job: Job | None) -> None:
        self.job = job
        self.points = {} if job is None else saved_points(job)
        self.items: dict[tuple[str, str], Any] = {}

    def point(self, key: str, compute: Any) -> Point:
        if key in self.points:
            log.info("%s: saved point reused", key)
            return self.points[key]
        pt = compute()
        log.info("%s: %d B, %.3f bpw, kld %.5f", key, pt.bytes, pt.bpw, pt.kld)
        if self.job is not None:
            save_point(self.job, key, pt)
        self.points[key] = pt
        return pt

    def has(self, stage: str, key: str) -> bool:
        return (stage, key) in self.items or (self.job is not None and self.job.has_item(stage, key))

    def item(self, stage: str, key: str, compute: Any) -> Any:
        """The JSON value saved under (stage, key), else ``compute()`` (saved)."""
        if (stage, key) not in self.items:
            if self.job is not None and self.job.has_item(stage, key):
                self.items[stage, key] = json.loads(self.job.load_item(stage, key)["json"])
            else:
                self.items[stage, key] = compute()
                if self.job is not None:
                    self.job.save_item(stage, key, {"json": json.dumps(self.items[stage, key])})
        return self.items[stage, key]


# ------------------------------------------------------------------------------------------------ parts
def run_quantized(args: argparse.Namespace, ctx: dict, cache: Cache, table: Measurement) -> list[Point]:
    """(a) bitalloc's plan per budget and (b) the fitting uniform formats, each GPTQ-quantized and evaluated."""
    model, view, saved = ctx["model"], ctx["view"], ctx["saved"]
    tkey = digest(table.to_json())
    points, seen = [], set()
    for b in ctx["budgets"]:
        plans = [] if args.skip_direct else [("allocated", make_plan(table, b))]
        if not args.skip_uniform:
            for p in fitting_uniforms(table, b):
                if p.entries[0].format not in seen:
                    seen.add(p.entries[0].format)
                    plans.append(("uniform", p))
        for kind, plan in plans:
            label = "allocated" if kind == "allocated" else plan.entries[0].format
            points.append(cache.point(pkey(kind, label, b, tkey), lambda kind=kind, plan=plan: run_point(
                model, view, saved, plan, kind, b, "gptq", ctx["calib"], ctx["evals"], ctx["ref"], progress=True)))
    restore(model, saved)
    return points


def run_bitstack(args: argparse.Namespace, ctx: dict, cache: Cache) -> tuple[list[Point], dict]:
    """(d) the BitStack-style stack: decompose, sort (levels the largest budget reaches), one prefix per budget."""
    model, view, saved, total = ctx["model"], ctx["view"], ctx["saved"], ctx["total_params"]
    settings = {"blocks": args.bitstack_blocks, "rank": args.bitstack_rank, "sort": args.bitstack_sort,
                "sort_windows": args.bitstack_sort_windows, "embedding": args.bitstack_embedding}
    key = "bitstack_" + digest(settings)
    keys = {b: pkey("bitstack", "bitstack", b, key) for b in ctx["budgets"]}
    info: dict = {"settings": settings}
    nofit = {b: f"{key}_nofit_{b.replace('.', '_')}" for b in ctx["budgets"]}  # budgets below the base model
    if all(keys[b] in cache.points or cache.has("bitstack", nofit[b]) for b in ctx["budgets"]):
        info.update(cache.item("bitstack", key, lambda: {}))
        log.info("BitStack: every point saved, nothing decomposed")
        return [cache.points[keys[b]] for b in ctx["budgets"] if keys[b] in cache.points], info
    restore(model, saved)
    t0 = time.perf_counter()
    stacks = bs.decompose_model(view, ctx["calib"], args.bitstack_blocks, args.bitstack_rank, args.bitstack_embedding)
    info["decompose_seconds"] = time.perf_counter() - t0
    other = bs.other_bytes(view, args.bitstack_embedding)
    top = max(ctx["budget_bytes"].values())
    levels = next((k for k in range(1, args.bitstack_blocks + 1)
                   if other + sum(s.nbytes(k) for s in stacks.values()) >= top), args.bitstack_blocks)
    proxy = bs.proxy_scores(stacks)
    ppl = bs.ppl_scores(view, stacks, ctx["calib"][: args.bitstack_sort_windows], progress=log.debug)

    def score(k: int, names: Any) -> dict:
        if args.bitstack_sort == "proxy" or k > levels:
            return proxy(k, names)
        log.info("BitStack sort: level %d of %d, %d perplexities", k, levels, len(names))
        return cache.item("bitstack", f"{key}_level{k}", lambda: ppl(k, names))

    t0 = time.perf_counter()
    order = bs.global_order(stacks, score)
    restore(model, saved)
    info.update(sort_seconds=time.perf_counter() - t0, levels_sorted_by_ppl=levels if args.bitstack_sort == "ppl" else 0,
                base_bytes=bs.base_bytes(stacks, other), other_bytes=other, stack_entries=len(order),
                block_bytes={n: s.blocks[0].nbytes for n, s in stacks.items()})
    cache.item("bitstack", key, lambda: {k: v for k, v in info.items() if k != "settings"})
    points = []
    for b in ctx["budgets"]:
        def compute(b: str = b) -> Point:
            t1 = time.perf_counter()
            sel = bs.select(stacks, order, other, ctx["budget_bytes"][b])
            for n, w in bs.assemble(stacks, sel.counts).items():
                view.set_weight(n, w)
            r = evaluate(model, ctx["ref"], ctx["evals"])
            restore(model, saved)
            return point("bitstack", b, f"bitstack-{sel.prefix}", sel.bytes, total, r, time.perf_counter() - t1)
        try:
            points.append(cache.point(keys[b], compute))
        except BudgetError as e:
            log.warning("BitStack at %s: %s", b, e)
            cache.item("bitstack", nofit[b], lambda e=e: str(e))
    return points, info


def run_nested(args: argparse.Namespace, ctx: dict, cache: Cache, cache_dir: Path | None) -> tuple[list[Point], dict]:
    """(c) one artifact, every budget extracted from it."""
    model, view, saved = ctx["model"], ctx["view"], ctx["saved"]
    NEST = {"group": args.nest_group, "max_bits": args.nest_bits, "outliers": args.nest_outliers,
            "passes": args.nest_passes, "refit": args.nest_refit}
    # what the cache key must also tell apart (settings of the code, not options): the depths' emphasis and how the
    # lattice is chosen (range scored with the refit depths free, then fit to the codes; older artifacts are cached
    # under keys without these)
    key = {**NEST, "emphasis": importlib.import_module("bitalloc.nest.descent").DEPTH_EMPHASIS,
           "lattice": "free refit depths, fit"}
    tag = digest(key, ctx["key"])
    art = (cache_dir if cache_dir is not None else Path(args.out)) / f"nest-{tag}"
    if cache.job is None or not cache.job.has_item("nest", f"info-{tag}") or not art.exists():
        shutil.rmtree(art, ignore_errors=True)
        restore(model, saved)
        t0 = time.perf_counter()
        build_nested(model, view, ctx["calib"], art, args.fisher_windows, NEST)
        seconds = time.perf_counter() - t0
        restore(model, saved)
        if cache.job is not None:
            cache.job.save_item("nest", f"info-{tag}", {"json": json.dumps({"seconds": seconds})})
    else:
        seconds = json.loads(cache.job.load_item("nest", f"info-{tag}")["json"])["seconds"]
    info: dict = {"nest_seconds": seconds, "artifact_bytes": dir_bytes(art), "artifact": str(art), "extract": {}}
    points = []
    for b in ctx["budgets"]:
        def compute(b: str = b) -> Point:
            t0 = time.perf_counter()
            nm = load_nested(art, b)
            r = evaluate(nm.model, ctx["ref"], ctx["evals"])
            cache.item("nest_extract", f"{b.replace('.', '_')}-{tag}", lambda: {"extract_seconds": nm.extract_seconds,
                                                                     "load_seconds": nm.load_seconds})
            return point("nested", b, "nested", nm.bytes, ctx["total_params"], r, time.perf_counter() - t0)
        try:
            points.append(cache.point(pkey("nested", "nested", b, tag), compute))
        except BudgetError as e:  # below the artifact's smallest model (int2 at its group everywhere)
            log.warning("nested at %s: %s", b, e)
            continue
        info["extract"][b] = cache.item("nest_extract", f"{b.replace('.', '_')}-{tag}", lambda: {})
    info["largest_model_bytes"] = cache.item("nest", f"largest-{tag}", lambda: largest_nested_bytes(art))
    info["artifact_ratio"] = info["artifact_bytes"] / info["largest_model_bytes"]
    info["largest_budget_model_bytes"] = max(p.bytes for p in points)
    info["artifact_over_largest_budget"] = info["artifact_bytes"] / info["largest_budget_model_bytes"]
    return points, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default=BUDGETS)
    ap.add_argument("--windows", type=int, default=32, help="calibration windows (comedies)")
    ap.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (tragedies)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help="candidate formats of the direct/uniform points")
    ap.add_argument("--cache", default=str(RESULTS.parent.parent / ".cache" / "anysize"),
                    help="directory for the measurement, the artifact and finished points ('' = none)")
    ap.add_argument("--fresh", action="store_true", help="ignore (and replace) what the cache holds")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="anysize")
    for part in ("direct", "uniform", "nest", "bitstack"):
        ap.add_argument(f"--skip-{part}", action="store_true")
    ap.add_argument("--nest-group", type=int, default=128, help="columns per scale of the artifact (default 128: "
                    "int2-g128 reaches 2.5 bpw, int2-g64 does not)")
    ap.add_argument("--nest-bits", type=int, default=6, help="the artifact's deepest depth (default 6)")
    ap.add_argument("--nest-outliers", type=int, default=0, help="elements per row stored exactly (default 0)")
    ap.add_argument("--nest-passes", type=int, default=None,
                    help="sweeps of coordinate descent after the joint rounding (default: bitalloc nest's)")
    ap.add_argument("--nest-refit", type=int, default=None,
                    help="shallowest depths with their own scale and zero (default: bitalloc nest's for the group)")
    ap.add_argument("--bitstack-blocks", type=int, default=8, help="residual blocks per weight (paper: 16)")
    ap.add_argument("--bitstack-rank", type=int, default=bs.RANK)
    ap.add_argument("--bitstack-sort", choices=("ppl", "proxy"), default="ppl",
                    help="ppl: the paper's calibration-perplexity sort; proxy: residual fall per byte (cheap)")
    ap.add_argument("--bitstack-sort-windows", type=int, default=4)
    ap.add_argument("--bitstack-embedding", choices=("stack", "fp16"), default="stack")
    args = ap.parse_args(argv)
    if not args.skip_nest:  # fail before the long parts
        try:
            importlib.import_module("bitalloc.nest")
        except ImportError as e:
            ap.error(f"the nested API is not available ({e}); pass --skip-nest")
        if args.nest_passes is None:
            args.nest_passes = importlib.import_module("bitalloc.nest.codes").DESCENT_PASSES
        if args.nest_refit is None:
            args.nest_refit = importlib.import_module("bitalloc.nest.refit").default_refit(args.nest_group,
                                                                                            args.nest_bits)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    t_start = time.perf_counter()

    model, tok, reference, view, calib, evals = bench_inputs(args.ctx, args.windows, args.eval_windows)
    budgets = [b for b in args.budgets.split(",") if b]
    formats = [f for f in args.formats.split(",") if f]
    total = view.total_params
    settings = ("rescaled SmolLM2 seed 0 sigma 0.1", args.ctx, args.fisher_windows)  # as bench/pareto.py
    ctx = {"model": model, "view": view, "saved": snapshot(model), "calib": calib, "evals": evals,
           "ref": CachedReference(reference), "budgets": budgets, "total_params": total,
           "budget_bytes": {b: Budget.parse(b).resolve(total) for b in budgets}, "key": digest(settings, calib, evals)}
    cache_dir = Path(args.cache) if args.cache else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if args.fresh:
            for p in [*cache_dir.glob("measure-*.json"), *cache_dir.glob("points-*"), *cache_dir.glob("nest-*")]:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    points: list[Point] = []
    result: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        job = None if cache_dir is None else stack.enter_context(
            Job(cache_dir / f"points-{ctx['key']}", {"anysize": ctx["key"]}))
        cache = Cache(job)
        nest: dict = {}
        if not args.skip_nest:  # first: the artifact's points come before the long direct/uniform ones
            nested, nest = run_nested(args, ctx, cache, cache_dir)
            points += nested
        if not (args.skip_direct and args.skip_uniform):
            def measure(fmts: list[str]) -> Measurement:
                return measure_model(model, view, calib, fmts, "gptq", True, fisher_windows=calib[: args.fisher_windows])
            table_, runs = cached_measurement(cache_dir, digest(settings, "gptq", calib), formats, measure)
            result.update(measure_seconds=sum(r["seconds"] for r in runs), measure_runs=runs)
            points += run_quantized(args, ctx, cache, table_)
        if not args.skip_bitstack:
            stacked, result["bitstack"] = run_bitstack(args, ctx, cache)
            points += stacked
    rows = comparison(points, budgets, ctx["budget_bytes"], nest)
    result = {
        "model": "SmolLM2-135M-Instruct, rescaled (seed 0, sigma 0.1)", "calibration": "comedies",
        "evaluation": "tragedies", "ctx": args.ctx, "calib_windows": int(calib.shape[0]),
        "eval_windows": int(evals.shape[0]), "formats": formats, "method": "gptq", "total_params": total,
        "nest": {"group": args.nest_group, "max_bits": args.nest_bits, "outliers": args.nest_outliers,
                 "passes": args.nest_passes, "refit": args.nest_refit, **nest},
        **result,
        "bitstack_variant": ("activation-aware scaling (per-channel L2 norm over tokens, mean over windows; fp16 "
                             "vector stored per weight), iterative absolute-value decomposition (packed signs + "
                             f"rank-{args.bitstack_rank} fp16 SVD factors of |residual|, {args.bitstack_blocks} blocks), "
                             "universal level-by-level sort "
                             + ("by calibration perplexity (the paper's)" if args.bitstack_sort == "ppl" else
                                "by the residual fall per byte (a cheaper substitute for the paper's perplexity)")
                             + f"; embedding/lm_head: {args.bitstack_embedding}"),
        "goals": "nested_over_direct <= 1.15 and nested_beats_uniform at every budget; artifact_ratio (artifact on disk / its largest model) <= 1.15",
        "peak_rss_mib": peak_rss_mib(), "total_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(), "comparison": rows, "points": [asdict(p) for p in points],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{args.name}.json", overwrite=True) as fh:
        fh.write((json.dumps(result, indent=1) + "\n").encode())
    with atomic_write(out / f"{args.name}.png", overwrite=True) as fh:
        fh.write(plot_png(points, total, "rescaled SmolLM2-135M: one artifact, any size (KLD, tragedies)"))
    print(format_table(points))
    print()
    print(table(rows, nest))
    print(f"peak RSS {peak_rss_mib():.0f} MiB; total {time.perf_counter() - t_start:.0f} s -> "
          f"{out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
