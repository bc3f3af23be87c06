"""The measurement in one process against worker processes (``Placement.workers``), same run, same inputs
(``python bench/measure_workers.py [--threads 2] [--blocks K] [--workers N]``).

On the rescaled SmolLM2 (comedies, 24 windows of 512 tokens, the 11 GGUF types: what the GGUF bench measures),
``measure_model`` runs twice: with the library's default placement (one process, ``--threads`` torch threads)
and with ``--workers`` processes of ``threads / workers`` threads each (default: what ``Placement.for_device``
chooses on this machine, as every command does).  ``--blocks K`` measures the first K decoder blocks only (the
model cut there, its head kept), for a shorter run.  Both tables and every kept rounding must be identical to the
last bit (checked and recorded); the times are wall seconds of the whole ``measure_model`` call, the Fisher pass and
calibration forwards included, with each run's stage clocks (the workers' are summed over workers).

Writes ``bench/results/measure_workers[_<name>].json`` and ``.png`` and prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.pareto import bench_inputs, png_bytes  # noqa: E402
from bitalloc.formats import QTensor  # noqa: E402
from bitalloc.pipeline import measure_model  # noqa: E402
from bitalloc.placement import Placement  # noqa: E402
from bitalloc.targets.gguf import GGUF_FORMATS  # noqa: E402
from bitalloc.timing import StageTimer  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
log = logging.getLogger("measure_workers")


def _digest(q: QTensor) -> str:
    h = hashlib.sha256(repr((q.format, tuple(q.shape), q.dtype)).encode())
    for k in sorted(q.parts):
        h.update(k.encode())
        h.update(q.parts[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cut(model: torch.nn.Module, blocks: int | None) -> None:
    """Keep the first ``blocks`` decoder blocks (the head and embedding stay)."""
    if blocks is None:
        return
    layers = model.model.layers
    if not 1 <= blocks <= len(layers):
        raise SystemExit(f"--blocks must be in 1..{len(layers)}")
    model.model.layers = torch.nn.ModuleList(list(layers)[:blocks])
    model.config.num_hidden_layers = blocks


def common_args(ap: argparse.ArgumentParser, what: str) -> None:
    """The options every workers bench takes (``what``: its verb in the help of ``--blocks``)."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=None, help=f"{what} the first K decoder blocks only")
    ap.add_argument("--workers", type=int, default=None, help="default: Placement.for_device's choice")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--name", default="")


def bench_setup(args: argparse.Namespace) -> tuple:
    """``(model, calib, chosen, parallel)`` of a workers bench: threads set, the rescaled SmolLM2 cut to
    ``args.blocks``, comedies in ``args.windows`` windows, ``Placement.for_device``'s choice, and the placement of
    ``args.workers`` (default: that choice) processes sharing ``args.threads``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, _tok, _ref, _view, calib, _evals = bench_inputs(512, args.windows, 1)
    _cut(model, args.blocks)
    chosen = Placement.for_device("cpu", model=model)
    workers = chosen.workers if args.workers is None else args.workers
    if workers < 2:
        raise SystemExit(f"Placement.for_device chose {workers} worker on {args.threads} threads: nothing to compare "
                         "(give --workers N)")
    return model, calib, chosen, Placement(workers=workers, worker_threads=max(1, args.threads // workers))


def run(model, calib, placement: Placement, fisher_windows: int) -> dict:
    kept: dict[str, str] = {}

    def on_rounded(_b: int, got: dict) -> None:
        kept.update({f"{t}/{f}": _digest(q) for (t, f), q in got.items()})

    timer = StageTimer()
    t0 = time.perf_counter()
    m = measure_model(model, None, calib, list(GGUF_FORMATS), "gptq", True, False,
                      fisher_windows=calib[:fisher_windows], placement=placement, timer=timer,
                      on_rounded=on_rounded)
    seconds = time.perf_counter() - t0
    table = hashlib.sha256(json.dumps([list(r.__dict__.values()) for r in m.rows]).encode()).hexdigest()
    return {"seconds": round(seconds, 2), "rows": len(m.rows), "table_sha256": table,
            "roundings_sha256": hashlib.sha256(json.dumps(sorted(kept.items())).encode()).hexdigest(),
            "roundings": len(kept), "stages": timer.as_dict(), "workers": placement.workers,
            "worker_threads": placement.worker_threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, "measure")
    ap.add_argument("--fisher-windows", type=int, default=8)
    args = ap.parse_args()
    model, calib, chosen, parallel = bench_setup(args)
    workers = parallel.workers
    one = run(model, calib, Placement(), args.fisher_windows)
    log.info("one process: %.1f s", one["seconds"])
    many = run(model, calib, parallel, args.fisher_windows)
    log.info("%d workers: %.1f s", workers, many["seconds"])
    same = {k: one[k] == many[k] for k in ("rows", "table_sha256", "roundings_sha256", "roundings")}
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": "SmolLM2-135M-Instruct, rescaled" + (f", first {args.blocks} blocks" if args.blocks else ""),
        "threads": args.threads, "windows": args.windows, "formats": list(GGUF_FORMATS),
        "policy_workers": chosen.workers, "one_process": one, "workers": many,
        "speedup": round(one["seconds"] / many["seconds"], 3), "identical": same, "all_identical": all(same.values()),
    }
    suffix = f"_{args.name}" if args.name else ""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"measure_workers{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    stages = [s for s in ("calibrate.forward", "fisher", "measure.fit", "measure.gptq", "measure.refit",
                          "measure.errors") if s in one["stages"]]
    x = range(len(stages) + 1)
    ax.bar([i - 0.2 for i in x], [one["seconds"]] + [one["stages"][s]["seconds"] for s in stages], 0.4,
           label="one process")
    ax.bar([i + 0.2 for i in x], [many["seconds"]] + [many["stages"].get(s, {}).get("seconds", 0) for s in stages],
           0.4, label=f"{workers} workers (stage clocks summed over workers)")
    ax.set_xticks(list(x), ["wall"] + stages, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(f"measure_model, {args.threads} threads: {result['speedup']:.2f}x, identical: "
                 f"{result['all_identical']}", fontsize=9)
    ax.legend(fontsize=7)
    (OUT / f"measure_workers{suffix}.png").write_bytes(png_bytes(fig))
    print(f"{'run':<22}{'seconds':>10}{'rows':>7}  table")
    print(f"{'one process':<22}{one['seconds']:>10.1f}{one['rows']:>7}  {one['table_sha256'][:12]}")
    print(f"{f'{workers} workers x {parallel.worker_threads} thr':<22}{many['seconds']:>10.1f}{many['rows']:>7}  "
          f"{many['table_sha256'][:12]}")
    print(f"speedup {result['speedup']:.2f}x; identical tables and roundings: {result['all_identical']}")


if __name__ == "__main__":
    main()
