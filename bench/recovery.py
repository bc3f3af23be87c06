"""Recovery bench (issue #14): what training after quantization buys, in the same formats and the same bytes.

On the rescaled SmolLM2 (comedies for calibration and training, tragedies held out for evaluation):

* **packed**: the allocated GPTQ mix at each budget (one measurement, shared with ``bench/anysize.py`` through
  ``--measure-cache``), then every ``--modes`` recovery of it; KLD ratio of ``block+e2e`` to ``none`` per budget
  (goal: <= 0.6 at 2.5 and 3.0 bpw, never above 1 anywhere);
* **curve**: at ``--curve-budget``, KLD against training tokens for ``block``, ``e2e`` and ``block+e2e``
  (``--curve-steps``; block tokens are per block, e2e tokens in all), with the wall time of each point.

Every point's bytes are checked equal to the unrecovered model's.  ``--cache DIR`` keeps the quantized models and
every finished point: a rerun resumes.  Writes ``<out>/<name>.json`` and ``.png`` and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.anysize import Cache, pkey  # noqa: E402
from bench.pareto import bench_inputs, cached_measurement, digest, peak_rss_mib, png_bytes  # noqa: E402
from bitalloc.cli.common import DEFAULT_FORMATS  # noqa: E402
from bitalloc.data import default_calibration_files, read_texts, token_windows  # noqa: E402
from bitalloc.evaluate import evaluate  # noqa: E402
from bitalloc.io.atomic import atomic_write  # noqa: E402
from bitalloc.jobs.store import Job  # noqa: E402
from bitalloc.measure import Measurement  # noqa: E402
from bitalloc.pipeline import CachedReference, make_plan, measure_model  # noqa: E402
from bitalloc.quantize import quantize_model, restore, snapshot  # noqa: E402
from bitalloc.recover import RecoverConfig, recover_model, training_windows  # noqa: E402
from bitalloc.sweep import Point  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.recovery")


@dataclass(frozen=True)
class RPoint:
    part: str  # "packed" | "curve"
    budget: str
    mode: str
    steps: int
    tokens: int  # training tokens: per block for the block stage, in all for e2e (block+e2e: the sum)
    bytes: int
    bpw: float
    kld: float
    ppl: float
    ref_ppl: float
    top1: float
    train_seconds: float


def rcfg(args: argparse.Namespace, mode: str, steps: int | None) -> RecoverConfig:
    """The bench's recovery of ``mode`` and ``steps`` (its learning rate and training windows)."""
    return RecoverConfig(mode=mode, steps=steps, lr=args.lr, windows=args.train_windows if mode != "none" else None)


def tokens_of(cfg: RecoverConfig, ctx: int) -> int:
    return (cfg.steps_for("block", ctx) * cfg.block_windows * ctx if cfg.block else 0) + \
        (cfg.steps_for("e2e", ctx) * cfg.e2e_windows * ctx if cfg.e2e else 0)


class Quantized:
    """The GPTQ model of each budget's plan, quantized once (QTensors cached in ``--cache``)."""

    def __init__(self, model: torch.nn.Module, view: Any, calib: torch.Tensor, table: Measurement,
                 cache_dir: Path | None) -> None:
        self.model, self.view, self.calib, self.table, self.cache_dir = model, view, calib, table, cache_dir
        self.fp = snapshot(model)
        self.current: tuple[Any, dict, dict] | None = None

    def load(self, budget: str, aware: dict[str, float] | None = None) -> tuple[dict, Any]:
        """QTensors of ``budget`` (allocated from the table scaled by ``aware`` gains when given) with the model
        holding their values; the plan."""
        from bitalloc.recover.aware import block_tensors, scaled_table

        plan = make_plan(self.table if aware is None else
                         scaled_table(self.table, aware, block_tensors(self.view)), budget)
        tag = (budget, plan.to_json())
        if self.current is not None and self.current[0] == tag:
            restore(self.model, self.current[2])
            return self.current[1], plan
        restore(self.model, self.fp)
        path = None if self.cache_dir is None else self.cache_dir / f"q-{digest(plan.to_json(), self.calib)}.pt"
        if path is not None and path.exists():
            q = torch.load(path, weights_only=False)  # the bench's own cache
            from bitalloc.rounding import dequantize
            from bitalloc.quantize import set_weight

            for n, t in q.items():
                set_weight(self.model, n, dequantize(t).reshape(self.model.get_parameter(n).shape))
        else:
            q = quantize_model(self.model, self.view, plan, self.calib, progress=False)
            if path is not None:
                torch.save(q, path)
        self.current = (tag, q, snapshot(self.model))
        return q, plan


def run(args: argparse.Namespace, ctx: dict, cache: Cache, quant: Quantized, part: str, budget: str,
        cfg: RecoverConfig, aware: dict[str, float] | None = None, keep: dict | None = None,
        after_block: dict | None = None) -> RPoint:
    """One point: the budget's GPTQ model (allocated from the table, or from the table scaled by ``aware`` gains),
    recovered by ``cfg``, evaluated on the held-out windows (cached by what it depends on, whatever the part).

    ``keep`` (a dict) receives the recovered QTensors, weights and seconds of a computed point; ``after_block``
    (what ``keep`` received from the ``block`` point of the same steps) lets a ``block+e2e`` point run only its
    e2e stage from there: the same computation, since the block stage does not depend on what follows it."""
    model, reference, evals = ctx["model"], ctx["reference"], ctx["evals"]
    key = pkey("run", cfg.mode, budget, digest(ctx["key"], cfg.fingerprint(), args.bench_version, aware))
    steps = 0 if not cfg.active else cfg.steps_for("block" if cfg.block else "e2e", args.ctx)

    def compute() -> Point:
        q, plan = quant.load(budget, aware)
        t0 = time.perf_counter()
        if after_block and cfg.mode == "block+e2e":
            restore(model, after_block["weights"])
            quant.current = None  # the model no longer holds the quantized values
            q2, _ = recover_model(model, reference, ctx["train"], after_block["q"],
                                  replace(cfg, mode="e2e"), progress=True, guard=ctx["guard"])
            seconds = after_block["seconds"] + time.perf_counter() - t0
        else:
            q2, _ = recover_model(model, reference, ctx["train"], q, cfg, progress=True, guard=ctx["guard"])
            seconds = time.perf_counter() - t0
        if keep is not None:
            keep.update(q=q2, weights=snapshot(model), seconds=seconds)
        nb = sum(t.nbytes() for t in q2.values())
        if nb != sum(t.nbytes() for t in q.values()) or any(q2[n].format != q[n].format for n in q):
            raise AssertionError("recovery changed a format or the bytes")
        r = evaluate(model, ctx["ref"], evals)
        return Point(part, budget, cfg.mode, f"{steps}", nb, 8.0 * (nb + 0) / ctx["total_params"], float("nan"),
                     r.ppl, r.ref_ppl, r.kld, r.top1, seconds)

    pt = cache.point(key, compute)
    return RPoint(part, budget, cfg.mode, steps, tokens_of(cfg, args.ctx) if cfg.active else 0, pt.bytes, pt.bpw,
                  pt.kld, pt.ppl, pt.ref_ppl, pt.top1, pt.seconds)


def run_aware(args: argparse.Namespace, ctx: dict, cache: Cache, quant: Quantized, table: Measurement,
              points: list[RPoint]) -> dict[str, Any]:
    """Recovery-aware allocation vs allocate-then-recover at ``--aware-budget``, both recovered by block+e2e with
    ``--aware-steps`` steps; the gains are measured once on the full-precision model (cached)."""
    from bitalloc.recover.aware import format_gains

    b, cfg = args.aware_budget, rcfg(args, "block+e2e", args.aware_steps)
    gains_cfg = rcfg(args, "block", args.aware_steps)

    def gains() -> dict[str, Any]:
        restore(quant.model, quant.fp)
        quant.current = None
        t0 = time.perf_counter()
        # trained on the recovery's windows, checked on the held-out ones after them (as the recovery itself)
        g = format_gains(quant.model, ctx["train"], table.formats(), gains_cfg, guard=ctx["guard"],
                         quant=int(ctx["calib"].shape[0]), progress=True)
        return {"gains": g, "seconds": time.perf_counter() - t0}

    measured = cache.item("aware", digest(ctx["key"], gains_cfg.fingerprint(), "held-out", ctx["guard"]), gains)
    plain = run(args, ctx, cache, quant, "aware", b, cfg)
    aware = run(args, ctx, cache, quant, "aware", b, cfg, measured["gains"])
    points += [plain, replace(aware, mode="block+e2e aware")]
    return {"budget": b, "steps": args.aware_steps, "gains": measured["gains"], "gain_seconds": measured["seconds"],
            "allocate_then_recover_kld": plain.kld, "recovery_aware_kld": aware.kld,
            "aware/plain": aware.kld / plain.kld, "bytes": [plain.bytes, aware.bytes]}


def comparison(points: list[RPoint], budgets: list[str]) -> list[dict]:
    rows = []
    for b in budgets:
        base = [p for p in points if p.part == "packed" and p.budget == b and p.mode == "none"]
        if not base:
            continue
        row: dict[str, Any] = {"budget": b, "none": base[0].kld}
        for p in points:
            if p.part == "packed" and p.budget == b and p.mode != "none":
                row[p.mode] = p.kld
                row[f"{p.mode}/none"] = p.kld / base[0].kld
                row[f"{p.mode} seconds"] = p.train_seconds
        rows.append(row)
    return rows


def plot_png(points: list[RPoint], rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = any(p.part == "curve" for p in points)  # a run without the curve gets one panel, not an empty second
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(12 if curve else 6.5, 4.5), squeeze=False)
    ax1 = axes[0][0]
    modes = sorted({p.mode for p in points if p.part == "packed"}, key=["none", "block", "e2e", "block+e2e"].index)
    for m in modes:
        ps = sorted((p for p in points if p.part == "packed" and p.mode == m), key=lambda p: p.bytes)
        ax1.plot([p.bytes / 2**20 for p in ps], [p.kld for p in ps], "o-", label=m)
    ax1.set_xlabel("size (MiB)")
    ax1.set_ylabel("KLD vs fp (tragedies)")
    ax1.set_yscale("log")
    ax1.set_title("allocated mixes, with and without recovery")
    ax1.legend()
    if curve:
        _plot_curve(axes[0][1], points)
    fig.suptitle(title)
    return png_bytes(fig)


def _plot_curve(ax2: Any, points: list[RPoint]) -> None:
    """The recovery curve: KLD against training tokens per mode, each point's training time written beside it."""
    base = [p for p in points if p.part == "curve" and p.mode == "none"]
    for m in ("block", "e2e", "block+e2e"):
        ps = sorted((p for p in points if p.part == "curve" and p.mode == m), key=lambda p: p.tokens)
        if ps:
            ax2.plot([p.tokens for p in ps], [p.kld for p in ps], "o-", label=m)
            for p in ps:
                ax2.annotate(f"{p.train_seconds:.0f}s", (p.tokens, p.kld), fontsize=7)
    if base:
        ax2.axhline(base[0].kld, color="gray", ls="--", label="no recovery")
    ax2.set_xscale("log")
    ax2.set_xlabel("training tokens (block: per block; e2e: in all; both: the sum)")
    ax2.set_ylabel("KLD")
    ax2.set_title("recovery curve" + (f" at {base[0].budget}" if base else ""))
    ax2.legend()


def table(points: list[RPoint], rows: list[dict]) -> str:
    head = f"{'part':<7} {'budget':<8} {'mode':<10} {'steps':>6} {'tokens':>8} {'MiB':>7} {'kld':>8} {'ppl':>8} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(f"{p.part:<7} {p.budget:<8} {p.mode:<10} {p.steps:>6} {p.tokens:>8} {p.bytes / 2**20:>7.2f} "
                     f"{p.kld:>8.4f} {p.ppl:>8.2f} {p.train_seconds:>8.0f}")
    lines.append("")
    for r in rows:
        lines.append(f"{r['budget']}: none {r['none']:.4f}; " + "; ".join(
            f"{m} {r[m]:.4f} ({r[m + '/none']:.2f}x)" for m in ("block", "e2e", "block+e2e") if m in r))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="2.5bpw,3bpw,4bpw")
    ap.add_argument("--modes", default="none,block+e2e", help="recoveries of the packed points")
    ap.add_argument("--steps", type=int, default=None, help="recovery steps of the packed points (default: "
                    "bitalloc's)")
    ap.add_argument("--lr", type=float, default=RecoverConfig.lr)
    ap.add_argument("--curve-budget", default="2.5bpw")
    ap.add_argument("--curve-steps", default="2,4,8,16", help="steps of the curve's points ('' = no curve)")
    ap.add_argument("--curve-modes", default="block,e2e,block+e2e")
    ap.add_argument("--curve-eval-windows", type=int, default=8, help="evaluation windows of the curve's points "
                    "(its own no-recovery point included)")
    ap.add_argument("--windows", type=int, default=16, help="calibration (training) windows (comedies)")
    ap.add_argument("--train-windows", type=int, default=None, help="comedy windows recovery trains on (the "
                    "first --windows are the quantization's; default: 4 times those, as the CLI); 16 more after "
                    "them are held out for the stages' checks")
    ap.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (tragedies)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--formats", default=None, help="candidate formats (default: the --measurement table's, else "
                    "bitalloc's defaults)")
    ap.add_argument("--cache", default=str(RESULTS.parent.parent / ".cache" / "recovery"))
    ap.add_argument("--measure-cache", default=str(RESULTS.parent.parent / ".cache" / "anysize"),
                    help="where the measurement table is kept (shared with bench/anysize.py)")
    ap.add_argument("--measurement", default=None, help="a measurement table of these formats to allocate from "
                    "(e.g. bench/anysize.py's, measured on more windows of the same text) instead of measuring")
    ap.add_argument("--aware-budget", default="2.5bpw", help="budget of the recovery-aware allocation comparison "
                    "('' = none)")
    ap.add_argument("--aware-steps", type=int, default=8, help="recovery steps of both arms of that comparison")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="recovery")
    ap.add_argument("--bench-version", default="2", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    t_start = time.perf_counter()

    model, tok, reference, view, calib, evals = bench_inputs(args.ctx, args.windows, args.eval_windows)
    budgets = [b for b in args.budgets.split(",") if b]
    given = Measurement.load(args.measurement) if args.measurement else None
    formats = [f for f in (args.formats or (",".join(given.formats()) if given else DEFAULT_FORMATS)).split(",") if f]
    settings = ("rescaled SmolLM2 seed 0 sigma 0.1", args.ctx, args.fisher_windows)  # as bench/pareto.py
    mcache = Path(args.measure_cache) if args.measure_cache else None
    if mcache is not None:
        mcache.mkdir(parents=True, exist_ok=True)

    def measure(fmts: list[str]) -> Measurement:
        return measure_model(model, view, calib, fmts, "gptq", True, fisher_windows=calib[: args.fisher_windows])

    if given is not None:
        table_, runs = given.subset(formats), [{"table": args.measurement}]
    else:
        table_, runs = cached_measurement(mcache, digest(settings, "gptq", calib), formats, measure)
    # as the CLI: the calibration windows first, more of the same text, then the held-out windows the stages check on
    train, guard = training_windows(rcfg(args, "block", None), calib,
                                    lambda n: token_windows(tok, read_texts(default_calibration_files()), args.ctx, n))
    ctx = {"model": model, "reference": reference, "ref": CachedReference(reference), "calib": calib, "train": train,
           "guard": guard,
           "evals": evals, "total_params": view.total_params,
           "key": digest(settings, calib, evals, formats, table_.to_json())}
    cache_dir = Path(args.cache) if args.cache else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    quant = Quantized(model, view, calib, table_, cache_dir)
    points: list[RPoint] = []
    with contextlib.ExitStack() as stack:
        job = None if cache_dir is None else stack.enter_context(Job(cache_dir / f"points-{ctx['key']}",
                                                                     {"recovery": ctx["key"]}))
        cache = Cache(job)
        for b in budgets:  # the budget's quantized model is reused by its points
            for m in (x for x in args.modes.split(",") if x):
                points.append(run(args, ctx, cache, quant, "packed", b, rcfg(args, m, args.steps)))
        aware_row: dict[str, Any] = {}
        if args.aware_budget:
            aware_row = run_aware(args, ctx, cache, quant, table_, points)
        steps_list = [int(s) for s in args.curve_steps.split(",") if s]
        if steps_list:
            cctx = ctx if args.curve_eval_windows >= len(evals) else \
                {**ctx, "evals": evals[: args.curve_eval_windows],
                 "key": digest(ctx["key"], "curve eval windows", args.curve_eval_windows)}
            curve = [run(args, cctx, cache, quant, "curve", args.curve_budget, RecoverConfig())]
            modes = [x for x in args.curve_modes.split(",") if x]
            for s in steps_list:
                kept: dict = {}
                for m in sorted(modes, key=["block", "block+e2e", "e2e"].index):
                    curve.append(run(args, cctx, cache, quant, "curve", args.curve_budget,
                                     rcfg(args, m, s),
                                     keep=kept if m == "block" else None,
                                     after_block=kept if m == "block+e2e" else None))
            if cctx is ctx:  # a packed point of the curve's budget is one more point of its curve
                curve += [replace(p, part="curve") for p in points if p.part == "packed" and
                          p.budget == args.curve_budget and p.mode in modes and p.steps not in steps_list]
            points += curve
    rows = comparison(points, budgets)
    result = {
        "model": "SmolLM2-135M-Instruct, rescaled (seed 0, sigma 0.1)", "calibration": "comedies (training)",
        "evaluation": "tragedies (held out)", "ctx": args.ctx, "calib_windows": int(calib.shape[0]),
        "eval_windows": int(evals.shape[0]), "train_windows": int(train.shape[0]) - guard, "guard_windows": guard,
        "formats": formats, "method": "gptq", "lr": args.lr,
        "steps": args.steps, "curve_budget": args.curve_budget, "curve_eval_windows": args.curve_eval_windows,
        "measure_runs": runs,
        "goals": "block+e2e KLD / none KLD <= 0.6 at 2.5 and 3.0 bpw, <= 1 at every budget",
        "comparison": rows, "recovery_aware": aware_row, "points": [asdict(p) for p in points],
        "peak_rss_mib": peak_rss_mib(), "total_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{args.name}.json", overwrite=True) as fh:
        fh.write((json.dumps(result, indent=1) + "\n").encode())
    with atomic_write(out / f"{args.name}.png", overwrite=True) as fh:
        fh.write(plot_png(points, rows, "rescaled SmolLM2-135M: recovery in the same bytes (KLD on tragedies)"))
    print(table(points, rows))
    print(f"peak RSS {peak_rss_mib():.0f} MiB; total {time.perf_counter() - t_start:.0f} s -> "
          f"{out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
