"""Storage formats: exact byte costs, grids, packing.  Importing this package registers every family."""
from .base import REGISTRY, Format, FormatError, Grid, QTensor, Shape, get_format
from . import keep as _keep  # noqa: F401  (registers fp16/bf16/fp32)
from . import int as _int  # noqa: F401  (registers int{2..8}-g{32,64,128}|row[-sym])
from . import gguf as _gguf  # noqa: F401  (registers q8_0 ... q2_k, iq4_nl)
from . import rotated as _rotated  # noqa: F401  (registers had-<grid format>)


def list_formats() -> list[str]:
    """Example ids of every registered family (what ``--help`` shows)."""
    return REGISTRY.examples()


__all__ = ["Format", "FormatError", "Grid", "QTensor", "Shape", "get_format", "list_formats", "REGISTRY"]
