"""Prometheus metrics of one node process, from its own registry (never the module globals).

Every node owns a :class:`NodeMetrics` with a private ``CollectorRegistry`` and serves it on its
own port (``base + rank`` by default), so several nodes in one machine, or one test process
holding many nodes, never mix their series. Names follow Prometheus practice: one ``gossip_``
prefix, base units (seconds, bytes), ``_total`` on counters, and labels limited to ``peer`` (at
most the node's degree) and ``reason`` (the fixed set
:data:`gossip.transport.api.REJECT_REASONS`).

What the node measures itself (rounds, steps, round duration, loss, consensus distance,
stragglers, peer liveness) is pushed here as it happens; what the transport counts (bytes per
peer, late and stale messages, rejected messages by reason) is read from its
:class:`~gossip.transport.api.TransportStats` at scrape time, so the two never drift apart.

Example::

    metrics = NodeMetrics(node=3, info={"transport": "zmq", "topology": "ring"})
    port = metrics.serve(9400 + 3)            # http://host:9403/metrics
    with metrics.round_timer():
        ...                                    # one gossip round
    metrics.close()
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .errors import ConfigError

#: Round-duration buckets in seconds: milliseconds (loopback, tiny models) up to ten minutes
#: (big models over slow links), so a slow cluster never lands only in +Inf.
ROUND_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

#: Checkpoint-write buckets in seconds.
CHECKPOINT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

PREFIX = "gossip_"


class _TransportCollector(Collector):
    """Reads a transport's cumulative counters at scrape time, plus the node's own rejections."""

    PER_PEER = (
        ("bytes_sent", "bytes_sent", "Bytes put on the wire to this peer (header included)."),
        ("bytes_received", "bytes_received", "Bytes received from this peer."),
        ("messages_sent", "messages_sent", "Messages sent to this peer."),
        ("messages_received", "messages_received", "Messages accepted from this peer."),
        ("send_failures", "send_failures", "Sends dropped: peer unreachable or its queue full."),
        ("late", "late_messages", "Accepted messages that arrived after their round."),
        ("expired", "expired_messages", "Accepted messages that fell out of the round window."),
    )

    def __init__(self, stats_fn: Callable[[], object], own_rejections: collections.Counter):
        self._stats_fn = stats_fn
        self._own = own_rejections

    def collect(self) -> Iterator:
        stats = self._stats_fn()
        for attr, name, doc in self.PER_PEER:
            fam = CounterMetricFamily(PREFIX + name, doc, labels=["peer"])
            for peer, v in sorted(dict(getattr(stats, attr, None) or {}).items()):
                fam.add_metric([str(peer)], float(v))
            yield fam
        rejected = collections.Counter(dict(getattr(stats, "rejected", None) or {}))
        rejected.update(dict(self._own))
        fam = CounterMetricFamily(
            PREFIX + "messages_rejected",
            "Messages dropped by validation, by reason (the node keeps running).",
            labels=["reason"],
        )
        for reason, v in sorted(rejected.items()):
            fam.add_metric([str(reason)], float(v))
        yield fam
        yield CounterMetricFamily(
            PREFIX + "disconnects",
            "Incoming connections dropped (a peer died, or announced an oversized frame).",
            value=float(getattr(stats, "disconnects", 0)),
        )


class NodeMetrics:
    """All series of one node, in a registry of its own.

    ``node`` is the node id (rank); ``info`` holds static facts (transport, topology, averaging,
    version) exported once as ``gossip_node_info{...} 1``. Methods are cheap and thread-safe
    (prometheus-client locks per series), so the async communication thread can use them too.
    """

    def __init__(self, node: int, info: dict[str, str] | None = None):
        self.node = int(node)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._server = None
        self._thread = None
        self._transport_collector: _TransportCollector | None = None
        self._own_rejections: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        labels = {"node": str(self.node), **{k: str(v) for k, v in (info or {}).items()}}
        self.info = Gauge(PREFIX + "node_info", "Static facts about this node (value 1).",
                          list(labels), registry=r)  # fmt: skip
        self.info.labels(**labels).set(1)
        self.rounds = Counter(PREFIX + "rounds", "Gossip rounds completed.", registry=r)
        self.local_steps = Counter(
            PREFIX + "local_steps", "Local optimizer steps taken.", registry=r
        )
        self.round = Gauge(PREFIX + "round", "Index of the last completed round.", registry=r)
        self.round_duration = Histogram(
            PREFIX + "round_duration_seconds",
            "Wall time of one gossip round (send, wait for neighbours, merge).",
            buckets=ROUND_BUCKETS_S,
            registry=r,
        )
        self.wait_duration = Histogram(
            PREFIX + "round_wait_seconds",
            "Time a round spent waiting for neighbours' messages.",
            buckets=ROUND_BUCKETS_S,
            registry=r,
        )
        self.consensus_distance = Gauge(
            PREFIX + "consensus_distance",
            "Estimate: L2 distance between this node's model and its neighbourhood average "
            "before the last merge (parameter units).",
            registry=r,
        )
        self.loss = Gauge(PREFIX + "loss", "Mean loss of the last evaluation.", ["split"],
                          registry=r)  # fmt: skip
        self.accuracy = Gauge(
            PREFIX + "accuracy_ratio", "Test accuracy of the last evaluation (0-1).", registry=r
        )
        self.stragglers = Counter(
            PREFIX + "stragglers",
            "Rounds in which this neighbour missed the deadline and was left out.",
            ["peer"],
            registry=r,
        )
        self.peer_up = Gauge(
            PREFIX + "peer_up",
            "1 while the neighbour answers, 0 once it missed enough rounds to be taken as down.",
            ["peer"],
            registry=r,
        )
        self.rounds_skipped = Counter(
            PREFIX + "rounds_skipped",
            "Rounds this node skipped to rejoin neighbours that had moved further ahead than "
            "the round window (it fell behind, e.g. paused).",
            registry=r,
        )
        self.neighbours_merged = Gauge(
            PREFIX + "neighbours_merged",
            "Neighbour models merged in the last round.",
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            PREFIX + "checkpoint_duration_seconds",
            "Wall time of one atomic checkpoint write.",
            buckets=CHECKPOINT_BUCKETS_S,
            registry=r,
        )

    # -- what the node reports -----------------------------------------------------------------
    def set_peers(self, peers) -> None:
        """Create the per-peer series for these neighbours (so a scrape shows them from round 0)."""
        for p in peers:
            self.peer_up.labels(peer=str(p)).set(1)
            self.stragglers.labels(peer=str(p))

    def observe_round(self, r: int, seconds: float, wait_seconds: float, merged: int) -> None:
        self.rounds.inc()
        self.round.set(r)
        self.round_duration.observe(seconds)
        self.wait_duration.observe(wait_seconds)
        self.neighbours_merged.set(merged)

    def observe_loss(self, value: float, split: str = "train") -> None:
        if math.isfinite(value):
            self.loss.labels(split=split).set(value)

    @contextlib.contextmanager
    def round_timer(self):
        """Time a block into the round-duration histogram (for callers without a Node)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.round_duration.observe(time.perf_counter() - t0)

    def reject(self, reason: str) -> None:
        """Count a message the node itself refused (e.g. a model of the wrong shape)."""
        with self._lock:
            self._own_rejections[reason] += 1

    def attach_transport(self, stats_fn: Callable[[], object]) -> None:
        """Export a transport's counters; ``stats_fn()`` returns its current ``TransportStats``."""
        if self._transport_collector is not None:
            self.registry.unregister(self._transport_collector)
        self._transport_collector = _TransportCollector(stats_fn, self._own_rejections)
        self.registry.register(self._transport_collector)

    # -- exposition ----------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``addr:port`` (``port=0``: a free port); returns the port."""
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"metrics_port={port} is not a TCP port (0-65535; 0 = any free)")
        if self._server is not None:
            return self.port
        try:
            self._server, self._thread = start_http_server(int(port), addr, registry=self.registry)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {addr}:{port} ({e.strerror}); set metrics_port "
                "(GOSSIP_METRICS_PORT) to a free base port, or 0 for any free port"
            ) from e
        return self.port

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    def exposition(self) -> str:
        """The text a scrape would return (for logs and tests without HTTP)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
