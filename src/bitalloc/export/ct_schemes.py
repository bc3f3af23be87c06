"""Which bitalloc formats compressed-tensors can express, and how (the mapping table of the
compressed-tensors output, :mod:`bitalloc.export.compressed_tensors`).

Each row (:class:`Scheme`) maps one family of bitalloc formats onto one of the library's compressors:

* ``intB-gG-sym`` / ``intB-row-sym`` (:class:`IntSym`) -> ``pack-quantized``, integer, symmetric, ``group``
  strategy of ``G`` columns / ``channel`` strategy.  bitalloc's symmetric codes ``q`` in ``[-2^(B-1), 2^(B-1))``
  with value ``scale * q`` are exactly the library's; the fp16 scale is stored as fp16.  The library packs each
  row densely into int32 words (``ceil(cols * B / 32)`` per row) and adds ``weight_shape`` (int64, 2 values).

* ``intB-gG-zp`` / ``intB-row-zp`` (:class:`IntZp`) -> ``pack-quantized``, integer, asymmetric: bitalloc's codes
  ``u`` and integer zero points ``z`` in ``[0, 2^B)`` are the library's signed ``u - 2^(B-1)`` and
  ``z - 2^(B-1)``, so its ``(q - zero_point) * scale`` is bitalloc's ``(u - z) * scale``.  The library packs the zero
  points along the rows (``ceil(rows * B / 32)`` int32 per group column): bitalloc's bytes exactly when
  ``rows * B`` is a multiple of 32, the shapes the row fits.

Refused (no row): the asymmetric ``intB-gG`` (an fp16 *float* minimum, which the library's integer
``zero_point`` cannot hold exactly: use ``-zp``) and every GGUF type.  Rows the lead may add once the formats exist
(``formats/fp.py``, ``formats/nf4.py``): ``nvfp4`` -> ``nvfp4-pack-quantized``; ``fp8`` (E4M3, per-row scale)
-> ``float-quantized`` channel; ``mxfp4`` -> ``mxfp4-pack-quantized``; ``nf4`` / ``fp4-gG``: no library format.

A scheme ``fits`` a tensor when the library can store that shape *and* its bytes are exactly bitalloc's
``nbytes`` plus :data:`SHAPE_BYTES` (the allocator then sees the written size, see
:mod:`bitalloc.targets.compressed_tensors`): for ``group`` the columns must be a multiple of ``G`` (the library
refuses others), for ``channel`` ``cols * B`` a multiple of 32 (no padding bits in a row).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..errors import InputError
from ..formats import Format, FormatError, QTensor, get_format
from ..formats.int import BITS, IntFormat
from ..formats.int_zp import IntZpFormat

#: bytes of the ``weight_shape`` tensor (int64, 2 values) the library stores beside every packed weight
SHAPE_BYTES = 16
#: the formats compressed-tensors stores as they are (the module then sits in ``ignore``)
PASS_THROUGH = ("fp16", "bf16", "fp32")


class Scheme(Protocol):
    """One row of the table: a family of bitalloc formats as one compressed-tensors compressor."""

    compressor: str  # the library's CompressionFormat value
    extra_bound: int  # the most :meth:`extra_bytes` gives for any format of the row that fits

    def handles(self, fmt: Format) -> bool: ...

    def args(self, fmt: Format) -> Any:
        """The library's ``QuantizationArgs`` of ``fmt``."""

    def fits(self, fmt: Format, shape: tuple[int, ...]) -> bool: ...

    def layout(self, fmt: Format, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The module's stored tensors (local names) with their dtypes and shapes, as the library writes them."""

    def extra_bytes(self, fmt: Format, shape: tuple[int, ...]) -> int:
        """Bytes the library stores beyond bitalloc's ``nbytes`` (when the scheme fits the shape)."""

    def patterns(self, shape: tuple[int, ...]) -> tuple[str, ...]:
        """fnmatch patterns of the format ids of this family that fit ``shape`` (for allocation constraints)."""

    def format_of(self, args: Any) -> Format:
        """The bitalloc format of the library's ``args`` (FormatError when it is none of this family)."""

    def to_library(self, q: QTensor) -> dict[str, torch.Tensor]:
        """The module's compressed tensors (local names), made by the library's compressor from ``q``."""

    def from_library(self, fmt: Format, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight the library decompresses from ``parts`` (local names)."""


def layout_bytes(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Bytes of the tensors of a :meth:`Scheme.layout`."""
    total = 0
    for dtype, shape in layout.values():
        n = 1
        for d in shape:
            n *= d
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def require_library() -> None:
    """InputError (one line) when the ``compressed-tensors`` package is not installed."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise InputError("compressed-tensors output needs the compressed-tensors package "
                         "(pip install compressed-tensors)")


def _compressor(name: str) -> Any:
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(name)


class IntSym:
    """``intB-gG-sym`` / ``intB-row-sym`` as ``pack-quantized`` (see the module)."""

    compressor = "pack-quantized"
    extra_bound = SHAPE_BYTES
    symmetric = True  # the library's QuantizationArgs.symmetric of this row

    def handles(self, fmt: Format) -> bool:
        return isinstance(fmt, IntFormat) and fmt.symmetric

    def args(self, fmt: Format) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        assert isinstance(fmt, (IntFormat, IntZpFormat))
        if fmt.group is None:
            return QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=self.symmetric, strategy="channel")
        return QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=self.symmetric, strategy="group",
                                group_size=fmt.group)

    def fits(self, fmt: Format, shape: tuple[int, ...]) -> bool:
        assert isinstance(fmt, (IntFormat, IntZpFormat))
        if len(shape) != 2:
            return False
        cols = int(shape[1])
        if fmt.group is None:
            return fmt.bits * cols % 32 == 0  # no padding bits in a row
        return cols % fmt.group == 0  # (then every row is whole int32 words too)

    def layout(self, fmt: Format, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        assert isinstance(fmt, (IntFormat, IntZpFormat))
        rows, cols = (int(d) for d in shape)
        return {"weight_packed": (torch.int32, (rows, -(-cols * fmt.bits // 32))),
                "weight_scale": (torch.float16, (rows, fmt.ngroups(cols))), "weight_shape": (torch.int64, (2,))}

    def extra_bytes(self, fmt: Format, shape: tuple[int, ...]) -> int:
        return layout_bytes(self.layout(fmt, shape)) - fmt.nbytes(shape)  # weight_shape's 16 B when it fits

    def patterns(self, shape: tuple[int, ...]) -> tuple[str, ...]:
        cols = int(shape[1])
        out = [f"int*-g{g}-sym" for g in (32, 64, 128) if cols % g == 0]
        out += [f"int{b}-row-sym" for b in (2, 3, 4, 5, 6, 8) if self.fits(IntFormat(b, None, True), shape)]
        return tuple(out)

    def format_of(self, args: Any) -> Format:
        if args.type != "int" or not args.symmetric or args.strategy not in ("group", "channel"):
            raise FormatError(f"{args.type} {args.strategy} weights (symmetric {args.symmetric}) are not a bitalloc "
                              "integer format")
        group = args.group_size if args.strategy == "group" else None
        return IntFormat(int(args.num_bits), group, True)

    def to_library(self, q: QTensor) -> dict[str, torch.Tensor]:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationScheme

        from ..formats.packing import unpack_bits

        fmt = get_format(q.format)
        assert isinstance(fmt, IntFormat)
        rows, cols = (int(d) for d in q.shape)
        scale = q.parts["weight_scale"]
        w = fmt.decode(q)  # scale * level, exact in float32: the library's w / scale gives the level back exactly
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float32)  # the library divides
        scheme = QuantizationScheme(targets=["x"], weights=self.args(fmt))
        out = dict(_compressor(self.compressor).compress({"weight": w, "weight_scale": safe}, scheme))
        out["weight_scale"] = scale.contiguous()  # bitalloc's fp16 scales, zeros included
        gs, ng = fmt.group_size(cols), fmt.ngroups(cols)
        codes = unpack_bits(q.parts["weight_packed"], fmt.bits, rows * ng * gs).reshape(rows, ng * gs)[:, :cols]
        levels = fmt.levels.to(torch.int64)[codes]
        packed = unpack_from_int32(out["weight_packed"], fmt.bits, torch.Size((rows, cols))).to(torch.int64)
        live = (scale != 0).repeat_interleave(gs, dim=1)[:, :cols]  # a zero scale's codes do not matter
        if not torch.equal(packed[live], levels[live]):
            raise InputError(f"compressed-tensors packed other codes than bitalloc chose ({q.format} {list(q.shape)})")
        return out

    def from_library(self, fmt: Format, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme(targets=["x"], weights=self.args(fmt))
        given = {**parts, "weight_scale": parts["weight_scale"].to(torch.float32)}  # products exact in float32
        return _compressor(self.compressor).decompress(given, scheme)["weight"].to(torch.float32)


class IntZp(IntSym):
    """``intB-gG-zp`` / ``intB-row-zp`` as asymmetric ``pack-quantized`` (see the module)."""

    symmetric = False

    def handles(self, fmt: Format) -> bool:
        return isinstance(fmt, IntZpFormat)

    def fits(self, fmt: Format, shape: tuple[int, ...]) -> bool:
        return super().fits(fmt, shape) and int(shape[0]) * fmt.bits % 32 == 0  # whole int32 words of zeros

    def layout(self, fmt: Format, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        assert isinstance(fmt, IntZpFormat)
        rows, cols = (int(d) for d in shape)
        return {**super().layout(fmt, shape),
                "weight_zero_point": (torch.int32, (-(-rows * fmt.bits // 32), fmt.ngroups(cols)))}

    def patterns(self, shape: tuple[int, ...]) -> tuple[str, ...]:
        rows, cols = (int(d) for d in shape)
        groups = [f"g{g}" for g in (32, 64, 128) if cols % g == 0]
        return tuple(f"int{b}-{g}-zp" for b in BITS if rows * b % 32 == 0
                     for g in groups + (["row"] if b * cols % 32 == 0 else []))

    def format_of(self, args: Any) -> Format:
        if args.type != "int" or args.symmetric or args.strategy not in ("group", "channel"):
            raise FormatError(f"{args.type} {args.strategy} weights (symmetric {args.symmetric}) are not a bitalloc "
                              "integer zero-point format")
        return IntZpFormat(int(args.num_bits), args.group_size if args.strategy == "group" else None)

    def to_library(self, q: QTensor) -> dict[str, torch.Tensor]:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationScheme

        fmt = get_format(q.format)
        assert isinstance(fmt, IntZpFormat)
        rows, cols = (int(d) for d in q.shape)
        codes, grid = fmt.unpack(q)
        half = 1 << (fmt.bits - 1)
        zero = (fmt.zeros_of(grid) - half).to(torch.int8)  # the library's signed zero points
        scale = q.parts["weight_scale"]
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float32)  # the library divides
        scheme = QuantizationScheme(targets=["x"], weights=self.args(fmt))
        out = dict(_compressor(self.compressor).compress(
            {"weight": grid.values(codes), "weight_scale": safe, "weight_zero_point": zero}, scheme))
        out["weight_scale"] = scale.contiguous()  # bitalloc's fp16 scales, zeros included
        packed = unpack_from_int32(out["weight_packed"], fmt.bits, torch.Size((rows, cols))).to(torch.int64)
        zeros = unpack_from_int32(out["weight_zero_point"], fmt.bits, torch.Size(tuple(scale.shape)), packed_dim=0)
        live = (scale != 0).repeat_interleave(fmt.group_size(cols), dim=1)[:, :cols]  # a zero scale's codes: any
        if not torch.equal(packed[live], codes[live] - half) or not torch.equal(zeros.to(torch.int8), zero):
            raise InputError(f"compressed-tensors packed other codes than bitalloc chose ({q.format} {list(q.shape)})")
        return out


class _Float:
    """A float-element format of :mod:`bitalloc.formats.fp` whose stored parts *are* the library's layout (the
    ``formats/fp.py`` helper chose them so): the library's compressor is fed bitalloc's decoded weight and scales
    and must give back bitalloc's bytes."""

    compressor = ""
    extra_bound = 0  # the stored parts are bitalloc's
    format_id = ""
    group = 0  # columns per scale (0: one per row)
    packed = "weight_packed"  # the library's name of the codes

    def handles(self, fmt: Format) -> bool:
        return fmt.id == self.format_id

    def fits(self, fmt: Format, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and fmt.supports(shape) and (self.group == 0 or int(shape[1]) % self.group == 0)

    def patterns(self, shape: tuple[int, ...]) -> tuple[str, ...]:
        ok = len(shape) == 2 and (self.group == 0 or int(shape[1]) % self.group == 0)
        return (self.format_id,) if ok else ()

    def extra_bytes(self, fmt: Format, shape: tuple[int, ...]) -> int:
        return layout_bytes(self.layout(fmt, shape)) - fmt.nbytes(shape)

    def layout(self, fmt: Format, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        rows, cols = (int(d) for d in shape)
        q = {self.packed: (torch.float8_e4m3fn, (rows, cols))} if self.packed == "weight" else \
            {"weight_packed": (torch.uint8, (rows, cols // 2))}
        return {**q, **self._scales_layout(rows, cols)}

    def _scales_layout(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        raise NotImplementedError

    def format_of(self, args: Any) -> Format:
        want = self.args(get_format(self.format_id))
        if (args.type, args.num_bits, args.strategy, args.group_size, args.symmetric) != \
                (want.type, want.num_bits, want.strategy, want.group_size, want.symmetric):
            raise FormatError(f"{args.type} {args.num_bits}-bit {args.strategy} weights are not {self.format_id}")
        return get_format(self.format_id)

    def _given(self, q: QTensor) -> dict[str, torch.Tensor]:
        """The library's inputs besides the weight (bitalloc's scales as the library takes them)."""
        raise NotImplementedError

    def to_library(self, q: QTensor) -> dict[str, torch.Tensor]:
        from compressed_tensors.quantization import QuantizationScheme

        fmt = get_format(q.format)
        scheme = QuantizationScheme(targets=["x"], weights=self.args(fmt))
        given = self._given(q)
        zero = given["weight_scale"] == 0  # the library divides by the scale: 1 there, bitalloc's 0 stored
        given["weight_scale"] = torch.where(zero, torch.ones_like(given["weight_scale"]), given["weight_scale"])
        out = dict(_compressor(self.compressor).compress({"weight": fmt.decode(q), **given}, scheme))
        for k, t in out.items():
            mine = q.parts["weight_packed" if k == self.packed else k]
            if k == self.packed:
                same = t.dtype == mine.dtype and torch.equal(t.contiguous().view(torch.uint8),
                                                             mine.contiguous().view(torch.uint8))
            else:
                same = t.dtype == mine.dtype and bool(((t.float() == mine.float()) | (zero if k == "weight_scale"
                                                                                     else False)).all())
                out[k] = mine  # bitalloc's bytes (a zero scale's sign included)
            if not same:
                raise InputError(f"compressed-tensors stored other {k} than bitalloc chose "
                                 f"({q.format} {list(q.shape)})")
        return out

    def from_library(self, fmt: Format, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme(targets=["x"], weights=self.args(fmt))
        return _compressor(self.compressor).decompress(parts, scheme)["weight"].to(torch.float32)


class NVFP4(_Float):
    """``nvfp4`` -> ``nvfp4-pack-quantized`` (E2M1 codes, E4M3 scales per 16 columns, a float32 global scale)."""

    compressor, format_id, group = "nvfp4-pack-quantized", "nvfp4", 16

    def args(self, fmt: Format) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", symmetric=True, dynamic=False,
                                group_size=16, scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)

    def _scales_layout(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight_scale": (torch.float8_e4m3fn, (rows, cols // 16)), "weight_global_scale": (torch.float32, (1,))}

    def _given(self, q: QTensor) -> dict[str, torch.Tensor]:
        return {"weight_scale": q.parts["weight_scale"].to(torch.float32),
                "weight_global_scale": q.parts["weight_global_scale"]}


class MXFP4(_Float):
    """``mxfp4`` -> ``mxfp4-pack-quantized`` (E2M1 codes, E8M0 exponent bytes per 32 columns)."""

    compressor, format_id, group = "mxfp4-pack-quantized", "mxfp4", 32

    def args(self, fmt: Format) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=4, type="float", strategy="group", symmetric=True, dynamic=False,
                                group_size=32, scale_dtype=torch.uint8, zp_dtype=torch.uint8)

    def _scales_layout(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight_scale": (torch.uint8, (rows, cols // 32))}

    def _given(self, q: QTensor) -> dict[str, torch.Tensor]:
        e = q.parts["weight_scale"].to(torch.float32) - 127.0
        return {"weight_scale": torch.exp2(e)}


class FP8(_Float):
    """``fp8`` (E4M3, one float32 scale per row) -> ``float-quantized``, channel strategy (the codes are ``weight``)."""

    compressor, format_id, group, packed = "float-quantized", "fp8", 0, "weight"

    def args(self, fmt: Format) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)

    def _scales_layout(self, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight_scale": (torch.float32, (rows, 1))}

    def _given(self, q: QTensor) -> dict[str, torch.Tensor]:
        return {"weight_scale": q.parts["weight_scale"]}


#: the table: the first row that handles a format maps it (the float rows need ``formats/fp.py``'s formats)
SCHEMES: tuple[Scheme, ...] = (IntSym(), IntZp(), NVFP4(), MXFP4(), FP8())


def scheme_for(fmt: Format | str) -> Scheme | None:
    """The row that maps ``fmt`` (None for a pass-through format)."""
    fmt = get_format(fmt)
    if not fmt.is_grid:
        return None
    for s in SCHEMES:
        if s.handles(fmt):
            return s
    raise FormatError(f"{fmt.id} cannot be written as compressed-tensors ({why_not(fmt)})")


def why_not(fmt: Format) -> str:
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        return "its fp16 float minimum has no integer zero point there; use the -zp or -sym variant"
    return ("the library has no format for it; expressible: intB-gG-sym, intB-row-sym, intB-gG-zp, intB-row-zp, "
            "nvfp4, mxfp4, fp8, fp16, bf16, fp32")


def check_expressible(formats: tuple[str, ...] | list[str]) -> None:
    """Refuse (FormatError, one line) a candidate format compressed-tensors cannot express."""
    require_library()
    for f in formats:
        scheme_for(f)


def ct_bytes(fmt: Format | str, shape: tuple[int, ...]) -> int:
    """Bytes the tensor takes in a compressed-tensors checkpoint (when its scheme fits the shape)."""
    fmt = get_format(fmt)
    scheme = scheme_for(fmt)
    return fmt.nbytes(shape) + (0 if scheme is None else scheme.extra_bytes(fmt, shape))


__all__ = ["PASS_THROUGH", "SCHEMES", "SHAPE_BYTES", "FP8", "IntSym", "IntZp", "MXFP4", "NVFP4", "Scheme", "check_expressible",
           "ct_bytes", "layout_bytes", "require_library",
           "scheme_for", "why_not"]
