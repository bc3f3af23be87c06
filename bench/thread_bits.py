"""Do a weight's GPTQ bytes depend on the number of torch threads?  (``python bench/thread_bits.py``)

The measurement and quantization workers run one thread each, the command's own process all of them, and a resumed
job may run on another thread count than the run it resumes.  This probe rounds the same weights with
``quantize_weight`` (GPTQ into int4-g128, the scaling bench's format, and q4_1, a refitting GGUF type) under
1 thread and under ``--threads`` threads, and counts what differs: the GPTQ factor of the Hessian
(``gptq_factor``: LAPACK's Cholesky and inverse), the stored bytes and the codes.  Hessians come from Gaussian
activations with a few heavy channels (``bench.measure_speed.tensor_and_stats``'s kind), at SmolLM2's widths and a
1-8B Llama's.

Writes ``bench/results/thread_bits.json`` and prints the table.  No timing: the answer is whether the bits move.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
from pathlib import Path

import torch

from bitalloc.formats import get_format
from bitalloc.rounding import quantize_weight
from bitalloc.rounding.gptq import gptq_factor

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (576, 1536, 2048, 4096)
FORMATS = ("int4-g128", "q4_1")
log = logging.getLogger("thread_bits")


def hessian(cols: int, tokens: int, seed: int) -> torch.Tensor:
    """``E[x xᵀ]`` in float32 of Gaussian activations whose first 1 % of channels are 20x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x[:, : max(1, cols // 100)] *= 20.0
    return (x.T @ x) / tokens


def run(threads: int, width: int, rows: int, tokens: int) -> dict:
    h = hessian(width, tokens, seed=width)
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(width + 1)) * 0.02
    out: dict = {}
    for t in (1, threads):
        torch.set_num_threads(t)
        factor = gptq_factor(h, device=torch.device("cpu"))
        qs = {f: quantize_weight(w, f, hessian=h, method="gptq") for f in FORMATS}
        out[t] = (factor.upper, qs)
    (u1, q1), (un, qn) = out[1], out[threads]
    row = {"width": width, "rows": rows, "factor_elements_differing": int((u1 != un).sum()),
           "factor_elements": int(u1.numel())}
    for f in FORMATS:
        a, b = q1[f], qn[f]
        ba = b"".join(bytes(v.contiguous().view(torch.uint8).numpy()) for v in a.parts.values())
        bb = b"".join(bytes(v.contiguous().view(torch.uint8).numpy()) for v in b.parts.values())
        fmt = get_format(f)
        codes_a, codes_b = fmt.unpack(a)[0], fmt.unpack(b)[0]
        row[f] = {"same_bytes": ba == bb, "sha256_1": hashlib.sha256(ba).hexdigest()[:16],
                  f"sha256_{threads}": hashlib.sha256(bb).hexdigest()[:16],
                  "codes_differing": int((codes_a != codes_b).sum()), "codes": int(codes_a.numel())}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="the thread count compared with one (default 2)")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="Hessian widths (input columns)")
    ap.add_argument("--rows", type=int, default=256, help="rows of each weight (default 256)")
    ap.add_argument("--tokens", type=int, default=8192, help="activation rows behind each Hessian")
    ap.add_argument("--out", default=str(RESULTS / "thread_bits.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    for width in (int(x) for x in args.widths.split(",")):
        log.info("width %d", width)
        rows.append(run(args.threads, width, args.rows, args.tokens))
    doc = {"command": " ".join(["python", "bench/thread_bits.py", *(sys.argv[1:] if argv is None else argv)]),
           "threads_compared": [1, args.threads], "torch": torch.__version__, "machine": platform.machine(),
           "formats": list(FORMATS), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'width':>6} {'factor elems differing':>24} " + " ".join(f"{f + ' codes differing':>26}" for f in FORMATS))
    for r in rows:
        print(f"{r['width']:>6} {r['factor_elements_differing']:>12} / {r['factor_elements']:<10} "
              + " ".join(f"{r[f]['codes_differing']:>12} / {r[f]['codes']:<10}{'' if r[f]['same_bytes'] else ' *'}"
                         for f in FORMATS))
    print(f"(* bytes differ between 1 and {args.threads} threads)  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
