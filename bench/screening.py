"""Screening benchmark: exhaustive vs screened measurement, same run, same budgets.

On a subset of the function-preserving rescaled SmolLM2-135M-Instruct (its first ``--blocks`` decoder blocks,
and a vocabulary cut to the ``--vocab`` tokens most frequent in the calibration + evaluation text, re-indexed:
embedding and tied lm_head rows of those tokens; the fp reference is the same subset), calibrated on the
comedies and evaluated on the tragedies:

* exhaustive: ``measure_model`` over every candidate (GGUF types by default) with GPTQ;
* screened: ``measure_model(..., screen=Screen(budgets, margin))`` (pass 1 RTN everywhere + GPTQ on the sample
  blocks, pass 2 GPTQ for the selected formats only);
* per budget: both plans (the share of tensors given the same format), predicted errors, and the KLD / PPL /
  top-1 of the quantized model (GPTQ, by the plan) on held-out windows: identical plans give the same model,
  which is quantized and scored once and reported for both.

Writes bench/results/screening.json and screening.png and prints the table.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from bitalloc.data import check_disjoint, default_calibration_files, default_eval_files, read_texts, token_windows
from bitalloc.activations import roundings_for
from bitalloc.calibrate import fisher_pass
from bitalloc.evaluate import evaluate
from bitalloc.targets.gguf import GGUF_FORMATS
from bitalloc.models.rescale import load_reference
from bitalloc.models.view import ModelView
from bitalloc.pipeline import make_plan, measure_model
from bitalloc.quantize import quantize_model, restore, snapshot
from bitalloc.screen import DEFAULT_MARGIN, DEFAULT_SAMPLE_BLOCKS, Screen, screen_formats

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.screening")


def subset_model(model: torch.nn.Module, blocks: int, keep: torch.Tensor) -> torch.nn.Module:
    """The first ``blocks`` decoder blocks and the vocabulary ``keep`` (token ids, re-indexed 0..V-1)."""
    inner = model.model
    inner.layers = torch.nn.ModuleList(list(inner.layers)[:blocks])
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]
    emb = torch.nn.Embedding(len(keep), inner.embed_tokens.weight.shape[1])
    with torch.no_grad():
        emb.weight.copy_(inner.embed_tokens.weight[keep])
    inner.embed_tokens = emb
    model.lm_head = torch.nn.Linear(emb.weight.shape[1], len(keep), bias=False)
    model.config.vocab_size = len(keep)
    model.lm_head.weight = emb.weight  # tied, as in SmolLM2
    return model.eval()


def remap(windows: torch.Tensor, keep: torch.Tensor, vocab: int) -> torch.Tensor:
    """Token ids re-indexed into ``keep``; ids outside it become the most frequent kept token (index 0)."""
    index = torch.zeros(vocab, dtype=torch.long)
    index[keep] = torch.arange(len(keep))
    return index[windows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4.5bpw,5bpw,5.5bpw,6.5bpw")
    ap.add_argument("--formats", default=",".join(GGUF_FORMATS))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    ap.add_argument("--sample-blocks", type=int, default=DEFAULT_SAMPLE_BLOCKS)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--fisher-windows", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="screening")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    formats = [f for f in args.formats.split(",") if f]
    budgets = [b for b in args.budgets.split(",") if b]

    full_model, tok = load_reference(rescaled=True)
    vocab = full_model.config.vocab_size
    check_disjoint(default_calibration_files(), default_eval_files())
    calib = token_windows(tok, read_texts(default_calibration_files()), args.ctx, args.calib_windows)
    evals = token_windows(tok, read_texts(default_eval_files()), args.ctx, args.eval_windows)
    counts = torch.bincount(torch.cat([calib.flatten(), evals.flatten()]), minlength=vocab)
    keep = torch.argsort(counts, descending=True, stable=True)[: args.vocab]
    covered = float(counts[keep].sum() / counts.sum())
    model = subset_model(full_model, args.blocks, keep)
    calib, evals = remap(calib, keep, vocab), remap(evals, keep, vocab)
    reference = copy.deepcopy(model)
    view = ModelView(model)
    fw = calib[: args.fisher_windows]

    t0 = time.perf_counter()
    full = measure_model(model, view, calib, formats, "gptq", True, progress=False, fisher_windows=fw)
    t_full = time.perf_counter() - t0
    screen = Screen(tuple(budgets), margin=args.margin, sample_blocks=args.sample_blocks)
    t0 = time.perf_counter()  # the screened run: its own Fisher pass, pass 1 (selection), pass 2 (exact rows)
    grads = fisher_pass(model, view, fw, batch_size=2, progress=False)
    t_fisher = time.perf_counter() - t0
    sel = screen_formats(model, view, calib, formats, "gptq", screen, fisher=grads, roundings=roundings_for(formats))
    scr = measure_model(model, view, calib, formats, "gptq", True, progress=False, fisher_windows=fw,
                        fisher_stats=grads, screen=sel)
    t_scr = time.perf_counter() - t0
    exact = {(r.tensor, r.format): r for r in full.rows}
    # the screened table's rows are exact GPTQ rows: equal to the exhaustive ones up to the float effects of
    # measuring another set of formats in one batch (bytes equal, errors to a relative tolerance)
    identical = all(exact[(r.tensor, r.format)] == r for r in scr.rows)
    rel = [abs(a - b) / max(abs(b), 1e-30) for r in scr.rows for a, b in
           ((r.output_error, exact[(r.tensor, r.format)].output_error),
            (r.fisher_error or 0.0, exact[(r.tensor, r.format)].fisher_error or 0.0))]
    max_rel = max(rel, default=0.0)
    honest = max_rel <= 1e-3 and all(exact[(r.tensor, r.format)].bytes == r.bytes for r in scr.rows)
    obj = full.objectives[0]
    off = sorted(abs(math.log(getattr(r, f"{obj}_error") / getattr(exact[(r.tensor, r.format)], f"{obj}_error")))
                 for r in sel.estimates.rows if r.tensor not in sel.reused and getattr(r, f"{obj}_error") > 0)
    estimate_error = {"objective": obj, "rows": len(off),
                      **{f"q{q}": math.exp(off[min(len(off) - 1, int(q / 100 * len(off)))]) for q in (50, 90, 99, 100)}
                      } if off else {}

    saved = snapshot(model)
    scored: dict[tuple[tuple[str, str], ...], dict] = {}
    rows = []
    for b in budgets:
        pf, ps = make_plan(full, b), make_plan(scr, b)
        same = sum(pf.assignments[t] == ps.assignments[t] for t in pf.assignments) / len(pf.assignments)
        res = {}
        for label, p in (("exhaustive", pf), ("screened", ps)):
            key = tuple(sorted(p.assignments.items()))
            if key not in scored:
                restore(model, saved)
                t1 = time.perf_counter()
                quantize_model(model, view, p, calib, "gptq", progress=False)
                r = evaluate(model, reference, evals)
                scored[key] = {"kld": r.kld, "ppl": r.ppl, "top1": r.top1, "seconds": time.perf_counter() - t1}
            res[label] = {"bytes": p.total_bytes, "predicted_error": p.error, **scored[key],
                          "formats": dict(collections.Counter(p.assignments.values()))}
        rows.append({"budget": b, "same_format_share": same, **res})
    restore(model, saved)

    n_full = len(full.rows)
    result = {
        "model": f"rescaled SmolLM2-135M-Instruct (seed 0), first {args.blocks} blocks, vocabulary cut to the "
                 f"{args.vocab} most frequent calibration+evaluation tokens ({covered:.1%} of their tokens; the "
                 "rest mapped to the most frequent), tied embedding",
        "calibration": "comedies", "evaluation": "tragedies", "ctx": args.ctx,
        "calib_windows": int(calib.shape[0]), "fisher_windows": int(fw.shape[0]), "eval_windows": int(evals.shape[0]),
        "formats": formats, "budgets": budgets, "margin": args.margin, "sample_blocks": args.sample_blocks,
        "threads": torch.get_num_threads(), "tensors": len(full.tensors),
        "gptq_measurements": {"exhaustive": n_full, "screened": sel.exact_measurements,
                              "saved_share": 1 - sel.exact_measurements / n_full},
        "rows_in_table": {"exhaustive": n_full, "screened": len(scr.rows)},
        "screened_rows_equal_exhaustive_rows": honest, "screened_rows_identical": identical,
        "screened_rows_max_relative_difference": max_rel,
        "measure_seconds": {"exhaustive": t_full, "screened": t_scr, "screened_fisher": t_fisher,
                            "screened_pass1": sel.seconds, "screened_pass2": t_scr - t_fisher - sel.seconds},
        "fingerprint_screen": scr.fingerprint.get("screen"),
        "estimate_factor_off": estimate_error,
        "comparison": rows,
        "total_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{args.name}.png")

    g = result["gptq_measurements"]
    print(f"GPTQ measurements: exhaustive {g['exhaustive']}, screened {g['screened']} ({g['saved_share']:.0%} saved); "
          f"measure time: exhaustive {t_full:.0f} s, screened {t_scr:.0f} s (pass 1 {sel.seconds:.0f} s); "
          f"screened rows equal exhaustive rows: {honest} (identical: {identical}, largest relative difference "
          f"{max_rel:.2g})")
    print(f"estimates off by a factor (quantiles over unsampled rows): {estimate_error}")
    print(f"{'budget':<8} {'same':>6} {'err exh':>10} {'err scr':>10} {'KLD exh':>9} {'KLD scr':>9} {'bytes exh':>10} "
          f"{'bytes scr':>10}")
    for r in rows:
        e, s = r["exhaustive"], r["screened"]
        print(f"{r['budget']:<8} {r['same_format_share']:>6.1%} {e['predicted_error']:>10.4g} "
              f"{s['predicted_error']:>10.4g} {e['kld']:>9.5f} {s['kld']:>9.5f} {e['bytes']:>10} {s['bytes']:>10}")
    print(f"total {time.perf_counter() - t_start:.0f} s -> {out / (args.name + '.json')}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    t = result["measure_seconds"]
    a.bar(["exhaustive", "screened"], [t["exhaustive"], 0], color="tab:gray")
    bottom = 0.0
    for k, c in (("screened_fisher", "tab:green"), ("screened_pass1", "tab:blue"), ("screened_pass2", "tab:orange")):
        a.bar(["screened"], [t[k]], bottom=bottom, color=c, label=k.removeprefix("screened_"))
        bottom += t[k]
    a.legend()
    g = result["gptq_measurements"]
    a.set_title(f"measure time (GPTQ measurements {g['exhaustive']} vs {g['screened']})")
    a.set_ylabel("seconds")
    bud = [r["budget"] for r in result["comparison"]]
    x = range(len(bud))
    b.plot(x, [r["exhaustive"]["kld"] for r in result["comparison"]], "o-", label="exhaustive")
    b.plot(x, [r["screened"]["kld"] for r in result["comparison"]], "x--", label="screened")
    b.set_xticks(list(x), bud)
    b.set_yscale("log")
    b.set_ylabel("KLD (tragedies)")
    b.set_title("final KLD at each budget")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
