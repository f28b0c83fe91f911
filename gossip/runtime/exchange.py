"""Asynchronous rounds: a background thread owns the transport, sends the posted snapshots and
keeps an inbox, so communication overlaps the caller's compute (``Node(mode="async")``).

At round ``r`` the node merges the freshest message of each neighbour whose round is at least
``r - max_staleness``, waiting (at most ``round_deadline_s``) only for neighbours that are further
behind. Push-sum messages are never dropped as stale: every share of mass is absorbed once
(:func:`combine_push_sum`).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING

import torch

from ..errors import TransportError

if TYPE_CHECKING:
    from .neighbours import RoundReport
    from .node import Node


class _Exchange:
    """Async mode: a thread that owns the transport, sends posted snapshots and keeps an inbox.

    The transport is used from this thread only (transports are not thread-safe); the node's
    thread hands over snapshots with :meth:`round` and reads the inbox under a condition.
    """

    POLL_S = 0.002

    def __init__(self, node: Node):
        self.node = node
        self.cv = threading.Condition()
        self.outbox: deque = deque()
        self.inbox: dict[int, list] = defaultdict(list)
        self.posted = -1
        self.error: BaseException | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._run, name=f"gossip-exchange-{node.rank}",
                                       daemon=True)  # fmt: skip
        self.thread.start()

    def round(self, r: int) -> RoundReport:
        node = self.node
        hood = node._hood(r)
        sends, keep = node._outgoing(r)
        with self.cv:
            # backpressure: at most max_staleness + 1 snapshots wait for the thread; every one
            # is sent (a push-sum share left unsent would be mass lost)
            t_full = time.perf_counter() + node.round_deadline_s
            while len(self.outbox) > node.max_staleness and self.error is None:
                if not self.cv.wait(max(0.0, t_full - time.perf_counter())):
                    break
            self._raise()
            snapshot = node._snapshot()
            self.outbox.append((r, sends, snapshot))
            self.cv.notify_all()
        oldest = r - node.max_staleness
        live = [p for p in hood.in_peers if node.liveness.is_up(p)]
        t_wait = time.perf_counter()
        deadline = t_wait + node._deadline(r)

        def fresh(p):
            return any(m.round >= oldest for m in self.inbox.get(p, ()))

        with self.cv:
            while oldest >= 0 and not all(fresh(p) for p in live):
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.error is not None:
                    break
                self.cv.wait(remaining)
            self._raise()
            got, stale = {}, 0
            for p, msgs in list(self.inbox.items()):
                if node.push_sum is not None:  # every message's mass is absorbed exactly once
                    usable = msgs
                else:
                    usable = [m for m in msgs if m.round >= oldest]
                    stale += len(msgs) - len(usable)
                    usable = usable[-1:]
                if usable:
                    got[p] = usable
                del self.inbox[p]
        wait = time.perf_counter() - t_wait
        if node.push_sum is not None:
            got = {p: [m for m in ms if node._valid(m) is not None] for p, ms in got.items()}
            got = {p: combine_push_sum(ms) for p, ms in got.items() if ms}
        else:
            got = {p: ms[-1] for p, ms in got.items()}
        report = node._merge(r, hood, got, keep, snapshot)
        report.wait_seconds = wait
        report.missing = tuple(p for p in live if oldest >= 0 and p not in got)
        report.extra["stale_dropped"] = stale
        node._update_liveness(r, got)
        report.down = tuple(sorted(node.liveness.down))
        return report

    def _raise(self) -> None:
        if self.error is not None:
            raise TransportError(f"node {self.node.rank}: exchange thread failed: {self.error}")

    def _pending(self, received: set[int]) -> list[int]:
        """Live in-neighbours whose message for the last posted round has not arrived."""
        if self.posted < 0:
            return []
        hood = self.node._hood(self.posted)
        return [p for p in hood.in_peers if p not in received and self.node.liveness.is_up(p)]

    def _run(self) -> None:
        node, t = self.node, self.node.transport
        received: set[int] = set()
        try:
            while True:
                with self.cv:
                    # nothing to send and nothing awaited: sleep until the next snapshot
                    while not (self._stop or self.outbox or self._pending(received)):
                        self.cv.wait()
                    if self._stop:
                        return
                    items = list(self.outbox)
                    self.outbox.clear()
                    if items:
                        self.cv.notify_all()
                for r, sends, snapshot in items:
                    node._send_all(r, sends, snapshot)
                    self.posted, received = r, set()
                wanted = self._pending(received)
                # a short wait, so the next snapshot is never held up for long
                got = t.recv_many(wanted, self.posted, self.POLL_S) if wanted else {}
                arrivals = list(got.values())
                for rr in range(max(0, self.posted - t.round_window), self.posted):
                    arrivals += t.recv_many(node.in_peers, rr, 0.0).values()
                received.update(m.sender for m in arrivals if m.round == self.posted)
                if arrivals:
                    with self.cv:
                        for m in sorted(arrivals, key=lambda m: m.round):
                            self.inbox[m.sender].append(m)
                        self.cv.notify_all()
        except BaseException as e:  # surfaced to the training thread at its next round
            with self.cv:
                self.error = e
                self.cv.notify_all()

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        self.thread.join(timeout=10)


def combine_push_sum(msgs: list):
    """Several (validated) push-sum messages from one peer as one: masses add, models mix by
    mass."""
    if len(msgs) == 1:
        return msgs[0]
    total = sum(float(m.header["w"]) for m in msgs)
    first = msgs[0]
    acc = torch.zeros_like(first.tensors[0])
    for m in msgs:
        acc.add_(m.tensors[0], alpha=float(m.header["w"]) / total)
    return type(first)(first.sender, msgs[-1].round, {"w": total}, [acc])
