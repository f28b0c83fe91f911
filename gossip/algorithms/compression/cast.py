"""The exact codecs: :class:`Identity` (the tensor itself) and :class:`Cast` (fp16 / bf16)."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from .base import FLOAT_DTYPES, Compressor


class Identity(Compressor):
    """No compression: one frame, the tensor itself (not copied). delta = 1."""

    name = "identity"

    def _compress(self, x2, *, seed, round, senders):
        return {}, (x2,)

    def _frame_specs(self, header, d):
        return [(FLOAT_DTYPES[header["dtype"]], (d,))]

    def _decompress_into(self, out2, header, frames2):
        out2.copy_(frames2[0])

    def _add_into(self, out2, header, frames2, weight):
        out2.add_(frames2[0], alpha=weight)


class Cast(Compressor):
    """Send ``x`` cast to float16 or bfloat16; decompress casts back to the original dtype.

    delta: 1 - u**2 with unit roundoff u (2**-11 for fp16, 2**-8 for bf16), valid while
    |x| stays within the format's range (fp16 overflows to inf beyond 65504).
    """

    def __init__(self, dtype: str):
        if dtype not in ("fp16", "bf16"):
            raise ConfigError(f"cast dtype must be 'fp16' or 'bf16', got {dtype!r}")
        self.name = dtype
        self.wire_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16

    def delta(self, d: int) -> float:
        u = 2.0**-11 if self.name == "fp16" else 2.0**-8
        return 1.0 - u * u

    def _compress(self, x2, *, seed, round, senders):
        return {}, (x2.to(self.wire_dtype),)

    def _frame_specs(self, header, d):
        return [(self.wire_dtype, (d,))]

    def _decompress_into(self, out2, header, frames2):
        out2.copy_(frames2[0])
