"""``bitalloc export PACKED_DIR --to compressed-tensors|vllm --out DIR``: a packed directory converted, without
re-quantizing, into a compressed-tensors checkpoint (:mod:`bitalloc.export.compressed_tensors`); ``vllm`` first
refuses a tensor in a format vLLM cannot run (:mod:`bitalloc.targets.vllm`)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError
from .options import add_common, add_out

#: the packed directory's own files; every other top-level file (config.json, the tokenizer's) is copied
_OWN = ("model.safetensors", "bitalloc.json", "manifest.json")


def cmd_export(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from ..api import _config_errors
    from ..checked import one_line
    from ..export.compressed_tensors import save_compressed_tensors
    from ..export.ct_schemes import scheme_for
    from ..export.packed import read_packed
    from ..formats import FormatError
    from ..models.config_checks import read_config
    from ..targets.compressed_tensors import linear_modules
    from ..targets.vllm import check_fused, why_not as why_not_vllm

    src, out = Path(args.dir), Path(args.out)
    info, qtensors = read_packed(src, verify=not args.no_verify)  # checked against its manifest first
    for name, q in sorted(qtensors.items()):  # every format refused before any work, naming its tensor
        try:
            scheme_for(q.format)
        except FormatError as e:
            raise InputError(f"{name}: {e}") from None
        reason = why_not_vllm(q.format) if args.to == "vllm" else None
        if reason is not None:
            raise InputError(f"{name}: --to vllm: {q.format} cannot be run by vLLM: {reason}")
    if args.to == "vllm":
        check_fused(qtensors)
    read_config(src)
    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
        linears = linear_modules(config)
    except _config_errors() as e:
        raise InputError(f"cannot read {src / 'config.json'}: {one_line(e)}") from None

    def write_base(tmp: Path) -> None:
        for f in sorted(src.iterdir()):
            if f.name not in _OWN and f.is_file() and not f.is_symlink():
                shutil.copyfile(f, tmp / f.name)

    written = save_compressed_tensors(out, qtensors, linears=linears, write_base=write_base,
                                      total_params=info["total_params"], tied=bool(info.get("tied", False)),
                                      plan=info.get("plan"), overwrite=args.overwrite, inputs=[src])
    print(f"wrote {out}: {written['bytes']} B ({written['bytes'] / 2**20:.2f} MiB, {written['bpw']:.4f} bpw) as "
          f"compressed-tensors (the packed directory: {info['bytes']} B), verified")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``export`` on the subcommand set ``sub``."""
    p = sub.add_parser("export", help="convert a packed directory to a compressed-tensors checkpoint",
                       description="Write the tensors of a packed directory (from `bitalloc quantize`) as a "
                       "compressed-tensors checkpoint that transformers and vLLM load, codes and scales unchanged; "
                       "a format compressed-tensors cannot express (asymmetric ints, GGUF types) is refused.")
    p.add_argument("dir", metavar="PACKED_DIR", help="packed directory from `bitalloc quantize`")
    p.add_argument("--to", choices=("compressed-tensors", "vllm"), required=True,
                   help="output format: compressed-tensors, or vllm (the same checkpoint, refused when a tensor is in a "
                   "format vLLM has no kernel for)")
    add_out(p, "output directory (must not exist)", "replace an existing output directory")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking PACKED_DIR against its manifest.json (bitalloc.json is still validated)")
    add_common(p)
    p.set_defaults(func=cmd_export)
