"""A node that fell behind by more than the round window rejoins its neighbours.

Four nodes in threads over the in-memory transport; "paused" means the node simply stops
stepping while the others go on, so no assertion depends on timing.
"""

from __future__ import annotations

import pytest
import torch
from node_threads import in_threads

from gossip.runtime.node import Node
from gossip.runtime.rounds import REJOIN_STREAK
from gossip.topology import build_topology
from gossip.transport.memory import MemoryHub, MemoryTransport

pytestmark = pytest.mark.timeout(60)

WINDOW = 4


@pytest.fixture(autouse=True)
def reference_merge(monkeypatch):
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")


def make_nodes(n, averaging="dpsgd", deadline=0.5, **kw):
    hub = MemoryHub()
    schedule = build_topology("ring", n, weights="push_sum" if averaging == "push_sum" else "auto")
    nodes = []
    for rank in range(n):
        t = MemoryTransport(rank, hub=hub, round_window=WINDOW, max_rounds_ahead=WINDOW)
        torch.manual_seed(rank)
        model = torch.nn.Linear(3, 2)
        node = Node(model, None, topology=schedule, transport=t, averaging=averaging,
                    round_deadline_s=deadline, startup_grace_s=5.0, down_after=3, **kw)  # fmt: skip
        nodes.append(node)
    for node in nodes:
        node.transport.connect({p: hub.address(p) for p in node.out_peers})
        node.transport.allow_senders(node.in_peers)
    return hub, nodes


def run_until(nodes, end, which):
    """Step each node in ``which`` (in threads) until its round reaches ``end``."""
    reports = {i: [] for i in which}

    def body(i):
        while nodes[i].round < end:
            reports[i].append(nodes[i].step())

    in_threads(body, which)
    return reports


def spread(nodes):
    flats = torch.stack([n.flat.detach() for n in nodes])
    return float((flats - flats.mean(0)).abs().max())


def skipped_metric(node):
    return node.metrics.rounds_skipped._value.get()


def pause_and_resume(averaging, paused=2, before=3, during=30, after=30):
    hub, nodes = make_nodes(4, averaging)
    try:
        run_until(nodes, before, range(4))
        others = [i for i in range(4) if i != paused]
        mid = run_until(nodes, before + during, others)
        late = run_until(nodes, before + during + after, range(4))
        return nodes, mid, late
    except BaseException:
        for node in nodes:
            node.close()
        raise


@pytest.mark.parametrize("averaging", ["dpsgd", "push_sum"])
def test_a_node_paused_past_the_window_rejoins(averaging):
    paused, before, during = 2, 3, 30
    nodes, mid, late = pause_and_resume(averaging, paused, before, during)
    try:
        # while it was away its neighbours took it as down
        for p in nodes[paused].in_peers:
            assert paused in mid[p][-1].down
        reps = late[paused]
        jump = reps[0]
        assert jump.skipped >= during - WINDOW - 1  # skipped (most of) the missed rounds
        assert jump.round == before + jump.skipped
        assert skipped_metric(nodes[paused]) == jump.skipped
        assert sum(r.skipped for r in reps) == jump.skipped  # one jump, then in step
        # merging again within a couple of rounds
        first = next(k for k, r in enumerate(reps) if r.merged)
        assert first <= 2, [(r.round, r.merged) for r in reps[:5]]
        assert set(reps[-1].merged) == set(nodes[paused].in_peers)
        # its neighbours took it back, and merge it again
        for p in nodes[paused].in_peers:
            assert paused not in late[p][-1].down
            assert paused in late[p][-1].merged
            assert nodes[p].metrics.rounds_skipped._value.get() == 0
        assert spread(nodes) < 1e-4
        if averaging == "push_sum":  # no mass lost or created by the pause and the jump
            total = sum(float(n.push_sum.weight) for n in nodes)
            assert total == pytest.approx(4.0, abs=1e-5)
    finally:
        for node in nodes:
            node.close()


def test_a_forged_far_future_message_does_not_move_a_node():
    hub, nodes = make_nodes(4, deadline=0.2)
    try:
        run_until(nodes, 2, range(4))
        # neighbour 1 "sends" node 2 one valid model for a round far ahead
        nodes[1].transport.send(2, 10_000, [nodes[1].flat.detach().clone()], {})
        reps = run_until(nodes, 8, range(4))
        assert all(r.skipped == 0 for rs in reps.values() for r in rs)
        assert nodes[2].round == 8
        assert nodes[2].transport.stats.rejected["future"] == 1
        assert set(reps[2][-1].merged) == {1, 3}
    finally:
        for node in nodes:
            node.close()


def test_an_isolated_node_needs_a_streak_from_one_neighbour():
    # node 2 alone with one neighbour that is far ahead: it jumps only after REJOIN_STREAK
    # consecutive, increasing far-ahead messages, and never past a single outlier
    hub, nodes = make_nodes(4, deadline=0.05)
    try:
        node = nodes[2]
        run_until(nodes, 1, range(4))
        x = nodes[1].flat.detach().clone()
        node._last_merged = ()  # isolated
        for k in range(REJOIN_STREAK):
            nodes[1].transport.send(2, 100 + k, [x], {})
            assert node._rejoin(node.round) == (0 if k < REJOIN_STREAK - 1 else 100 + k - 1)
        assert node.round == 100 + REJOIN_STREAK - 1
    finally:
        for node in nodes:
            node.close()


def test_a_far_future_message_of_the_wrong_shape_is_no_evidence():
    hub, nodes = make_nodes(4, deadline=0.05)
    try:
        run_until(nodes, 1, range(4))
        node = nodes[2]
        for p in (1, 3):
            nodes[p].transport.send(2, 50, [torch.zeros(3)], {})
        assert node._rejoin(node.round) == 0
        assert node.round == 1
        assert node._rejoin_evidence == {}
    finally:
        for node in nodes:
            node.close()
