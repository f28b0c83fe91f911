"""One error tree for the whole package.

Every error the package raises on purpose is a :class:`GossipError`. Subclasses also inherit the
built-in exception that says what kind of failure it is, so ``except ValueError`` keeps working for
callers who do not know this package.
"""

from __future__ import annotations


class GossipError(Exception):
    """Base class of every error raised on purpose by ``gossip``."""


class ConfigError(GossipError, ValueError):
    """A user-supplied setting is invalid (names the setting, shows the value, says what is
    valid)."""


class TopologyError(GossipError, ValueError):
    """A graph or mixing matrix breaks a requirement (names the node or row and the value)."""


class AlgorithmError(GossipError, ValueError):
    """An algorithm's inputs are inconsistent (shapes, weights, layouts)."""


class DecodeError(GossipError, ValueError):
    """A gradient code cannot recover the full gradient from the workers that answered."""


class WireError(GossipError, ValueError):
    """A message failed validation (header, dtype, shape, size, checksum, sender, round).

    ``reason`` is a short label from the bounded set in
    :data:`gossip.transport.api.REJECT_REASONS` (``"checksum"``, ``"bad_payload"``, ...): the
    transports count a dropped message under it. Example:
    ``raise WireError("frame 0 failed its checksum", reason="checksum")``.
    """

    def __init__(self, message: str = "", *, reason: str = "bad_header"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # keep the reason across pickling (the default rebuilds from args alone)
        return (_wire_error, (self.args, self.reason))


def _wire_error(args: tuple, reason: str) -> WireError:
    return WireError(*args, reason=reason)


class TransportError(GossipError, ConnectionError):
    """A peer could not be reached or the connection failed."""


class DeadlineError(GossipError, TimeoutError):
    """A receive or a round did not complete before its deadline."""


class NativeUnavailableError(GossipError, RuntimeError):
    """The native merge kernels were requested but could not be built or loaded."""
