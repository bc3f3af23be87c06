"""Helpers to run llama.cpp's tools (built by bench/build_llamacpp_tools.sh) and llama-cpp-python.

Used by bench/gguf_vs_llamacpp.py and the slow export test.  Every tool runs at niceness 10 on a
fixed thread count; its output is parsed from the lines llama.cpp prints (``Final estimate: PPL = ...``,
``Mean    KLD: ...``, ``Same top p: ...``).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
TOOLS_DIR = REPO / ".cache" / "llamacpp" / "bin"
THREADS = 2
log = logging.getLogger(__name__)


class ToolMissing(RuntimeError):
    """A llama.cpp tool is not built."""


def tool(name: str, tools_dir: Path = TOOLS_DIR) -> Path:
    path = tools_dir / name
    if not path.is_file():
        raise ToolMissing(f"{path} not found: run bench/build_llamacpp_tools.sh first")
    return path


def run_tool(name: str, args: Sequence[str | Path], *, timeout: float = 1800, tools_dir: Path = TOOLS_DIR) -> str:
    """Run a tool, return its combined stdout+stderr; raise with the output tail when it fails."""
    bump = max(0, 10 - os.nice(0))  # run at niceness 10, also from a process that is already niced
    cmd = ["nice", "-n", str(bump), str(tool(name, tools_dir)), *map(str, args)]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return proc.stdout


# ----------------------------------------------------------------------------------------- tools
def imatrix(model: Path, text: Path, out: Path, *, ctx: int = 512, chunks: int = 64, threads: int = THREADS) -> Path:
    """An importance matrix for ``model`` from ``text`` (llama-imatrix)."""
    run_tool("llama-imatrix", ["-m", model, "-f", text, "-o", out, "-c", ctx, "--chunks", chunks,
                               "-t", threads, "-b", ctx, "--no-ppl"])
    return out


def quantize(src: Path, out: Path, qtype: str, *, imatrix_file: Path | None = None, pure: bool = False,
             threads: int = THREADS) -> Path:
    """llama-quantize ``src`` to ``qtype`` (a mix name such as Q4_K_M or a type such as IQ4_NL)."""
    args: list[str | Path] = []
    if imatrix_file is not None:
        args += ["--imatrix", imatrix_file]
    if pure:
        args.append("--pure")
    run_tool("llama-quantize", [*args, src, out, qtype, threads])
    return out


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_PPL_Q = re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s*(-?[0-9.]+)")
_TOP = re.compile(r"Same top p:\s*([0-9.]+)")


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    kld: float | None = None
    top1: float | None = None  # share in [0, 1]


def parse_perplexity(output: str) -> PerplexityResult:
    """PPL (and, with --kl-divergence, mean KLD and the top-1 share) from llama-perplexity's output."""
    m = _PPL_Q.search(output) or _PPL.search(output)
    if m is None:
        raise RuntimeError(f"no perplexity in llama-perplexity output:\n{output[-2000:]}")
    kld, top = _KLD.search(output), _TOP.search(output)
    return PerplexityResult(float(m.group(1)), float(kld.group(1)) if kld else None,
                            float(top.group(1)) / 100.0 if top else None)


def perplexity_base(model: Path, text: Path, base_out: Path, *, ctx: int = 512, chunks: int = 32,
                    threads: int = THREADS) -> PerplexityResult:
    """PPL of the reference; saves its logits for later --kl-divergence runs."""
    out = run_tool("llama-perplexity", ["-m", model, "-f", text, "-c", ctx, "-b", ctx, "--chunks", chunks,
                                        "-t", threads, "--kl-divergence-base", base_out])
    return parse_perplexity(out)


def perplexity_kld(model: Path, text: Path, base: Path, *, ctx: int = 512, chunks: int = 32,
                   threads: int = THREADS) -> PerplexityResult:
    """PPL, mean KLD and top-1 agreement of ``model`` against the saved reference logits."""
    out = run_tool("llama-perplexity", ["-m", model, "-f", text, "-c", ctx, "-b", ctx, "--chunks", chunks,
                                        "-t", threads, "--kl-divergence-base", base, "--kl-divergence"])
    res = parse_perplexity(out)
    if res.kld is None or res.top1 is None:
        raise RuntimeError(f"no KLD statistics in llama-perplexity output:\n{out[-2000:]}")
    return res


# ------------------------------------------------------------------------------ llama-cpp-python
@contextmanager
def _model_params(**fields: Any) -> Iterator[None]:
    """``llama_cpp.Llama`` has no ``use_extra_bufts`` argument: within the block the default model parameters
    it starts from carry ``fields`` (its module's reference to the function is swapped, then restored)."""
    mod = sys.modules["llama_cpp.llama"].llama_cpp
    original = mod.llama_model_default_params

    def patched() -> Any:
        params = original()
        for k, v in fields.items():
            setattr(params, k, v)
        return params

    mod.llama_model_default_params = patched
    try:
        yield
    finally:
        mod.llama_model_default_params = original


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


def llama_cpp_dequantize(llama_cpp: Any, raw: np.ndarray, ggml_type: int, n: int) -> torch.Tensor:
    """The ``n`` float32 values llama.cpp's own ``to_float`` (ggml type traits of the library llama-cpp-python
    loads, as used by ``get_rows`` and by dequantizing matmuls) decodes from the raw blocks ``raw``."""
    src = np.ascontiguousarray(raw, dtype=np.uint8)
    if int(ggml_type) == 0:  # F32 is stored as is (ggml has no to_float for it)
        return torch.from_numpy(src.view(np.float32)[:n].copy())
    lib = ctypes.CDLL(str(sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))[0]))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(int(ggml_type)).contents
    if not traits.to_float:
        raise RuntimeError(f"llama.cpp has no to_float for ggml type {int(ggml_type)}")
    out = np.empty(n, dtype=np.float32)
    traits.to_float(src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
    return torch.from_numpy(out)


def llama_cpp_logits(llama_cpp: Any, gguf_path: Path, windows: torch.Tensor, threads: int = THREADS, *,
                     repack: bool = True) -> torch.Tensor:
    """Logits llama.cpp computes for each window of token ids, (n, ctx, vocab) float32.

    ``repack=False`` loads without llama.cpp's extra CPU buffer types: q4_0, iq4_nl, q4_K and q2_K then run
    through the plain ``vec_dot``/llamafile kernels instead of the repacked 8x8 interleaved ones.
    """
    import llama_cpp.llama  # noqa: F401  (the module whose default parameters _model_params adjusts)

    ctx = int(windows.shape[1])
    with _model_params(use_extra_bufts=repack):
        llm = llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=ctx, n_batch=ctx,
                              n_threads=threads, verbose=False)
    out = []
    try:
        for row in windows.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[:ctx], dtype=np.float32)))
    finally:
        llm.close()
    return torch.stack(out)


@torch.no_grad()
def model_logits(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers model, (n, ctx, vocab) float32."""
    return torch.cat([model(w[None]).logits.float() for w in windows])


PROOF_TYPES = ("q4_0", "q5_0", "iq4_nl", "q4_1", "q5_1", "q8_0")  # 32-wide: every SmolLM2 linear
PROOF_K_TYPES = ("q4_k", "q6_k", "q3_k", "q5_k", "q2_k")  # 256-wide: ffn_down (1536 columns)


def proof_gguf(workdir: Path, n_windows: int = 3, n_blocks: int | None = None
               ) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """A bitalloc GGUF of the packaged SmolLM2 using every GGUF type, the model holding exactly the
    values it decodes to, and ``n_windows`` held-out windows (tragedies) of 512 tokens.

    Linears of the first ``n_blocks`` blocks (all by default) cycle through the 32-wide types (ffn_down
    through the K-quants), the tied embedding/output is q8_0, the rest stays F32.  RTN rounding: the
    point is that llama.cpp decodes bitalloc's blocks (with the q/k row permutation) as bitalloc does.
    """
    from bitalloc.data import default_eval_files, read_texts, token_windows
    from bitalloc.export.gguf import read_template, write_gguf
    from bitalloc.models.sources import default_model_path, load_model
    from bitalloc.models.view import ModelView
    from bitalloc.quantize import set_weight
    from bitalloc.rounding import dequantize, quantize_weight

    src = default_model_path()
    model, tok = load_model(src)
    view = ModelView(model)
    held = token_windows(tok, read_texts(default_eval_files()), 512, n_windows)
    params = dict(model.named_parameters())
    tpl = read_template(src)
    hf_to_gguf = tpl.names.to_gguf
    tensors: dict[str, Any] = {}
    used = {PROOF_TYPES: 0, PROOF_K_TYPES: 0}
    for ref in view.quantizable():
        if ref.kind == "linear" and n_blocks is not None and (ref.block or 0) >= n_blocks:
            continue
        if ref.kind == "embedding":
            fmt = "q8_0"
        else:
            cycle = PROOF_K_TYPES if ref.shape[1] % 256 == 0 else PROOF_TYPES
            fmt = cycle[used[cycle] % len(cycle)]
            used[cycle] += 1
        q = quantize_weight(params[ref.name].detach(), fmt, method="rtn")
        set_weight(model, ref.name, dequantize(q))
        tensors[hf_to_gguf(ref.name)] = q
    in_file = {t[0] for t in tpl.tensors}
    for name, p in params.items():
        gg = hf_to_gguf(name)
        if gg not in tensors and gg in in_file:
            tensors[gg] = p.detach()
    out = workdir / "bitalloc-proof.gguf"
    write_gguf(out, tpl, tensors)
    return out, model, held
