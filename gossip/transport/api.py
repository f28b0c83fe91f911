"""The transport API: send tensors to a peer, receive from a peer with a deadline.

A transport moves one gossip message -- a small header dict plus a list of tensors -- from one
rank to another. It knows bytes, ranks and round numbers, never the math. Every backend
(:mod:`.memory`, :mod:`.zmq`, :mod:`.torchdist`) implements two hooks, ``_send_message`` and
``_pump``; this base class owns everything they share:

* the **mailbox**: messages are keyed by ``(sender, round)``. A message for a round the caller
  has not asked for yet (an *early* message) waits in the mailbox until it is asked for;
* the **round window**: the transport tracks the highest round asked for so far (the *floor*).
  A message whose round is below ``floor - round_window`` is rejected as ``"stale"``; one above
  ``floor + max_rounds_ahead`` as ``"future"`` (that bound keeps a misbehaving peer from filling
  memory with early messages). A second message for the same ``(sender, round)`` is rejected as
  ``"replayed"``. A message for a round below the floor but inside the window is accepted and
  counted as *late* (the caller may still ask for it; the async mode does);
* **far-ahead evidence**: a ``"future"`` message from an allowed sender that passed every other
  check of the backend is still rejected, but the newest one per sender is kept
  (:meth:`Transport.ahead`, one message per sender, so memory stays bounded). A node that fell
  behind its neighbours by more than the window uses them as evidence to rejoin
  (:meth:`Transport.rejoin` moves the window and admits the kept messages that now fit); the
  rule is the node's (:mod:`gossip.runtime.rounds`). A kept message that comes inside the
  window as the floor advances is admitted then;
* the **sender check**: only ranks passed to :meth:`Transport.connect` (or to
  :meth:`Transport.allow_senders`) may send; anyone else is rejected as ``"unknown_sender"``;
* :class:`TransportStats`: bytes and messages per peer, rejections by reason, late and expired
  messages; the node exports them as Prometheus counters;
* logging a rejection once per ``(peer, reason)``, so a flood of bad input cannot flood the log.

A bad message never raises out of ``recv``: it is dropped, counted and logged once, and the
caller keeps waiting for a good one until its deadline.

Example::

    with make_transport("memory", rank=0, hub=hub) as t:
        t.connect({1: hub.address(1)})
        t.send(1, round=0, tensors=[flat], header={"weight": 0.5})
        msg = t.recv(1, round=0, timeout_s=5.0)      # Message(sender=1, round=0, ...)
        got = t.recv_many([1, 2], round=1, deadline_s=0.5)   # {1: Message} if 2 was late
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, DeadlineError, TransportError

log = logging.getLogger("gossip.transport")

#: Reasons a received message can be rejected: the ``reason`` label of the rejection counters.
#: The first group is decided by the base class, then ``run_id`` by a backend, then the wire
#: decoder's (:mod:`gossip.transport.wire`); last, a node's checks of a compressed payload:
#: ``bad_codec`` (another compressor than the node's) and ``bad_payload`` (contents that fail
#: the codec's ``Compressor.check``, e.g. top-k indices out of order).
REJECT_REASONS = (
    "unknown_sender",
    "stale",
    "future",
    "replayed",
    "run_id",
    "bad_header",
    "version",
    "bad_dtype",
    "size_mismatch",
    "checksum",
    "truncated",
    "oversize",
    "bad_codec",
    "bad_payload",
)

#: Peer label used in stats and logs when the sender of a bad message cannot be determined.
UNKNOWN_PEER = -1


@dataclass
class Message:
    """One received gossip message.

    ``header`` is the dict the sender passed to :meth:`Transport.send` (wire fields such as dtype
    and checksum are not repeated here); ``tensors`` are new CPU tensors the receiver owns (for
    NCCL, tensors on the receiving device).
    """

    sender: int
    round: int
    header: dict
    tensors: list[torch.Tensor]
    #: Transport-owned receive buffers behind ``tensors`` (see :meth:`Transport.release`).
    buffers: list = field(default_factory=list, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        """Payload size in bytes (sum over tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass
class TransportStats:
    """Counters kept by every transport; the node exports them as Prometheus metrics.

    All dicts map a peer rank (or a reason string) to a running count; nothing is ever reset.

    * ``bytes_sent[peer]`` / ``bytes_received[peer]``: payload plus header bytes on the wire;
    * ``messages_sent[peer]`` / ``messages_received[peer]``: accepted messages;
    * ``send_failures[peer]``: sends dropped because the peer was unreachable or its queue full;
    * ``rejected[reason]`` and ``rejected_by_peer[(peer, reason)]``: dropped bad messages
      (``peer`` is :data:`UNKNOWN_PEER` when the header could not be read);
    * ``late[peer]``: accepted messages for a round below the highest round asked for so far;
    * ``expired[peer]``: accepted messages that fell out of the round window unread;
    * ``disconnects``: incoming connections dropped (a peer died, or sent a frame over the size
      limit, which ZeroMQ refuses before allocating it); not attributable to a peer.
    """

    bytes_sent: Counter = field(default_factory=Counter)
    bytes_received: Counter = field(default_factory=Counter)
    messages_sent: Counter = field(default_factory=Counter)
    messages_received: Counter = field(default_factory=Counter)
    send_failures: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    rejected_by_peer: Counter = field(default_factory=Counter)
    late: Counter = field(default_factory=Counter)
    expired: Counter = field(default_factory=Counter)
    disconnects: int = 0

    def total_rejected(self) -> int:
        """Number of rejected messages, all reasons together."""
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict copy (JSON-friendly keys) for summaries and logs."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            counter = getattr(self, name)
            if isinstance(counter, int):
                out[name] = counter
                continue
            out[name] = {
                (f"{k[0]}:{k[1]}" if isinstance(k, tuple) else str(k)): v
                for k, v in sorted(counter.items(), key=lambda kv: str(kv[0]))
            }
        return out


def _check_rank(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative int rank, got {value!r}")
    return value


class Transport(ABC):
    """Point-to-point messages between ranks, with deadlines; see the module docstring.

    Args:
        rank: this node's rank (>= 0).
        round_window: how many rounds below the highest requested round are still accepted
            (older ones are rejected as ``"stale"``). Default 4.
        max_rounds_ahead: how many rounds above the highest requested round are buffered
            (further ones are rejected as ``"future"``). Default 4.
        senders: ranks allowed to send to this node, in addition to the keys given to
            :meth:`connect`. Use it for directed graphs, where in-neighbours differ from
            out-neighbours.

    A transport is used from one thread (the node's communication thread); it is not
    thread-safe. ``close()`` is idempotent, and the transport is a context manager.
    """

    kind = "abstract"

    def __init__(
        self,
        rank: int,
        *,
        round_window: int = 4,
        max_rounds_ahead: int = 4,
        senders: Iterable[int] = (),
    ):
        self.rank = _check_rank("rank", rank)
        if isinstance(round_window, bool) or not isinstance(round_window, int) or round_window < 0:
            raise ConfigError(f"round_window must be an int >= 0, got {round_window!r}")
        if (
            isinstance(max_rounds_ahead, bool)
            or not isinstance(max_rounds_ahead, int)
            or max_rounds_ahead < 0
        ):
            raise ConfigError(f"max_rounds_ahead must be an int >= 0, got {max_rounds_ahead!r}")
        self.round_window = round_window
        self.max_rounds_ahead = max_rounds_ahead
        self.stats = TransportStats()
        self.peers: dict[int, str] = {}
        self._senders: set[int] = {_check_rank("senders", s) for s in senders}
        self._mailbox: dict[tuple[int, int], Message] = {}
        self._seen: set[tuple[int, int]] = set()
        self._floor = 0
        self._ahead: dict[int, Message] = {}  # newest far-future message per sender
        self._logged: set[tuple[int, str]] = set()
        self._left: set[int] = set()  # peers that said goodbye (backends that can tell)
        self._closed = False

    # ----------------------------------------------------------------------------- public API
    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this node, e.g. ``"tcp://127.0.0.1:41234"`` or ``"mem://hub/3"``."""

    @property
    def closed(self) -> bool:
        return self._closed

    def connect(self, peers: dict[int, str]) -> None:
        """Learn where peers live (``rank -> address``, e.g. from rendezvous); may be called again.

        The ranks become allowed senders too. Connecting to a rank twice with the same address is
        a no-op; a new address replaces the old one.
        """
        self._check_open()
        for peer, addr in peers.items():
            _check_rank("peer", peer)
            if not isinstance(addr, str) or not addr:
                raise ConfigError(f"address of peer {peer} must be a non-empty str, got {addr!r}")
        for peer, addr in peers.items():
            if self.peers.get(peer) != addr:
                self._connect_peer(peer, addr)
                self.peers[peer] = addr
            self._senders.add(peer)

    @property
    def unreachable(self) -> frozenset[int]:
        """Connected peers this transport currently believes are down (for metrics).

        ZeroMQ: the last send to them failed; torch.distributed: they failed or said goodbye;
        memory: they left the hub.
        """
        return frozenset(self._left & set(self.peers))

    def allow_senders(self, ranks: Iterable[int]) -> None:
        """Accept messages from these ranks as well (in-neighbours of a directed graph)."""
        self._senders.update(_check_rank("senders", r) for r in ranks)

    @property
    def senders(self) -> frozenset[int]:
        """Ranks whose messages are accepted."""
        return frozenset(self._senders)

    def send(
        self,
        peer: int,
        round: int,
        tensors: list[torch.Tensor],
        header: dict | None = None,
    ) -> int:
        """Send ``tensors`` and ``header`` to ``peer`` without waiting for delivery.

        ``tensors``: any dtype in :data:`gossip.transport.wire.WIRE_DTYPES`, any shape
        (non-contiguous ones are copied once). Returns the bytes put on the wire (header
        included), or 0 when the message was dropped because the peer is unreachable or its
        queue is full (counted in ``stats.send_failures``). Backends send zero-copy and may read
        the tensors after ``send`` returns, so never modify them in place afterwards: send a
        snapshot (``flat.clone()``) of a buffer you keep updating. ``header`` must be
        msgpack-serialisable (str keys; ints, floats, str, bytes, lists, dicts, None).
        """
        self._check_open()
        _check_rank("peer", peer)
        if peer not in self.peers:
            raise ConfigError(
                f"peer {peer} is not connected on rank {self.rank}; "
                f"known peers: {sorted(self.peers)} (call connect() first)"
            )
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ConfigError(f"round must be an int >= 0, got {round!r}")
        if not isinstance(tensors, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) for t in tensors
        ):
            raise ConfigError(f"tensors must be a list of torch.Tensor, got {type(tensors)!r}")
        if header is not None and not isinstance(header, dict):
            raise ConfigError(f"header must be a dict or None, got {type(header)!r}")
        nbytes = self._send_message(peer, round, list(tensors), dict(header or {}))
        if nbytes > 0:
            self.stats.bytes_sent[peer] += nbytes
            self.stats.messages_sent[peer] += 1
        else:
            self.stats.send_failures[peer] += 1
        return nbytes

    def recv(self, peer: int, round: int, timeout_s: float) -> Message:
        """The message from ``peer`` for ``round``; waits at most ``timeout_s`` seconds.

        Raises :class:`gossip.errors.DeadlineError` naming the peer, round and timeout, or
        :class:`gossip.errors.TransportError` at once if the peer is known to have closed.
        """
        self._check_open()
        self._check_sender(peer)
        self._advance(round)
        key = (peer, round)
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        pumped = False
        while True:
            msg = self._mailbox.pop(key, None)
            if msg is not None:
                return msg
            if peer in self._left:
                raise TransportError(f"rank {self.rank}: peer {peer} closed its transport")
            remaining = deadline - time.monotonic()
            if remaining <= 0 and pumped:
                raise DeadlineError(
                    f"rank {self.rank}: no message from peer {peer} for round {round} "
                    f"within timeout_s={timeout_s} s ({self.kind} transport)"
                )
            self._pump(max(0.0, remaining), {key})
            pumped = True

    def recv_many(self, peers: Iterable[int], round: int, deadline_s: float) -> dict[int, Message]:
        """Whatever arrived from ``peers`` for ``round`` within ``deadline_s`` seconds from now.

        Returns as soon as every peer's message is in, or at the deadline; peers whose message
        did not arrive are simply absent (as are peers known to have closed). Never raises on
        a missing peer, except on a backend that cannot go on without it (torch.distributed
        raises :class:`gossip.errors.TransportError` for a failed peer).
        """
        self._check_open()
        peers = list(peers)
        for p in peers:
            self._check_sender(p)
        self._advance(round)
        wanted = {(p, round) for p in peers}
        got: dict[int, Message] = {}
        deadline = time.monotonic() + max(0.0, float(deadline_s))
        pumped = False
        while True:
            for key in list(wanted):
                msg = self._mailbox.pop(key, None)
                if msg is not None:
                    got[key[0]] = msg
                    wanted.discard(key)
                elif key[0] in self._left:
                    wanted.discard(key)
            remaining = deadline - time.monotonic()
            if not wanted or (remaining <= 0 and pumped):
                return got
            self._pump(max(0.0, remaining), wanted)
            pumped = True

    def advance(self, round: int) -> None:
        """Tell the transport the node is now on ``round`` (``recv``/``recv_many`` do this too).

        Moves the round window: buffered messages older than ``round - round_window`` are
        dropped (counted in ``stats.expired``). Useful after resuming from a checkpoint and in
        the asynchronous mode, which may not ask for every round.
        """
        self._check_open()
        self._advance(round)

    @property
    def round(self) -> int:
        """The highest round asked for so far (the floor of the round window)."""
        return self._floor

    def poll(self, timeout_s: float = 0.0) -> None:
        """Handle what has arrived (waiting at most ``timeout_s``) without asking for a round:
        messages go to the mailbox (or are rejected, far-ahead ones kept, see :meth:`ahead`)."""
        self._check_open()
        self._pump(max(0.0, float(timeout_s)), set())

    def ahead(self) -> dict[int, Message]:
        """The newest rejected ``"future"`` message of each sender (``sender -> Message``) that
        passed every other check: evidence that the senders are further ahead than the window.

        Backends that cannot tell (or do not keep them) return an empty dict. The messages stay
        kept until :meth:`rejoin`, until the window reaches them, or until a newer one replaces
        them.
        """
        return dict(self._ahead)

    def rejoin(self, round: int) -> list[int]:
        """Jump the window's floor to ``round`` (a node that skips rounds to catch up): buffered
        messages below the new window expire, and the kept far-ahead messages now inside the
        window are admitted (counted as received, so the receiver sees their senders alive).
        Returns the senders whose kept message was admitted."""
        self._check_open()
        if isinstance(round, bool) or not isinstance(round, int) or round < self._floor:
            raise ConfigError(f"rejoin round must be an int >= {self._floor}, got {round!r}")
        self._advance(round)
        admitted = self._admit_ahead()
        self._ahead.clear()
        return admitted

    def release(self, msg: Message) -> None:
        """Give a received message's buffers back for reuse; ``msg.tensors`` are emptied.

        Optional: call it when the message has been consumed (e.g. merged into the model) and
        no view of its tensors is kept. Backends that receive into their own buffers
        (torch.distributed) then skip allocating and page-faulting a fresh buffer for the next
        message of the same size; for the others it only drops the references.
        """
        buffers, msg.buffers, msg.tensors = msg.buffers, [], []
        if buffers and not self._closed:
            self._recycle(buffers)

    def _recycle(self, buffers: list) -> None:  # noqa: B027 - optional hook, no-op by default
        """Backend hook: take back receive buffers (default: let them be freed)."""

    def close(self) -> None:
        """Release sockets and buffers. Idempotent; after close, the address can be rebound."""
        if self._closed:
            return
        self._closed = True
        self._mailbox.clear()
        self._ahead.clear()
        self._close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.address
        return f"{type(self).__name__}(rank={self.rank}, {state})"

    # ------------------------------------------------------------------- for backends to call
    def _admit(self, sender: int, round: int) -> str | None:
        """Decide on a message before its payload is touched: ``None`` or a reject reason."""
        if sender not in self._senders:
            return "unknown_sender"
        if round < self._floor - self.round_window:
            return "stale"
        if round > self._floor + self.max_rounds_ahead:
            return "future"
        if (sender, round) in self._seen:
            return "replayed"
        return None

    def _hold_ahead(self, msg: Message) -> None:
        """Keep ``msg`` (rejected as ``"future"``, every other check passed) if it is the
        newest far-ahead message of its sender; call after :meth:`_reject`."""
        old = self._ahead.get(msg.sender)
        if old is None or msg.round > old.round:
            self._ahead[msg.sender] = msg

    def _admit_ahead(self) -> list[int]:
        """Admit the kept far-ahead messages that the window now reaches (bytes were counted
        when they arrived)."""
        admitted = []
        for sender, msg in list(self._ahead.items()):
            if msg.round > self._floor + self.max_rounds_ahead:
                continue
            del self._ahead[sender]
            if self._admit(sender, msg.round) is None:
                self._deliver(msg, 0)
                admitted.append(sender)
        return admitted

    def _deliver(self, msg: Message, nbytes: int) -> None:
        """Put an admitted message into the mailbox (call :meth:`_admit` first)."""
        key = (msg.sender, msg.round)
        self._seen.add(key)
        self._mailbox[key] = msg
        self.stats.bytes_received[msg.sender] += nbytes
        self.stats.messages_received[msg.sender] += 1
        if msg.round < self._floor:
            self.stats.late[msg.sender] += 1

    def _reject(self, peer: int, reason: str, detail: str = "", nbytes: int = 0) -> None:
        """Count a dropped message and log it once per ``(peer, reason)``."""
        self.stats.rejected[reason] += 1
        self.stats.rejected_by_peer[(peer, reason)] += 1
        if nbytes and peer != UNKNOWN_PEER:
            self.stats.bytes_received[peer] += nbytes
        if (peer, reason) not in self._logged:
            self._logged.add((peer, reason))
            who = "unknown peer" if peer == UNKNOWN_PEER else f"peer {peer}"
            log.warning(
                "rank %d: dropped a message from %s: %s%s (further ones are only counted)",
                self.rank,
                who,
                reason,
                f" ({detail})" if detail else "",
            )

    def _advance(self, round: int) -> None:
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ConfigError(f"round must be an int >= 0, got {round!r}")
        if round <= self._floor:
            return
        self._floor = round
        low = round - self.round_window
        for key in [k for k in self._mailbox if k[1] < low]:
            self.stats.expired[key[0]] += 1
            del self._mailbox[key]
        self._seen = {k for k in self._seen if k[1] >= low}
        if self._ahead:
            self._admit_ahead()

    def _check_sender(self, peer: int) -> None:
        if peer not in self._senders:
            raise ConfigError(
                f"peer {peer} is not an allowed sender of rank {self.rank}; allowed: "
                f"{sorted(self._senders)} (connect() to it or allow_senders([{peer}]))"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"{type(self).__name__} of rank {self.rank} is closed")

    # ---------------------------------------------------------------------- backend hooks
    @abstractmethod
    def _connect_peer(self, peer: int, address: str) -> None:
        """Open (or re-open) the way to ``peer`` at ``address``."""

    @abstractmethod
    def _send_message(
        self, peer: int, round: int, tensors: list[torch.Tensor], header: dict
    ) -> int:
        """Put one message on the way to ``peer``; return bytes sent, or 0 if it was dropped."""

    @abstractmethod
    def _pump(self, timeout_s: float, wanted: set[tuple[int, int]]) -> None:
        """Wait up to ``timeout_s`` for incoming messages; admit/deliver or reject each.

        Returns after at least one message was handled or the time is up; ``wanted`` (the
        ``(sender, round)`` keys the caller waits for) is a hint a backend may use.
        """

    @abstractmethod
    def _close(self) -> None:
        """Release backend resources (called once)."""
