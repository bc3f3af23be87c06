"""Where ``bitalloc demo``'s time goes, and the integer scale search before/after its speed-up.

  python bench/demo_profile.py search [--rev REV] [--rows N] [--repeat K]
      old (``search_affine`` as of git revision REV, default c1e57f9) vs current search on real SmolLM2
      weights (the packaged GGUF), the demo's six formats, with a per-column importance as the demo's RTN
      measurement passes it (diag H), in one process, alternating: ratio old/new per tensor and format, and
      the results checked equal byte for byte.  ``return_large_frees`` is on, as in the CLI (low-memory load).
  python bench/demo_profile.py tensor [--name blk.0.ffn_down.weight]
      cProfile of ``measure_tensor`` (RTN, the six demo formats, a synthetic Hessian) on one real tensor:
      how the measurement splits between the scale search, RTN, packing/unpacking and the error functions.
  python bench/demo_profile.py finite [--repeat K]
      the finite check of activations, logits and errors: ``torch.isfinite(t).all()`` against
      ``bitalloc.formats.fit.all_finite`` (one min/max pass) on the demo's shapes, alternating, with the answers
      checked equal on clean tensors and on copies holding one NaN, +Inf or -Inf.
  python bench/demo_profile.py packing [--rev REV] [--codes N]
      the int formats' bit packing (``formats.packing``) as of git revision REV (default 65dbda7: a bitstream
      built bit by bit) against the current one (8 codes per int64 word), widths 2..6, alternating: ratio
      old/new per direction, and the bytes and codes checked equal.
  python bench/demo_profile.py decode [--rev REV] [--name TENSOR] [--formats F,...]
      decoding a whole real tensor (default the embedding) with the formats' decode as of REV (default a0b9ea0:
      every temporary full-size) against the current one (a block of rows or GGUF blocks at a time), alternating,
      best of 5: ratio old/new per format, and the values checked equal bit for bit.
  python bench/demo_profile.py stages
      the demo's stages on the real model, timed one by one: load, Fisher pass, calibration (Hessians),
      measurement (fit / RTN / errors, per tensor kind), allocation, quantize, evaluation windows.

Run from the repository root with ``PYTHONPATH=src``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_FORMATS = ["int2-g64", "int3-g64", "int3-g128", "int4-g64", "int4-g128", "int8-g128"]
TENSORS = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.ffn_up.weight", "token_embd.weight"]


def old_module(rev: str, paths: tuple[str, ...], name: str) -> types.ModuleType:
    """The first of ``paths`` (modules of ``bitalloc``) that exists at git revision ``rev``, imported under another
    name, its relative imports made absolute."""
    for path in paths:
        got = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if got.returncode == 0:
            break
    else:
        raise SystemExit(f"none of {', '.join(paths)} at revision {rev}")
    # ``.base`` is the formats' base wherever the module lived (the old scale search imported it from rounding/)
    src = got.stdout.replace("from .base", "from bitalloc.formats.base")
    package = "bitalloc." + ".".join(Path(path).parent.parts[2:])  # src/bitalloc/formats/x.py -> bitalloc.formats
    src = src.replace("from .. ", "from bitalloc ").replace("from ..", "from bitalloc.").replace(
        "from . ", f"from {package} ").replace("from .", f"from {package}.")
    mod = types.ModuleType(f"{name}_{rev}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, f"{name}@{rev}", "exec"), mod.__dict__)
    return mod


def old_rtn(rev: str) -> types.ModuleType:
    """The scale search as of git revision ``rev``: ``bitalloc.formats.fit``, or ``bitalloc.rounding.rtn`` where it
    lived before."""
    return old_module(rev, ("src/bitalloc/formats/fit.py", "src/bitalloc/rounding/rtn.py"), "rtn")


def real_weight(name: str, rows: int | None = None) -> torch.Tensor:
    from bitalloc.io.gguf import GGUFFile
    from bitalloc.models.sources import default_model_path

    f = GGUFFile(default_model_path())
    w = f.dequantize(name)
    return (w if rows is None else w[:rows]).contiguous()


def cmd_search(args: argparse.Namespace) -> None:
    from bitalloc.memory import return_large_frees
    from bitalloc.formats import get_format
    from bitalloc.formats import int as new  # IntFormat.fit calls this module's search_affine

    new_search = new.search_affine

    return_large_frees()  # what the CLI's low-memory load sets for the whole process
    old = old_rtn(args.rev)
    g = torch.Generator().manual_seed(0)
    tot_old = tot_new = 0.0
    print(f"torch threads {torch.get_num_threads()}; old = rtn@{args.rev}, new = working tree")
    for name in TENSORS:
        w = real_weight(name, args.rows if name.startswith("token_embd") else None)
        imp_col = torch.rand(w.shape[1], generator=g) ** 2 + 0.01
        for fid in DEMO_FORMATS:
            fmt = get_format(fid)
            t_old = t_new = 0.0
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                new.search_affine = old.search_affine  # IntFormat.fit looks it up at each call
                try:
                    go = fmt.fit(w, imp_col)
                finally:
                    new.search_affine = new_search
                t1 = time.perf_counter()
                gn = fmt.fit(w, imp_col)
                t2 = time.perf_counter()
                t_old, t_new = t_old + t1 - t0, t_new + t2 - t1
                same = torch.equal(go.scale.view(torch.int32), gn.scale.view(torch.int32)) and \
                    torch.equal(go.offset.view(torch.int32), gn.offset.view(torch.int32))
                if not same:
                    raise SystemExit(f"DIFFERENT results: {name} {fid}")
            tot_old, tot_new = tot_old + t_old, tot_new + t_new
            print(f"{name:24s} {str(tuple(w.shape)):14s} {fid:10s} old {t_old / args.repeat:7.3f} s  "
                  f"new {t_new / args.repeat:7.3f} s  ratio {t_old / t_new:5.2f}  identical", flush=True)
    print(f"total old {tot_old:.1f} s, new {tot_new:.1f} s: ratio {tot_old / tot_new:.2f}")


#: (what, shape) of the tensors the demo checks most often: a block's input and the down projection's input over
#: 16 windows of 512 tokens, and one evaluation batch's scored logits
FINITE_SHAPES = [("block input / q,k,v,gate,up input", (8192, 576)), ("down_proj input", (8192, 1536)),
                 ("evaluation logits (2 windows)", (512, 49152))]


def cmd_finite(args: argparse.Namespace) -> None:
    from bitalloc.formats.fit import all_finite

    def clock(fn, t: torch.Tensor) -> float:
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            fn(t)
        return (time.perf_counter() - t0) / args.repeat

    def old(t: torch.Tensor) -> bool:
        return bool(torch.isfinite(t).all())

    g = torch.Generator().manual_seed(0)
    print(f"{'tensor':<36} {'shape':>14} {'isfinite().all() ms':>20} {'all_finite ms':>14} {'ratio':>7}")
    for what, shape in FINITE_SHAPES:
        t = torch.randn(shape, generator=g)
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u.view(-1)[int(torch.randint(u.numel(), (1,), generator=g))] = bad
            assert old(u) is all_finite(u) is False, (what, bad)
        assert old(t) is all_finite(t) is True
        a = min(clock(old, t) for _ in range(3))
        b = min(clock(all_finite, t) for _ in range(3))
        print(f"{what:<36} {str(shape):>14} {a * 1e3:>20.3f} {b * 1e3:>14.3f} {a / b:>6.1f}x")


def best_of(fn, *a, runs: int = 5) -> float:
    """The least wall time of ``runs`` calls ``fn(*a)``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*a)
        times.append(time.perf_counter() - t0)
    return min(times)


def cmd_packing(args: argparse.Namespace) -> None:
    from bitalloc.formats import packing

    old = old_module(args.rev, ("src/bitalloc/formats/packing.py",), "packing")
    g = torch.Generator().manual_seed(0)
    print(f"{'bits':>4} {'pack old ms':>12} {'new ms':>8} {'ratio':>6} "
          f"{'unpack old ms':>14} {'new ms':>8} {'ratio':>6}")
    for bits in (2, 3, 4, 5, 6):
        codes = torch.randint(0, 1 << bits, (args.codes,), generator=g)
        packed = packing.pack_bits(codes, bits)
        assert torch.equal(packed, old.pack_bits(codes, bits))
        assert torch.equal(packing.unpack_bits(packed, bits, args.codes), old.unpack_bits(packed, bits, args.codes))
        po, pn = best_of(old.pack_bits, codes, bits), best_of(packing.pack_bits, codes, bits)
        uo, un = (best_of(old.unpack_bits, packed, bits, args.codes),
                  best_of(packing.unpack_bits, packed, bits, args.codes))
        print(f"{bits:>4} {po * 1e3:>12.2f} {pn * 1e3:>8.2f} {po / pn:>5.2f}x {uo * 1e3:>14.2f} {un * 1e3:>8.2f} "
              f"{uo / un:>5.2f}x")


def cmd_decode(args: argparse.Namespace) -> None:
    """Decoding a whole real tensor: the formats' ``decode`` as of ``args.rev`` (every temporary full-size) against
    the current one (a block of rows or blocks at a time), alternating, best of 5, values checked equal bit for
    bit.  The old modules are loaded beside the current ones (their formats registered again, after them)."""
    from bitalloc.formats import get_format
    from bitalloc.formats.gguf_legacy import GGUFLegacy
    from bitalloc.rounding import quantize_weight

    w = real_weight(args.name)
    old_int = old_module(args.rev, ("src/bitalloc/formats/int.py",), "int")
    old_legacy = old_module(args.rev, ("src/bitalloc/formats/gguf_legacy.py",), "gguf_legacy")
    old_k = old_module(args.rev, ("src/bitalloc/formats/gguf_kquants.py",), "gguf_kquants")

    def old_format(fid: str):
        fmt = get_format(fid)
        if fid.startswith("int"):
            return old_int.IntFormat(fmt.bits, fmt.group, fmt.symmetric)
        return (old_legacy.GGUFLegacy if isinstance(fmt, GGUFLegacy) else old_k.GGUFKQuant)(fid)

    print(f"{args.name} {tuple(w.shape)}; old = {args.rev}")
    print(f"{'format':>10} {'old ms':>9} {'new ms':>9} {'ratio':>6} {'decoded as':>14}")
    for fid in args.formats.split(","):
        new, old = get_format(fid), old_format(fid)
        x = w if new.supports(tuple(w.shape)) else w.reshape(-1, 1536)  # K-quants: the same values, rows of 1536
        q = quantize_weight(x, new)
        a, b = old.decode(q), new.decode(q)
        if not torch.equal(a.view(torch.int32), b.view(torch.int32)):
            raise SystemExit(f"{fid}: the decodes differ")
        del a, b
        to, tn = best_of(old.decode, q), best_of(new.decode, q)
        print(f"{fid:>10} {to * 1e3:>9.1f} {tn * 1e3:>9.1f} {to / tn:>5.2f}x {str(tuple(x.shape)):>14}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("--rev", default="c1e57f9")
    s.add_argument("--rows", type=int, default=8192, help="rows of the embedding to use (default 8192)")
    s.add_argument("--repeat", type=int, default=1)
    s.add_argument("--threads", type=int, default=None)
    t = sub.add_parser("tensor")
    t.add_argument("--name", default="blk.0.ffn_down.weight")
    t.add_argument("--threads", type=int, default=None)
    st = sub.add_parser("stages")
    st.add_argument("--threads", type=int, default=None)
    f = sub.add_parser("finite")
    f.add_argument("--repeat", type=int, default=20)
    f.add_argument("--threads", type=int, default=None)
    pk = sub.add_parser("packing")
    pk.add_argument("--rev", default="65dbda7")
    pk.add_argument("--codes", type=int, default=1536 * 576, help="codes per call (default: one down projection)")
    pk.add_argument("--threads", type=int, default=None)
    dc = sub.add_parser("decode")
    dc.add_argument("--rev", default="a0b9ea0")
    dc.add_argument("--name", default="token_embd.weight")
    dc.add_argument("--formats", default="int2-g64,int4-g128,int8-g128,int4-row-sym,q4_0,q8_0,q4_k,q6_k")
    dc.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"search": cmd_search, "tensor": cmd_tensor, "stages": cmd_stages, "finite": cmd_finite,
     "packing": cmd_packing, "decode": cmd_decode}[args.cmd](args)


class _Clock:
    """Wall seconds spent inside wrapped functions (by label), outermost call only."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.depth = 0

    def wrap(self, mod, attr: str, label: str) -> None:
        fn = getattr(mod, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0
        setattr(mod, attr, timed)


def cmd_tensor(args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    from bitalloc import measure
    from bitalloc.memory import return_large_frees
    from bitalloc.stats import LinearStats, TensorStats

    return_large_frees()
    g = torch.Generator().manual_seed(0)
    w = real_weight(args.name)
    x = torch.randn(1024, w.shape[1], generator=g) * torch.rand(w.shape[1], generator=g)
    st = TensorStats(roles=(LinearStats(x.T @ x / 1024, 1024, torch.rand(w.shape[0], generator=g), {}),))
    prof = cProfile.Profile()
    prof.runcall(measure.measure_tensor, args.name, w, st, DEMO_FORMATS, "rtn")
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def cmd_stages(args: argparse.Namespace) -> None:
    """The demo's stages one by one (the library calls ``bitalloc demo`` makes), with the time inside the
    scale search, the RTN rounding and the error functions split out of the measurement."""
    import bitalloc.measure as measure
    import bitalloc.pipeline as pipeline
    import bitalloc.formats.int as int_formats
    import bitalloc.rounding.methods as methods
    from bitalloc.cli.common import DEMO_BUDGETS, DEMO_FORMATS as FMTS, _load_model
    from bitalloc.data import default_calibration_files, default_eval_files, text_windows
    from bitalloc.evaluate import evaluate
    from bitalloc.fisher import fisher_pass
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import CachedReference, fitting_uniforms, make_plan
    from bitalloc.quantize import quantize_model

    clock = _Clock()
    clock.wrap(int_formats, "search_affine", "fit: search_affine")
    clock.wrap(methods, "rtn_round", "rtn_round (Grid.snap)")
    clock.wrap(measure, "output_error", "errors: output_error")
    clock.wrap(measure, "fisher_error", "errors: fisher_error")
    clock.wrap(measure, "dequantize", "dequantize")
    clock.wrap(pipeline, "measure_tensor", "measure_tensor (all)")
    clock.wrap(pipeline, "fisher_pass", "fisher pass")
    times: dict[str, float] = {}

    def stage(label, fn):
        t0 = time.perf_counter()
        out = fn()
        times[label] = time.perf_counter() - t0
        print(f"{label:28s} {times[label]:8.1f} s", flush=True)
        return out

    model, tok = stage("load", lambda: _load_model(None))
    view = ModelView(model)
    calib = stage("calib windows", lambda: text_windows(tok, default_calibration_files(), 512, 16))
    evals = stage("eval windows", lambda: text_windows(tok, default_eval_files(), 512, 8))
    fmts = FMTS.split(",")
    m = stage("measure_model", lambda: pipeline.measure_model(model, view, calib, fmts, "rtn", True,
                                                              progress=False, fisher_windows=calib[:4]))
    inner = dict(clock.t)
    for k, v in sorted(inner.items()):
        print(f"  {k:26s} {v:8.1f} s")
    fisher = inner.get("fisher pass", 0.0)
    mt = inner.get("measure_tensor (all)", 0.0)
    print(f"  {'calibration (forwards, H)':26s} {times['measure_model'] - fisher - mt:8.1f} s  (the rest)")
    budgets = DEMO_BUDGETS.split(",")
    plans = stage("allocate (plans)", lambda: [make_plan(m, b) for b in budgets]
                  + [p for b in budgets for p in fitting_uniforms(m, b, 2)])
    print(f"  points: {len(plans)} ({len(budgets)} allocated + uniform candidates, some shared)")
    ref_model = stage("load reference", lambda: _load_model(None)[0])
    ref = CachedReference(ref_model)
    clock.t.clear()
    stage("quantize one point", lambda: quantize_model(model, view, plans[0], calib, method="rtn", progress=False))
    for k, v in sorted(clock.t.items()):
        print(f"  {k:26s} {v:8.1f} s")
    stage("evaluate (reference+cand)", lambda: evaluate(model, ref, evals))
    stage("evaluate again (cached ref)", lambda: evaluate(model, ref, evals))


if __name__ == "__main__":
    main()
