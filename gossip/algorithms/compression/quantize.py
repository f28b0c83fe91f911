"""Quantizers: :class:`StochasticQuantizer` (2, 4 or 8 bits per chunk) and :class:`ScaledSign`
(one bit per coordinate), with the little-endian bit packing both put on the wire."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...ops import dequantize_accumulate_
from .base import FLOAT_DTYPES, Compressor, _is_int, stream_seed, wire_error


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[N, m]`` integer codes (< 2**bits) into ``[N, ceil(m*bits/8)]`` uint8, little-endian.

    Code j sits in byte ``j // (8/bits)`` at bit offset ``bits * (j % (8/bits))``.
    """
    per = 8 // bits
    n, m = codes.shape
    pad = (-m) % per
    c = codes.to(torch.uint8)
    if per == 1:
        return c if c is not codes else c.clone()
    if pad:
        c = torch.cat([c, c.new_zeros(n, pad)], 1)
    c = c.view(n, c.shape[1] // per, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out.bitwise_or_(c[..., j] << (bits * j))
    return out


def _byte_table(bits: int, values: tuple[float, ...] | None, dtype, device) -> torch.Tensor:
    """``[256, 8/bits]``: the codes packed in each byte value (or ``values[code]``)."""
    per, mask = 8 // bits, (1 << bits) - 1
    rows = [[(b >> (bits * j)) & mask for j in range(per)] for b in range(256)]
    table = torch.tensor(rows, dtype=torch.int64)
    if values is not None:
        table = torch.tensor(values, dtype=torch.float64)[table]
    return table.to(device=device, dtype=dtype)


_TABLES: dict = {}


def unpack_table(packed: torch.Tensor, bits: int, m: int, values=None, dtype=torch.uint8):
    """Look ``[N, nbytes]`` packed bytes up in a byte table: ``[N, m]`` codes of ``dtype``, or
    ``values[code]`` when ``values`` is given (one gather instead of a shift and mask per code)."""
    key = (bits, values, dtype, packed.device)
    if key not in _TABLES:
        _TABLES[key] = _byte_table(bits, values, dtype, packed.device)
    n, nb = packed.shape
    flat = _TABLES[key].index_select(0, packed.reshape(-1).to(torch.int32))
    return flat.view(n, nb * (8 // bits))[:, :m]


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[N, nbytes]`` uint8 -> ``[N, m]`` uint8 codes."""
    return unpack_table(packed, bits, m)


class StochasticQuantizer(Compressor):
    """Stochastic ``bits``-bit quantization (2, 4 or 8) with a per-chunk fp32 scale and zero-point.

    Per chunk of ``chunk`` coordinates: ``zero = min``, ``scale = (max - min) / (2**bits - 1)``,
    ``code = floor((x - zero) / scale + u)`` with ``u ~ U[0, 1)`` from
    ``stream_seed(seed, round, sender)`` (unbiased rounding). The value is
    ``code * scale + zero`` in fp32 as two rounded operations (a multiply, then an add; no fused
    multiply-add), cast to the original dtype. Frames: codes packed little-endian within each
    byte (``[ceil(d*bits/8)]`` uint8), scales and zero-points (``[ceil(d/chunk)]`` fp32 each):
    the quantized format of :mod:`gossip.ops.payload`, whose kernels decode it for
    ``decompress`` and ``decompress_add_`` alike.

    delta: with L = 2**bits - 1 and n = min(chunk, d), the worst case over inputs is
    ``E||C(v)-v||^2 <= (n-2)/(2 L^2) ||v||^2`` (at most n-2 coordinates per chunk are rounded,
    each with variance <= scale**2/4, and ||chunk||^2 >= (max-min)**2/2). ``delta`` returns
    ``1 - (n-2)/(2 L^2)``, or 0.0 where that bound gives no contraction (2 bits with chunk 256:
    use a chunk of 16 or fewer for a guarantee; typical inputs contract far better).
    """

    name = "quant"

    def __init__(self, bits: int, chunk: int = 256):
        if bits not in (2, 4, 8):
            raise ConfigError(f"quant bits must be 2, 4 or 8, got {bits!r}")
        if not _is_int(chunk) or chunk < 1:
            raise ConfigError(f"quant chunk must be an int >= 1, got {chunk!r}")
        self.bits, self.chunk = bits, chunk

    def spec(self) -> str:
        return f"quant:{self.bits}" + ("" if self.chunk == 256 else f":{self.chunk}")

    def delta(self, d: int) -> float:
        n = min(self.chunk, d)
        levels = (1 << self.bits) - 1
        return max(0.0, 1.0 - max(n - 2, 0) / (2.0 * levels * levels))

    def _compress(self, x2, *, seed, round, senders):
        n, d = x2.shape
        c, levels = self.chunk, (1 << self.bits) - 1
        extra = {"bits": self.bits, "chunk": c}
        if d == 0:
            empty = x2.new_zeros(n, 0, dtype=torch.float32)
            return extra, (x2.new_zeros(n, 0, dtype=torch.uint8), empty, empty)
        nch = -(-d // c)
        xf = x2.to(torch.float32)
        pad = nch * c - d
        if pad:
            xf = torch.cat([xf, xf[:, -1:].expand(n, pad)], 1)
        v = xf.view(n, nch, c)
        zero = v.amin(2)
        scale = (v.amax(2) - zero) / levels
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        t = torch.sub(v, zero.unsqueeze(2)).mul_(inv.unsqueeze(2))
        u = torch.empty_like(t)
        for i, s in enumerate(senders):
            g = torch.Generator(device=x2.device).manual_seed(stream_seed(seed, round, s))
            u[i].uniform_(0.0, 1.0, generator=g)
        codes = t.add_(u).floor_().clamp_(0, levels).view(n, nch * c)[:, :d]
        return extra, (pack_bits(codes, self.bits), scale, zero)

    def _frame_specs(self, header, d):
        bits, c = header.get("bits"), header.get("chunk")
        if bits not in (2, 4, 8) or not _is_int(c) or c < 1:
            raise wire_error("bad_header", f"quant payload bits={bits!r} chunk={c!r} invalid")
        nch = -(-d // c)
        return [
            (torch.uint8, (-(-d * bits // 8),)),
            (torch.float32, (nch,)),
            (torch.float32, (nch,)),
        ]

    def _decompress_into(self, out2, header, frames2):
        # 0 + 1 * (code * scale + zero) is the value itself: the merge kernel decodes for both
        # the sender and every receiver, so their copies agree whichever backend runs
        self._add_into(out2.zero_(), header, frames2, 1.0)

    def _add_into(self, out2, header, frames2, weight):
        # gossip.ops reads this exact format (rows of packed codes, fp32 scale and zero)
        codes, scale, zero = frames2
        dequantize_accumulate_(out2, codes, scale, zero, header["bits"], header["chunk"], weight)


class ScaledSign(Compressor):
    """``C(v) = (||v||_1 / d) * sign(v)`` with one bit per coordinate (1 = negative; 0 -> +).

    Frames: packed sign bits (``[ceil(d/8)]`` uint8, little-endian within each byte) and the
    scale (``[1]``, the input dtype). delta = ||v||_1^2 / (d ||v||_2^2) >= 1/d; ``delta(d)``
    returns the worst case 1/d.
    """

    name = "sign"

    def delta(self, d: int) -> float:
        return 1.0 if d == 0 else 1.0 / d

    def _compress(self, x2, *, seed, round, senders):
        n, d = x2.shape
        scale = x2.abs().sum(1, keepdim=True) / max(d, 1)
        return {}, (pack_bits((x2 < 0).to(torch.uint8), 1), scale.to(x2.dtype))

    def _frame_specs(self, header, d):
        return [(torch.uint8, (-(-d // 8),)), (FLOAT_DTYPES[header["dtype"]], (1,))]

    def _decompress_into(self, out2, header, frames2):
        if frames2[1].dtype == torch.float32:
            self._add_into(out2.zero_(), header, frames2, 1.0)  # as for the quantizer
            return
        signs = unpack_table(frames2[0], 1, out2.shape[1], (1.0, -1.0), out2.dtype)
        torch.mul(signs, frames2[1], out=out2)  # +-1 * s is exact

    def _add_into(self, out2, header, frames2, weight):
        bits, s = frames2
        if s.dtype != torch.float32:
            return super()._add_into(out2, header, frames2, weight)
        # a 1-bit quantized payload with one chunk: code * (-2s) + s is s or -s exactly
        d = out2.shape[1]
        dequantize_accumulate_(out2, bits, (-2.0 * s).contiguous(), s, 1, max(d, 1), weight)
