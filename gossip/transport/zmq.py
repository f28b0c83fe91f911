"""ZeroMQ transport over TCP or IPC: one ROUTER bound per node, one DEALER per out-neighbour.

Why this socket design. Gossip is many-to-one on the receive side (every in-neighbour sends to
me) and one-to-one per edge on the send side:

* a **ROUTER** bound once per node receives from all in-neighbours, fair-queued. Unlike PULL it
  tells us *which connection* each message came from (the routing id the sender's DEALER set to
  ``gossip-rank:<rank>``), so a message from a connection that is not a known neighbour is
  dropped before its payload is decoded, and a malformed message is attributed to a peer in the
  stats instead of to "unknown". ``ROUTER_HANDOVER`` lets a restarted peer take its routing id
  back while the dead connection is still half-open;
* one **DEALER** per out-neighbour (not one shared DEALER or PUSH, which would round-robin over
  peers) so each edge has its own queue, high-water mark and reconnect state. It is connected
  with ``IMMEDIATE=1``: messages are queued only on completed connections, so a send to a dead
  or not-yet-started peer fails at once (counted in ``stats.send_failures``) instead of
  queueing up to the high-water mark and arriving stale after a restart. A blocked send waits at
  most ``send_timeout_s`` once; while a peer stays down, later sends to it give up at once.

Socket options, set on purpose (see RELIABILITY.md, "ZeroMQ flow control"):

* ``MAXMSGSIZE`` on the ROUTER = the largest frame allowed (``limits.max_total_bytes``): libzmq
  disconnects a peer that announces a larger frame *before* allocating it (counted in
  ``stats.disconnects``, as is any other dropped connection);
* ``SNDHWM`` (default 4 messages per neighbour; a neighbour 4 rounds behind gets nothing new)
  and ``RCVHWM`` (default 16 per neighbour, above ``max_rounds_ahead``);
* ``LINGER=0``: close never blocks on a dead peer;
* ``RECONNECT_IVL`` 100 ms with exponential backoff to ``RECONNECT_IVL_MAX`` 5 s, so a dead peer
  is retried without a reconnect storm;
* ZMTP heartbeats (``HEARTBEAT_IVL`` 5 s, ``HEARTBEAT_TIMEOUT`` 60 s) and TCP keepalive detect a
  silently dead link (no RST); the timeout is long because a ping queues behind a large message.

Messages use :mod:`gossip.transport.wire` (msgpack header + raw frames; no pickle). Frames are
sent zero-copy (``copy=False``) and received zero-copy: libzmq allocates each incoming frame
once, after the ``MAXMSGSIZE`` check, and the decoded tensors are views of those buffers (a
frame not aligned to its item size, which happens only to small frames, is copied). The caller's
header travels under the wire key ``"h"``. Validation order on receive, all before any tensor is
built: routing id is a known sender -> header decodes within :class:`WireLimits` (dtype
allow-list, ``shape x itemsize == nbytes == frame length``, total size, CRC-32C) -> header
``run`` equals ours and ``sender`` equals the connection's rank -> round inside the window and
not seen before.

Example::

    a = ZmqTransport(0, bind="tcp://127.0.0.1:0", run_id="exp1")
    b = ZmqTransport(1, bind="ipc:///tmp/gossip-1.sock", run_id="exp1")
    a.connect({1: b.address}); b.connect({0: a.address})
    a.send(1, round=0, tensors=[torch.ones(4)])
    b.recv(0, round=0, timeout_s=2.0).tensors    # [tensor([1., 1., 1., 1.])]
"""

from __future__ import annotations

import socket as _socket
import time
from dataclasses import replace

import zmq
import zmq.utils.monitor as zmq_monitor

from ..errors import ConfigError, TransportError, WireError
from .api import UNKNOWN_PEER, Message, Transport
from .wire import DEFAULT_LIMITS, WireLimits, decode, encode

ROUTING_PREFIX = b"gossip-rank:"


def routing_id(rank: int) -> bytes:
    """The ZeroMQ routing id a node of ``rank`` uses on its DEALER sockets."""
    return ROUTING_PREFIX + str(rank).encode()


def _rank_of(identity: bytes) -> int:
    if identity.startswith(ROUTING_PREFIX):
        tail = identity[len(ROUTING_PREFIX) :]
        if tail.isdigit() and len(tail) <= 9:
            return int(tail)
    return UNKNOWN_PEER


class ZmqTransport(Transport):
    """Gossip over ZeroMQ (TCP or IPC); see the module docstring for the design.

    Args:
        rank: this node's rank.
        bind: where to listen: ``"tcp://HOST:PORT"`` (port ``0`` or ``*`` picks a free port),
            or ``"ipc://PATH"``. Default ``"tcp://127.0.0.1:0"``.
        advertise_host: host name peers should use when ``bind`` is a wildcard (``0.0.0.0`` or
            ``*``); default this machine's host name.
        run_id: messages whose header carries another run id are rejected (``"run_id"``).
        limits: :class:`~gossip.transport.wire.WireLimits` for incoming messages; the largest
            frame (``MAXMSGSIZE``) is ``limits.max_total_bytes``.
        checksum: send a CRC-32C per frame (default True). With ``checksum=False`` pass
            ``limits`` with ``require_checksum=False`` on the receivers too.
        sndhwm, rcvhwm: high-water marks in messages per neighbour (default 4 and 16).
        send_timeout_s: how long a send may wait for a connection or queue space before the
            message is dropped (default 1.0 s; only the first failure to a down peer waits).
        connect_timeout_s: how long :meth:`connect` waits for new connections (default 5 s);
            peers not connected by then are not an error: a send waits for them up to
            ``send_timeout_s`` and is dropped if they are still not up.
        heartbeat_s, heartbeat_timeout_s: ZMTP heartbeat interval and timeout (5 s, 60 s).
        io_threads: ZeroMQ I/O threads of this transport's private context (default 1).
        **kw: ``round_window``, ``max_rounds_ahead``, ``senders`` (see :class:`Transport`).
    """

    kind = "zmq"

    def __init__(
        self,
        rank: int,
        *,
        bind: str = "tcp://127.0.0.1:0",
        advertise_host: str | None = None,
        run_id: str = "",
        limits: WireLimits = DEFAULT_LIMITS,
        checksum: bool = True,
        sndhwm: int = 4,
        rcvhwm: int = 16,
        send_timeout_s: float = 1.0,
        connect_timeout_s: float = 5.0,
        heartbeat_s: float = 5.0,
        heartbeat_timeout_s: float = 60.0,
        io_threads: int = 1,
        **kw,
    ):
        super().__init__(rank, **kw)
        if not isinstance(run_id, str):
            raise ConfigError(f"run_id must be a str, got {run_id!r}")
        if not isinstance(limits, WireLimits):
            raise ConfigError(f"limits must be a WireLimits, got {type(limits)!r}")
        for name, value in (("sndhwm", sndhwm), ("rcvhwm", rcvhwm), ("io_threads", io_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        self.run_id = run_id
        self.limits = limits
        self.checksum = bool(checksum)
        self.sndhwm, self.rcvhwm = sndhwm, rcvhwm
        self.send_timeout_s = float(send_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self._heartbeat_ms = int(heartbeat_s * 1000)
        self._heartbeat_timeout_ms = int(heartbeat_timeout_s * 1000)
        self._ctx = zmq.Context(io_threads=io_threads)
        self._dealers: dict[int, zmq.Socket] = {}
        self._down: set[int] = set()
        try:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._router.setsockopt(zmq.RCVHWM, rcvhwm)
            self._router.setsockopt(
                zmq.MAXMSGSIZE, max(limits.max_total_bytes, limits.max_header_bytes)
            )
            self._address = self._bind(bind, advertise_host)
            self._monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except Exception:
            self._ctx.destroy(linger=0)
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    # ------------------------------------------------------------------------------ binding
    def _bind(self, bind: str, advertise_host: str | None) -> str:
        if not isinstance(bind, str) or "://" not in bind:
            raise ConfigError(
                f"bind must look like 'tcp://HOST:PORT' or 'ipc://PATH', got {bind!r}"
            )
        scheme, rest = bind.split("://", 1)
        if scheme == "ipc":
            if not rest:
                raise ConfigError(f"bind {bind!r} needs a path, e.g. 'ipc:///tmp/gossip-0.sock'")
            self._bind_checked(bind)
            return bind
        if scheme != "tcp":
            raise ConfigError(f"bind scheme must be 'tcp' or 'ipc', got {scheme!r} in {bind!r}")
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"bind {bind!r} must be 'tcp://HOST:PORT' (PORT 0 picks a free one)")
        if port in ("0", "*"):
            try:
                port_no = self._router.bind_to_random_port(f"tcp://{host}")
            except zmq.ZMQError as exc:
                raise TransportError(f"cannot bind a free port on {host!r}: {exc}") from exc
        elif port.isdigit():
            self._bind_checked(bind)
            port_no = int(port)
        else:
            raise ConfigError(f"port in bind {bind!r} must be a number, 0 or '*'")
        if host in ("*", "0.0.0.0", "[::]", "::"):
            host = advertise_host or _socket.gethostname()
        return f"tcp://{host}:{port_no}"

    def _bind_checked(self, endpoint: str) -> None:
        try:
            self._router.bind(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"rank {self.rank} cannot bind {endpoint!r}: {exc}") from exc

    @property
    def address(self) -> str:
        return self._address

    @property
    def unreachable(self) -> frozenset[int]:
        return frozenset(self._down)

    # ----------------------------------------------------------------------------- sending
    def connect(self, peers: dict[int, str]) -> None:
        """Connect a DEALER to each new peer and wait (``connect_timeout_s``) until they are up."""
        new = [p for p, a in peers.items() if self.peers.get(p) != a]
        super().connect(peers)
        self._await_connected(new, self.connect_timeout_s)

    def _await_connected(self, peers: list[int], timeout_s: float) -> list[int]:
        """Wait until each peer's connection is complete; return the ones still down."""
        pending = set(peers)
        deadline = time.monotonic() + timeout_s
        while pending:
            poller = zmq.Poller()
            for p in pending:
                poller.register(self._dealers[p], zmq.POLLOUT)
            remaining = deadline - time.monotonic()
            ready = dict(poller.poll(max(0, int(remaining * 1000))))
            pending = {p for p in pending if not ready.get(self._dealers[p], 0) & zmq.POLLOUT}
            if remaining <= 0:
                break
        return sorted(pending)  # not marked down: the first send still waits send_timeout_s

    def _connect_peer(self, peer: int, address: str) -> None:
        old = self._dealers.pop(peer, None)
        if old is not None:
            old.close(linger=0)
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, routing_id(self.rank))
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.SNDHWM, self.sndhwm)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        if self._heartbeat_ms > 0:
            s.setsockopt(zmq.HEARTBEAT_IVL, self._heartbeat_ms)
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, self._heartbeat_timeout_ms)
        try:
            s.connect(address)
        except zmq.ZMQError as exc:
            s.close(linger=0)
            raise ConfigError(f"cannot connect to peer {peer} at {address!r}: {exc}") from exc
        self._dealers[peer] = s

    def _send_message(self, peer, round, tensors, header) -> int:
        wire_header = {"run": self.run_id, "sender": self.rank, "round": round, "h": header}
        try:
            frames = encode(wire_header, tensors, checksum=self.checksum)
        except WireError as exc:
            raise ConfigError(f"cannot send to peer {peer}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"header must be msgpack-serialisable: {exc}") from exc
        nbytes = sum(memoryview(f).nbytes for f in frames)
        dealer = self._dealers[peer]
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            wait_s = 0.0 if peer in self._down else self.send_timeout_s
            if not wait_s or not dealer.poll(int(wait_s * 1000), zmq.POLLOUT):
                self._down.add(peer)
                return 0
            try:
                dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._down.add(peer)
                return 0
        self._down.discard(peer)
        return nbytes

    # --------------------------------------------------------------------------- receiving
    def _pump(self, timeout_s: float, wanted) -> None:
        deadline = time.monotonic() + timeout_s
        events = dict(self._poller.poll(max(0, int(timeout_s * 1000 + 0.999))))
        if self._monitor in events:
            self._drain_monitor()
        if self._router not in events:
            return
        while True:
            try:
                parts = self._router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(parts)
            if time.monotonic() > deadline:
                return

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = zmq_monitor.recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.stats.disconnects += 1

    def _handle(self, parts: list) -> None:
        peer = _rank_of(parts[0].bytes)
        frames = parts[1:]
        nbytes = sum(len(f) for f in frames)
        if peer == UNKNOWN_PEER or peer not in self._senders:
            self._reject(peer, "unknown_sender", f"routing id {parts[0].bytes[:40]!r}", nbytes)
            return
        try:
            header, tensors = decode(frames, limits=self.limits)
        except WireError as exc:
            self._reject(peer, exc.reason, str(exc), nbytes)
            return
        user = header.get("h", {})
        if header["run"] != self.run_id:
            self._reject(peer, "run_id", f"run id {header['run']!r} != {self.run_id!r}", nbytes)
            return
        if header["sender"] != peer or not isinstance(user, dict):
            detail = f"header sender {header['sender']} on the connection of rank {peer}"
            self._reject(peer, "bad_header", detail, nbytes)
            return
        reason = self._admit(peer, header["round"])
        if reason is not None and reason != "future":
            self._reject(peer, reason, f"round {header['round']}", nbytes)
            return
        tensors = [t if t.data_ptr() % t.element_size() == 0 else t.clone() for t in tensors]
        msg = Message(peer, header["round"], user, tensors)
        if reason == "future":  # rejected, but kept as evidence that we fell behind (ahead())
            self._reject(peer, reason, f"round {header['round']}", nbytes)
            self._hold_ahead(msg)
            return
        self._deliver(msg, nbytes)

    # ------------------------------------------------------------------------------ closing
    def _close(self) -> None:
        for s in self._dealers.values():
            s.close(linger=0)
        self._dealers.clear()
        self._router.disable_monitor()
        self._monitor.close(linger=0)
        self._router.close(linger=0)
        self._ctx.term()

    @classmethod
    def limits_for(cls, max_message_bytes: int, **kw) -> WireLimits:
        """:class:`WireLimits` allowing messages up to ``max_message_bytes`` of tensor data."""
        return replace(DEFAULT_LIMITS, max_total_bytes=int(max_message_bytes), **kw)
