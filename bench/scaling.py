"""How bitalloc's time and memory grow with the model: random-weight Llama models of about 0.1B, 0.5B, 1.5B...
parameters through load -> measure -> plan -> quantize -> write, each size in a fresh process.

For each size the bench writes a Llama-shaped model with random weights (``LlamaConfig``, no download) as a
Hugging Face safetensors folder in **bf16** (shards of at most 2 GiB; norms 1, every other weight N(0, 0.02²)),
then runs, in a new Python process so that the peak RSS is that size's alone:

    load_model(low_memory=True)   the CLI's load (weights spilled to a scratch file, one block resident)
    random token windows          ``--windows`` x ``--ctx`` uniform random ids (seeded): fine for timing, not
                                  for quality -- nothing here measures quality
    measure_model                 Fisher pass + block stream (Hessians, activation noise) + every tensor x
                                  every ``--formats`` candidate (``--method`` rounding)
    make_plan                     exact allocation at the byte budget halfway between the smallest and the
                                  largest model the candidates can make
    quantize_model                sequential, block by block (``--method``)
    save_packed                   the verified packed directory (deleted afterwards)

Each stage runs under a :class:`bitalloc.timing.StageTimer`; a library function that accepts ``timer=`` (and
``device=``) gets it, so the finer stages (calibration forwards, Hessians, Fisher pass, measurement, refits...)
appear in the JSON as soon as the library records them, and nothing breaks before.  The worker reports
its peak RSS after each stage and at the end (``VmHWM``: Linux's ``ru_maxrss`` would include the parent's RSS,
carried across fork + exec; it is stored too), and the runtime floor: its peak RSS after importing torch,
transformers' Llama modelling code and bitalloc (and initialising CUDA when used), before building anything.
When the placement measures in worker processes (``Placement.workers``, a CPU with several threads), the peak
RSS is that of the process and its workers together: their RSS summed at the same moment, sampled every 0.1 s
(:class:`TreeSampler`), or the process's own ``VmHWM`` where that is higher.  ``rss_main_peak_bytes`` keeps the
process's own peak, ``rss_peak_bound_bytes`` the upper bound earlier runs reported (each worker's own peak,
``RUSAGE_CHILDREN``, added once per worker as if all were at theirs at once), and
``rss_sampled_peak_by_stage_bytes`` the sampled peak within each stage.

Results: per stage the seconds at each size and the exponent of a least-squares line through
log(seconds) vs log(parameters) (goal: at most 1.1), the same for the peak RSS above the floor, and that peak
above the floor as a fraction of the model's fp32 size at the largest size (goal: at most 0.5).  Writes
``--out`` (default bench/results/scaling.json) and the PNG beside it, and prints a table.

Defaults are sized for a small CPU machine: two candidate formats (int4-g128, int3-g128), GPTQ, 4 calibration
windows of 512 tokens, 2 of them for the Fisher pass.  Examples::

    python bench/scaling.py --sizes 0.1,0.5,1.5 --threads 2                     # CPU
    PYTHONPATH=src python3 bench/scaling.py --device cuda --sizes 0.1,0.5,1.5,3,7 --threads 16
    python bench/scaling.py --sizes 0.002,0.004 --vocab 4096 --windows 2 --ctx 64  # plumbing smoke test

Only what bitalloc itself imports is needed (torch, transformers, safetensors, numpy, gguf: the format registry
imports gguf-py at import time; matplotlib for the PNG, skipped with a warning when missing).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/scaling.py` finds bench.*
from bench.memory import proc_rss  # noqa: E402
RESULTS = REPO / "bench" / "results"
WORK = REPO / ".cache" / "scaling"
VOCAB = 49152  # SmolLM2's vocabulary, the same at every size so the head's share does not jump between sizes
# (parameters in billions, hidden width) of familiar decoders; a size takes the width of its nearest entry
# (log distance) and as many layers as bring it to the asked size
WIDTHS = ((0.002, 128), (0.01, 256), (0.03, 384), (0.1, 576), (0.5, 1152), (1.5, 2048), (3.0, 2560),
          (7.0, 4096), (13.0, 5120), (30.0, 6656), (70.0, 8192))
HEAD_DIM = 64
SHARD_BYTES = 2 << 30
GOAL_EXPONENT = 1.1
GOAL_RSS_FRACTION = 0.5
#: The sizes (billions) the speed issue names: the goal exponents are fitted over these when two or more ran
#: (smaller sizes are dominated by the embedding, whose work grows unlike the blocks').
GOAL_SIZES = (0.1, 0.5, 1.5)
#: Settings that must be equal for a size's earlier result to be reused (``--reuse``).
RUN_KEYS = ("device", "formats", "method", "windows", "fisher_windows", "ctx", "threads", "vocab", "seed")
log = logging.getLogger("scaling")


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """A tied-embedding Llama decoder (GQA, SwiGLU MLP, head_dim 64)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * HEAD_DIM
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.vocab * h + self.layers * per_layer + h

    def config(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers.LlamaConfig``."""
        return {"hidden_size": self.hidden, "num_hidden_layers": self.layers, "intermediate_size": self.intermediate,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": HEAD_DIM,
                "vocab_size": self.vocab, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "bfloat16",
                "bos_token_id": 0, "eos_token_id": 0}


def shape_for(billions: float, vocab: int = VOCAB) -> Shape:
    """A Llama shape of about ``billions`` x 1e9 parameters (width from :data:`WIDTHS`, depth solved)."""
    if billions <= 0:
        raise ValueError(f"size must be positive, got {billions}")
    hidden = min(WIDTHS, key=lambda t: abs(math.log(t[0] / billions)))[1]
    heads = hidden // HEAD_DIM
    kv = max(d for d in range(1, max(1, heads // 3) + 1) if heads % d == 0)
    inter = max(256, round(8 / 3 * hidden / 256) * 256)
    one = Shape(hidden, 1, inter, heads, kv, vocab)
    per_layer = Shape(hidden, 2, inter, heads, kv, vocab).params - one.params
    layers = max(1, round((billions * 1e9 - (one.params - per_layer)) / per_layer))
    return Shape(hidden, layers, inter, heads, kv, vocab)


# ------------------------------------------------------------------------------------------- the model
def write_model(shape: Shape, out: Path, seed: int = 0) -> Path:
    """A random-weight Llama folder (config.json, bf16 safetensors shards + index); reused when complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = out / "scaling.json"
    want = {"shape": asdict(shape), "seed": seed, "dtype": "bfloat16", "std": 0.02}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                log.info("model %s reused", out)
                return out
        except ValueError:
            pass
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = LlamaConfig(**shape.config())
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, p in meta.named_parameters():  # a tied lm_head is the embedding: listed once
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        shard_bytes += nbytes
        total += nbytes
    flush()
    # shard names are final only now (model-0000i-of-0000n would need the count up front): plain names + index
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    config.save_pretrained(out)
    marker.write_text(json.dumps(want) + "\n")
    return out


# ------------------------------------------------------------------------------------------ the worker
def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far: ``VmHWM`` (the high-water mark of this program's own
    memory) on Linux, else ``ru_maxrss``.  Linux's ``ru_maxrss`` carries the parent's peak across fork + exec
    (the spawning process's RSS becomes the child's starting maximum), which would hide a small size's peak
    under the parent's; VmHWM starts afresh with the new program."""
    hwm = _proc_status("VmHWM")
    return hwm if hwm is not None else ru_maxrss_bytes()


def current_rss_bytes() -> int | None:
    return _proc_status("VmRSS")


class TreeSampler:
    """The resident memory of this process and of its child processes (the measurement workers) together,
    sampled every ``interval`` seconds in a thread from ``/proc`` (Linux; elsewhere it records nothing): the peak
    of the sum overall and under each ``label`` (the stage running).  The workers' own peaks do not coincide
    with each other's or with the main process's, so their sum over-counts; this is the memory the job held at
    once (a spike shorter than ``interval`` can be missed: the main process's own ``VmHWM`` is kept beside it).
    Not more often than every 0.1 s: the thread takes the interpreter lock from the main process's Python-heavy
    loops (GPTQ's column loop ran 1.12x slower with samples every 20 ms, no slower at 100 ms; scratch check)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.label, self.peak = interval, "start", 0
        self.by_label: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    @staticmethod
    def _children(pid: str) -> list[str]:
        out: list[str] = []
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                out += (task / "children").read_text().split()
        except OSError:
            pass
        return out

    def sample(self) -> int:
        pids, total = [str(os.getpid())], 0
        while pids:
            pid = pids.pop()
            total += proc_rss(pid)
            pids += self._children(pid)
        self.peak = max(self.peak, total)
        self.by_label[self.label] = max(self.by_label.get(self.label, 0), total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def timer(self, device: Any) -> Any:
        """A :class:`bitalloc.timing.StageTimer` for the library whose stages (the innermost running one) label
        this sampler's samples as ``"<bench stage>/<library stage>"``."""
        from bitalloc.timing import StageTimer

        sampler = self

        class LabellingTimer(StageTimer):
            @contextmanager
            def stage(self, name: str) -> Iterator[None]:
                outer = sampler.label
                sampler.label = f"{outer.split('/')[0]}/{name}"
                try:
                    with super().stage(name):
                        yield
                finally:
                    sampler.label = outer

        return LabellingTimer(device=device)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One size, in this (fresh) process: the stages, their times and the peak RSS after each."""
    t_process = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    importlib.import_module("transformers.models.llama.modeling_llama")  # the modelling code every run imports
    from bitalloc.export.packed import save_packed
    from bitalloc.models.sources import load_model
    from bitalloc.models.view import ModelView
    from bitalloc.pipeline import make_plan, measure_model
    from bitalloc.quantize import quantize_model
    from bitalloc.placement import Placement, resolve_device
    from bitalloc.timing import StageTimer

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context belongs to the floor
        torch.cuda.synchronize(device)
    floor = maxrss_bytes()
    timer = StageTimer(device=device)  # the bench's own stages
    rss: dict[str, int] = {}
    spill = Path(args.spill)
    spill.mkdir(parents=True, exist_ok=True)
    sampler = TreeSampler()
    lib_timer = sampler.timer(device)  # the library's finer ones (names may repeat the bench's)
    with sampler:
        sampler.label = "load"
        with timer.stage("load"):
            model, _tok = load_model(args.worker, low_memory=True, spill_dir=spill)
        rss["load"] = maxrss_bytes()
        view = ModelView(model)
        placement = Placement.for_device(device, model=model)
        vocab = int(model.config.vocab_size)
        gen = torch.Generator().manual_seed(args.seed)
        windows = torch.randint(0, vocab, (args.windows, args.ctx), generator=gen, dtype=torch.long)
        fisher_windows = windows[: args.fisher_windows]
        sampler.label = "measure"
        with timer.stage("measure"):
            m = measure_model(model, view, windows, args.formats.split(","), args.method, True, False,
                              fisher_windows=fisher_windows, placement=placement, timer=lib_timer)
        rss["measure"] = maxrss_bytes()
        lo = sum(min(r.bytes for r in m.rows_for(t.name)) for t in m.tensors) + m.fixed_bytes
        hi = sum(max(r.bytes for r in m.rows_for(t.name)) for t in m.tensors) + m.fixed_bytes
        budget = f"{(lo + hi) // 2}B"
        sampler.label = "allocate"
        with timer.stage("allocate"):
            plan = make_plan(m, budget)
        rss["allocate"] = maxrss_bytes()
        sampler.label = "quantize"
        with timer.stage("quantize"):
            qt = quantize_model(model, view, plan, windows, args.method, progress=False, placement=placement,
                                timer=lib_timer)
        rss["quantize"] = maxrss_bytes()
        out_dir = spill / "packed"
        sampler.label = "write"
        with timer.stage("write"):
            info = save_packed(out_dir, model, view, qt, plan, None, overwrite=True)
        rss["write"] = maxrss_bytes()
    shutil.rmtree(out_dir, ignore_errors=True)
    # measurement workers (Placement.workers, separate processes): the peak is the sampled sum of this process's
    # and its workers' RSS at the same moment (or this process's own VmHWM, if higher: a spike between samples);
    # the sum of every process's own peak, as if all were at theirs at once, is kept as an upper bound
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    workers_bytes = placement.workers * int(worker_peak) if placement.workers > 1 else 0
    sampled = sampler.peak if sampler.peak else maxrss_bytes() + workers_bytes
    result: dict[str, Any] = {
        "params": int(view.total_params), "device": str(device), "offload": placement.offload,
        "threads": args.threads, "stages": timer.as_dict(), "library_stages": lib_timer.as_dict(),
        "workers": placement.workers, "worker_rss_peak_bytes": int(worker_peak) if workers_bytes else 0,
        "rss_main_peak_bytes": maxrss_bytes(),
        "rss_floor_bytes": floor, "rss_peak_bytes": max(sampled, maxrss_bytes()),
        "rss_peak_bound_bytes": maxrss_bytes() + workers_bytes,
        "rss_sampled_peak_bytes": sampler.peak, "rss_sampled_peak_by_stage_bytes": sampler.by_label,
        "rss_peak_after_stage_bytes": rss, "rss_now_bytes": current_rss_bytes(),
        "budget": budget, "plan_bytes": int(plan.total_bytes),
        "packed_bytes": int(info.get("bytes", 0)) if isinstance(info, dict) else None,
        "process_seconds": round(time.perf_counter() - t_process, 3),
        "rss_source": "VmHWM" if _proc_status("VmHWM") is not None else "ru_maxrss",
        "ru_maxrss_bytes": ru_maxrss_bytes(),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return result


# ------------------------------------------------------------------------------------------ the parent
def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the least-squares line through (log x, log y); None with fewer than two positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def source_commit() -> str | None:
    """The repository's commit, with ``-dirty`` when the library or this bench differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "bench/scaling.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a size's result depends on (:data:`RUN_KEYS`)."""
    return {k: getattr(args, k) for k in RUN_KEYS}


def reusable(path: Path, args: argparse.Namespace) -> dict[float, dict[str, Any]]:
    """Finished sizes of an earlier result file run with the same :func:`run_settings` (an entry's own
    ``run_settings``, else the file's ``settings``), by size; {} when the file is missing or unreadable."""
    try:
        body = json.loads(path.read_text())
        entries, file_settings = list(body["sizes"]), dict(body.get("settings", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    want = run_settings(args)
    out: dict[float, dict[str, Any]] = {}
    for e in entries:
        if not isinstance(e, dict) or "error" in e or "size_b" not in e:
            continue
        have = e.get("run_settings") or {k: file_settings.get(k) for k in RUN_KEYS}
        if have == want:
            out[float(e["size_b"])] = dict(e, run_settings=want)
    return out


def run_size(args: argparse.Namespace, billions: float) -> dict[str, Any]:
    shape = shape_for(billions, args.vocab)
    tag = f"llama-{billions:g}b-v{args.vocab}"
    folder = Path(args.work) / tag
    t0 = time.perf_counter()
    write_model(shape, folder, seed=args.seed)
    write_s = time.perf_counter() - t0
    result_file = Path(args.work) / f"{tag}.result.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder), "--result", str(result_file),
           "--formats", args.formats, "--method", args.method, "--windows", str(args.windows), "--ctx", str(args.ctx),
           "--fisher-windows", str(args.fisher_windows), "--device", args.device, "--threads", str(args.threads),
           "--seed", str(args.seed), "--spill", str(Path(args.work) / f"{tag}.spill")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    log.info("size %gB: %s (%d params), model written in %.0f s; running %s", billions, shape, shape.params,
             write_s, " ".join(cmd))
    t1 = time.perf_counter()
    entry: dict[str, Any] = {"size_b": billions, "shape": asdict(shape), "nominal_params": shape.params,
                             "model_write_seconds": round(write_s, 1), "commit": source_commit(),
                             "run_settings": run_settings(args)}
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        entry["wall_seconds"] = round(time.perf_counter() - t1, 2)
        if proc.returncode != 0 or not result_file.is_file():
            entry["error"] = f"worker exit {proc.returncode}: {proc.stdout[-2000:]}"
            log.error("size %gB failed: %s", billions, entry["error"])
        else:
            entry.update(json.loads(result_file.read_text()))
    except subprocess.TimeoutExpired:
        entry["error"] = f"timed out after {args.timeout} s"
        log.error("size %gB: %s", billions, entry["error"])
    shutil.rmtree(Path(args.work) / f"{tag}.spill", ignore_errors=True)
    if not args.keep_models:
        shutil.rmtree(folder, ignore_errors=True)
    return entry


def summarise(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Exponents over every size that ran (``time_exponents``...), and, under ``goal``, the same fitted over the
    :data:`GOAL_SIZES` only (None when fewer than two of them ran); the RSS goal at the largest size."""
    out = _fit(entries)
    at_goal = [e for e in entries if any(math.isclose(float(e["size_b"]), b) for b in GOAL_SIZES)]
    n_goal = sum("error" not in e for e in at_goal)
    goal = _fit(at_goal) if n_goal >= 2 else None
    out["goal"] = {"sizes_b": list(GOAL_SIZES), "sizes_run": n_goal,
                   "time_exponents": None if goal is None else goal["time_exponents"],
                   "total_exponent": None if goal is None else goal["total_exponent"]}
    return out


def _fit(entries: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [e for e in entries if "error" not in e]
    params = [float(e["params"]) for e in ok]
    fits: dict[str, Any] = {}
    for group, prefix in (("stages", ""), ("library_stages", "library:")):
        names: list[str] = []
        for e in ok:
            names += [s for s in e.get(group, {}) if s not in names]
        for s in names:
            ys = [float(e.get(group, {}).get(s, {}).get("seconds", 0.0)) for e in ok]
            k = fit_exponent(params, ys)
            fits[prefix + s] = {"exponent": k, "goal_met": None if k is None else k <= GOAL_EXPONENT}
    totals = [sum(float(e["stages"][s]["seconds"]) for s in ("load", "measure", "allocate", "quantize", "write")
                  if s in e["stages"]) for e in ok]
    above = [max(0, e["rss_peak_bytes"] - e["rss_floor_bytes"]) for e in ok]
    k_total = fit_exponent(params, totals)
    out: dict[str, Any] = {
        "time_exponents": fits,
        "total_exponent": {"exponent": k_total, "goal_met": None if k_total is None else k_total <= GOAL_EXPONENT},
        "rss_above_floor_exponent": fit_exponent(params, [float(a) for a in above]),
    }
    if ok:
        big = max(ok, key=lambda e: e["params"])
        frac = (big["rss_peak_bytes"] - big["rss_floor_bytes"]) / (4 * big["params"])
        out["largest"] = {"params": big["params"],
                          "rss_above_floor_bytes": big["rss_peak_bytes"] - big["rss_floor_bytes"],
                          "fp32_bytes": 4 * big["params"], "rss_above_floor_fraction_of_fp32": frac,
                          "goal_met": frac <= GOAL_RSS_FRACTION}
    return out


def stage_seconds(entry: dict[str, Any], name: str) -> float:
    """Seconds of a bench stage, or of a library stage named ``library:<name>`` (nan when not recorded)."""
    group, key = ("library_stages", name[len("library:"):]) if name.startswith("library:") else ("stages", name)
    return float(entry.get(group, {}).get(key, {}).get("seconds", float("nan")))


def plot(entries: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no PNG")
        return
    ok = sorted((e for e in entries if "error" not in e), key=lambda e: e["params"])
    if not ok:
        return
    xs = [e["params"] for e in ok]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for s, fit in summary["time_exponents"].items():
        ys = [stage_seconds(e, s) for e in ok]
        k = fit["exponent"]
        a1.plot(xs, ys, "x--" if s.startswith("library:") else "o-",
                label=f"{s} (k={k:.2f})" if k is not None else s)
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("parameters")
    a1.set_ylabel("seconds")
    a1.set_title(f"time per stage ({ok[0]['device']}, {ok[0]['threads']} threads)")
    a1.legend(fontsize=7)
    gib = 2**30
    a2.plot(xs, [e["rss_peak_bytes"] / gib for e in ok], "o-", label="peak RSS")
    a2.plot(xs, [(e["rss_peak_bytes"] - e["rss_floor_bytes"]) / gib for e in ok], "s-", label="peak RSS above floor")
    a2.plot(xs, [4 * e["params"] / gib for e in ok], "--", color="grey", label="fp32 model size")
    a2.plot(xs, [2 * e["params"] / gib for e in ok], ":", color="grey", label="half the fp32 size (goal)")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("parameters")
    a2.set_ylabel("GiB")
    a2.set_title("peak resident memory")
    a2.legend(fontsize=7)
    goal = (summary.get("goal") or {}).get("total_exponent") or {}
    sizes = ",".join(f"{b:g}" for b in GOAL_SIZES)
    over = "" if goal.get("exponent") is None else (
        f"; whole job over {sizes}B: k={goal['exponent']:.2f} (goal <= {GOAL_EXPONENT})")
    fig.suptitle(f"bitalloc scaling: random-weight Llama models, random tokens (k: fit over all sizes{over})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(k: float | None) -> str:
    return "-" if k is None else format(k, ".2f")


def print_table(entries: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    stages = list(summary["time_exponents"])
    mib = 2**20
    print(f"{'size':>6} {'params':>14} " + " ".join(f"{s.replace('library:', 'l:')[:12]:>12}" for s in stages)
          + f" {'peak MiB':>9} {'bound MiB':>9} {'floor MiB':>9} {'above/fp32':>10}")
    for e in entries:
        if "error" in e:
            print(f"{e['size_b']:>6g} {e['nominal_params']:>14,d}  failed: {e['error'][:80]}")
            continue
        cells = " ".join(f"{stage_seconds(e, s):>12.2f}" for s in stages)
        frac = (e["rss_peak_bytes"] - e["rss_floor_bytes"]) / (4 * e["params"])
        bound = e.get("rss_peak_bound_bytes", e["rss_peak_bytes"])
        print(f"{e['size_b']:>6g} {e['params']:>14,d} {cells} {e['rss_peak_bytes'] / mib:>9.0f} {bound / mib:>9.0f} "
              f"{e['rss_floor_bytes'] / mib:>9.0f} {frac:>10.3f}")
    ks = " ".join(f"{_fmt(f['exponent']):>12}" for f in summary["time_exponents"].values())
    print(f"{'exponent':>21} {ks}   (all sizes; bench stages' total {_fmt(summary['total_exponent']['exponent'])})")
    goal = summary.get("goal") or {}
    if goal.get("time_exponents"):
        kg = " ".join(f"{_fmt(goal['time_exponents'].get(s, {}).get('exponent')):>12}" for s in stages)
        kt = goal["total_exponent"]["exponent"]
        sizes = ",".join(f"{b:g}" for b in GOAL_SIZES)
        print(f"{'exponent ' + sizes + 'B':>21} {kg}   (goal <= {GOAL_EXPONENT}; total {_fmt(kt)}: "
              f"{'met' if kt is not None and kt <= GOAL_EXPONENT else 'NOT met'})")
    if "largest" in summary:
        L = summary["largest"]
        print(f"largest size: peak RSS above the floor = {L['rss_above_floor_fraction_of_fp32']:.3f} x fp32 size "
              f"(goal <= {GOAL_RSS_FRACTION}: {'met' if L['goal_met'] else 'NOT met'})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1,0.5,1.5",
                    help="model sizes in billions of parameters (default 0.1,0.5,1.5)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="passed as device= to the library functions that accept it (auto: cuda when available)")
    ap.add_argument("--formats", default="int4-g128,int3-g128", help="candidate formats (default int4-g128,int3-g128)")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="rounding when measuring and quantizing")
    ap.add_argument("--windows", type=int, default=4, help="calibration windows (random tokens, default 4)")
    ap.add_argument("--fisher-windows", type=int, default=2, help="windows of the Fisher pass (default 2)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary (default {VOCAB}; smaller for smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per size (default: no limit)")
    ap.add_argument("--work", default=str(WORK), help=f"models, spill files and packed outputs (default {WORK})")
    ap.add_argument("--keep-models", action="store_true", help="keep the random models for a rerun (reused)")
    ap.add_argument("--reuse", action="store_true",
                    help="take the sizes already in --out that ran with the same settings instead of running them "
                         "again (each entry records its commit)")
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"), help="result JSON (the PNG goes beside it)")
    ap.add_argument("--worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--spill", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.windows < 1 or args.ctx < 4 or not 1 <= args.fisher_windows <= args.windows:
        ap.error("need --windows >= 1, --ctx >= 4 and 1 <= --fisher-windows <= --windows")
    return args


def missing_modules() -> list[str]:
    """Modules the workers import that this interpreter cannot find (bitalloc's formats import gguf-py at import
    time, so it is needed even though nothing here writes a GGUF)."""
    import importlib.util

    sys.path.insert(0, str(REPO / "src"))
    try:
        return [m for m in ("torch", "transformers", "safetensors", "numpy", "scipy", "gguf", "bitalloc")
                if importlib.util.find_spec(m) is None]
    finally:
        sys.path.remove(str(REPO / "src"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.worker and (missing := missing_modules()):
        log.error("cannot run: %s not importable (bitalloc needs them at import; gguf is gguf-py)", ", ".join(missing))
        return 2
    if args.worker:
        res = run_worker(args)
        Path(args.result).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "result", "spill", "reuse")}
    t0 = time.perf_counter()
    earlier = reusable(out, args) if args.reuse else {}
    for b in sizes:
        if b in earlier:
            log.info("size %gB: reusing the result in %s (commit %s)", b, out, earlier[b].get("commit"))
            entries.append(dict(earlier[b], reused=True))
        else:
            entries.append(run_size(args, b))
        summary = summarise(entries)
        body = {"settings": settings, "checkpoint_dtype": "bfloat16", "compute_dtype": "float32",
                "weights": "random N(0, 0.02^2), norms 1, tied embedding", "tokens": "uniform random ids",
                "notes": "time per stage and peak RSS per size, each size in a fresh process; exponents are "
                         "least-squares slopes of log(seconds) on log(parameters)",
                "goal": {"exponent_max": GOAL_EXPONENT, "rss_above_floor_fraction_max": GOAL_RSS_FRACTION},
                "sizes": entries, "summary": summary, "seconds_this_run": round(time.perf_counter() - t0, 1)}
        out.write_text(json.dumps(body, indent=1) + "\n")
        plot(entries, summary, out.with_suffix(".png"))
    print_table(entries, summarise(entries))
    return 0 if all("error" not in e for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
