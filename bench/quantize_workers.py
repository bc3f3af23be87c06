"""The quantization's rounding in one process against worker processes (``Placement.workers``), same run, same
inputs (``python bench/quantize_workers.py [--threads 2] [--blocks K] [--workers N] [--repeats R]``).

On the rescaled SmolLM2 (comedies, 24 windows of 512 tokens), ``quantize_model`` rounds the model with GPTQ into a
mix of the 11 GGUF types (each tensor the next type in ``GGUF_FORMATS`` that stores its shape, cycling: every type
is used, as the GGUF bench's mixes use them), once with the library's default placement (one process,
``--threads`` torch threads) and once with ``--workers`` processes of ``threads / workers`` threads each (default:
what ``Placement.for_device`` chooses on this machine, as every command does), alternated ``--repeats`` times
(one process first).  ``--blocks K`` keeps the first K decoder blocks only.  Every stored tensor must be
identical to the last bit in every run (checked and recorded); the times are wall seconds of the whole
``quantize_model`` call (block forwards, Hessians, rounding, writing back) with each run's stage clocks.

Writes ``bench/results/quantize_workers[_<name>].json`` and ``.png`` and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.measure_workers import _digest, bench_setup, common_args  # noqa: E402
from bench.pareto import png_bytes  # noqa: E402
from bitalloc.formats import get_format  # noqa: E402
from bitalloc.placement import Placement  # noqa: E402
from bitalloc.quantize import quantize_model, quantizable_names, view_of  # noqa: E402
from bitalloc.targets.gguf import GGUF_FORMATS  # noqa: E402
from bitalloc.timing import StageTimer  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
log = logging.getLogger("quantize_workers")


def mixed_plan(model: torch.nn.Module) -> dict[str, str]:
    """Each quantizable tensor in the next GGUF type (cycling through ``GGUF_FORMATS``) that stores its shape."""
    plan: dict[str, str] = {}
    k = 0
    for name in quantizable_names(view_of(model)):
        shape = tuple(model.get_parameter(name).shape)
        for _ in range(len(GGUF_FORMATS)):
            fmt = get_format(GGUF_FORMATS[k % len(GGUF_FORMATS)])
            k += 1
            if fmt.supports(shape):
                plan[name] = fmt.id
                break
        else:
            raise SystemExit(f"no GGUF type stores {name} {shape}")
    return plan


def run(model: torch.nn.Module, calib: torch.Tensor, plan: dict[str, str], placement: Placement) -> dict:
    work = copy.deepcopy(model)
    timer = StageTimer()
    t0 = time.perf_counter()
    q = quantize_model(work, None, plan, calib, "gptq", progress=False, placement=placement, timer=timer)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(sorted((n, _digest(t)) for n, t in q.items())).encode()).hexdigest()
    return {"seconds": round(seconds, 2), "tensors": len(q), "sha256": digest, "stages": timer.as_dict(),
            "workers": placement.workers, "worker_threads": placement.worker_threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, "quantize")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternated (default 2)")
    args = ap.parse_args()
    model, calib, chosen, parallel = bench_setup(args)
    workers = parallel.workers
    plan = mixed_plan(model)
    runs: dict[str, list[dict]] = {"one": [], "workers": []}
    for r in range(args.repeats):
        for arm, place in (("one", Placement()), ("workers", parallel)):
            runs[arm].append(run(model, calib, plan, place))
            log.info("repeat %d, %s: %.1f s", r + 1, arm, runs[arm][-1]["seconds"])
    digests = {x["sha256"] for arm in runs.values() for x in arm}
    med = {arm: statistics.median(x["seconds"] for x in xs) for arm, xs in runs.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": "SmolLM2-135M-Instruct, rescaled" + (f", first {args.blocks} blocks" if args.blocks else ""),
        "threads": args.threads, "windows": args.windows, "repeats": args.repeats, "policy_workers": chosen.workers,
        "plan_formats": {f: sum(v == f for v in plan.values()) for f in GGUF_FORMATS},
        "one_process": runs["one"], "workers": runs["workers"], "median_seconds": med,
        "speedup": round(med["one"] / med["workers"], 3),
        "speedups_per_repeat": [round(a["seconds"] / b["seconds"], 3) for a, b in zip(runs["one"], runs["workers"])],
        "identical": len(digests) == 1,
    }
    suffix = f"_{args.name}" if args.name else ""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"quantize_workers{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    stages = ["quantize", "quantize.round", "calibrate.forward", "calibrate.hessians"]
    x = range(len(stages))
    for off, arm, label in ((-0.2, "one", "one process"), (0.2, "workers", f"{workers} workers")):
        ax.bar([i + off for i in x], [statistics.median(r["stages"].get(s, {}).get("seconds", 0) for r in runs[arm])
                                      for s in stages], 0.4, label=label)
    ax.set_xticks(list(x), stages, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("seconds (median over repeats)")
    ax.set_title(f"quantize_model (GPTQ, GGUF mix), {args.threads} threads: {result['speedup']:.2f}x, identical: "
                 f"{result['identical']}", fontsize=9)
    ax.legend(fontsize=7)
    (OUT / f"quantize_workers{suffix}.png").write_bytes(png_bytes(fig))
    print(f"{'run':<26}{'seconds':>10}{'round':>10}  sha256")
    for arm, xs in runs.items():
        for i, r in enumerate(xs):
            label = "one process" if arm == "one" else f"{workers} workers x {parallel.worker_threads} thr"
            print(f"{label + f' #{i + 1}':<26}{r['seconds']:>10.1f}"
                  f"{r['stages'].get('quantize.round', {}).get('seconds', 0):>10.1f}  {r['sha256'][:12]}")
    print(f"speedup (medians) {result['speedup']:.2f}x; per repeat {result['speedups_per_repeat']}; "
          f"identical bytes: {result['identical']}")


if __name__ == "__main__":
    main()
