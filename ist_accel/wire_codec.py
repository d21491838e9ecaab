"""The quantized wire (``ISTConfig(wire_dtype="int8" | "int4" | "fp8")``): values travel as
low-precision codes with one fp32 scale per block of ``wire_block`` elements; master values
stay in the model's dtype and are decoded, then averaged, in the value dtype (fp32, or
float64 for exact checks).

Blocks. The elements of one tensor that travel together (one message from one group to
another, or one tensor of the shared set), taken in the tensor's own row-major order, are
cut into blocks of ``wire_block``. Both ends and :class:`~ist_accel.reference.ReferenceIST`
derive the same blocks from the elements' global indices, whatever order a message lays
them out in (:func:`blocks_of`).

Rounding. IST's wire carries *values*, not deltas (a unit reaches a group that does not
hold its round-start value), so a weight whose update of the round is under half a code
step would come back unchanged under round-to-nearest. Codes are therefore rounded
**stochastically**: up with probability equal to the fraction of a step, which is
unbiased. The random number of an element is a hash of (seed, round, stream, global
index) (:func:`noise`): every sender of the same element draws the same number, and the
reference computes it element by element. Error feedback is not used: a moving unit's
next send happens on whichever group holds it next, which would have to keep a residual
for every element it ever sent (the whole model); unbiased rounding needs no state
(docs/exchange.md#the-quantized-wire measures what it costs in accuracy).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QUANTIZED = {"int8": (127.0, 1.0), "int4": (7.0, 0.5), "fp8": (448.0, 1.0)}  # name -> (largest code, bytes per code)
_M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer mix (lowbias32-style, odd multipliers below 2**31 so that int64
    products cannot overflow): on Python ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x6B43A9B5) & _M32
    return x ^ (x >> 16)


def stream_id(*parts) -> int:
    """A 32-bit stream number naming what is rounded (a tensor's name, a stage of the
    shared set's reduction, a group)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def noise(seed: int, round_: int, stream: int, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform numbers in [0, 1) (24 bits), a pure function of (seed, round, stream, index)."""
    key = _mix((_mix((_mix(seed & _M32) ^ round_) & _M32) ^ stream) & _M32)
    h = _mix((index & _M32) ^ key)
    return (h >> 8).to(dtype) * (1.0 / (1 << 24))


def blocks_of(index: torch.Tensor, block: int) -> torch.Tensor:
    """Block labels of elements given by distinct global ``index``: rank in ascending
    index order, divided by ``block``."""
    if index.numel() and bool((index[1:] > index[:-1]).all()):
        return torch.arange(index.numel(), device=index.device) // block
    rank = torch.empty_like(index)
    rank[torch.argsort(index)] = torch.arange(index.numel(), device=index.device)
    return rank // block


@dataclass(frozen=True)
class Run:
    """``numel`` elements of one tensor at ``offset`` in a message: ``stream`` names their
    random numbers, ``index`` are their global indices (None: the whole tensor, in order; or
    a function returning them, so that a cached run keeps no per-element memory), ``raw``
    runs (frozen tensors, buffers, scalar state) travel exactly, in the value dtype."""

    offset: int
    numel: int
    stream: int
    index: torch.Tensor | Callable[[], torch.Tensor] | None = None
    raw: bool = False

    def global_index(self, device: torch.device) -> torch.Tensor:
        if self.index is None:
            return torch.arange(self.numel, device=device)
        return (self.index() if callable(self.index) else self.index).to(device)


class WireCodec:
    """Encodes a flat buffer of values, laid out as :class:`Run` s, into bytes and back."""

    def __init__(self, kind: str, block: int, seed: int, values: torch.dtype = torch.float32) -> None:
        if kind not in QUANTIZED:
            raise ValueError(f"quantized wire dtype must be one of {', '.join(QUANTIZED)}, got {kind!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"wire_block must be an int >= 1, got {block!r}")
        self.kind, self.block, self.seed, self.values = kind, block, seed, values
        self.top, self.code_bytes = QUANTIZED[kind]

    def bytes_per_element(self) -> float:
        """Wire bytes per value: the code and a share of its block's fp32 scale."""
        return self.code_bytes + 4.0 / self.block

    # ---- one block-labelled vector ---------------------------------------------

    def quantize(self, x: torch.Tensor, labels: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes as uint8, one scale per label 0..max): stochastic rounding of ``x``."""
        nblocks = int(labels.max()) + 1 if labels.numel() else 0
        amax = torch.zeros(nblocks, dtype=x.dtype, device=x.device)
        amax.scatter_reduce_(0, labels, x.abs(), "amax", include_self=True)
        scales = (amax / self.top).to(torch.float32)
        s = scales.to(x.dtype)[labels]
        y = x / torch.where(s > 0, s, torch.ones_like(s))
        if self.kind == "fp8":
            return _round_fp8(y.clamp(-self.top, self.top), u), scales
        codes = torch.floor(y + u).clamp_(-self.top, self.top).to(torch.int16)
        if self.kind == "int4":
            return (codes + 8).to(torch.uint8), scales
        return codes.to(torch.int8).view(torch.uint8), scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = scales.to(self.values)[labels]
        if self.kind == "fp8":
            return codes.view(torch.float8_e4m3fn).to(self.values) * s
        if self.kind == "int8":
            return codes.view(torch.int8).to(self.values) * s
        return (codes.to(torch.int16) - 8).to(self.values) * s

    def roundtrip(self, x: torch.Tensor, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """What arrives when ``x`` is sent: decode(encode(x))."""
        codes, scales = self.quantize(x, labels, u)
        return self.dequantize(codes, scales, labels)

    # ---- a message of runs -----------------------------------------------------


    def payload_size(self, runs: Sequence[Run]) -> int:
        """Bytes of an encoded message: scales, then raw values, then codes (each section
        padded to 8 bytes, so that messages laid end to end stay aligned)."""
        scales = sum(4 * math.ceil(r.numel / self.block) for r in runs if not r.raw)
        raw = sum(r.numel for r in runs if r.raw) * torch.tensor([], dtype=self.values).element_size()
        return _align(scales) + _align(raw) + _align(sum(self._code_size(r.numel) for r in runs if not r.raw))

    def _code_size(self, n: int) -> int:
        return (n + 1) // 2 if self.kind == "int4" else n

    def _sections(self, payload: torch.Tensor, runs: Sequence[Run]):
        scales_n = sum(math.ceil(r.numel / self.block) for r in runs if not r.raw)
        raw_n = sum(r.numel for r in runs if r.raw)
        size = torch.tensor([], dtype=self.values).element_size()
        a, b = _align(4 * scales_n), _align(raw_n * size)
        return (_view(payload[: 4 * scales_n], torch.float32), _view(payload[a : a + raw_n * size], self.values),
                payload[a + b :])

    def encode(self, values: torch.Tensor, runs: Sequence[Run], round_: int, out: torch.Tensor) -> torch.Tensor:
        """``values`` (the flat message) into ``out`` (uint8, :meth:`payload_size` bytes)."""
        scales, raw, codes = self._sections(out, runs)
        si = ri = ci = 0
        for run in runs:
            x = values[run.offset : run.offset + run.numel]
            if run.raw:
                raw[ri : ri + run.numel].copy_(x)
                ri += run.numel
                continue
            index = run.global_index(x.device)
            labels = blocks_of(index, self.block)
            u = noise(self.seed, round_, run.stream, index, x.dtype)
            c, s = self.quantize(x, labels, u)
            scales[si : si + s.numel()].copy_(s)
            si += s.numel()
            packed = _pack_nibbles(c) if self.kind == "int4" else c
            codes[ci : ci + packed.numel()].copy_(packed)
            ci += packed.numel()
        return out

    def decode(self, payload: torch.Tensor, runs: Sequence[Run], out: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`: the values into ``out`` (flat, the value dtype)."""
        scales, raw, codes = self._sections(payload, runs)
        si = ri = ci = 0
        for run in runs:
            target = out[run.offset : run.offset + run.numel]
            if run.raw:
                target.copy_(raw[ri : ri + run.numel])
                ri += run.numel
                continue
            labels = blocks_of(run.global_index(out.device), self.block)
            nb = math.ceil(run.numel / self.block)
            size = self._code_size(run.numel)
            c = codes[ci : ci + size]
            c = _unpack_nibbles(c, run.numel) if self.kind == "int4" else c
            target.copy_(self.dequantize(c, scales[si : si + nb], labels))
            si, ci = si + nb, ci + size
        return out


def _view(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes as ``dtype``: a view where aligned, else a copy (read only)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return data.view(dtype) if data.storage_offset() % size == 0 else data.clone().view(dtype)


def _align(n: int) -> int:
    return -(-n // 8) * 8


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n]


def _round_fp8(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of ``|y| <= 448`` to float8 e4m3fn codes (uint8): between the
    two neighbouring codes (consecutive bit patterns are consecutive magnitudes), up with
    probability of the fraction between them."""
    a = y.abs()
    near = a.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    over = near.to(torch.uint8).view(torch.float8_e4m3fn).to(a.dtype) > a
    lo = torch.where(over, near - 1, near)
    hi = torch.where(over, near, (near + 1).clamp(max=0x7E))
    lo_v = lo.to(torch.uint8).view(torch.float8_e4m3fn).to(a.dtype)
    hi_v = hi.to(torch.uint8).view(torch.float8_e4m3fn).to(a.dtype)
    gap = hi_v - lo_v
    p = torch.where(gap > 0, (a - lo_v) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(a))
    code = torch.where(u < p, hi, lo)
    return (code | torch.where(y < 0, 0x80, 0).to(torch.int16)).to(torch.uint8)


__all__ = ["QUANTIZED", "Run", "WireCodec", "blocks_of", "noise", "stream_id"]
