"""The compressor interface: :class:`Payload`, :class:`Compressor` and the helpers every codec uses.

A codec subclasses :class:`Compressor` and implements three hooks on a 2-D ``[N, d]`` view
(``_compress``, ``_frame_specs``, ``_decompress_into``); the base class handles the ``[P]`` /
``[N, P]`` shapes, validation of untrusted payloads (:meth:`Compressor.check`, raising
:class:`~gossip.errors.WireError` with a ``reason``), exact byte counts and per-row splitting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import torch

from ...errors import AlgorithmError, ConfigError, WireError

#: Dense dtypes a payload may describe (its ``header["dtype"]``).
FLOAT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}


class Payload(NamedTuple):
    """One compressed message: ``header`` (plain msgpack-able dict) and raw contiguous ``frames``.

    Frames may alias the compressed tensor (identity, casts of the same dtype); consume or send
    the payload before modifying that tensor. Any object with ``.header``/``.frames`` (such as
    ``gossip.transport.wire.decode_payload``'s result) is accepted where a Payload is expected.
    """

    header: dict
    frames: tuple


def wire_error(reason: str, message: str) -> WireError:
    """A :class:`WireError` with a short bounded ``reason`` label for metrics."""
    return WireError(message, reason=reason)


def index_dtype(d: int) -> torch.dtype:
    """The narrowest integer dtype that holds every index of ``range(d)``.

    ``uint8`` up to d = 256, ``uint16`` up to 65,536, ``uint32`` up to 2**32, else ``int64``.
    """
    if d <= 1 << 8:
        return torch.uint8
    if d <= 1 << 16:
        return torch.uint16
    if d <= 1 << 32:
        return torch.uint32
    return torch.int64


_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_seed(seed: int, round: int, sender: int) -> int:
    """A 63-bit generator seed for one (run seed, round, sender) triple, equal in every process."""
    h = _splitmix64(seed & _M64)
    h = _splitmix64(h ^ (round & _M64))
    h = _splitmix64(h ^ (sender & _M64))
    return h >> 1


def _senders(sender: int | Sequence[int], n: int | None) -> list[int]:
    if n is None:
        return [int(sender)]
    if isinstance(sender, int):
        return [sender + i for i in range(n)]
    out = [int(s) for s in sender]
    if len(out) != n:
        raise ConfigError(f"sender has {len(out)} ids for {n} rows; give one per row or an int")
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Compressor(ABC):
    """Base class: ``compress``, ``decompress``, ``decompress_add_``, ``delta``, ``wire_bytes``.

    Subclasses set ``name`` and implement ``_compress(x2, seeds...)`` on a 2-D ``[N, d]`` view,
    ``_frame_specs(header, n, d)`` (the dtype and shape of every frame, for validation) and
    ``_decompress_into(out2, header, frames)``.
    """

    name = "base"

    def spec(self) -> str:
        """The spec string :func:`make_compressor` parses back into this compressor."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"

    # -- public API ------------------------------------------------------------------------
    def compress(
        self, x: torch.Tensor, *, seed: int = 0, round: int = 0, sender: int | Sequence[int] = 0
    ) -> Payload:
        """Compress ``x`` (``[P]`` or ``[N, P]``, floating point) into a :class:`Payload`.

        ``seed``/``round``/``sender`` seed the randomness (rand-k coordinates, stochastic
        rounding); for a batch, ``sender`` is the first row's id (rows get ``sender + i``) or
        one id per row.
        """
        if x.dtype not in _DTYPE_NAMES:
            raise ConfigError(
                f"{self.name} compresses float16/bfloat16/float32/float64 tensors, got {x.dtype}"
            )
        if x.dim() not in (1, 2):
            raise ConfigError(f"x must be [P] or [N, P], got shape {tuple(x.shape)}")
        n = x.shape[0] if x.dim() == 2 else None
        d = x.shape[-1]
        x2 = x.detach().reshape(-1 if n is None else n, d) if d else x.detach().reshape(n or 1, 0)
        header: dict[str, Any] = {"codec": self.name, "d": int(d), "dtype": _DTYPE_NAMES[x.dtype]}
        if n is not None:
            header["n"] = int(n)
        extra, frames = self._compress(x2, seed=seed, round=round, senders=_senders(sender, n))
        header.update(extra)
        if n is None:
            frames = tuple(f.reshape(f.shape[1:]) for f in frames)
            if isinstance(header.get("sender"), list):
                header["sender"] = header["sender"][0]
        return Payload(header, tuple(f.contiguous() for f in frames))

    def decompress(self, payload, *, d: int | None = None, out: torch.Tensor | None = None):
        """The dense ``C(x)`` a payload stands for (a new tensor, or written into ``out``).

        Validates the payload first (raises :class:`WireError` with a ``reason``); pass ``d``,
        the size you expect, for payloads that came from the network.
        """
        header, frames, n, dd = self.check(payload, d=d)
        dtype = FLOAT_DTYPES[header["dtype"]]
        shape = (dd,) if n is None else (n, dd)
        device = frames[0].device if frames else torch.device("cpu")
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=device)
        elif tuple(out.shape) != shape or out.dtype != dtype:
            raise AlgorithmError(
                f"out is {tuple(out.shape)} {out.dtype}, but the payload is {shape} {dtype}"
            )
        if dd:
            frames = tuple(f.to(out.device) for f in frames)
            self._decompress_into(out.view(n or 1, dd), header, self._frames2(frames, n))
        return out

    def decompress_add_(self, out: torch.Tensor, payload, weight: float = 1.0) -> torch.Tensor:
        """``out += weight * C(x)`` in place (the merge path); returns ``out``.

        With ``weight == 1`` the result is bit-identical to ``out.add_(decompress(payload))``.
        """
        header, frames, n, dd = self.check(payload, d=out.shape[-1])
        shape, dtype = ((dd,) if n is None else (n, dd)), FLOAT_DTYPES[header["dtype"]]
        if tuple(out.shape) != shape or out.dtype != dtype:
            raise AlgorithmError(
                f"out is {tuple(out.shape)} {out.dtype}, but the payload is {shape} {dtype}"
            )
        if dd:
            frames = tuple(f.to(out.device) for f in frames)
            self._add_into(out.view(n or 1, dd), header, self._frames2(frames, n), weight)
        return out

    def delta(self, d: int) -> float:
        """Contraction factor in (0, 1] (worst case over inputs of size ``d``; 1 = exact)."""
        return 1.0

    def wire_bytes(self, payload) -> int:
        """Exact bytes of ``payload``: its msgpack-packed header plus all frames."""
        return len(msgpack.packb(payload.header)) + sum(_nbytes(f) for f in payload.frames)

    def message_bytes(self, payload) -> int:
        """Bytes a batched payload costs when each of its rows is sent as its own message.

        For a 1-D payload this is :meth:`wire_bytes`. For ``[N, P]`` it sums, exactly, the
        header and frames of every row's message (see :meth:`split`).
        """
        h = payload.header
        if "n" not in h:
            return self.wire_bytes(payload)
        frames = sum(_nbytes(f) for f in payload.frames)
        if not self._row_headers_differ:
            return h["n"] * len(msgpack.packb(self._row_header(h, 0))) + frames
        return sum(len(msgpack.packb(self._row_header(h, i))) for i in range(h["n"])) + frames

    def split(self, payload) -> list[Payload]:
        """The per-row messages of a batched payload (views, no copies)."""
        h = payload.header
        if "n" not in h:
            return [Payload(h, tuple(payload.frames))]
        return [
            Payload(self._row_header(h, i), tuple(f[i] for f in payload.frames))
            for i in range(h["n"])
        ]

    # -- validation ------------------------------------------------------------------------
    def check(self, payload, *, d: int | None = None):
        """Validate a payload before anything is allocated; returns ``(header, frames, n, d)``."""
        header, frames = payload.header, tuple(payload.frames)
        if not isinstance(header, dict) or header.get("codec") != self.name:
            codec = header.get("codec") if isinstance(header, dict) else None
            raise wire_error("bad_header", f"payload codec {codec!r} is not {self.name!r}")
        hd, n = header.get("d"), header.get("n")
        if not _is_int(hd) or hd < 0:
            raise wire_error("bad_header", f"payload d must be an int >= 0, got {hd!r}")
        if n is not None and (not _is_int(n) or n < 1):
            raise wire_error("bad_header", f"payload n must be an int >= 1, got {n!r}")
        if d is not None and hd != d:
            raise wire_error("size_mismatch", f"payload has d={hd}, expected d={d}")
        if header.get("dtype") not in FLOAT_DTYPES:
            raise wire_error("bad_dtype", f"payload dtype {header.get('dtype')!r} not allowed")
        specs = self._frame_specs(header, hd)
        if len(frames) != len(specs):
            raise wire_error(
                "bad_header", f"{self.name} payload has {len(frames)} frames, expected {len(specs)}"
            )
        lead = () if n is None else (n,)
        for i, (f, (dt, shape)) in enumerate(zip(frames, specs, strict=True)):
            if f.dtype != dt:
                raise wire_error("bad_dtype", f"frame {i} has dtype {f.dtype}, expected {dt}")
            if tuple(f.shape) != lead + tuple(shape):
                raise wire_error(
                    "size_mismatch",
                    f"frame {i} has shape {tuple(f.shape)}, expected {lead + tuple(shape)}",
                )
        self._check_values(header, frames, hd)
        return header, frames, n, hd

    # -- hooks -----------------------------------------------------------------------------
    _row_headers_differ = False

    def _row_header(self, header: dict, i: int) -> dict:
        return {k: v for k, v in header.items() if k != "n"}

    def _check_values(self, header, frames, d) -> None:  # noqa: B027 - optional hook
        """Codec-specific checks of frame contents (top-k: index order and range)."""

    @staticmethod
    def _frames2(frames, n):
        return frames if n is not None else tuple(f.unsqueeze(0) for f in frames)

    def _add_into(self, out2, header, frames2, weight) -> None:
        dense = torch.empty_like(out2)
        self._decompress_into(dense, header, frames2)
        out2.add_(dense, alpha=weight)

    @abstractmethod
    def _compress(self, x2, *, seed, round, senders) -> tuple[dict, tuple]:
        """``[N, d]`` -> (extra header fields, frames with a leading row dimension)."""

    @abstractmethod
    def _frame_specs(self, header, d) -> list:
        """``[(dtype, shape without the row dimension), ...]`` of every frame, from the header."""

    @abstractmethod
    def _decompress_into(self, out2, header, frames2) -> None:
        """Write the dense ``[N, d]`` values of validated frames (with a row dim) into ``out2``."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
