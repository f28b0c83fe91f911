"""The wire format: one msgpack header frame, then raw tensor frames sent zero-copy.

A message is a list of frames. Frame 0 is a msgpack map::

    {"v": 2, "run": str, "sender": int, "round": int, ...caller fields...,
     "frames": [[dtype, shape, nbytes, crc32c or None], ...]}

and frames 1.. are the raw bytes of each tensor (C order, native little-endian). ``decode``
validates everything before it allocates or copies anything: the header's size, msgpack limits
(string/bin/array/map lengths, no extension types, string map keys only), required keys and
types, the version, each dtype against an allow-list, ``prod(shape) * itemsize == nbytes ==
len(frame)``, the total size, and the CRC-32C of every frame. A violation raises
:class:`~gossip.errors.WireError` with a short ``reason`` label for metrics:

``truncated`` (fewer frames or bytes than declared), ``oversize`` (a bound exceeded),
``bad_header`` (not msgpack, wrong keys or types, extra frames), ``version``, ``bad_dtype``,
``size_mismatch`` (shape, byte length or frame length disagree), ``checksum``.

The checksum is CRC-32C (Castagnoli, as in iSCSI and ext4) from the ``crc32c`` package, which
uses the CPU's CRC instruction where there is one (SSE4.2, ARMv8): several GB/s, against ~1 GB/s
for zlib's CRC-32, so checking every frame no longer halves a fast link. Version 1 of the format
carried zlib's CRC-32 in the same slot; a version-1 message is rejected as ``version``.

Decoded tensors are views over the received buffers (``torch.frombuffer``): no copies, no
pickle. Treat them as read-only; copy what you keep past the buffer's lifetime.

Example::

    frames = encode({"run": "r1", "sender": 3, "round": 7}, [x])   # [header, memoryview]
    header, (y,) = decode(frames)                                  # y views frames[1]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import crc32c
import msgpack
import torch

from ..errors import WireError

#: Format version; 2 = CRC-32C frame checksums (1 had zlib CRC-32).
VERSION = 2

#: dtypes a frame may carry (name on the wire -> torch dtype).
WIRE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "uint16": torch.uint16,
    "int16": torch.int16,
    "uint32": torch.uint32,
    "int32": torch.int32,
    "int64": torch.int64,
}
_WIRE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
REASONS = (
    "truncated",
    "oversize",
    "bad_header",
    "version",
    "bad_dtype",
    "size_mismatch",
    "checksum",
)
_RESERVED = ("v", "frames")


@dataclass(frozen=True, kw_only=True)
class WireLimits:
    """Bounds a receiver enforces before it allocates anything.

    ``max_header_bytes`` bounds frame 0; ``max_total_bytes`` the sum of the tensor frames;
    ``max_frames``/``max_ndim`` the frame list and each shape; ``max_str_len``, ``max_array_len``
    and ``max_map_len`` are passed to msgpack. ``require_checksum`` rejects frames sent without a
    CRC-32C. Example: ``WireLimits(max_total_bytes=2 * model_bytes)``.
    """

    max_header_bytes: int = 64 * 1024
    max_total_bytes: int = 4 * 1024**3
    max_frames: int = 64
    max_ndim: int = 8
    max_str_len: int = 4096
    max_array_len: int = 4096
    max_map_len: int = 256
    require_checksum: bool = True


DEFAULT_LIMITS = WireLimits()


def _error(reason: str, message: str) -> WireError:
    return WireError(f"{message} [{reason}]", reason=reason)


def frame_checksum(buf) -> int:
    """The CRC-32C (Castagnoli) of a bytes-like frame, as a uint32: the descriptor's checksum.

    Example: ``frame_checksum(b"123456789") == 0xE3069283``.
    """
    return crc32c.crc32c(buf)


def _byte_view(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (copies once to CPU/contiguous when it must)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def encode(
    header: Mapping, frames: Sequence[torch.Tensor], *, checksum: bool = True
) -> list[bytes | memoryview]:
    """Encode ``header`` (needs ``run``: str, ``sender``: int, ``round``: int, plus any
        msgpack-able fields) and ``frames`` into ``[header_bytes, frame_1, ...]``.

        Tensor frames are memoryviews over the tensors' own memory (CPU tensors are not copied;
        keep them alive and unchanged until sent). ``checksum`` adds a CRC-32C per frame
    (:func:`frame_checksum`, hardware-accelerated: several GB/s).
    """
    for key in _RESERVED:
        if key in header:
            raise _error("bad_header", f"header key {key!r} is reserved for the wire format")
    _check_meta(header)
    views, descs = [], []
    for t in frames:
        if t.dtype not in _WIRE_NAMES:
            raise _error("bad_dtype", f"dtype {t.dtype} cannot go on the wire")
        mv = _byte_view(t)
        views.append(mv)
        crc = frame_checksum(mv) if checksum else None
        descs.append([_WIRE_NAMES[t.dtype], list(t.shape), mv.nbytes, crc])
    head = msgpack.packb({"v": VERSION, **header, "frames": descs})
    return [head, *views]


def encoded_bytes(frames: Sequence) -> int:
    """Total bytes of an encoded message (header frame + tensor frames)."""
    return sum(memoryview(f).nbytes for f in frames)


def _check_meta(h: Mapping) -> None:
    if not isinstance(h.get("run"), str):
        raise _error("bad_header", f"header 'run' must be a str, got {h.get('run')!r}")
    for key in ("sender", "round"):
        if not _is_int(h.get(key)) or h[key] < 0:
            raise _error("bad_header", f"header {key!r} must be an int >= 0, got {h.get(key)!r}")


def _ext_hook(code, data):
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode(
    frames: Sequence, *, limits: WireLimits = DEFAULT_LIMITS
) -> tuple[dict, list[torch.Tensor]]:
    """Validate and decode a message; returns ``(header, tensors)``, tensors viewing ``frames``.

    Raises :class:`WireError` (with ``.reason``) on any violation; nothing is allocated before
    the header and every frame's declared size have been checked.
    """
    if len(frames) < 1:
        raise _error("truncated", "message has no header frame")
    if len(frames) - 1 > limits.max_frames:
        raise _error("oversize", f"{len(frames) - 1} frames exceed max_frames={limits.max_frames}")
    head = memoryview(frames[0])
    if head.nbytes > limits.max_header_bytes:
        raise _error("oversize", f"header of {head.nbytes} B exceeds {limits.max_header_bytes} B")
    try:
        header = msgpack.unpackb(
            head,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_ext_hook,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several types; all mean "not a valid header"
        raise _error("bad_header", f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise _error("bad_header", f"header must be a map, got {type(header).__name__}")
    if header.get("v") != VERSION:
        raise _error("version", f"wire version {header.get('v')!r}, this build reads {VERSION}")
    _check_meta(header)
    descs = header.get("frames")
    if not isinstance(descs, list):
        raise _error("bad_header", "header 'frames' must be a list")
    got = f"{len(frames) - 1} frames arrived, header declares {len(descs)}"
    if len(frames) - 1 < len(descs):
        raise _error("truncated", got)
    if len(frames) - 1 > len(descs):
        raise _error("bad_header", got)
    plan, total = [], 0
    for i, desc in enumerate(descs):
        dtype, shape, nbytes, crc = _check_desc(i, desc, limits)
        total += nbytes
        if total > limits.max_total_bytes:
            raise _error("oversize", f"frames total over max_total_bytes={limits.max_total_bytes}")
        plan.append((dtype, shape, nbytes, crc))
    tensors = []
    for i, ((dtype, shape, nbytes, crc), raw) in enumerate(zip(plan, frames[1:], strict=True)):
        buf = _bytes_view(i, raw)
        got = buf.nbytes
        if got < nbytes:
            raise _error("truncated", f"frame {i} has {got} B, header declares {nbytes} B")
        if got > nbytes:
            raise _error("size_mismatch", f"frame {i} has {got} B, header declares {nbytes} B")
        if crc is not None and frame_checksum(buf) != crc:
            raise _error("checksum", f"frame {i} failed its CRC-32C check")
        tensors.append(_view(buf, dtype, shape, nbytes))
    del header["frames"], header["v"]
    return header, tensors


def _bytes_view(i: int, raw) -> memoryview:
    try:
        buf = memoryview(raw)
        return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
    except (TypeError, ValueError) as e:
        raise _error("bad_header", f"frame {i} is not a contiguous byte buffer: {e}") from None


def _check_desc(i: int, desc, limits: WireLimits):
    if not (isinstance(desc, list) and len(desc) == 4):
        raise _error("bad_header", f"frame {i} descriptor must be [dtype, shape, nbytes, crc32c]")
    name, shape, nbytes, crc = desc
    if name not in WIRE_DTYPES:
        raise _error("bad_dtype", f"frame {i} dtype {name!r} is not in the allow-list")
    if not (isinstance(shape, list) and len(shape) <= limits.max_ndim):
        raise _error("bad_header", f"frame {i} shape must be a list of <= {limits.max_ndim} ints")
    if not all(_is_int(s) and s >= 0 for s in shape):
        raise _error("bad_header", f"frame {i} shape {shape!r} must hold ints >= 0")
    if not _is_int(nbytes) or nbytes < 0:
        raise _error("bad_header", f"frame {i} nbytes {nbytes!r} must be an int >= 0")
    if crc is None:
        if limits.require_checksum:
            raise _error("checksum", f"frame {i} has no checksum and limits require one")
    elif not _is_int(crc) or not 0 <= crc < 2**32:
        raise _error("bad_header", f"frame {i} crc32c {crc!r} must be a uint32")
    dtype = WIRE_DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != nbytes:
        raise _error("size_mismatch", f"frame {i}: shape {shape} x {itemsize} B != nbytes {nbytes}")
    return dtype, shape, nbytes, crc


def _view(buf, dtype: torch.dtype, shape: list[int], nbytes: int) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # Read-only buffers (bytes, zmq frames) are fine: decoded tensors are documented read-only.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buf, dtype=dtype).view(shape)


# -- compressor payloads ----------------------------------------------------------------------
class WirePayload(NamedTuple):
    """A decoded compressor payload: the codec ``header`` dict and its ``frames`` (tensor views).

    Duck-type compatible with ``gossip.algorithms.compression.Payload``.
    """

    header: dict
    frames: tuple


def encode_payload(payload, meta: Mapping, *, checksum: bool = True) -> list:
    """Encode a compressor payload with ``meta`` (``run``, ``sender``, ``round``, ...).

    The codec header travels under the ``codec`` key; frames are the payload's frames.
    """
    if "codec" in meta:
        raise _error("bad_header", "meta key 'codec' is reserved for the payload header")
    return encode({**meta, "codec": payload.header}, list(payload.frames), checksum=checksum)


def decode_payload(
    frames: Sequence, *, limits: WireLimits = DEFAULT_LIMITS
) -> tuple[dict, WirePayload]:
    """Inverse of :func:`encode_payload`: ``(meta, WirePayload(codec_header, tensors))``.

    The codec header is checked to be a map with a string ``codec``; its semantics (d, k,
    index ranges) are checked by the compressor's ``decompress`` (``Compressor.check``).
    """
    header, tensors = decode(frames, limits=limits)
    codec = header.pop("codec", None)
    if not isinstance(codec, dict) or not isinstance(codec.get("codec"), str):
        raise _error("bad_header", "payload message needs a 'codec' map with a str 'codec' name")
    return header, WirePayload(codec, tuple(tensors))
