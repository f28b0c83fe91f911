"""One conformance suite for every transport, plus backend-specific checks.

Transports under test, all inside this process: the in-memory hub, ZeroMQ over TCP loopback,
ZeroMQ over IPC, and torch.distributed gloo (one ``ProcessGroupGloo`` per rank, built in
threads over a ``HashStore``). Cross-process runs live in ``tests/multiproc``.
"""

from __future__ import annotations

import datetime
import json
import threading

import pytest
import torch
import torch.distributed as dist

from gossip.errors import ConfigError, DeadlineError, TransportError
from gossip.transport import KINDS, make_transport, torchdist
from gossip.transport.memory import MemoryHub, MemoryTransport
from gossip.transport.torchdist import TorchDistTransport
from gossip.transport.wire import WireLimits, encode
from gossip.transport.zmq import ZmqTransport

pytestmark = pytest.mark.timeout(60)

KIND_IDS = ["memory", "zmq-tcp", "zmq-ipc", "gloo"]


class Net:
    """Builds transports of one kind; ``make(n, edges)`` connects rank r to ``edges[r]``."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        self.tmp_path = tmp_path
        self.hub = MemoryHub()
        self.groups: dict[int, dist.ProcessGroup] = {}
        self.open: list = []
        self.kw: dict = {}

    def _groups(self, n: int) -> None:
        store = dist.HashStore()
        timeout = datetime.timedelta(seconds=20)

        def build(r):
            self.groups[r] = dist.ProcessGroupGloo(store, r, n, timeout)

        threads = [threading.Thread(target=build, args=(r,)) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def one(self, rank: int, bind: str | None = None, **kw):
        kw = {**self.kw, **kw}
        if self.kind == "memory":
            t = MemoryTransport(rank, hub=self.hub, **kw)
        elif self.kind == "zmq-tcp":
            t = ZmqTransport(rank, bind=bind or "tcp://127.0.0.1:0", send_timeout_s=2.0, **kw)
        elif self.kind == "zmq-ipc":
            path = f"ipc://{self.tmp_path}/r{rank}.sock"
            t = ZmqTransport(rank, bind=bind or path, send_timeout_s=2.0, **kw)
        else:
            t = TorchDistTransport(
                rank, group=self.groups[rank], timeout_s=20.0, close_timeout_s=2.0, **kw
            )
        self.open.append(t)
        return t

    def make(self, n: int, edges: dict[int, list[int]] | None = None, **kw):
        self.kw = kw
        if self.kind == "gloo" and not self.groups:
            self._groups(n)
        ts = [self.one(r) for r in range(n)]
        if edges is None:
            edges = {r: [p for p in range(n) if p != r] for r in range(n)}
        for r, peers in edges.items():
            ts[r].connect({p: ts[p].address for p in peers})
        return ts

    def close_all(self) -> None:
        for t in self.open:
            t.close()


@pytest.fixture(params=KIND_IDS)
def net(request, tmp_path):
    n = Net(request.param, tmp_path)
    yield n
    n.close_all()


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if x.numel() >= 3:
            x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
        return x
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype
        and x.shape == y.shape
        and torch.equal(
            x.contiguous().reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        )
    )


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
]
SHAPES = [(), (0,), (7,), (3, 5), (2, 3, 4)]


# ------------------------------------------------------------------------------ conformance
def test_round_trip_is_bit_exact_for_every_dtype_and_shape(net):
    a, b = net.make(2)
    sent = [_sample(d, s, i) for i, (d, s) in enumerate((d, s) for d in DTYPES for s in SHAPES)]
    sent.append(torch.arange(12.0).reshape(3, 4).t())  # non-contiguous view
    a.send(1, 0, sent)
    got = b.recv(0, 0, timeout_s=10.0)
    assert (got.sender, got.round) == (0, 0)
    assert len(got.tensors) == len(sent)
    for x, y in zip(sent, got.tensors, strict=True):
        assert _same_bits(x, y), (x.dtype, tuple(x.shape))


def test_received_tensors_do_not_alias_the_senders(net):
    a, b = net.make(2)
    x = torch.zeros(1000)
    a.send(1, 0, [x])
    got = b.recv(0, 0, timeout_s=10.0).tensors[0]
    x.fill_(5.0)
    assert torch.count_nonzero(got) == 0


def test_header_passes_through_and_bytes_are_counted_on_both_sides(net):
    a, b = net.make(2)
    header = {"weight": 0.25, "codec": {"codec": "topk", "k": 3}, "tags": [1, "x", b"\x00\xff"]}
    n = a.send(1, 0, [torch.ones(10)], header=header)
    got = b.recv(0, 0, timeout_s=10.0)
    assert got.header == header
    assert n >= 40 and got.nbytes == 40
    assert a.stats.bytes_sent[1] == n == b.stats.bytes_received[0]
    assert a.stats.messages_sent[1] == 1 == b.stats.messages_received[0]
    json.dumps(b.stats.as_dict())


def test_recv_timeout_raises_deadline_error_naming_peer_round_and_timeout(net):
    a, b = net.make(2)
    with pytest.raises(DeadlineError, match=r"peer 0 for round 3 within timeout_s=0.05"):
        b.recv(0, 3, timeout_s=0.05)


def test_recv_many_returns_what_arrived_and_a_late_message_is_kept_and_counted(net):
    a, b, c = net.make(3)
    b.send(0, 0, [torch.full((4,), 1.0)])
    got = a.recv_many([1, 2], 0, deadline_s=0.3)
    assert set(got) == {1}
    assert torch.equal(got[1].tensors[0], torch.full((4,), 1.0))
    b.send(0, 1, [torch.full((4,), 1.0)])
    c.send(0, 1, [torch.full((4,), 2.0)])
    assert set(a.recv_many([1, 2], 1, deadline_s=10.0)) == {1, 2}
    c.send(0, 0, [torch.full((4,), 2.0)])  # round 0, after a has moved on to round 1
    late = a.recv(2, 0, timeout_s=10.0)
    assert torch.equal(late.tensors[0], torch.full((4,), 2.0))
    assert a.stats.late[2] == 1 and a.stats.late[1] == 0


def test_recv_many_with_everything_already_there_returns_without_waiting_for_the_deadline(net):
    a, b, c = net.make(3)
    b.send(0, 0, [torch.ones(1)])
    c.send(0, 0, [torch.ones(1)])
    a.recv(1, 0, timeout_s=10.0)
    a.recv(2, 0, timeout_s=10.0)
    b.send(0, 1, [torch.ones(1)])
    c.send(0, 1, [torch.ones(1)])
    # A 600 s deadline would trip the 60 s test timeout if recv_many waited for it.
    assert set(a.recv_many([1, 2], 1, deadline_s=600.0)) == {1, 2}


def test_release_empties_the_message_and_the_next_one_is_intact(net):
    a, b = net.make(2)
    a.send(1, 0, [torch.full((1000,), 1.0)])
    first = b.recv(0, 0, timeout_s=10.0)
    ptr = first.tensors[0].data_ptr()
    b.release(first)
    assert first.tensors == [] and first.buffers == []
    a.send(1, 1, [torch.full((1000,), 2.0)])
    second = b.recv(0, 1, timeout_s=10.0)
    assert torch.equal(second.tensors[0], torch.full((1000,), 2.0))
    if net.kind == "gloo":  # receives into its own buffers: released ones are reused (the
        # next message's receive may be staged before this one comes back: two at most)
        ptrs = {ptr, second.tensors[0].data_ptr()}
        b.release(second)
        for r in range(2, 8):
            a.send(1, r, [torch.full((1000,), float(r))])
            msg = b.recv(0, r, timeout_s=10.0)
            assert torch.equal(msg.tensors[0], torch.full((1000,), float(r)))
            ptrs.add(msg.tensors[0].data_ptr())
            b.release(msg)
        assert len(ptrs) <= 2


def test_out_of_order_rounds_are_buffered(net):
    a, b = net.make(2)
    for r in (3, 1, 2, 0):
        a.send(1, r, [torch.full((2,), float(r))])
    for r in range(4):
        assert torch.equal(b.recv(0, r, timeout_s=10.0).tensors[0], torch.full((2,), float(r)))


def test_stale_round_is_rejected_and_counted(net):
    a, b = net.make(2, round_window=2)
    assert b.recv_many([0], 10, deadline_s=0.0) == {}
    a.send(1, 7, [torch.ones(2)])  # 7 < 10 - 2
    a.send(1, 10, [torch.ones(2)])
    b.recv(0, 10, timeout_s=10.0)
    assert b.stats.rejected["stale"] == 1
    assert b.stats.rejected_by_peer[(0, "stale")] == 1
    with pytest.raises(DeadlineError):
        b.recv(0, 7, timeout_s=0.05)


def test_far_future_round_is_rejected_as_future(net):
    a, b = net.make(2, max_rounds_ahead=2)
    a.send(1, 5, [torch.ones(2)])
    a.send(1, 2, [torch.ones(2)])
    b.recv(0, 2, timeout_s=10.0)  # floor 0 when both arrived: 5 > 0 + 2, 2 is allowed
    assert b.stats.rejected["future"] == 1


def test_replayed_message_is_rejected_and_counted(net):
    a, b = net.make(2)
    a.send(1, 0, [torch.ones(2)])
    a.send(1, 0, [torch.zeros(2)])
    a.send(1, 1, [torch.ones(2)])
    assert torch.equal(b.recv(0, 0, timeout_s=10.0).tensors[0], torch.ones(2))
    b.recv(0, 1, timeout_s=10.0)
    assert b.stats.rejected["replayed"] == 1


def test_unknown_sender_is_rejected_and_counted(net):
    if net.kind == "gloo":
        pytest.skip("gloo posts receives only for allowed senders: another rank is never read")
    a, b, c = net.make(3, edges={0: [1], 1: [0], 2: [0]})
    assert a.senders == {1}
    c.send(0, 0, [torch.ones(2)])
    b.send(0, 0, [torch.ones(2)])
    a.recv(1, 0, timeout_s=10.0)
    for _ in range(100):  # bounded wait for c's message, which may arrive after b's
        if a.stats.rejected["unknown_sender"]:
            break
        a.recv_many([1], 0, deadline_s=0.05)
    assert a.stats.rejected_by_peer[(2, "unknown_sender")] == 1
    with pytest.raises(ConfigError, match="peer 2 is not an allowed sender of rank 0"):
        a.recv(2, 0, timeout_s=0.1)


def test_close_is_idempotent_and_frees_the_address(net):
    a, b = net.make(2)
    addresses = [a.address, b.address]
    a.close()
    a.close()
    b.close()
    with pytest.raises(ConfigError, match="closed"):
        a.send(1, 0, [torch.ones(1)])
    a2 = net.one(0, bind=addresses[0])
    b2 = net.one(1, bind=addresses[1])
    assert [a2.address, b2.address] == addresses
    a2.connect({1: b2.address})
    b2.connect({0: a2.address})
    a2.send(1, 0, [torch.ones(3)])
    assert torch.equal(b2.recv(0, 0, timeout_s=10.0).tensors[0], torch.ones(3))


def test_send_argument_errors_name_the_argument(net):
    a, b = net.make(2)
    with pytest.raises(ConfigError, match="peer 5 is not connected on rank 0"):
        a.send(5, 0, [torch.ones(1)])
    with pytest.raises(ConfigError, match="round must be an int >= 0, got -1"):
        a.send(1, -1, [torch.ones(1)])
    with pytest.raises(ConfigError, match="msgpack"):
        a.send(1, 0, [torch.ones(1)], header={"bad": object()})
    with pytest.raises(ConfigError, match="tensors must be a list"):
        a.send(1, 0, torch.ones(1))


# ---------------------------------------------------------------------------- factory, API
def test_make_transport_builds_each_kind_and_rejects_unknown_names(tmp_path):
    with make_transport("memory", rank=0, hub=MemoryHub()) as t:
        assert t.address.startswith("mem://")
    with make_transport("zmq", rank=0, bind=f"ipc://{tmp_path}/f.sock") as t:
        assert t.address == f"ipc://{tmp_path}/f.sock"
    assert t.closed
    assert {"memory", "zmq", "torchdist", "gloo"} <= set(KINDS)
    with pytest.raises(ConfigError, match="transport kind must be one of"):
        make_transport("carrier-pigeon", rank=0)
    with pytest.raises(ConfigError, match="backend must be 'gloo'"):
        make_transport("nccl", rank=0)


def test_constructor_arguments_are_validated():
    with pytest.raises(ConfigError, match="rank must be a non-negative int rank, got -1"):
        MemoryTransport(-1, hub=MemoryHub())
    with pytest.raises(ConfigError, match="round_window must be an int >= 0"):
        MemoryTransport(0, hub=MemoryHub(), round_window=-2)
    with pytest.raises(ConfigError, match="bind scheme must be 'tcp' or 'ipc'"):
        ZmqTransport(0, bind="udp://127.0.0.1:0")
    with pytest.raises(ConfigError, match="needs a path"):
        ZmqTransport(0, bind="ipc://")
    with pytest.raises(ConfigError, match="group is None and torch.distributed is not init"):
        TorchDistTransport(0)


# --------------------------------------------------------------------------- memory faults
def _mem_pair():
    hub = MemoryHub()
    a, b = MemoryTransport(0, hub=hub), MemoryTransport(1, hub=hub)
    a.connect({1: b.address})
    b.connect({0: a.address})
    return hub, a, b


def test_memory_hub_drop_is_keyed_by_round_and_sender():
    hub, a, b = _mem_pair()
    hub.drop(round=1, sender=0)
    for r in range(3):
        a.send(1, r, [torch.full((1,), float(r))])
    assert set(b.recv_many([0], 0, deadline_s=0.0)) == {0}
    assert b.recv_many([0], 1, deadline_s=0.0) == {}
    assert set(b.recv_many([0], 2, deadline_s=0.0)) == {0}


def test_memory_hub_delay_makes_a_message_late_by_whole_rounds():
    hub, a, b = _mem_pair()
    hub.delay(round=0, sender=0, rounds=2, receiver=1)
    for r in range(3):
        a.send(1, r, [torch.full((1,), float(r))])
    assert b.recv_many([0], 0, deadline_s=0.0) == {}
    assert b.recv_many([0], 1, deadline_s=0.0).keys() == {0}
    assert b.recv_many([0], 2, deadline_s=0.0).keys() == {0}
    assert b.recv(0, 0, timeout_s=0.0).tensors[0].item() == 0.0
    assert b.stats.late[0] == 1
    with pytest.raises(ConfigError, match="rounds must be an int >= 1"):
        hub.delay(round=0, sender=0, rounds=0)


def test_memory_hub_refuses_a_rank_twice_and_send_to_a_closed_peer_raises():
    hub, a, b = _mem_pair()
    with pytest.raises(ConfigError, match="rank 0 is already open"):
        MemoryTransport(0, hub=hub)
    b.close()
    assert a.unreachable == {1}
    with pytest.raises(TransportError, match="peer 1 is not open"):
        a.send(1, 0, [torch.ones(1)])


def test_memory_transport_works_across_threads():
    hub, a, b = _mem_pair()
    result = {}

    def receive():
        result["msg"] = b.recv(0, 0, timeout_s=20.0)

    t = threading.Thread(target=receive)
    t.start()
    a.send(1, 0, [torch.ones(2)])
    t.join(20.0)
    assert torch.equal(result["msg"].tensors[0], torch.ones(2))


def test_expired_messages_are_counted_when_the_window_moves_past_them():
    hub, a, b = _mem_pair()
    b.round_window = 1
    a.send(1, 3, [torch.ones(1)])
    b.recv_many([0], 0, deadline_s=0.0)  # pumps round 3 into the mailbox (early)
    b.advance(5)  # window now 4..: round 3 falls out unread
    assert b.round == 5 and b.stats.expired[0] == 1
    b.advance(2)  # never moves back
    assert b.round == 5


# ------------------------------------------------------------------------------ zmq only
def test_zmq_send_to_a_dead_peer_is_dropped_and_counted_without_hanging(tmp_path):
    a = ZmqTransport(0, bind=f"ipc://{tmp_path}/a.sock", send_timeout_s=0.2)
    b = ZmqTransport(1, bind=f"ipc://{tmp_path}/b.sock")
    try:
        a.connect({1: b.address})
        assert a.send(1, 0, [torch.ones(4)]) > 0
        b.close()
        results = [a.send(1, r, [torch.ones(4)]) for r in range(1, 8)]
        # The first sends may still be queued on the dying connection; then they fail.
        assert results[-1] == 0 and a.stats.send_failures[1] >= 1
        assert a.unreachable == {1}
    finally:
        a.close()
        b.close()


def test_zmq_connect_to_a_peer_that_is_not_up_does_not_raise(tmp_path):
    with ZmqTransport(
        0, bind=f"ipc://{tmp_path}/a.sock", connect_timeout_s=0.1, send_timeout_s=0.1
    ) as a:
        a.connect({1: f"ipc://{tmp_path}/nobody.sock"})
        assert a.send(1, 0, [torch.ones(1)]) == 0


def test_zmq_checksum_can_be_turned_off_on_both_sides(tmp_path):
    lim = WireLimits(require_checksum=False)
    a = ZmqTransport(0, bind=f"ipc://{tmp_path}/a.sock", checksum=False, limits=lim)
    b = ZmqTransport(1, bind=f"ipc://{tmp_path}/b.sock", checksum=False, limits=lim)
    c = ZmqTransport(2, bind=f"ipc://{tmp_path}/c.sock")  # requires checksums
    try:
        a.connect({1: b.address, 2: c.address})
        b.connect({0: a.address})
        c.connect({0: a.address})
        a.send(1, 0, [torch.ones(3)])
        a.send(2, 0, [torch.ones(3)])
        assert torch.equal(b.recv(0, 0, timeout_s=10.0).tensors[0], torch.ones(3))
        with pytest.raises(DeadlineError):
            c.recv(0, 0, timeout_s=0.3)
        assert c.stats.rejected["checksum"] == 1
    finally:
        for t in (a, b, c):
            t.close()


def test_zmq_wildcard_bind_advertises_a_host(tmp_path):
    with ZmqTransport(0, bind="tcp://0.0.0.0:0", advertise_host="node-7") as t:
        assert t.address.startswith("tcp://node-7:")


def test_zmq_bind_to_a_busy_port_raises_transport_error():
    with ZmqTransport(0) as a:
        with pytest.raises(TransportError, match="cannot bind"):
            ZmqTransport(1, bind=a.address)


# ---------------------------------------------------------------------------- gloo only
def test_gloo_peer_that_closes_is_absent_from_recv_many_and_recv_raises(tmp_path):
    n = Net("gloo", tmp_path)
    try:
        a, b, c = n.make(3)
        c.close()
        b.send(0, 0, [torch.ones(1)])
        got = a.recv_many([1, 2], 0, deadline_s=0.5)
        assert set(got) == {1}
        assert a.unreachable == {2}
        error = None
        for _ in range(100):  # the goodbye may still be on its way
            try:
                a.recv(2, 0, timeout_s=0.1)
            except DeadlineError:
                continue
            except TransportError as exc:
                error = exc
                break
        assert error is not None and "peer 2 closed its transport" in str(error)
    finally:
        n.close_all()


class _RawSender:
    """Rank 0 speaks the gloo prefix protocol by hand to a transport on rank 1."""

    def __init__(self, tmp_path):
        self.net = Net("gloo", tmp_path)
        self.net._groups(2)
        self.group = self.net.groups[0]
        self.t = TorchDistTransport(
            1, group=self.net.groups[1], timeout_s=20.0, close_timeout_s=2.0, senders=[0]
        )

    def send(self, prefix: torch.Tensor, *frames: torch.Tensor) -> None:
        for piece in (prefix, *frames):
            self.group.send([piece], 1, torchdist.TAG).wait()

    def close(self) -> None:
        if self.t._in[0].error is None:  # else no receive is posted for the goodbye
            self.send(TorchDistTransport._prefix(torchdist.KIND_BYE))
        self.t.close()


def _encoded(round: int, tensors: list[torch.Tensor], header: dict | None = None):
    frames = encode({"run": "", "sender": 0, "round": round, "h": header or {}}, tensors)
    return frames[0], frames[1:]


def test_gloo_small_message_is_one_inline_send_and_round_trips_exactly(tmp_path, monkeypatch):
    n = Net("gloo", tmp_path)
    try:
        a, b = n.make(2)
        posted = []
        real_post = TorchDistTransport._post

        def post(self, state, pieces, bye=False):
            works = real_post(self, state, pieces, bye)
            posted.append(len(works))
            return works

        monkeypatch.setattr(TorchDistTransport, "_post", post)
        sent = [
            torch.tensor([1.5, float("nan"), -0.0], dtype=torch.float32),
            torch.arange(5, dtype=torch.int8),  # 5 B: the next frame starts 8-aligned
            torch.empty(0, 3, dtype=torch.float64),
            torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64),
            torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
        ]
        a.send(1, 0, sent, header={"k": "v"})
        msg = b.recv(0, 0, timeout_s=10.0)
        assert posted == [1]  # header and frames in the prefix: a single send
        assert msg.header == {"k": "v"} and msg.buffers == []
        assert all(_same_bits(x, y) for x, y in zip(sent, msg.tensors, strict=True))
        b.release(msg)
        # Just over the inline area: prefix plus one frame send, received into a buffer.
        big = torch.arange(torchdist.INLINE_BYTES // 8, dtype=torch.float64)
        a.send(1, 1, [big])
        msg = b.recv(0, 1, timeout_s=10.0)
        assert posted == [1, 2] and torch.equal(msg.tensors[0], big) and msg.buffers
    finally:
        n.close_all()


def test_gloo_inline_frame_whose_size_disagrees_with_the_header_is_rejected(tmp_path):
    raw = _RawSender(tmp_path)
    try:
        head, views = _encoded(0, [torch.ones(2)])  # the header declares 8 B
        short = [views[0][:4]]  # ... the prefix declares and carries 4 B
        raw.send(TorchDistTransport._prefix(torchdist.KIND_INLINE, head, [4], short))
        head, views = _encoded(1, [torch.full((3,), 7.0)])
        raw.send(TorchDistTransport._prefix(torchdist.KIND_INLINE, head, [12], views))
        msg = raw.t.recv(0, 1, timeout_s=10.0)  # the peer stays up; the next message is fine
        assert torch.equal(msg.tensors[0], torch.full((3,), 7.0))
        assert raw.t.stats.rejected == {"truncated": 1}
        with pytest.raises(DeadlineError):
            raw.t.recv(0, 0, timeout_s=0.05)
    finally:
        raw.close()


def test_gloo_inline_message_overflowing_the_prefix_is_a_protocol_error(tmp_path):
    raw = _RawSender(tmp_path)
    try:
        head, views = _encoded(0, [torch.ones(2)])
        prefix = TorchDistTransport._prefix(torchdist.KIND_INLINE, head, [8], views)
        prefix[4] = torchdist.INLINE_BYTES  # declared frame size past the inline area
        raw.send(prefix)
        with pytest.raises(TransportError, match="peer 0 failed: protocol error: inline"):
            for _ in range(100):
                raw.t.recv_many([0], 0, deadline_s=0.1)
    finally:
        raw.close()


def test_gloo_staged_receives_follow_size_changes_and_inline_messages(tmp_path, monkeypatch):
    n = Net("gloo", tmp_path)
    try:
        a, b = n.make(2)
        kinds = []
        real_prefix = TorchDistTransport._prefix
        monkeypatch.setattr(
            TorchDistTransport,
            "_prefix",
            staticmethod(lambda kind, *args: kinds.append(kind) or real_prefix(kind, *args)),
        )
        K = torchdist
        plan = [  # (frame sizes in float64 elements, kind the sender picks)
            ([600, 0, 300], K.KIND_MESSAGE),  # nothing staged yet
            ([600, 0, 300], K.KIND_STAGED),  # same nonempty sizes: into the staged receives
            ([3], K.KIND_INLINE),  # small: inside the prefix, staging untouched
            ([600, 300], K.KIND_STAGED),
            ([700, 300], K.KIND_MESSAGE),  # new sizes: staged receives get a byte each
            ([700, 300], K.KIND_STAGED),
        ]
        for r, (sizes, kind) in enumerate(plan):
            sent = [torch.arange(k, dtype=torch.float64) + r for k in sizes]
            a.send(1, r, sent, header={"r": r})
            msg = b.recv(0, r, timeout_s=10.0)
            assert kinds[-1] == kind, (r, kinds)
            assert msg.header == {"r": r}
            assert all(_same_bits(x, y) for x, y in zip(sent, msg.tensors, strict=True))
            if r % 2:
                b.release(msg)
        assert b.stats.rejected == {}
    finally:
        n.close_all()


def test_gloo_staged_prefix_without_matching_staged_receives_is_a_protocol_error(tmp_path):
    raw = _RawSender(tmp_path)
    try:
        head, _ = _encoded(0, [torch.ones(1000)])
        raw.send(TorchDistTransport._prefix(torchdist.KIND_STAGED, head, [4000]))
        with pytest.raises(TransportError, match="peer 0 failed: protocol error: staged"):
            for _ in range(100):
                raw.t.recv_many([0], 0, deadline_s=0.1)
    finally:
        raw.close()
