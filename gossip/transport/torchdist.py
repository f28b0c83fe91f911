"""torch.distributed point-to-point transport (gloo), with deadlines that never hang.

Each message is sent as ``1 + k`` point-to-point sends to the same peer: a fixed-size int64
*prefix* (magic, kind, header length, frame count, byte length of each frame, and the
:mod:`~gossip.transport.wire` header bytes when they fit in 2 KiB; a larger header is one more
send), then the ``k`` raw tensor frames (the tensors themselves, no copy). The prefix makes
variable-size payloads work: the receiver checks every length against its
:class:`~gossip.transport.wire.WireLimits` before it allocates the buffers (or reuses released
ones, see :meth:`~gossip.transport.api.Transport.release`), then
:func:`~gossip.transport.wire.decode` validates the header (dtype allow-list, shapes, frame
sizes, checksums). Gloo matches sends and receives between two ranks in order (per tag), so the
stream stays in step as long as the prefix is valid; a peer that sends an invalid prefix is
treated as failed.

Gloo sends are a rendezvous: the bytes move only once the receiver has posted its receive, and
a receive for a frame can only be posted once its size is known. Two things keep the receiver
thread out of that path. A small message (header and frames, each frame at the next multiple of
8 bytes, within the 2 KiB) rides whole inside the prefix, for which a receive is always posted:
one send, no second rendezvous. For a larger message, once its frames have landed the receiver
*stages* receives of the same sizes for the next one (on tag ``TAG_STAGED``; both sides know
the sizes, as both saw that message); if the next message's nonempty frames have exactly those
sizes (the usual case: the same model every round), the sender sends them there and they move
at once, while the prefix is still being read. Otherwise it first sends one byte to each staged
receive, then the frames after the prefix as above, and the receiver stages the new sizes. The
price is one message-sized receive buffer per in-neighbour, posted ahead of time.

How deadlines work, and why not ``Work.wait(timeout)``. In gloo, a ``wait(timeout)`` that
expires *closes the pair* ("Application timeout caused pair closure"), and ``is_completed()``
never turns true unless someone waits. So each sender rank gets one receiver thread that keeps a
receive posted and waits with the long *peer timeout* (``timeout_s``, default 30 s, far below
torch's 30-minute default); complete messages go to a queue, and ``recv``/``recv_many`` wait on
that queue with the caller's short round deadline. After a round deadline expires, the
outstanding receive stays posted: the message still arrives, lands in the mailbox and counts as
*late*. Only when a peer sends nothing at all for ``timeout_s`` (it keeps a heartbeat going
while idle) or its connection closes is it declared failed, and the next ``send``/``recv``/
``recv_many`` involving it raises :class:`~gossip.errors.TransportError` naming the dead rank:
torch.distributed cannot route around a dead peer, so the node should fail fast and let torchrun
restart it. A peer that calls ``close()`` sends a goodbye first; after that it is simply absent
from ``recv_many`` and ``recv`` from it raises at once.

Sending never blocks the caller: ``send`` posts the sends and one sender thread per
out-neighbour waits for them (gloo completes a send only when the receiver has taken it). At
most ``sndhwm`` messages may be queued per neighbour; beyond that a send is dropped and counted,
as with ZeroMQ.

NCCL is not supported by this transport: NCCL point-to-point runs both directions of a pair on
one CUDA stream, so the always-posted receive this design relies on would block the sends to
that peer. GPU nodes can use this transport with ``device="cuda"``: frames are staged through
host memory and received tensors are moved to ``device``.

Example::

    pg = init_process_group("gloo", rank=r, world_size=4, store=store, timeout_s=30)
    with TorchDistTransport(r, group=pg) as t:
        t.connect({p: address_of(p) for p in ring_neighbours(r)})
        t.send(peer, round=0, tensors=[flat.clone()])
        got = t.recv_many(ring_neighbours(r), round=0, deadline_s=5.0)
"""

from __future__ import annotations

import datetime
import queue
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, TransportError, WireError
from .api import Message, Transport
from .wire import DEFAULT_LIMITS, WireLimits, decode, encode

#: First int64 of every prefix ("GOSSIP01" in ASCII).
MAGIC = int.from_bytes(b"GOSSIP01", "little", signed=True)
#: Prefix kinds. ``KIND_INLINE`` is a whole message (header and frames) inside the prefix;
#: ``KIND_STAGED`` a message whose frames went to the receiver's staged receives on
#: ``TAG_STAGED`` (``KIND_MESSAGE`` frames follow the prefix on ``TAG``).
KIND_MESSAGE, KIND_PING, KIND_BYE, KIND_INLINE, KIND_STAGED = 0, 1, 2, 3, 4
_KINDS = (KIND_MESSAGE, KIND_PING, KIND_BYE, KIND_INLINE, KIND_STAGED)
#: Most frames one message may carry over this transport (fixed prefix size: 4 + 64 int64).
PREFIX_FRAMES = 64
PREFIX_LEN = 4 + PREFIX_FRAMES
#: Bytes after the prefix's words: a header up to this size rides there (one send less per
#: message), and so does a whole small message (header, then each frame at the next multiple
#: of 8 bytes) when it fits: then the message is a single send.
INLINE_BYTES = 2048
_INLINE_AT = PREFIX_LEN * 8
_PREFIX_WORDS = PREFIX_LEN + INLINE_BYTES // 8
TAG = 0
#: Tag of frames sent into the receiver's *staged* receives (see the module docstring).
TAG_STAGED = 1
#: Released receive buffers kept per size (see :meth:`Transport.release`).
POOL_PER_SIZE = 4


def address_of(rank: int, backend: str = "gloo") -> str:
    """The address string of ``rank`` on a torch.distributed transport (``torch://gloo/3``)."""
    return f"torch://{backend}/{rank}"


def init_process_group(
    backend: str = "gloo",
    *,
    rank: int,
    world_size: int,
    store: dist.Store | None = None,
    init_method: str | None = None,
    timeout_s: float = 30.0,
) -> dist.ProcessGroup:
    """Initialise the default process group with a short timeout and return it.

    ``timeout_s`` (default 30 s) replaces torch's 30-minute default, so a peer that never joins
    raises instead of hanging. With neither ``store`` nor ``init_method``, the torchrun
    environment (``MASTER_ADDR``/``MASTER_PORT``) is used.
    """
    if backend != "gloo":
        raise ConfigError(f"backend must be 'gloo' for TorchDistTransport, got {backend!r}")
    kw = {"store": store} if store is not None else {"init_method": init_method or "env://"}
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kw,
    )
    return dist.group.WORLD


class _Peer:
    """Per-neighbour state shared with its threads."""

    def __init__(self, rank: int):
        self.rank = rank
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.queued = 0  # messages queued or in flight (guarded by the transport's lock)
        self.error: str | None = None
        self.left = False
        self.post_lock = threading.Lock()  # one message's pieces are posted back to back
        self.bye_sent = False
        self.sender: threading.Thread | None = None
        self.receiver: threading.Thread | None = None
        # Sizes of the nonempty frames of the last multi-send message: the receiver keeps
        # receives of exactly these sizes posted on TAG_STAGED (sender: under post_lock;
        # receiver: its thread only, with the buffers and works of those receives).
        self.staged: list[int] = []
        self.staged_bufs: list[torch.Tensor] = []
        self.staged_works: list = []


class TorchDistTransport(Transport):
    """Gossip over torch.distributed point-to-point (gloo); see the module docstring.

    Args:
        rank: this node's rank in ``group``.
        group: the process group (default: the default group, which must be initialised,
            e.g. by :func:`init_process_group`).
        backend: ``"gloo"`` (the only one supported; see the module docstring on NCCL).
        timeout_s: peer timeout in seconds (default 30): a neighbour silent this long, or
            whose connection closes, is declared failed. Must exceed the longest pause between
            two messages of a live peer; idle peers send heartbeats every ``timeout_s / 4``.
        device: where received tensors are put (default CPU).
        run_id, limits, checksum, sndhwm: as for :class:`~gossip.transport.zmq.ZmqTransport`.
        close_timeout_s: how long :meth:`close` waits for goodbyes to cross (default 10 s).
        **kw: ``round_window``, ``max_rounds_ahead``, ``senders`` (see :class:`Transport`).
    """

    kind = "torchdist"

    def __init__(
        self,
        rank: int,
        *,
        group: dist.ProcessGroup | None = None,
        backend: str = "gloo",
        timeout_s: float = 30.0,
        device: str | torch.device = "cpu",
        run_id: str = "",
        limits: WireLimits = DEFAULT_LIMITS,
        checksum: bool = True,
        sndhwm: int = 4,
        close_timeout_s: float = 10.0,
        **kw,
    ):
        super().__init__(rank, **kw)
        if backend != "gloo":
            raise ConfigError(
                f"backend must be 'gloo' for TorchDistTransport, got {backend!r} (NCCL "
                "point-to-point shares one stream per pair; use gloo with device='cuda')"
            )
        if group is None:
            if not dist.is_initialized():
                raise ConfigError(
                    "group is None and torch.distributed is not initialised; call "
                    "gossip.transport.torchdist.init_process_group(...) or pass group="
                )
            group = dist.group.WORLD
        if group.rank() != rank:
            raise ConfigError(f"rank {rank} does not match the group's rank {group.rank()}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if isinstance(sndhwm, bool) or not isinstance(sndhwm, int) or sndhwm < 1:
            raise ConfigError(f"sndhwm must be an int >= 1, got {sndhwm!r}")
        self.group = group
        self.world_size = group.size()
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.device = torch.device(device)
        self.run_id = run_id
        self.limits = limits
        self.checksum = bool(checksum)
        self.sndhwm = sndhwm
        self.close_timeout_s = float(close_timeout_s)
        self._timeout = datetime.timedelta(seconds=self.timeout_s)
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pool: dict[int, list[torch.Tensor]] = {}
        self._out: dict[int, _Peer] = {}
        self._in: dict[int, _Peer] = {}
        self._stop = threading.Event()
        for s in self._senders:
            self._start_receiver(s)

    @property
    def address(self) -> str:
        return address_of(self.rank, self.backend)

    # ------------------------------------------------------------------------------ peers
    def _check_peer_rank(self, peer: int) -> None:
        if peer >= self.world_size or peer == self.rank:
            raise ConfigError(
                f"peer {peer} must be another rank in 0..{self.world_size - 1} "
                f"(this is rank {self.rank})"
            )

    def _connect_peer(self, peer: int, address: str) -> None:
        self._check_peer_rank(peer)
        if address != address_of(peer, self.backend):
            raise ConfigError(
                f"address of peer {peer} must be {address_of(peer, self.backend)!r}, "
                f"got {address!r}"
            )
        if peer not in self._out:
            state = _Peer(peer)
            state.sender = threading.Thread(
                target=self._send_loop, args=(state,), name=f"gossip-send-{peer}", daemon=True
            )
            self._out[peer] = state
            state.sender.start()
        self._start_receiver(peer)

    def allow_senders(self, ranks) -> None:
        ranks = list(ranks)
        super().allow_senders(ranks)
        for r in ranks:
            self._start_receiver(r)

    def _start_receiver(self, peer: int) -> None:
        if peer in self._in:
            return
        self._check_peer_rank(peer)
        state = _Peer(peer)
        state.receiver = threading.Thread(
            target=self._recv_loop, args=(state,), name=f"gossip-recv-{peer}", daemon=True
        )
        self._in[peer] = state
        state.receiver.start()

    @property
    def unreachable(self) -> frozenset[int]:
        failed = {p for table in (self._out, self._in) for p, st in table.items() if st.error}
        return frozenset((failed | self._left) & set(self.peers))

    def _raise_if_failed(self, peer: int) -> None:
        for table in (self._out, self._in):
            state = table.get(peer)
            if state is not None and state.error is not None:
                raise TransportError(f"rank {self.rank}: peer {peer} failed: {state.error}")

    # ---------------------------------------------------------------------------- sending
    def _send_message(self, peer, round, tensors, header) -> int:
        self._raise_if_failed(peer)
        state = self._out[peer]
        if peer in self._left:
            return 0  # it said goodbye: nobody will take the message
        if len(tensors) > PREFIX_FRAMES:
            raise ConfigError(f"at most {PREFIX_FRAMES} tensors per message, got {len(tensors)}")
        wire_header = {"run": self.run_id, "sender": self.rank, "round": round, "h": header}
        try:
            frames = encode(wire_header, tensors, checksum=self.checksum)
        except WireError as exc:
            raise ConfigError(f"cannot send to peer {peer}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"header must be msgpack-serialisable: {exc}") from exc
        with self._lock:
            if state.queued >= self.sndhwm:
                return 0
            state.queued += 1
        head, views = frames[0], frames[1:]
        sizes = [v.nbytes for v in views]
        if _inline_end(len(head), sizes) <= INLINE_BYTES:
            # Small message: one send, and the receiver needs no second rendezvous.
            pieces = [(self._prefix(KIND_INLINE, head, sizes, views), TAG)]
            works = self._post(state, pieces)
        else:
            # The bytes encode viewed: the tensors' own memory on CPU (no copy); for a GPU
            # tensor, the one host copy encode made.
            data = [torch.frombuffer(v, dtype=torch.uint8) for v in views if v.nbytes]
            nonempty = [n for n in sizes if n]
            big_head = len(head) > INLINE_BYTES
            head_piece = [(torch.frombuffer(bytearray(head), dtype=torch.uint8), TAG)]

            def pieces_fn():  # under post_lock: the staged sizes change in send order
                if nonempty == state.staged:  # the receiver has receives of these sizes up
                    pieces = [(self._prefix(KIND_STAGED, head, sizes), TAG)]
                    pieces += head_piece if big_head else []
                    return pieces + [(d, TAG_STAGED) for d in data]
                # Fill the receiver's staged receives with one byte each, then send the
                # frames after the prefix; it stages receives of the new sizes.
                pieces = [(_ONE_BYTE, TAG_STAGED) for _ in state.staged]
                pieces += [(self._prefix(KIND_MESSAGE, head, sizes), TAG)]
                pieces += head_piece if big_head else []
                state.staged = nonempty
                return pieces + [(d, TAG) for d in data]

            works = self._post(state, pieces_fn)
            pieces = data
        # Posted here, in the caller's thread (no hand-off latency); the sender thread waits.
        if works is None:
            with self._lock:
                state.queued -= 1
            self._raise_if_failed(peer)
            return 0
        state.outbox.put((works, pieces))
        return len(head) + sum(sizes)

    def _post(self, state: _Peer, pieces, bye: bool = False):
        """Post ``pieces`` (``(tensor, tag)`` pairs, or a function of no arguments returning
        them, called under the peer's post lock) in order; None if it failed or we said
        goodbye."""
        with state.post_lock:
            if state.bye_sent or state.error is not None:
                return None
            if callable(pieces):
                pieces = pieces()
            try:
                works = [self.group.send([t], state.rank, tag) for t, tag in pieces]
            except RuntimeError as exc:
                state.error = _describe(exc, self.timeout_s)
                return None
            state.bye_sent = bye
            return works

    @staticmethod
    def _prefix(kind: int, head: bytes = b"", sizes=(), inline=()) -> torch.Tensor:
        """The prefix: magic, kind, header length, frame count, frame sizes, then the inline
        bytes (the header when it fits; with ``inline``, the frames too)."""
        p = torch.zeros(_PREFIX_WORDS, dtype=torch.int64)
        words = p.numpy()
        words[:4] = (MAGIC, kind, len(head), len(sizes))
        words[4 : 4 + len(sizes)] = sizes
        if 0 < len(head) <= INLINE_BYTES:
            raw = words.view(np.uint8)
            raw[_INLINE_AT : _INLINE_AT + len(head)] = np.frombuffer(head, dtype=np.uint8)
            at = _INLINE_AT + _align8(len(head))
            for view in inline:
                n = view.nbytes
                if n:
                    raw[at : at + n] = np.frombuffer(view, dtype=np.uint8)
                at += _align8(n)
        return p

    def _send_loop(self, state: _Peer) -> None:
        """Complete this peer's sends in order; heartbeat while idle; post one goodbye."""
        idle_s = self.timeout_s / 4
        while True:
            try:
                entry = state.outbox.get(timeout=idle_s)
            except queue.Empty:
                ping = [(self._prefix(KIND_PING), TAG)]
                entry = (self._post(state, ping), ping, False)
            if entry is None:
                bye = [(self._prefix(KIND_BYE), TAG)]
                works, is_message = self._post(state, bye, bye=True), False
            else:
                works, is_message = entry[0], len(entry) == 2
            try:
                for w in works or []:
                    w.wait(self._timeout)
            except RuntimeError as exc:
                state.error = _describe(exc, self.timeout_s)
            finally:
                if is_message:
                    with self._lock:
                        state.queued -= 1
            if state.bye_sent or state.error is not None:
                return

    # -------------------------------------------------------------------------- receiving
    def _recv_loop(self, state: _Peer) -> None:
        src = state.rank
        try:
            prefix, posted = self._post_prefix(src)
            while True:  # a posted receive is always waited for; the goodbye ends the loop
                posted.wait(self._timeout)
                words = prefix.numpy()
                magic, kind, head_len, nframes = words[:4].tolist()
                if magic != MAGIC or kind not in _KINDS:
                    raise _ProtocolError(f"bad prefix (magic {magic:#x}, kind {kind})")
                if kind == KIND_BYE:
                    self._inbox.put(("bye", src))
                    out = self._out.get(src)
                    if out is not None:
                        out.outbox.put(None)  # answer with our goodbye so its receiver ends too
                    return
                if kind == KIND_PING:
                    prefix, posted = self._post_prefix(src)
                    continue
                sizes = words[4 : 4 + max(0, min(nframes, PREFIX_FRAMES))].tolist()
                self._check_sizes(head_len, nframes, sizes)
                raw = prefix.view(torch.uint8)
                works, bufs, frames = [], [], []
                if kind == KIND_INLINE:
                    end = _inline_end(head_len, sizes)
                    if end > INLINE_BYTES:
                        raise _ProtocolError(
                            f"inline message of {end} B overflows the {INLINE_BYTES} B prefix"
                        )
                    head = raw[_INLINE_AT : _INLINE_AT + head_len]
                    at = _INLINE_AT + _align8(head_len)
                    for n in sizes:
                        frames.append(raw[at : at + n])
                        at += _align8(n)
                    self._inbox.put(("msg", src, head, frames, bufs))
                    prefix, posted = self._post_prefix(src)
                    continue
                if head_len <= INLINE_BYTES:
                    head = raw[_INLINE_AT : _INLINE_AT + head_len]
                else:
                    head = torch.empty(head_len, dtype=torch.uint8)
                    works.append(self.group.recv([head], src, TAG))
                nonempty = [n for n in sizes if n]
                if kind == KIND_STAGED:
                    if nonempty != state.staged:
                        raise _ProtocolError(
                            f"staged frames of {nonempty[:4]} B, receives of {state.staged[:4]} B"
                        )
                    staged = iter(state.staged_bufs)
                    frames = [next(staged) if n else self._buffer(0) for n in sizes]
                    bufs = state.staged_bufs
                    works += state.staged_works
                else:
                    # The staged receives get one byte each; the frames follow the prefix.
                    for b, w in zip(state.staged_bufs, state.staged_works, strict=True):
                        w.wait(self._timeout)
                        bufs.append(b)  # recycled with this message's buffers
                    frames = [self._buffer(n) for n in sizes]
                    works += [self.group.recv([b], src, TAG) for b in frames if b.numel() > 0]
                    bufs = [*frames, *bufs]
                state.staged = nonempty
                # The next prefix's receive is posted before this message's frames land, so a
                # message right behind this one is not held up by the hand-off below.
                prefix, posted = self._post_prefix(src)
                for w in works:
                    w.wait(self._timeout)
                self._inbox.put(("msg", src, head, frames, bufs))
                # Stage receives for the next message of these sizes: its frames then move as
                # soon as they are sent, without waiting for this thread to read its prefix.
                # (After the hand-off: a caller quick to release this message lends its buffers.)
                state.staged_bufs = [self._buffer(n) for n in nonempty]
                state.staged_works = [
                    self.group.recv([b], src, TAG_STAGED) for b in state.staged_bufs
                ]
        except _ProtocolError as exc:
            self._inbox.put(("error", src, f"protocol error: {exc}"))
        except RuntimeError as exc:
            if not self._stop.is_set():
                self._inbox.put(("error", src, _describe(exc, self.timeout_s)))

    def _post_prefix(self, src: int):
        prefix = torch.empty(_PREFIX_WORDS, dtype=torch.int64)
        return prefix, self.group.recv([prefix], src, TAG)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A receive buffer: a released one of that size if any, else a new one."""
        with self._lock:
            free = self._pool.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def _recycle(self, buffers: list) -> None:
        with self._lock:
            for b in buffers:
                free = self._pool.setdefault(b.numel(), [])
                if len(free) < POOL_PER_SIZE:
                    free.append(b)

    def _check_sizes(self, head_len: int, nframes: int, sizes: list[int]) -> None:
        lim = self.limits
        if not 0 < head_len <= lim.max_header_bytes:
            raise _ProtocolError(f"header length {head_len} outside 1..{lim.max_header_bytes}")
        if not 0 <= nframes <= min(lim.max_frames, PREFIX_FRAMES):
            raise _ProtocolError(f"frame count {nframes} outside 0..{lim.max_frames}")
        if any(n < 0 for n in sizes) or sum(sizes) > lim.max_total_bytes:
            raise _ProtocolError(f"frame sizes {sizes[:4]}... over max {lim.max_total_bytes} B")

    def _pump(self, timeout_s: float, wanted) -> None:
        for key in wanted:
            if key not in self._mailbox:
                self._raise_if_failed(key[0])
        try:
            items = [self._inbox.get(timeout=max(0.0, timeout_s))]
        except queue.Empty:
            return
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            self._handle(item)
        for key in wanted:  # a failed peer whose message made it in fails on the next call
            if key not in self._mailbox:
                self._raise_if_failed(key[0])

    def _handle(self, item: tuple) -> None:
        what, src = item[0], item[1]
        state = self._in[src]
        if what == "bye":
            state.left = True
            self._left.add(src)
            return
        if what == "error":
            state.error = item[2]
            return
        head, frames, bufs = item[2], item[3], item[4]
        nbytes = head.numel() + sum(f.numel() for f in frames)
        try:
            header, tensors = decode(
                [memoryview(head.numpy()), *[memoryview(f.numpy()) for f in frames]],
                limits=self.limits,
            )
        except WireError as exc:
            self._reject(src, exc.reason, str(exc), nbytes)
            return
        user = header.get("h", {})
        if header["run"] != self.run_id:
            self._reject(src, "run_id", f"run id {header['run']!r} != {self.run_id!r}", nbytes)
            return
        if header["sender"] != src or not isinstance(user, dict):
            self._reject(src, "bad_header", f"header sender {header['sender']} from rank {src}")
            return
        reason = self._admit(src, header["round"])
        if reason is not None:
            self._reject(src, reason, f"round {header['round']}", nbytes)
            return
        if self.device.type != "cpu":
            tensors = [t.to(self.device) for t in tensors]
        msg = Message(
            src, header["round"], user, tensors, buffers=bufs if self.device.type == "cpu" else []
        )
        self._deliver(msg, nbytes)

    # ---------------------------------------------------------------------------- closing
    def _close(self) -> None:
        """Say goodbye to every out-neighbour and wait (``close_timeout_s``) for the threads.

        Each neighbour answers a goodbye with its own, which ends our receiver thread for it, so
        on an undirected graph close returns as soon as the goodbyes have crossed. A receiver
        thread for an in-neighbour we do not send to ends only when that neighbour closes or
        after ``timeout_s`` (gloo cannot cancel a posted receive); destroying the process group
        while it waits aborts the process, so close every transport before
        ``destroy_process_group``.
        """
        for state in self._out.values():
            state.outbox.put(None)
        self._stop.set()
        deadline = time.monotonic() + self.close_timeout_s
        for state in [*self._out.values(), *self._in.values()]:
            thread = state.sender or state.receiver
            thread.join(max(0.0, deadline - time.monotonic()))


class _ProtocolError(Exception):
    pass


_ONE_BYTE = torch.zeros(1, dtype=torch.uint8)


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _inline_end(head_len: int, sizes) -> int:
    """Bytes a message takes in the prefix's inline area (header, then 8-aligned frames)."""
    return _align8(head_len) + sum(_align8(n) for n in sizes)


def _describe(exc: BaseException, timeout_s: float) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "Timed out" in text or "timeout" in text.lower():
        return f"no traffic for timeout_s={timeout_s} s (peer presumed dead): {text}"
    if "closed" in text.lower() or "reset" in text.lower():
        return f"connection closed (peer process died?): {text}"
    return text
