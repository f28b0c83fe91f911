"""Compressors with exact wire formats: identity, top-k, rand-k, quantization, sign, casts.

A compressor turns a flat tensor ``x`` (one node, ``[P]``, or a batch of nodes, ``[N, P]``, row by
row) into a :class:`Payload`: a tiny msgpack-able ``header`` dict plus a tuple of raw contiguous
``frames``. ``decompress(payload)`` rebuilds **exactly** (bit for bit) the dense tensor ``C(x)``.
Every algorithm uses ``decompress(compress(x))`` as ``C(x)`` on the sender too, so the public
copies that neighbours keep of each other (CHOCO, MoTEF) never drift.

``delta(d)`` is the contraction factor of ALGORITHMS.md §0: ``E||C(v) - v||^2 <= (1 - delta)
||v||^2`` (CHOCO calls it the "quality omega"; it is not the variance bound of the unbiased
literature). ``wire_bytes(payload)`` is the exact byte count of the payload: its msgpack-packed
header plus its frames. (The transport adds a fixed envelope per message: version, run id,
sender, round and per-frame dtype/shape/checksum; see ``gossip.transport.wire``.)

Example::

    c = make_compressor("topk:0.01")
    p = c.compress(x)                  # k = 1% of x.numel() values + narrowest-int indices
    q = c.decompress(p)                # the dense C(x), identical on sender and receiver
    c.wire_bytes(p)                    # k * (4 + 2) + len(header) for d <= 65536, float32
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import FLOAT_DTYPES, Compressor, Payload, index_dtype, stream_seed, wire_error
from .cast import Cast, Identity
from .quantize import ScaledSign, StochasticQuantizer, pack_bits, unpack_bits, unpack_table
from .sparse import RandK, TopK, randk_indices, randk_rows, topk_indices

SPEC_FORMS = (
    "none, identity, topk:<fraction in (0,1]>, topk:<count>, with options topk:<k>:bf16, "
    "topk:<k>:packed, topk:<k>:bf16:packed, randk:<fraction>, randk:<count>, "
    "quant:<2|4|8>[:<chunk>], sign, fp16, bf16"
)


def make_compressor(spec: str | Compressor | None) -> Compressor:
    """Parse a compressor spec (``none|identity|topk:0.01|topk:100|randk:0.01|quant:4|sign|bf16``).

    ``topk``/``randk`` take a fraction of d (a number with a '.' or exponent, in (0, 1]) or a
    count (an integer >= 1); ``topk:0.01:bf16:packed`` sends bfloat16 values and Elias-Fano
    packed indices (see :class:`TopK`). ``quant`` takes bits in {2, 4, 8} and an optional chunk size
    (``quant:4:128``; default 256). Raises :class:`ConfigError` naming the spec otherwise.
    """
    if isinstance(spec, Compressor):
        return spec
    if spec is None:
        return Identity()
    if not isinstance(spec, str):
        raise ConfigError(f"compressor spec must be a string, got {spec!r}; valid: {SPEC_FORMS}")
    name, _, arg = spec.strip().lower().partition(":")

    def bad(why: str) -> ConfigError:
        return ConfigError(f"compressor spec {spec!r}: {why}; valid forms: {SPEC_FORMS}")

    try:
        if name in ("none", "identity") and not arg:
            return Identity()
        if name in ("fp16", "bf16") and not arg:
            return Cast(name)
        if name == "sign" and not arg:
            return ScaledSign()
        if name in ("topk", "randk") and arg:
            arg, *options = arg.split(":")
            kw = {"options": tuple(options)} if name == "topk" else {}
            if options and name == "randk":
                raise bad("randk takes no options")
            if any(ch in arg for ch in ".e"):
                return (TopK if name == "topk" else RandK)(fraction=float(arg), **kw)
            return (TopK if name == "topk" else RandK)(int(arg), **kw)
        if name == "quant" and arg:
            parts = arg.split(":")
            if len(parts) > 2:
                raise bad("quant takes bits and an optional chunk")
            return StochasticQuantizer(int(parts[0]), *(int(p) for p in parts[1:]))
    except (ValueError, ConfigError) as e:
        if isinstance(e, ConfigError) and "valid forms" in str(e):
            raise
        raise bad(str(e)) from None
    raise bad("unknown or malformed compressor")


__all__ = [
    "FLOAT_DTYPES",
    "SPEC_FORMS",
    "Payload",
    "Compressor",
    "make_compressor",
    "Identity",
    "Cast",
    "TopK",
    "RandK",
    "StochasticQuantizer",
    "ScaledSign",
    "wire_error",
    "index_dtype",
    "stream_seed",
    "topk_indices",
    "randk_rows",
    "randk_indices",
    "pack_bits",
    "unpack_bits",
    "unpack_table",
]
