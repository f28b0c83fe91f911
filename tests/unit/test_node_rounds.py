"""The node's gossip rounds, with N nodes in threads over the in-memory transport.

Faults are injected deterministically by the hub (drop a (round, sender) message) or by a node
that simply stops stepping; no assertion depends on timing.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from node_threads import in_threads

from gossip.algorithms import variance_corrected_average
from gossip.errors import ConfigError
from gossip.runtime.node import Node, PeerLiveness, neighbourhood
from gossip.topology import build_topology
from gossip.transport.memory import MemoryHub, MemoryTransport

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def reference_merge(monkeypatch):
    # The node's arithmetic is checked against the reference kernels; that native kernels match
    # the reference is the ops tests' job (and a first-use build must not eat these budgets).
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")


def make_nodes(n, spec="ring", averaging="dpsgd", mode="sync", deadline=5.0, **kw):
    """``n`` nodes over one hub, each with a linear model drawn from seed = rank."""
    hub = MemoryHub()
    schedule = build_topology(spec, n, weights="push_sum" if averaging == "push_sum" else "auto")
    nodes = []
    for rank in range(n):
        t = MemoryTransport(rank, hub=hub, round_window=4, max_rounds_ahead=4)
        torch.manual_seed(rank)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        node = Node(model, opt, topology=schedule, transport=t, averaging=averaging, mode=mode,
                    round_deadline_s=deadline, startup_grace_s=deadline, **kw)  # fmt: skip
        nodes.append(node)
    for node in nodes:
        peers = set(node.out_peers)
        node.transport.connect({p: hub.address(p) for p in peers})
        node.transport.allow_senders(node.in_peers)
    return hub, nodes


def run_threads(nodes, steps, which=None):
    """Call ``node.step()`` ``steps`` times on each node in ``which`` (default all), in threads."""
    reports = {i: [] for i in range(len(nodes))}

    def body(i):
        for _ in range(steps):
            r = nodes[i].step()
            if r is not None:
                reports[i].append(r)

    in_threads(body, which or range(len(nodes)))
    return reports


def close_all(nodes):
    for node in nodes:
        node.close()


def models(nodes):
    return torch.stack([n.flat.detach().clone() for n in nodes])


def test_neighbourhood_reads_rows_as_inputs_and_columns_as_outputs():
    W = sp.csr_array(np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]))
    nb = neighbourhood(W, 0)
    assert nb.in_peers == (1,) and nb.in_weights == (0.5,)
    assert nb.out_peers == (2,) and nb.out_weights == (0.5,)
    assert nb.self_weight == 0.5


def test_parameters_become_views_of_one_flat_buffer():
    _, nodes = make_nodes(2)
    try:
        node = nodes[0]
        node.flat.zero_()
        assert all(float(p.detach().abs().sum()) == 0 for p in node.model.parameters())
    finally:
        close_all(nodes)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_dpsgd_rounds_reach_the_mean_of_the_initial_models(mode):
    _, nodes = make_nodes(4, mode=mode)
    try:
        start = models(nodes)
        run_threads(nodes, 30 if mode == "sync" else 60)  # async merges one round behind
        end = models(nodes)
        torch.testing.assert_close(end, start.mean(0).expand_as(end), atol=1e-4, rtol=0)
    finally:
        close_all(nodes)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_push_sum_on_a_directed_ring_keeps_the_mean(mode):
    _, nodes = make_nodes(4, spec="directed_ring", averaging="push_sum", mode=mode)
    try:
        start = models(nodes)
        run_threads(nodes, 50 if mode == "sync" else 100)
        # in-flight shares of the last round are not merged yet: compare de-biased models
        end = models(nodes)
        torch.testing.assert_close(end, start.mean(0).expand_as(end), atol=1e-3, rtol=0)
    finally:
        close_all(nodes)


def test_local_steps_run_one_round_every_h_calls():
    _, nodes = make_nodes(2, local_steps=3)
    try:
        reports = run_threads(nodes, 9)
        assert [r.round for r in reports[0]] == [0, 1, 2]
        assert nodes[0].steps == 9 and nodes[0].round == 3
    finally:
        close_all(nodes)


def test_a_dropped_message_is_left_out_and_the_weights_renormalised():
    hub, nodes = make_nodes(3, deadline=1.0)
    try:
        hub.drop(round=0, sender=1, receiver=0)
        x0, x2 = nodes[0].flat.clone(), nodes[2].flat.clone()
        reports = run_threads(nodes, 1)
        r0 = reports[0][0]
        assert r0.missing == (1,) and r0.merged == (2,)
        # ring of 3, weights 1/3: node 0 keeps 1/3 and gives node 2 the missing 1/3
        torch.testing.assert_close(nodes[0].flat, x0 / 3 + 2 * x2 / 3)
        assert 'gossip_stragglers_total{peer="1"} 1.0' in nodes[0].metrics.exposition()
    finally:
        close_all(nodes)


def test_a_silent_neighbour_is_taken_as_down_then_back_when_it_speaks():
    _, nodes = make_nodes(3, deadline=1.0, down_after=1)
    try:
        reports = run_threads(nodes, 2, which=[0, 1])  # node 2 never steps
        assert [r.missing for r in reports[0]] == [(2,), ()]  # down: no longer waited for
        assert [r.down for r in reports[0]] == [(2,), (2,)]
        assert 'gossip_peer_up{peer="2"} 0.0' in nodes[0].metrics.exposition()
        run_threads(nodes, 2, which=[2])  # node 2 catches up on the messages waiting for it
        run_threads(nodes, 1)
        assert 2 not in nodes[0].liveness.down
        assert 'gossip_peer_up{peer="2"} 1.0' in nodes[0].metrics.exposition()
    finally:
        close_all(nodes)


def test_push_sum_keeps_the_share_of_a_down_neighbour():
    _, nodes = make_nodes(3, averaging="push_sum", deadline=1.0, down_after=1)
    try:
        run_threads(nodes, 2, which=[0, 1])  # node 2 silent: down after round 0
        # round 0: nodes 0 and 1 each sent 1/3 of their mass to node 2 (lost to them); after
        # that node 2's share stays home, so their total mass stays 2 - 2/3 = 4/3
        mass = [float(n.push_sum.weight) for n in nodes[:2]]
        assert sum(mass) == pytest.approx(4 / 3, rel=1e-12)
        run_threads(nodes, 2, which=[0, 1])
        assert sum(float(n.push_sum.weight) for n in nodes[:2]) == pytest.approx(4 / 3, rel=1e-12)
    finally:
        close_all(nodes)


def test_a_model_of_the_wrong_shape_is_rejected_and_counted():
    hub, nodes = make_nodes(2, deadline=0.2)
    try:
        liar = nodes[1].transport
        x0 = nodes[0].flat.clone()
        liar.send(0, 0, [torch.zeros(5)])  # a neighbour sending garbage for round 0
        report = nodes[0].gossip()
        assert report.merged == ()
        torch.testing.assert_close(nodes[0].flat, x0)  # nothing merged: the model is unchanged
        assert 'gossip_messages_rejected_total{reason="size_mismatch"} 1.0' in (
            nodes[0].metrics.exposition()
        )
    finally:
        close_all(nodes)


def test_variance_corrected_round_is_the_algorithm_functions_result():
    _, nodes = make_nodes(3, averaging="variance_corrected")
    try:
        xs = [n.flat.clone() for n in nodes]
        run_threads(nodes, 1)
        expect = variance_corrected_average(xs[0], [xs[1], xs[2]], nodes[0].layout, beta=1 / 3)
        torch.testing.assert_close(nodes[0].flat, expect)
    finally:
        close_all(nodes)


def test_peer_liveness_counts_rounds_without_any_message():
    live = PeerLiveness([1, 2], down_after=2)
    assert live.observe(0, {1: 1, 2: 1}) == ([], [])
    assert live.observe(1, {1: 2, 2: 1}) == ([], [])
    assert live.observe(2, {1: 3, 2: 1}) == ([2], [])  # two rounds (1, 2) with nothing from 2
    assert live.observe(3, {1: 4, 2: 2}) == ([], [2])
    # a message that arrived early (counted in an earlier round) is a sign of life when used
    assert live.observe(4, {1: 4, 2: 3}, seen={1}) == ([], [])
    assert live.observe(5, {1: 4, 2: 4}, seen={1}) == ([], [])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"averaging": "gossip"}, "averaging='gossip'; valid: dpsgd"),
        ({"mode": "later"}, "mode='later'; valid: sync, async"),
        ({"local_steps": 0}, "local_steps=0; need an integer >= 1"),
        ({"round_deadline_s": 0}, "round_deadline_s=0; need a number of seconds > 0"),
        ({"max_staleness": -1}, "max_staleness=-1; need an integer >= 0"),
    ],
)
def test_settings_are_validated(kw, match):
    model = torch.nn.Linear(2, 1)
    t = MemoryTransport(0, hub=MemoryHub())
    try:
        with pytest.raises(ConfigError, match=match):
            Node(model, topology="ring", transport=t, world_size=2, **kw)
    finally:
        t.close()
