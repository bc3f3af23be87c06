"""Recorded rotations: any grid format with its input columns rotated by a randomised Hadamard transform.

``had-<base>`` (``had-int3-g128``, ``had-q4_k``, ``had-iq4_nl``) stores the base format's parts of ``W·R``,
where ``R = diag(s)·H/√k`` is orthogonal (``H`` a Hadamard matrix, ``s`` a fixed ±1 sign vector), and decodes
to ``base.decode(q)·Rᵀ``: every reader that decodes (``bitalloc.load``, evaluation, the measurement) sees the
approximation of the original weight, so the loader applies the rotation.  Bytes are exactly the base's.
Rotating the columns spreads an outlier column over all columns of its Hadamard block (incoherence
processing, as QuIP#/QuaRot do online), which helps formats whose groups share one scale.

``R`` is rebuilt from the id and the column count alone: the signs come from SHA-256 in counter mode over
``(seed, n)`` (the same on every machine and torch version), ``H`` from a fixed construction:

* ``n = 2^k·r`` (r odd).  For the smallest ``j <= k`` with a known Hadamard matrix ``B`` of order ``m = r·2^j``
  (Sylvester for ``m = 1, 2``; Paley I for ``m - 1`` a prime ≡ 3 mod 4; Paley II for ``m/2 - 1`` a prime ≡ 1
  mod 4; ``m <= MAX_SMALL``) ``H = B ⊗ H_{2^(k-j)}``, a full Hadamard matrix of order ``n`` (576 = 36·16,
  1536 = 12·128, 14336 = 28·512);
* otherwise ``H = I_r ⊗ H_{2^k}``: block-diagonal, blocks of the largest power of two dividing ``n``
  (11008 = 43 blocks of 256).

The power-of-two factor is applied as a fast Walsh-Hadamard transform, ``B`` as a dense ±1 matrix; entries
are exactly ±1 in float64, so ``H·Hᵀ = n·I`` holds exactly.  Rounding (``bitalloc.rounding``) and the
measurement (``bitalloc.measure``) look up :func:`rotation_of` and quantize ``W·R`` under the rotated Hessian
``Rᵀ·H·R``.  The rotation is applied by bitalloc's loader only: a GGUF cannot record it (llama.cpp would not
undo it), so the GGUF target refuses these ids, and the format has no activation rounding (its runtime is
bitalloc's float matmul).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .base import REGISTRY, Format, FormatError, Grid, QTensor, Shape, get_format

PREFIX = "had-"
#: Largest order of the dense (non power-of-two) Hadamard factor.
MAX_SMALL = 1024
_APPLY_ELEMS = 1 << 20  # rows rotated at once (float64 temporaries of ~8 MiB)


# --- Hadamard matrices ----------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    d = 2
    while d * d <= q:
        if q % d == 0:
            return False
        d += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` over GF(q), χ the quadratic character (χ(0) = 0), float64 (q, q)."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[sorted({(x * x) % q for x in range(1, q)})] = 1.0
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]


def _core(q: int, top: float, left: float) -> torch.Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = top, left, _jacobsthal(q)
    return s


def small_hadamard(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order ``m`` (float64) from Sylvester or Paley I/II over a prime field; None if
    this construction has none."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S with S = [[0, 1ᵀ], [-1, Q]] skew-symmetric
        return torch.eye(m, dtype=torch.float64) + _core(q, 1.0, -1.0)
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:  # Paley II: S = [[0, 1ᵀ], [1, Q]] symmetric; 0 and ±1 become 2x2 blocks
        s = _core(q, 1.0, 1.0)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(s, one) + torch.kron((s == 0).to(torch.float64), zero)
    return None


def hash_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` signs ±1 (float64) from SHA-256 of ``(seed, n, counter)``: fixed across machines and versions."""
    bits: list[int] = []
    counter = 0
    while len(bits) < n:
        digest = hashlib.sha256(f"bitalloc-hadamard/{seed}/{n}/{counter}".encode()).digest()
        bits.extend((byte >> i) & 1 for byte in digest for i in range(8))
        counter += 1
    return 1.0 - 2.0 * torch.tensor(bits[:n], dtype=torch.float64)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """``x · H_p`` along the last dim (Sylvester order p, natural order, unnormalised)."""
    p = int(x.shape[-1])
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return x


@dataclass(frozen=True, eq=False)
class Rotation:
    """``R = diag(signs) · (B ⊗ H_p) · scale``, orthogonal, of order ``n = m·p`` (``B`` None: ``I_m``).

    :meth:`apply` is ``x·R`` and :meth:`apply_t` ``x·Rᵀ`` over the last dim, computed in float64 and returned
    in ``x``'s dtype (float32 for integer inputs)."""

    n: int
    p: int
    small: torch.Tensor | None
    signs: torch.Tensor
    seed: int = 0

    @classmethod
    def build(cls, n: int, seed: int = 0) -> "Rotation":
        if n < 1:
            raise FormatError(f"a rotation needs a positive order, got {n}")
        p = n & -n
        m, q = n // p, p
        while m <= MAX_SMALL:
            b = small_hadamard(m)
            if b is not None:
                return cls(n, q, b, hash_signs(n, seed), seed)
            if q == 1:
                break
            m, q = m * 2, q // 2
        return cls(n, p, None, hash_signs(n, seed), seed)

    @property
    def key(self) -> tuple[int, int]:
        """``(n, seed)``: equal keys, equal rotations."""
        return self.n, self.seed

    @property
    def full(self) -> bool:
        """Whether ``H`` is one Hadamard matrix of order n (else block-diagonal, blocks of ``p``)."""
        return self.small is not None

    @property
    def scale(self) -> float:
        return float(self.n if self.full else self.p) ** -0.5

    def _mix(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        lead = x.shape[:-1]
        z = _fwht(x.reshape(*lead, self.n // self.p, self.p))
        if self.small is not None and self.small.shape[0] > 1:
            b = self.small.to(z.device)
            z = (b if transpose else b.T) @ z  # x·(B ⊗ A) = Bᵀ·X·A for X = x as (m, p)
        return z.reshape(*lead, self.n)

    def _run(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise FormatError(f"a rotation of order {self.n} cannot act on {x.shape[-1]} columns")
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        s = self.signs.to(x.device)
        flat = x.reshape(-1, self.n)
        out = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
        step = max(1, _APPLY_ELEMS // self.n)
        for a in range(0, flat.shape[0], step):
            d = flat[a : a + step].to(torch.float64)
            r = self._mix(d, True) * s if transpose else self._mix(d * s, False)
            out[a : a + step] = (r * self.scale).to(out_dtype)
        return out.reshape(x.shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x · R`` over the last dim."""
        return self._run(x, False)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x · Rᵀ`` over the last dim (the inverse of :meth:`apply`)."""
        return self._run(x, True)

    def conjugate(self, h: torch.Tensor) -> torch.Tensor:
        """``Rᵀ · h · R`` of a symmetric (n, n) matrix, in ``h``'s dtype."""
        hr = self.apply(h.to(torch.float64))  # h·R
        return self.apply(hr.T.contiguous()).T.to(h.dtype)  # (Rᵀ·h·R) = ((h·R)ᵀ·R)ᵀ

    def importance(self, imp: torch.Tensor) -> torch.Tensor:
        """The diagonal of ``Rᵀ·diag(imp)·R`` (per row for a 2-D ``imp``): ``Σ_k imp_k R_ki²``, i.e. the mean of
        ``imp`` over each Hadamard block (all columns when ``H`` is full)."""
        k = self.n if self.full else self.p
        v = imp.to(torch.float64).reshape(*imp.shape[:-1], self.n // k, k)
        return v.mean(dim=-1, keepdim=True).expand(v.shape).reshape(imp.shape).to(imp.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``R`` as a dense (n, n) matrix."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).to(dtype)


# --- the format -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RotatedFormat(Format):
    """``base`` storing ``W·R`` (R from :meth:`input_rotation`); decodes to ``base.decode(q)·Rᵀ``."""

    base: Format
    seed: int = 0

    activation_rounding = None  # decoded by bitalloc (float matmul); never in a GGUF

    def __post_init__(self) -> None:
        if not self.base.is_grid or isinstance(self.base, RotatedFormat):
            raise FormatError(f"{PREFIX}{self.base.id}: a rotation needs a grid format that is not rotated already")

    @property
    def id(self) -> str:
        return PREFIX + self.base.id

    @property
    def bits(self) -> float:
        return self.base.bits

    def nbytes(self, shape: Shape) -> int:
        return self.base.nbytes(shape)

    def check_shape(self, shape: Shape) -> None:
        if len(tuple(shape)) != 2:
            self.check_2d(shape)
        self.base.check_shape(shape)

    def input_rotation(self, cols: int) -> Rotation:
        """The orthogonal ``R`` (cols x cols) this format stores ``W·R`` with."""
        return Rotation.build(int(cols), self.seed)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        return self.base.fit(w, importance)  # w is already W·R (bitalloc.rounding rotates it)

    def refine(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> Grid:
        return self.base.refine(w, codes, grid, hessian)

    def refine_measured(self, w: torch.Tensor, codes: torch.Tensor, grid: Grid, hessian: torch.Tensor
                        ) -> tuple[Grid, torch.Tensor | None]:
        return self.base.refine_measured(w, codes, grid, hessian)  # the error is the same in rotated coordinates

    def _as(self, q: QTensor, fid: str) -> QTensor:
        return QTensor(fid, q.shape, q.dtype, q.parts)

    def encode(self, codes: torch.Tensor, grid: Grid, shape: Shape, dtype: str = "float32") -> QTensor:
        return self._as(self.base.encode(codes, grid, shape, dtype), self.id)

    def decode(self, q: QTensor) -> torch.Tensor:
        if q.format != self.id:
            raise FormatError(f"{self.id}: cannot decode a tensor stored as {q.format}")
        self.check_shape(q.shape)
        v = self.base.decode(self._as(q, self.base.id))
        return self.input_rotation(int(q.shape[1])).apply_t(v.to(torch.float32)).reshape(q.shape)

    def concat_rows(self, parts: list[QTensor]) -> QTensor:  # type: ignore[override]
        self._check_concat(parts)
        return self._as(self.base.concat_rows([self._as(p, self.base.id) for p in parts]), self.id)


def rotation_of(fmt: Format, cols: int) -> Rotation | None:
    """The input rotation a format stores its weight under (None for every unrotated format)."""
    hook = getattr(fmt, "input_rotation", None)
    return None if hook is None else hook(cols)


def parse_rotated(format_id: str) -> Format | None:
    """``had-<grid format id>`` -> the rotated format; None for ids of other families."""
    if not format_id.startswith(PREFIX):
        return None
    return RotatedFormat(get_format(format_id[len(PREFIX):]))


REGISTRY.register("rotated", parse_rotated, ("had-int3-g128", "had-int4-g64", "had-q4_k", "had-iq4_nl"))

__all__ = ["RotatedFormat", "Rotation", "rotation_of", "parse_rotated", "small_hadamard", "hash_signs", "PREFIX"]
