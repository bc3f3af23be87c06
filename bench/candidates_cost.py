"""What a candidate list costs to measure: ``measure_tensor`` time of two lists on one decoder block's shapes
(``python bench/candidates_cost.py [--threads 2] [--repeats 2]``).

By default the lists are bitalloc's default candidates before and after the double-scale ``-dq`` formats joined
them (``bitalloc.cli.common.PREVIOUS_DEFAULT_FORMATS`` / ``DEFAULT_FORMATS``); ``--before``/``--after`` take
any two.  The tensors are SmolLM2-135M's seven linears of one block (q and o 576x576, k and v 192x576, gate and
up 1536x576, down 576x1536) with random weights and the realistic Hessians, Fisher weights and activation noise
of ``bench/measure_speed.py``; each list runs ``--repeats`` times, alternating, and the fastest of each is kept.
Measurement is the part of a job whose time grows with the candidates (calibration forwards do not), so the
ratio after/before is what adding formats costs; what they gain is in ``bench/pareto_formats.py``.  Other
processes on the machine move absolute times: read the ratio.

Writes ``bench/results/candidates_cost.json`` and ``.png`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_speed import tensor_and_stats  # noqa: E402

from bitalloc.cli.common import DEFAULT_FORMATS, PREVIOUS_DEFAULT_FORMATS  # noqa: E402
from bitalloc.formats import FormatError, get_format  # noqa: E402
from bitalloc.measure import measure_tensor  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
#: one SmolLM2-135M decoder block: (name, rows, cols)
BLOCK = (("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576), ("gate", 1536, 576),
         ("up", 1536, 576), ("down", 576, 1536))
log = logging.getLogger("candidates_cost")


def time_lists(lists: dict[str, list[str]], repeats: int) -> dict[str, dict[str, float]]:
    """Fastest ``measure_tensor`` seconds of every list on every tensor of :data:`BLOCK` ({list: {tensor: s}})."""
    out: dict[str, dict[str, float]] = {k: {} for k in lists}
    for i, (name, rows, cols) in enumerate(BLOCK):
        w, st = tensor_and_stats(rows, cols, i, torch.device("cpu"))
        for _ in range(repeats):
            for k, fmts in lists.items():
                t0 = time.perf_counter()
                measure_tensor(name, w, st, fmts)
                dt = time.perf_counter() - t0
                out[k][name] = min(dt, out[k].get(name, float("inf")))
        log.info("%s %dx%d: %s", name, rows, cols, ", ".join(f"{k} {v[name]:.2f} s" for k, v in out.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=PREVIOUS_DEFAULT_FORMATS, help="first list (default: the previous defaults)")
    ap.add_argument("--after", default=DEFAULT_FORMATS, help="second list (default: the current defaults)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT / "candidates_cost.json")
    args = ap.parse_args(argv)
    lists = {"before": [f for f in args.before.split(",") if f], "after": [f for f in args.after.split(",") if f]}
    for k, fmts in lists.items():  # refused before any tensor is built
        if not fmts:
            ap.error(f"--{k} names no format")
        for f in fmts:
            try:
                get_format(f)
            except FormatError as exc:
                ap.error(f"--{k}: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    times = time_lists(lists, args.repeats)
    totals = {k: sum(v.values()) for k, v in times.items()}
    ratio = totals["after"] / totals["before"]
    body = {"bench": "candidates_cost", "threads": args.threads, "repeats": args.repeats, "lists": lists,
            "added": [f for f in lists["after"] if f not in lists["before"]],
            "removed": [f for f in lists["before"] if f not in lists["after"]],
            "tensors": [{"name": n, "rows": r, "cols": c} for n, r, c in BLOCK], "seconds": times,
            "total_seconds": totals, "ratio_after_over_before": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [n for n, _, _ in BLOCK]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [times["before"][n] for n in names], 0.4,
           label=f"before ({len(lists['before'])} formats)")
    ax.bar([x + 0.2 for x in xs], [times["after"][n] for n in names], 0.4,
           label=f"after ({len(lists['after'])} formats)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("measure_tensor seconds")
    ax.set_title(f"measurement time of one block's linears: after/before = {ratio:.2f} ({args.threads} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print(f"{'tensor':<6} {'shape':>10} {'before s':>9} {'after s':>9} {'ratio':>6}")
    for n, r, c in BLOCK:
        print(f"{n:<6} {f'{r}x{c}':>10} {times['before'][n]:>9.2f} {times['after'][n]:>9.2f} "
              f"{times['after'][n] / times['before'][n]:>6.2f}")
    print(f"{'block':<17} {totals['before']:>9.2f} {totals['after']:>9.2f} {ratio:>6.2f}   added: "
          f"{', '.join(body['added']) or '-'}; removed: {', '.join(body['removed']) or '-'} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
