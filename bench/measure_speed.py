"""Speed of ``measure_tensor`` over the 11 GGUF types: per-format path vs batched GPTQ, same run
(``python bench/measure_speed.py [--device cuda] [--threads 2] [--repeats 2]``).

Random weights of SmolLM2-135M's linear shapes (576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down;
``--embedding`` adds the 49152x576 tied embedding) with a realistic input Hessian ``H = XᵀX/n``: correlated
activations (a random mixing of a few hundred latent directions) with a handful of outlier channels and a few
dead ones, plus per-output Fisher weights and Q8_0/Q8_K activation noise.  For every shape both paths run
``--repeats`` times, alternating, and the fastest of each is kept; the ratio is per-format ÷ batched.  The
tables' largest relative difference between the two paths is recorded too, with the batched run's stage
breakdown (``StageTimer``).  Other processes on the machine move absolute times: read the ratios.

Writes ``bench/results/measure_speed[_<device>].json`` and ``.png`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bitalloc.targets.gguf import GGUF_FORMATS  # noqa: E402
from bitalloc.measure import measure_tensor  # noqa: E402
from bitalloc.stats import LinearStats, TensorStats  # noqa: E402
from bitalloc.timing import StageTimer  # noqa: E402

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
EMBEDDING = (49152, 576)
OUT = Path(__file__).resolve().parent / "results"
log = logging.getLogger("measure_speed")


def tensor_and_stats(rows: int, cols: int, seed: int, device: torch.device) -> tuple[torch.Tensor, TensorStats]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.04 * (1 + torch.rand(rows, 1, generator=g))
    n = 4 * cols
    latent = torch.randn(n, min(cols, 256), generator=g)
    x = latent @ torch.randn(latent.shape[1], cols, generator=g) / latent.shape[1] ** 0.5
    x = x + 0.3 * torch.randn(n, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 20.0  # outlier channels
    x[:, torch.randperm(cols, generator=g)[:2]] = 0.0  # dead channels
    h = x.T @ x / n
    noise = {k: torch.rand(rows, generator=g, dtype=torch.float64).to(device) for k in ("q8_0", "q8_k")}
    role = LinearStats(h.to(device), n, torch.rand(rows, generator=g).to(device), noise)
    return w.to(device), TensorStats((role,))


def _run(w: torch.Tensor, st: TensorStats, batched: bool, device: torch.device):
    timer = StageTimer(device=device if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    rows = measure_tensor("w", w, st, GGUF_FORMATS, batched=batched, timer=timer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, rows, timer


def _max_rel(a, b) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        assert (x.format, x.bytes) == (y.format, y.bytes)
        for u, v in ((x.output_error, y.output_error), (x.fisher_error, y.fisher_error)):
            if u is not None and v is not None:
                worst = max(worst, abs(u - v) / max(abs(v), 1e-300))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--embedding", action="store_true", help="also the 49152x576 embedding (slow on a CPU)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SHAPES + ((EMBEDDING,) if args.embedding else ())
    results = []
    for i, (rows, cols) in enumerate(shapes):
        w, st = tensor_and_stats(rows, cols, i, device)
        _run(w[:16], st_rows(st, 16), True, device)  # warm-up (kernels, allocator)
        old_t, new_t = [], []
        old_rows = new_rows = timer = None
        for _ in range(args.repeats):
            t, old_rows, _ = _run(w, st, False, device)
            old_t.append(t)
            t, new_rows, timer = _run(w, st, True, device)
            new_t.append(t)
        assert old_rows is not None and new_rows is not None and timer is not None
        res = {"shape": [rows, cols], "formats": [r.format for r in new_rows], "per_format_s": min(old_t),
               "batched_s": min(new_t), "speedup": min(old_t) / min(new_t),
               "max_rel_diff": _max_rel(new_rows, old_rows), "batched_stages": timer.as_dict()}
        results.append(res)
        print(f"{rows:>6}x{cols:<5} {len(res['formats']):>2} formats  per-format {res['per_format_s']:8.2f} s  "
              f"batched {res['batched_s']:8.2f} s  speedup {res['speedup']:5.2f}x  max rel diff "
              f"{res['max_rel_diff']:.1e}", flush=True)
    tag = "" if device.type == "cpu" else f"_{device.type}"
    out = args.out or OUT / f"measure_speed{tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "command": f"python bench/measure_speed.py --device {args.device} --threads {args.threads} "
                       f"--repeats {args.repeats}" + (" --embedding" if args.embedding else "")}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    labels = [f"{r['shape'][0]}x{r['shape'][1]}\n({len(r['formats'])} fmts)" for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [r["per_format_s"] for r in results], 0.4, label="per format")
    ax.bar([x + 0.2 for x in xs], [r["batched_s"] for r in results], 0.4, label="batched")
    for x, r in zip(xs, results):
        ax.text(x, max(r["per_format_s"], r["batched_s"]), f"{r['speedup']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("measure_tensor seconds (11 GGUF types)")
    ax.set_title(f"measure_tensor on {device.type}, {args.threads} threads: per-format vs batched GPTQ")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def st_rows(st: TensorStats, n: int) -> TensorStats:
    """The statistics of the first ``n`` rows (for the warm-up)."""
    r = st.roles[0]
    assert isinstance(r, LinearStats) and r.grad_sq is not None
    return TensorStats((LinearStats(r.hessian, r.ntokens, r.grad_sq[:n], {k: v[:n] for k, v in r.act_noise.items()}),))


if __name__ == "__main__":
    main()
