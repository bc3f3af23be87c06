"""How fast each hostile or careless input is refused (issue "Trust under hostile and careless input").

Every refusal must come before weights are loaded or text is calibrated, in seconds.  The bench builds a real
model folder (the packaged SmolLM2-135M, written as an fp32 safetensors folder, ~540 MB) and its GGUF, plants
one defect per case (the same kinds the tests build on tiny models), runs the ``bitalloc`` command as a
subprocess and records the wall time, the exit status and the one ``error:`` line.  The baseline in the same
run is the same command on the intact input (a ``measure`` with one window and RTN, the cheapest full run);
the ratio refusal / baseline shows the refusal happened before the work.  Also: the time and peak memory of
reading the calibration windows from a 2 GiB text file (only what is needed is read).
Writes bench/results/refusals.json and refusals.png, prints a table.

    python bench/refusals.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def default_gguf() -> Path:
    from bitalloc.models.sources import default_model_path

    return default_model_path()


def default_calib() -> Path:
    from bitalloc.data import default_calibration_files

    return default_calibration_files()[0]


def write_hf(gguf: Path, dest: Path) -> Path:
    """The GGUF as a Hugging Face folder (fp32 safetensors, config, tokenizer)."""
    from bitalloc.models.sources import load_model

    model, tok = load_model(gguf)
    model.save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))
    return dest


def run(argv: list[str], timeout: float = 900.0) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "bitalloc.cli", *argv], capture_output=True, text=True,
                              env=ENV, timeout=timeout, stdin=subprocess.DEVNULL)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, "timed out"
    seconds = time.perf_counter() - t0
    lines = [ln for ln in err.strip().splitlines() if ln and not ln.startswith("peak memory")]
    return {"seconds": round(seconds, 2), "rc": rc, "lines": len(lines), "line": lines[-1][:200] if lines else "",
            "one_line": rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err}


def measure_argv(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["measure", str(model), "--calib", str(calib), "--windows", "1", "--ctx", "64", "--method", "rtn",
            "--no-fisher", "--formats", "int8-g128", "-q", "--out", str(out), *extra]


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.unlink()  # the case folders hard-link the intact files: never write through a link
    path.write_text(json.dumps(d))


def _rewrite_safetensors(folder: Path, edit: Callable[[dict], None]) -> None:
    """Edit the tensors of a folder's single safetensors file (header-level: drop or reshape one)."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    f.unlink()  # hard-linked to the intact model: write a new file
    save_file(tensors, str(f), metadata={"format": "pt"})


def build_cases(work: Path, hf: Path, gguf: Path, calib: Path) -> list[tuple[str, str, Callable[[], list[str]]]]:
    """(class, name, setup returning argv) for every case; each setup makes its own copy of the input."""
    def copy_hf(name: str) -> Path:
        dest = work / name / "model"
        shutil.copytree(hf, dest, copy_function=os.link)  # edits replace files, never write through a link
        return dest

    def out(name: str) -> Path:
        return work / name / "out"

    def custom_tokenizer() -> list[str]:
        m = copy_hf("c1")
        (m / "evil_tok.py").write_text("open('/tmp/bitalloc-bench-marker','w').write('ran')\n")
        _edit_json(m / "tokenizer_config.json", lambda d: d.update(
            auto_map={"AutoTokenizer": ["evil_tok.T", "evil_tok.T"]}, tokenizer_class="EvilTokenizer"))
        return measure_argv(m, calib, out("c1"))

    def out_is_model() -> list[str]:
        m = copy_hf("c2a")
        return ["quantize", str(m), "--format", "int4-g128", "--calib", str(calib), "--windows", "1", "--ctx", "64",
                "-q", "--out", str(m), "--overwrite"]

    def out_contains_model() -> list[str]:
        m = copy_hf("c2b")
        return ["quantize", str(m), "--format", "int4-g128", "--calib", str(calib), "--windows", "1", "--ctx", "64",
                "-q", "--out", str(m.parent), "--overwrite"]

    def gguf_over_input() -> list[str]:
        d = work / "c2c"
        d.mkdir()
        g = d / "model.gguf"
        shutil.copy(gguf, g)
        return ["gguf", str(g), "--budget", "5bpw", "--calib", str(calib), "--windows", "1", "--ctx", "64", "-q",
                "-o", str(g), "--overwrite"]

    def missing_tensor() -> list[str]:
        m = copy_hf("c3a")
        _rewrite_safetensors(m, lambda t: t.pop(next(k for k in t if "layers.3.mlp.up_proj" in k)))
        return measure_argv(m, calib, out("c3a"))

    def misshaped_tensor() -> list[str]:
        m = copy_hf("c3b")
        key = "model.layers.5.self_attn.o_proj.weight"
        _rewrite_safetensors(m, lambda t: t.__setitem__(key, t[key][:, :-8].contiguous()))
        return measure_argv(m, calib, out("c3b"))

    def fifo_gguf() -> list[str]:
        d = work / "c5a"
        d.mkdir()
        os.mkfifo(d / "model.gguf")
        return measure_argv(d / "model.gguf", calib, out("c5a"))

    def huge_vocab() -> list[str]:
        m = copy_hf("c5b")
        _edit_json(m / "config.json", lambda d: d.update(vocab_size=2_000_000_000))
        return measure_argv(m, calib, out("c5b"))

    def vocab_plus_one() -> list[str]:
        m = copy_hf("c5d")
        _edit_json(m / "config.json", lambda d: d.update(vocab_size=d["vocab_size"] + 1))
        return measure_argv(m, calib, out("c5d"))

    def string_heads() -> list[str]:
        m = copy_hf("c6a")
        _edit_json(m / "config.json", lambda d: d.update(num_attention_heads="nine"))
        return measure_argv(m, calib, out("c6a"))

    def zero_heads() -> list[str]:
        m = copy_hf("c6b")
        _edit_json(m / "config.json", lambda d: d.update(num_key_value_heads=0))
        return measure_argv(m, calib, out("c6b"))

    def non_utf8_config() -> list[str]:
        m = copy_hf("c6c")
        (m / "config.json").unlink()
        (m / "config.json").write_bytes(b'{"model_type": "llama", "x": "\xff\xfe"}')
        return measure_argv(m, calib, out("c6c"))

    def budget_overflow() -> list[str]:
        return ["quantize", str(hf), "--budget", "1e400bpw", "--calib", str(calib), "-q", "--out", str(out("c6d"))]

    def text_fifo() -> list[str]:
        d = work / "c5c"
        d.mkdir()
        os.mkfifo(d / "calib.txt")
        return measure_argv(hf, d / "calib.txt", out("c5c"))

    def utf16_text() -> list[str]:
        d = work / "c6e"
        d.mkdir()
        (d / "calib.txt").write_bytes("To be, or not to be\n".encode("utf-16") * 100)
        return measure_argv(hf, d / "calib.txt", out("c6e"))

    def foreign_tokenizer() -> list[str]:
        m = copy_hf("c6f")  # a tokenizer whose ids run past the model's embedding rows
        tok = json.loads((m / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        base = max(vocab.values()) + 1
        for i, word in enumerate(("Ġthe", "Ġand", "Ġto", "Ġof", "Ġa", "Ġthat", "Ġis", "Ġin")):
            vocab.pop(word, None)
            vocab[word] = base + 1000 + i
        (m / "tokenizer.json").unlink()
        (m / "tokenizer.json").write_text(json.dumps(tok))
        return measure_argv(m, calib, out("c6f"))

    def flipped_packed_bit() -> list[str]:
        packed = work / "intact" / "packed"
        d = work / "c7" / "packed"
        shutil.copytree(packed, d)
        f = d / "model.safetensors"
        raw = bytearray(f.read_bytes())
        raw[-3] ^= 0x10
        f.write_bytes(bytes(raw))
        return ["eval", str(d), "--reference", str(hf), "--text", str(calib), "--windows", "1", "--ctx", "64", "-q"]

    return [
        ("1 custom code", "tokenizer names custom code", custom_tokenizer),
        ("2 input destroyed", "quantize --out MODEL --overwrite", out_is_model),
        ("2 input destroyed", "quantize --out PARENT-OF-MODEL --overwrite", out_contains_model),
        ("2 input destroyed", "gguf -o MODEL.gguf --overwrite", gguf_over_input),
        ("3 missing tensor", "a tensor missing from the safetensors", missing_tensor),
        ("3 missing tensor", "a tensor of the wrong shape", misshaped_tensor),
        ("5 metadata", "FIFO named model.gguf", fifo_gguf),
        ("5 metadata", "config vocab_size 2e9 (out of range)", huge_vocab),
        ("5 metadata", "config vocab_size +1 (tensors disagree)", vocab_plus_one),
        ("5 metadata", "FIFO named calib.txt", text_fifo),
        ("6 malformed", "config heads as a string", string_heads),
        ("6 malformed", "config with zero KV heads", zero_heads),
        ("6 malformed", "config not UTF-8", non_utf8_config),
        ("6 malformed", "budget 1e400bpw", budget_overflow),
        ("6 malformed", "calibration text in UTF-16 (NUL bytes)", utf16_text),
        ("6 malformed", "tokenizer ids beyond the embedding", foreign_tokenizer),
        ("7 reading verified", "eval of a packed model with one flipped bit", flipped_packed_bit),
    ]


def _read_windows(path: Path) -> dict:
    """A fresh process that loads the packaged tokenizer and reads 128 windows of 512 tokens from ``path``:
    seconds of the read and peak RSS of the process."""
    code = ("import resource, pathlib, time; from bitalloc.models.sources import default_model_path, _tokenizer; "
            "from bitalloc.cli.common import _windows; tok = _tokenizer(default_model_path(), gguf=True); "
            f"t = time.perf_counter(); w = _windows(tok, [pathlib.Path({str(path)!r})], 128, 512); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=900)
    if proc.returncode != 0:
        return {"file_bytes": path.stat().st_size, "error": proc.stderr.strip().splitlines()[-1:]}
    secs, rss = proc.stdout.split()[-2:]
    return {"file_bytes": path.stat().st_size, "seconds": round(float(secs), 2), "peak_rss_mib": int(rss)}


def huge_text(work: Path, calib: Path) -> dict:
    """Calibration windows from a 2 GiB text file against the same from the packaged comedy (same process
    setup): the read must not grow with the file."""
    path = work / "huge.txt"
    line = b"Now is the winter of our discontent made glorious summer by this sun of York.\n"
    with open(path, "wb") as f:
        for _ in range((2 << 30) // (len(line) * 4096)):
            f.write(line * 4096)
    out = {"windows": "128 x 512", "huge": _read_windows(path), "packaged_text": _read_windows(calib)}
    path.unlink()
    return out


def plot(rows: list[dict], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    names = [r["case"] for r in rows]
    ax.barh(names, [r["seconds"] for r in rows], color=["tab:green" if r["one_line"] else "tab:red" for r in rows])
    ax.axvline(baseline, color="k", ls="--", label=f"intact input, whole measure run ({baseline:.0f} s)")
    ax.set_xscale("log")
    ax.set_xlabel("seconds to the refusal (log)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("bitalloc: time to refuse hostile / careless input (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-huge-text", action="store_true", help="skip the 2 GiB text case")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    gguf, calib = default_gguf(), default_calib()
    with tempfile.TemporaryDirectory(prefix="bitalloc-refusals-") as tmp:
        work = Path(tmp)
        hf = write_hf(gguf, work / "intact" / "model")
        base = run(measure_argv(hf, calib, work / "intact" / "table.json"))
        packed = run(["quantize", str(hf), "--format", "int8-g128", "--calib", str(calib), "--windows", "1",
                      "--ctx", "64", "-q", "--out", str(work / "intact" / "packed")])
        assert packed["rc"] == 0, packed
        rows = []
        for cls, name, setup in build_cases(work, hf, gguf, calib):
            r = run(setup(), timeout=max(120.0, 2 * base["seconds"]))
            rows.append({"class": cls, "case": name, **r, "ratio_to_baseline": round(r["seconds"] / base["seconds"], 3)})
        text = None if args.no_huge_text else huge_text(work, calib)
    result = {"baseline": {"command": "measure, 1 window x 64 tokens, RTN, int8-g128", **base}, "cases": rows,
              "huge_text": text, "marker_written": Path("/tmp/bitalloc-bench-marker").exists()}
    (RESULTS / "refusals.json").write_text(json.dumps(result, indent=2))
    plot(rows, base["seconds"], RESULTS / "refusals.png")
    print(f"baseline (intact input, whole measure run): {base['seconds']:.1f} s, rc {base['rc']}")
    print(f"{'class':<18} {'case':<44} {'s':>6} {'ratio':>6}  one line  message")
    for r in rows:
        print(f"{r['class']:<18} {r['case']:<44} {r['seconds']:>6.2f} {r['ratio_to_baseline']:>6.3f}  "
              f"{'yes' if r['one_line'] else 'NO':<8}  {r['line'][:90]}")
    if text:
        for k in ("huge", "packaged_text"):
            print(f"windows from {k} ({text[k]['file_bytes']} B): {text[k]}")


if __name__ == "__main__":
    main()
