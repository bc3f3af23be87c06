"""The format contract every storage format implements, the grid GPTQ rounds onto, and the registry.

A *format* is a storage scheme for one weight tensor (``int4-g128``, ``q4_k``, ``fp16``). It knows

* its exact storage cost in bytes for a given shape (codes, scales, zero-points, padding): ``nbytes``;
* how to choose quantization parameters for a weight matrix (scale search): ``fit`` -> :class:`Grid`;
* how to pack integer codes on a grid into bytes and back: ``encode`` / ``decode``.

Rounding algorithms (RTN, GPTQ in :mod:`bitalloc.rounding`) never import a specific format: they work on
the :class:`Grid` a format returns, which describes every representable value of every element as
``scale[r, g] * levels[code] + offset[r, g]`` with ``g = column // group_size``.  That single shape covers
integer formats (uniform levels, fp16 scale and min), GGUF block types (including the two-level K-quant
scales, once the sub-scales are fixed) and codebook formats (IQ4_NL, NF4: non-uniform ``levels``).

Formats register a *parser* (``format id -> Format | None``) so user-typed ids are resolved without the
core knowing about families.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import BitallocError

Shape = tuple[int, ...]


class FormatError(BitallocError, ValueError):
    """A format id that does not exist, or a tensor shape a format cannot store."""


#: Formats that decode in parts (the int formats by rows, the GGUF types by blocks) decode at most this many values
#: at a time, so that a large tensor's temporaries stay small.
DECODE_CHUNK_ELEMS = 1 << 20


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor as stored: self-describing named parts plus what is needed to decode it.

    ``parts`` uses on-disk names: ``weight_packed`` (uint8 codes or raw GGUF blocks), ``weight_scale``,
    ``weight_zero`` (when the format has them).  ``nbytes()`` equals ``get_format(format).nbytes(shape)``.
    """

    format: str
    shape: Shape
    dtype: str  # original dtype name, e.g. "float32", "bfloat16"
    parts: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


@dataclass(frozen=True, eq=False)
class Grid:
    """Every value an element may take: ``scale[r, g] * levels[code] + offset[r, g]``.

    ``scale`` and ``offset`` are float32 tensors of shape ``(rows, ngroups)`` holding the values exactly as
    the format stores them (already rounded to fp16 etc.), ``levels`` a sorted float32 codebook and
    ``group_size`` the number of consecutive input columns sharing one (scale, offset).  ``extra`` carries
    format-specific data that ``encode`` needs (e.g. K-quant super-block scales and integer sub-scales).

    Two optional extensions (None for every plain grid, whose arithmetic is then exactly as without them):

    * ``set_index`` (int64 ``(rows, ngroups)``): a mixture of value sets.  ``levels`` is then 2-D ``(nsets, L)``,
      each row a sorted codebook, and group ``(r, g)`` uses ``levels[set_index[r, g]]``; codes index within it.
    * ``exact_mask`` (bool ``(rows, cols)``) with ``exact_values`` (float32 ``(rows, cols)``): elements stored
      exactly (sparse outliers).  Where the mask is set the element's value is ``exact_values`` whatever its
      code (the code still indexes the grid, so the base format can pack it); elsewhere ``exact_values`` is
      ignored.  The values are fixed when the grid is fitted (the format's stored values, e.g. fp16 of the
      original weights), so rounding at such a column leaves the error ``w − exact`` (GPTQ propagates it).
    """

    scale: torch.Tensor
    offset: torch.Tensor
    levels: torch.Tensor
    group_size: int
    extra: dict[str, Any] = field(default_factory=dict)
    set_index: torch.Tensor | None = None
    exact_mask: torch.Tensor | None = None
    exact_values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.exact_mask is None) != (self.exact_values is None):
            raise FormatError("Grid: exact_mask and exact_values go together")
        if self.set_index is not None and self.levels.dim() != 2:
            raise FormatError(f"Grid: a set_index needs 2-D levels (nsets, L), got {tuple(self.levels.shape)}")
        if self.set_index is None and self.levels.dim() != 1:
            raise FormatError(f"Grid: levels must be 1-D without a set_index, got {tuple(self.levels.shape)}")

    @property
    def plain(self) -> bool:
        """True when the grid uses neither a mixture of value sets nor exactly stored elements."""
        return self.set_index is None and self.exact_mask is None

    @property
    def rows(self) -> int:
        return int(self.scale.shape[0])

    def to(self, device: torch.device | str) -> "Grid":
        """This grid with its tensors (``extra``'s included) on ``device``; itself when already there."""
        device = torch.device(device)
        opt = [t for t in (self.set_index, self.exact_mask, self.exact_values) if t is not None]
        if self.scale.device == device and self.levels.device == device and all(t.device == device for t in opt):
            return self
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return Grid(self.scale.to(device), self.offset.to(device), self.levels.to(device), self.group_size, extra,
                    move(self.set_index), move(self.exact_mask), move(self.exact_values))

    def group_of(self, cols: torch.Tensor) -> torch.Tensor:
        return torch.div(cols, self.group_size, rounding_mode="floor")

    def snap(self, w: torch.Tensor, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest grid point for each element of ``w`` (``rows x k``) whose columns are ``cols`` (k,).

        Returns ``(codes, values)``: int64 indices into ``levels`` and the float32 values they decode to.
        ``cols`` defaults to ``0..k-1``.  A zero scale maps every element to its offset (code of the level
        closest to 0).  Never produces NaN for finite inputs.
        """
        w = w.to(torch.float32)
        if cols is None:
            cols = torch.arange(w.shape[1], device=w.device)
        cols = cols.to(device=w.device, dtype=torch.long)
        g = self.group_of(cols)
        s = self.scale[:, g]
        o = self.offset[:, g]
        zero = s == 0
        u = torch.where(zero, torch.zeros_like(w), (w - o) / torch.where(zero, torch.ones_like(s), s))
        levels = self.levels.to(w.device)
        if self.set_index is None:
            mids = (levels[1:] + levels[:-1]) * 0.5
            codes = torch.searchsorted(mids, u.contiguous())
            lv = levels[codes]
        else:
            codes, lv = _snap_sets(u, self.set_index.to(w.device)[:, g], levels)
        values = s * lv + o
        if self.exact_mask is not None:
            values = torch.where(self.exact_mask.to(w.device)[:, cols], self.exact_values.to(w.device)[:, cols],
                                 values)
        return codes, values

    def level_values(self, codes: torch.Tensor) -> torch.Tensor:
        """The codebook value of every code (``rows x cols``), before scale and offset (each group's own set)."""
        levels = self.levels.to(codes.device)
        if self.set_index is None:
            return levels.take(codes)
        g = self.group_of(torch.arange(int(codes.shape[1]), device=codes.device))
        return levels.reshape(-1).take(self.set_index.to(codes.device)[:, g] * int(levels.shape[1]) + codes)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode full-width codes (``rows x cols``) to float32 values (on the codes' device)."""
        rows, cols = (int(d) for d in codes.shape)
        lv = self.levels.to(codes.device).take(codes) if self.set_index is None else self.level_values(codes)
        gs = self.group_size
        if cols % gs == 0 and tuple(self.scale.shape) == (rows, cols // gs):  # broadcast: no (rows, cols) gathers
            s, o = self.scale.unsqueeze(-1), self.offset.unsqueeze(-1)
            out = (s * lv.reshape(rows, -1, gs) + o).reshape(rows, cols)
        else:
            g = self.group_of(torch.arange(cols, device=codes.device))
            out = self.scale[:, g] * lv + self.offset[:, g]
        if self.exact_mask is not None:
            out = torch.where(self.exact_mask.to(out.device), self.exact_values.to(out.device), out)
        return out

    def pick_rows(self, take: torch.Tensor, other: "Grid") -> "Grid | None":
        """Row by row this grid where ``take`` (bool, one per row) else ``other`` (a grid of the same format and
        shape): scales, offsets, set indices, exact elements and every per-row tensor of ``extra`` (leading
        dimension = rows).  None when the two differ in anything that is not per row (levels, group size, another
        entry of ``extra``), so that no row mix would be consistent."""
        rows = self.rows
        if tuple(take.shape) != (rows,) or other.rows != rows or other.group_size != self.group_size \
                or set(self.extra) != set(other.extra) or not _same(self.levels, other.levels):
            return None
        t = take.to(torch.bool)

        def pick(a: Any, b: Any) -> Any:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 1 \
                    and int(a.shape[0]) == rows and a.shape == b.shape:
                return torch.where(t.to(a.device).reshape(-1, *([1] * (a.dim() - 1))), a, b.to(a.device))
            if _same(a, b):
                return a
            raise _NotPerRow

        def opt(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None and b is None:
                return None
            if a is None or b is None:
                raise _NotPerRow
            return pick(a, b)
        try:
            return Grid(pick(self.scale, other.scale), pick(self.offset, other.offset), self.levels, self.group_size,
                        {k: pick(v, other.extra[k]) for k, v in self.extra.items()},
                        opt(self.set_index, other.set_index), opt(self.exact_mask, other.exact_mask),
                        opt(self.exact_values, other.exact_values))
        except _NotPerRow:
            return None


class _NotPerRow(Exception):
    """Two grids differ in something that is not per row (:meth:`Grid.pick_rows`)."""


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same value (tensors: same shape and elements)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _snap_sets(u: torch.Tensor, sets: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest level of each element of ``u`` in its own set ``levels[sets]`` (``levels`` ``(nsets, L)``):
    ``(codes, level values)``, each exactly ``searchsorted`` over that set's midpoints (ties: the lower level)."""
    codes = torch.zeros(u.shape, dtype=torch.int64, device=u.device)
    uc = u.contiguous()
    for k in range(int(levels.shape[0])):
        mids = ((levels[k, 1:] + levels[k, :-1]) * 0.5).contiguous()
        codes = torch.where(sets == k, torch.searchsorted(mids, uc), codes)
    return codes, levels.reshape(-1).take(sets * int(levels.shape[1]) + codes)


class Format(ABC):
    """A storage format for one tensor.  Subclasses are frozen dataclasses validated in ``__post_init__``."""

    #: True for formats that quantize onto a :class:`Grid`; False for pass-through (fp16/bf16/fp32).
    is_grid: bool = True

    #: The rounding the format's runtime applies to a matmul's input activations (a name from
    #: :mod:`bitalloc.activations`, e.g. ``q8_0`` for llama.cpp's CPU kernels), or None when it multiplies
    #: with float activations.  The measurement adds the output error of that rounding to the format's.
    activation_rounding: str | None = None

    @property
    @abstractmethod
    def id(self) -> str:
        """The short id users type and plans store (``int4-g128``, ``q4_k``, ``fp16``)."""

    @property
    def bits(self) -> float:
        """Nominal bits of one code (not counting scales); see :meth:`bpw` for the true cost."""
        return float("nan")

    @abstractmethod
    def nbytes(self, shape: Shape) -> int:
        """Exact bytes a tensor of ``shape`` takes in storage, scales, zero-points and padding included."""

    def bpw(self, shape: Shape) -> float:
        return 8.0 * self.nbytes(shape) / math.prod(shape)

    def check_shape(self, shape: Shape) -> None:
        """Raise :class:`FormatError` when the format cannot store ``shape`` (e.g. rows not a multiple of 256)."""
        if len(shape) == 0 or any(int(d) <= 0 for d in shape):
            raise FormatError(f"{self.id}: cannot store a tensor of shape {tuple(shape)}")

    def check_2d(self, shape: Shape) -> None:
        """:meth:`check_shape` for formats that store 2-D ``(rows, cols)`` tensors only."""
        if len(tuple(shape)) != 2:
            raise FormatError(f"{self.id}: stores 2-D (rows, cols) tensors only, got shape {tuple(shape)}")
        Format.check_shape(self, shape)

    def check_parts(self, q: QTensor, want: dict[str, tuple[torch.dtype, Shape]]) -> None:
        """FormatError unless ``q``'s parts are exactly ``want`` (name -> (dtype, shape))."""
        got = {k: (t.dtype, tuple(t.shape)) for k, t in q.parts.items()}
        if got != want:
            raise FormatError(f"{self.id}: a tensor of shape {tuple(q.shape)} stores {want}, got {got}")

    def supports(self, shape: Shape) -> bool:
        try:
            self.check_shape(shape)
        except FormatError:
            return False
        return True

    # --- grid formats -------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        """Choose scales/offsets for the 2-D weight ``w`` (rows = outputs, cols = inputs).

        ``importance`` weights the squared error of each element in the scale search: shape ``(cols,)``
        (e.g. the Hessian diagonal / mean squared activation) or ``(rows, cols)``.
        """
        raise NotImplementedError(f"{self.id} is not a grid format")

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        """Pack int64 ``codes`` (``rows x cols``, indices into ``grid.levels``) and the grid into storage."""
        raise NotImplementedError(f"{self.id} is not a grid format")

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        """A grid for the fixed ``codes`` of ``w`` whose layer-output error under ``hessian`` is no larger,
        row by row, than ``grid``'s (GPTQ refits the stored scales after rounding).  ``grid`` itself when
        the format has nothing to refit (the default)."""
        return grid

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor | None]:
        """:meth:`refine` with, where the refit knows it, how much it changed each row's layer-output error
        ``(w_r − v_r)ᵀ H (w_r − v_r)`` (float64, one per row, ≤ 0; 0 for a row left as it was), else None.
        Default: None (the caller computes the errors it needs from the values)."""
        return self.refine(w, codes, grid, hessian), None

    @abstractmethod
    def decode(self, q: QTensor) -> torch.Tensor:
        """Dequantize to a float32 tensor of ``q.shape``."""

    # --- recovery (training what the file stores) -----------------------------------------------
    def unpack(self, q: QTensor) -> tuple[torch.Tensor, Grid]:
        """``(codes, grid)`` of a stored tensor: ``encode(codes, grid, q.shape, q.dtype)`` gives back ``q``'s
        parts byte for byte and ``grid.values(codes)`` equals ``decode(q)``.  What recovery trains from;
        FormatError for a format that does not offer it (recovery then leaves its tensors as they are)."""
        raise FormatError(f"{self.id}: stored tensors cannot be unpacked to codes and a grid for training")

    #: True when :meth:`with_scales` stores learned scales/offsets (recovery trains them); False: only the codes
    learns_scales: bool = False
    #: True when each group's offset is its scale times a stored integer (an integer zero point): recovery then
    #: keeps that integer and lets the offset follow the learned scale, instead of learning the offset freely
    offset_follows_scale: bool = False

    def with_scales(self, grid: Grid, scale: torch.Tensor, offset: torch.Tensor) -> Grid:
        """The grid this format can encode nearest to the learned per-group ``scale``/``offset`` (float32, the
        shape of ``grid.scale``), rounded to the storage precision (fp16, integer sub-scales...); levels, group
        and the optional parts of ``grid`` unchanged.  The default (``learns_scales`` False): ``grid`` itself."""
        return grid

    def concat_rows(self, parts: Sequence[QTensor]) -> QTensor:
        """One stored tensor from row blocks of it stored separately, byte-identical to storing it whole.

        ``parts`` are QTensors of this format with equal column counts, in row order.  Formats whose rows
        do not start on byte boundaries need every part but the last to hold a multiple of 8 rows.
        """
        raise FormatError(f"{self.id}: concatenating stored rows is not supported")

    def _check_concat(self, parts: Sequence[QTensor]) -> tuple[int, int, str]:
        """(total rows, cols, dtype) of ``parts`` to concatenate; FormatError when they do not fit together."""
        if not parts:
            raise FormatError(f"{self.id}: nothing to concatenate")
        cols = {tuple(p.shape[1:]) for p in parts}
        dtypes = {p.dtype for p in parts}
        if any(p.format != self.id for p in parts) or len(cols) != 1 or len(dtypes) != 1:
            raise FormatError(f"{self.id}: parts to concatenate must share format, trailing shape and dtype, got "
                              f"{sorted({(p.format, tuple(p.shape), p.dtype) for p in parts})[:4]}")
        if any(len(p.shape) < 1 for p in parts):
            raise FormatError(f"{self.id}: cannot concatenate the rows of scalars")
        return sum(int(p.shape[0]) for p in parts), int(parts[0].shape[1]) if len(parts[0].shape) > 1 else 0, \
            parts[0].dtype

    # --- pass-through formats -----------------------------------------------------------------
    def store(self, w: torch.Tensor) -> QTensor:
        """Pass-through formats (``is_grid`` False) store the tensor directly."""
        raise NotImplementedError(f"{self.id} is a grid format: use bitalloc.rounding.quantize_weight")

    def __str__(self) -> str:
        return self.id


FormatParser = Callable[[str], "Format | None"]


class FormatRegistry:
    """Resolves format ids through parsers registered by each family module."""

    def __init__(self) -> None:
        self._parsers: list[tuple[str, FormatParser]] = []
        self._examples: list[str] = []
        self._cache: dict[str, Format] = {}

    def register(self, family: str, parser: FormatParser, examples: Iterable[str] = ()) -> None:
        self._parsers.append((family, parser))
        self._examples.extend(examples)

    def get(self, format_id: str) -> Format:
        key = format_id.strip().lower()
        if key in self._cache:
            return self._cache[key]
        for _family, parser in self._parsers:
            fmt = parser(key)
            if fmt is not None:
                self._cache[key] = fmt
                return fmt
        known = ", ".join(self._examples[:24])
        raise FormatError(f"unknown format {format_id!r}; examples of valid ids: {known}")

    def examples(self) -> list[str]:
        return list(self._examples)


#: The one registry instance; family modules register into it on import (see ``formats/__init__``).
REGISTRY = FormatRegistry()


def get_format(format_id: str | Format) -> Format:
    """The :class:`Format` for a user-typed id (or the format itself)."""
    if isinstance(format_id, Format):
        return format_id
    return REGISTRY.get(format_id)
