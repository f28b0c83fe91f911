"""In-memory transport: N transports in one process share a :class:`MemoryHub`.

For tests, and for algorithms tested against a fake transport with no processes. It behaves like
the wire transports where it matters: the receiver gets its own copies of the tensors (never
views of the sender's buffer), the header must survive a msgpack round trip, and byte counts
include the packed header. Faults are injected deterministically, keyed by ``(round, sender)``
(optionally the receiver too), never by sleeping:

* ``hub.drop(round, sender)``: the message is lost;
* ``hub.delay(round, sender, rounds=k)``: the message is held until the receiver has asked for
  round ``round + k``, so it arrives *late* (after the receiver gave up on it).

The hub is thread-safe, so nodes may also run in threads; a ``recv`` with nothing to receive
waits on a condition variable until its timeout.

Example::

    hub = MemoryHub()
    a, b = MemoryTransport(0, hub=hub), MemoryTransport(1, hub=hub)
    a.connect({1: b.address}); b.connect({0: a.address})
    hub.delay(round=3, sender=0, rounds=1)      # a's round-3 message reaches b at round 4
    a.send(1, 0, [torch.ones(3)])
    b.recv(0, 0, timeout_s=1.0).tensors[0]      # tensor([1., 1., 1.])
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

import msgpack

from ..errors import ConfigError, TransportError
from .api import Message, Transport

_hub_ids = itertools.count()


class MemoryHub:
    """Shared mailbox of in-process transports; holds the fault plan.

    Args:
        name: label used in addresses (``mem://<name>/<rank>``); default a unique counter.
    """

    def __init__(self, name: str | None = None):
        self.name = name if name is not None else f"hub{next(_hub_ids)}"
        self._lock = threading.Condition()
        self._members: dict[int, MemoryTransport] = {}
        self._drops: dict[tuple[int, int, int | None], bool] = {}
        self._delays: dict[tuple[int, int, int | None], int] = {}

    def address(self, rank: int) -> str:
        """The address a transport of ``rank`` has on this hub."""
        return f"mem://{self.name}/{rank}"

    def drop(self, round: int, sender: int, receiver: int | None = None) -> None:
        """Lose the message ``sender`` sends for ``round`` (to ``receiver``, or to everyone)."""
        self._drops[(round, sender, receiver)] = True

    def delay(self, round: int, sender: int, rounds: int, receiver: int | None = None) -> None:
        """Hold ``sender``'s ``round`` message until the receiver asks for ``round + rounds``."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}")
        self._delays[(round, sender, receiver)] = rounds

    @staticmethod
    def _lookup(table: dict, round: int, sender: int, receiver: int):
        for key in ((round, sender, receiver), (round, sender, None)):
            if key in table:
                return table[key]
        return None

    def _join(self, transport: MemoryTransport) -> None:
        with self._lock:
            if transport.rank in self._members:
                raise ConfigError(
                    f"rank {transport.rank} is already open on hub {self.name!r}; "
                    "close it first or use another rank"
                )
            self._members[transport.rank] = transport

    def _leave(self, transport: MemoryTransport) -> None:
        with self._lock:
            if self._members.get(transport.rank) is transport:
                del self._members[transport.rank]
            self._lock.notify_all()

    def _post(self, sender: int, receiver: int, item: tuple) -> bool:
        round = item[1]
        if self._lookup(self._drops, round, sender, receiver):
            return True  # lost on the way: the sender cannot tell
        hold = self._lookup(self._delays, round, sender, receiver)
        with self._lock:
            dest = self._members.get(receiver)
            if dest is None:
                return False
            if hold:
                dest._held.append((round + hold, item))
            else:
                dest._inbox.append(item)
            self._lock.notify_all()
        return True


class MemoryTransport(Transport):
    """A transport whose peers are other :class:`MemoryTransport` objects on the same hub."""

    kind = "memory"

    def __init__(self, rank: int, *, hub: MemoryHub, **kw):
        super().__init__(rank, **kw)
        if not isinstance(hub, MemoryHub):
            raise ConfigError(f"hub must be a MemoryHub, got {type(hub)!r}")
        self.hub = hub
        self._inbox: deque = deque()
        self._held: list[tuple[int, tuple]] = []
        hub._join(self)

    @property
    def address(self) -> str:
        return self.hub.address(self.rank)

    def _connect_peer(self, peer: int, address: str) -> None:
        if address != self.hub.address(peer):
            raise ConfigError(
                f"address of peer {peer} must be {self.hub.address(peer)!r} on this hub, "
                f"got {address!r}"
            )

    @property
    def unreachable(self) -> frozenset[int]:
        with self.hub._lock:
            return frozenset(p for p in self.peers if p not in self.hub._members)

    def _send_message(self, peer, round, tensors, header) -> int:
        try:
            packed = msgpack.packb(header, use_bin_type=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"header must be msgpack-serialisable: {exc}") from exc
        copies = [t.detach().to("cpu", copy=True).contiguous() for t in tensors]
        nbytes = len(packed) + sum(t.numel() * t.element_size() for t in copies)
        ok = self.hub._post(self.rank, peer, (self.rank, round, packed, copies, nbytes))
        if not ok:
            raise TransportError(
                f"rank {self.rank}: peer {peer} is not open on hub {self.hub.name!r}"
            )
        return nbytes

    def _pump(self, timeout_s: float, wanted) -> None:
        with self.hub._lock:
            ready = [item for due, item in self._held if due <= self._floor]
            if ready:
                self._held = [(due, it) for due, it in self._held if due > self._floor]
                self._inbox.extend(ready)
            if not self._inbox:
                self.hub._lock.wait(timeout_s)
            items = list(self._inbox)
            self._inbox.clear()
        for sender, round, packed, tensors, nbytes in items:
            reason = self._admit(sender, round)
            if reason is not None:
                self._reject(sender, reason, f"round {round}", nbytes)
                if reason == "future":  # evidence that this node fell behind (see ahead())
                    header = msgpack.unpackb(packed, raw=False)
                    self._hold_ahead(Message(sender, round, header, tensors))
                continue
            header = msgpack.unpackb(packed, raw=False)
            self._deliver(Message(sender, round, header, tensors), nbytes)

    def _close(self) -> None:
        self.hub._leave(self)
        self._inbox.clear()
        self._held.clear()
