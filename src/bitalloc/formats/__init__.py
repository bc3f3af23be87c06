"""Storage formats: exact byte costs, grids, packing.  Importing this package registers every family."""
from .base import REGISTRY, Format, FormatError, Grid, QTensor, Shape, get_format
from . import outliers as _outliers  # noqa: F401  (registers BASE+oK first: it sees ids the families would refuse)
from . import keep as _keep  # noqa: F401  (registers fp16/bf16/fp32)
from . import int_dq as _int_dq  # noqa: F401  (int{b}-g{G}-dq[S]; before int, which refuses other int ids)
from . import int as _int  # noqa: F401  (registers int{2..8}-g{32,64,128}|row[-sym])
from . import gguf as _gguf  # noqa: F401  (registers q8_0 ... q2_k, iq4_nl)
from . import fp as _fp, nf4 as _nf4  # noqa: F401  (registers fp4-g32 ... mxfp4, nvfp4, fp8; nf4)
from . import mixture as _mixture  # noqa: F401  (registers mix{3,4}-g{32,64,128})
from . import mixture_dq as _mixture_dq  # noqa: F401  (registers mix{3,4}-g{16,32}-dq[S])
from . import rotated as _rotated  # noqa: F401  (registers had-<grid format>)


def list_formats() -> list[str]:
    """Example ids of every registered family (what ``--help`` shows)."""
    return REGISTRY.examples()


__all__ = ["Format", "FormatError", "Grid", "QTensor", "Shape", "get_format", "list_formats", "REGISTRY"]
