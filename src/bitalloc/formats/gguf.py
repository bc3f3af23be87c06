"""GGUF (llama.cpp) block types as bitalloc formats; importing this module registers all of them.

The 32-wide types live in :mod:`.gguf_legacy` (``q8_0 q5_1 q5_0 q4_1 q4_0 iq4_nl``), the 256-wide K-quants
in :mod:`.gguf_kquants` (``q6_k q5_k q4_k q3_k q2_k``).  Each format has ``gguf_type``
(``gguf.GGMLQuantizationType``) for the writer and stores ``weight_packed`` = the raw llama.cpp blocks.
"""
from __future__ import annotations

from .base import REGISTRY, Format
from .gguf_common import GGUFFormat
from .gguf_kquants import GGUFKQuant, KQUANT_TYPES
from .gguf_legacy import GGUFLegacy

LEGACY_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
GGUF_TYPES = LEGACY_TYPES + KQUANT_TYPES


def parse_gguf(format_id: str) -> Format | None:
    """``q4_k`` -> the Q4_K format; None for ids of other families."""
    if format_id in LEGACY_TYPES:
        return GGUFLegacy(format_id)
    if format_id in KQUANT_TYPES:
        return GGUFKQuant(format_id)
    return None


REGISTRY.register("gguf", parse_gguf, GGUF_TYPES)

__all__ = ["GGUFFormat", "GGUFLegacy", "GGUFKQuant", "GGUF_TYPES", "LEGACY_TYPES", "KQUANT_TYPES", "parse_gguf"]
