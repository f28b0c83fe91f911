"""Compressed gossip in the node (``Node(compress=..., feedback=...)``), over the in-memory
transport: N nodes in threads, or one node whose neighbours are scripted by the test.

Faults are injected deterministically (the hub drops or delays a (round, sender, receiver)
message; a scripted neighbour sends what the test says); no assertion depends on timing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from node_threads import in_threads

from gossip.algorithms.compression import make_compressor
from gossip.errors import ConfigError
from gossip.layout import ParamLayout
from gossip.runtime.node import Node
from gossip.sim.config import SimConfig
from gossip.sim.rules import make_rule
from gossip.topology import build_topology
from gossip.transport.memory import MemoryHub, MemoryTransport

pytestmark = pytest.mark.timeout(60)

D = 205  # Linear(40, 5)


@pytest.fixture(autouse=True)
def reference_merge(monkeypatch):
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")


@pytest.fixture(autouse=True)
def quiet_experimental():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="choco-econtrol with eta")
        yield


def make_nodes(n, compress, feedback, *, shared=False, deadline=5.0, hub=None, **kw):
    """``n`` nodes on a ring over one hub; models drawn from seed = rank (or one shared draw)."""
    hub = hub or MemoryHub()
    schedule = build_topology("ring", n)
    nodes = []
    for rank in range(n):
        t = MemoryTransport(rank, hub=hub, round_window=4, max_rounds_ahead=4)
        torch.manual_seed(0 if shared else rank)
        node = Node(torch.nn.Linear(40, 5), None, topology=schedule, transport=t,
                    compress=compress, feedback=feedback, round_deadline_s=deadline,
                    startup_grace_s=deadline, **kw)  # fmt: skip
        nodes.append(node)
    for node in nodes:
        node.transport.connect({p: hub.address(p) for p in node.out_peers})
    return hub, schedule, nodes


def run_rounds(nodes, rounds):
    reports = {n.rank: [] for n in nodes}

    def body(node):
        for _ in range(rounds):
            reports[node.rank].append(node.gossip())

    in_threads(body, nodes)
    return reports


def models(nodes):
    return torch.stack([n.flat.detach().clone() for n in nodes])


def assert_replicas_equal_owners(nodes):
    for node in nodes:
        for p, replica in node.compressed.replicas.items():
            assert node.compressed.rv[p] == nodes[p].compressed.version, (node.rank, p)
            assert torch.equal(replica, nodes[p].compressed.pc.copy), (node.rank, p)


def close_all(nodes):
    for node in nodes:
        node.close()


# -- (a) the runtime computes what the simulator's rule computes -----------------------------
@pytest.mark.parametrize(
    ("compress", "feedback", "init"),
    [
        ("topk:0.05", "choco:0.3", "independent"),
        ("randk:0.1", "choco-econtrol:0.3,0.05", "independent"),
        ("topk:0.1", "choco:0.5", "shared"),
        ("quant:4", "none", "independent"),
    ],
)
def test_runtime_matches_the_simulator_rule_on_a_ring(compress, feedback, init):
    n, rounds = 5, 10
    shared = init == "shared"
    public = "model" if shared else "zeros"
    _, schedule, nodes = make_nodes(n, compress, feedback, shared=shared, public_copy_init=public)
    try:
        Z0 = models(nodes)
        layout = ParamLayout.from_module(nodes[0].model)
        cfg = SimConfig(nodes=n, compress=compress, feedback=feedback, init=init)
        rule = make_rule(cfg, schedule, layout, Z0)
        if shared:  # the same x0 everywhere, then local progress the copies do not know of
            step = torch.randn(n, D, generator=torch.Generator().manual_seed(1))
            Z0 = Z0 + step
            for node in nodes:
                node.flat.add_(step[node.rank])
        run_rounds(nodes, rounds)
        Z = Z0
        for r in range(rounds):
            Z, _ = rule.communicate(r, Z)
        X = models(nodes)
        assert not torch.equal(X, Z0)
        torch.testing.assert_close(X, Z, atol=2e-5, rtol=0)
        if feedback != "none":
            copies = torch.stack([node.compressed.pc.copy for node in nodes])
            torch.testing.assert_close(copies, rule.state.x_hat, atol=2e-5, rtol=0)
            assert_replicas_equal_owners(nodes)
            assert all(node.compressed.stats["full_copies_sent"] == 0 for node in nodes)
        # the bytes counted are the compressed messages' (a dense model is D * 4 bytes)
        sent = nodes[0].transport.stats
        assert sent.messages_sent[1] == rounds
        assert sent.bytes_sent[1] < rounds * D * 4 * (0.5 if compress != "quant:4" else 0.3)
        scrape = nodes[0].metrics.exposition()
        assert f'gossip_bytes_sent_total{{peer="1"}} {float(sent.bytes_sent[1])}' in scrape
    finally:
        close_all(nodes)


# -- (b) lost and late messages ----------------------------------------------------------------
@pytest.mark.parametrize("fault", ["drop", "delay"])
def test_a_lost_message_costs_one_resync_and_a_late_one_none(fault):
    hub, _, nodes = make_nodes(5, "topk:0.1", "choco:0.3", deadline=1.0)
    try:
        if fault == "drop":
            hub.drop(round=3, sender=1, receiver=2)
        else:
            hub.delay(round=3, sender=1, rounds=1, receiver=2)
        start = models(nodes)
        reports = run_rounds(nodes, 120)
        assert_replicas_equal_owners(nodes)
        end = models(nodes)
        spread = lambda X: float((X - X.mean(0)).abs().max())  # noqa: E731
        assert spread(end) < 1e-2 * spread(start)  # converging (not exact: deadlines on a busy CI)
        assert 1 not in reports[2][3].merged and reports[2][3].extra["stale"] == (1,)
        c1, c2 = nodes[1].compressed, nodes[2].compressed
        if fault == "drop":  # round 4 reveals the gap; 2 asks in round 5; 1 answers in round 6
            assert c2.stats["gaps"] == 1 and c1.stats["full_copies_sent"] == 1
            assert c2.stats["full_copies_received"] == 1
            assert [1 in reports[2][r].merged for r in range(3, 8)] == [0, 0, 0, 1, 1]
            extra = nodes[1].transport.stats.bytes_sent[2] - nodes[1].transport.stats.bytes_sent[0]
            assert extra >= D * 4 // 2  # the dense copy is counted as bytes sent
        else:  # the late increment is applied in order: no resync
            assert 1 in reports[2][4].merged
            assert all(n.compressed.stats["full_copies_sent"] == 0 for n in nodes)
        assert sum(n.compressed.stats["full_copies_sent"] for n in nodes) == (fault == "drop")
    finally:
        close_all(nodes)


def test_nodes_that_did_not_share_their_first_model_are_resynced_at_round_zero():
    # public_copy_init="model" promises one common x0; the round-0 checksum catches the lie
    _, _, nodes = make_nodes(4, "topk:0.1", "choco:0.3", public_copy_init="model")
    try:
        run_rounds(nodes, 8)
        assert [n.compressed.stats["full_copies_sent"] for n in nodes] == [2, 2, 2, 2]
        assert_replicas_equal_owners(nodes)
    finally:
        close_all(nodes)


# -- one node, its neighbours scripted by the test ----------------------------------------------
class Scripted:
    """Node 0 on a 3-ring whose neighbours 1 and 2 are raw transports driven by the test."""

    def __init__(self, compress="topk:0.1", feedback="choco:0.3"):
        self.hub = MemoryHub()
        schedule = build_topology("ring", 3)
        t0 = MemoryTransport(0, hub=self.hub)
        torch.manual_seed(0)
        self.node = Node(torch.nn.Linear(40, 5), None, topology=schedule, transport=t0,
                         compress=compress, feedback=feedback, round_deadline_s=0.2,
                         startup_grace_s=0.2)  # fmt: skip
        self.peers = {p: MemoryTransport(p, hub=self.hub) for p in (1, 2)}
        for t in self.peers.values():
            t.connect({0: self.hub.address(0)})
        self.node.transport.connect({p: self.hub.address(p) for p in (1, 2)})
        self.c = make_compressor(compress)
        self.copy = {p: torch.zeros(D) for p in (1, 2)}  # the scripted peers' public copies
        self.version = {1: 0, 2: 0}
        self.round = 0

    def payload(self, p):
        """A valid increment of p for this round: ``(header, frames, dense)``, not applied."""
        q = self.c.compress(torch.randn(D), seed=0, round=self.round, sender=p)
        return {"base": self.version[p], "codec": q.header}, list(q.frames), self.c.decompress(q)

    def increment(self, p):
        """A valid message of p: ``(header, frames)``, applied to p's own copy."""
        header, frames, dense = self.payload(p)
        self.copy[p] += dense
        self.version[p] += 1
        return header, frames

    def full(self, p):
        self.version[p] += 1
        return {"base": self.version[p] - 1, "full": True}, [self.copy[p].clone()]

    def play(self, messages):
        """Send ``{peer: (header, frames)}`` for this round, run node 0's round, and return its
        report and the headers it sent to each peer (``"frames"``: the tensors)."""
        for p, (header, frames) in messages.items():
            self.peers[p].send(0, self.round, frames, header)
        report = self.node.gossip()
        sent = {}
        for p, t in self.peers.items():
            m = t.recv(0, self.round, 1.0)
            sent[p] = {**m.header, "frames": m.tensors}
        self.round += 1
        return report, sent

    def rejected(self) -> dict[str, float]:
        out = {}
        for line in self.node.metrics.exposition().splitlines():
            if line.startswith("gossip_messages_rejected_total{"):
                reason = line.split('reason="')[1].split('"')[0]
                out[reason] = float(line.rsplit(" ", 1)[1])
        return out

    def close(self):
        self.node.close()
        for t in self.peers.values():
            t.close()


def test_malformed_compressed_payloads_are_rejected_by_reason_and_the_node_goes_on():
    s = Scripted()
    try:

        def bad(mutate):
            header, frames, _ = s.payload(1)  # (never applied: not on the scripted side either)
            return mutate(header, frames)

        randk = make_compressor("randk:0.1").compress(torch.randn(D), seed=0, round=0, sender=1)
        wide = torch.full((20,), D + 3, dtype=torch.uint8)
        cases = {
            "bad_codec": lambda h, f: ({**h, "codec": randk.header}, list(randk.frames)),
            "bad_header": lambda h, f: (h, f[:1]),  # a frame missing
            "bad_payload": lambda h, f: (h, [f[0], wide]),  # indices out of range
            "size_mismatch": lambda h, f: (h, [f[0][:10], f[1][:10]]),  # k frames of 10
            "bad_dtype": lambda h, f: ({"base": 0, "full": True}, [torch.zeros(D).double()]),
        }
        for reason, mutate in cases.items():
            before = s.rejected().get(reason, 0)
            report, _ = s.play({1: bad(mutate), 2: s.increment(2)})
            assert s.rejected().get(reason, 0) == before + 1, (reason, s.rejected())
            assert 2 in report.merged and 1 not in report.merged
        for header in ({"base": -1}, {"base": "3"}, {"base": 0, "resync": 1}):
            before = s.rejected().get("bad_header", 0)
            s.play({1: (header, []), 2: s.increment(2)})
            assert s.rejected()["bad_header"] == before + 1
        d_wrong = lambda h, f: ({**h, "codec": {**h["codec"], "d": D + 1}}, f)  # noqa: E731
        s.play({1: bad(d_wrong), 2: s.increment(2)})
        assert s.node.compressed.stats["rejected_size_mismatch"] == 2
        # nothing bad reached the replicas; a good message still applies
        report, _ = s.play({1: s.increment(1), 2: s.increment(2)})
        assert report.merged == (1, 2)
        assert torch.equal(s.node.compressed.replicas[1], s.copy[1])
        assert torch.equal(s.node.compressed.replicas[2], s.copy[2])
    finally:
        s.close()


def test_a_neighbour_that_went_back_or_missed_updates_is_resynced_by_request():
    s = Scripted()
    try:
        for _ in range(3):
            report, sent = s.play({1: s.increment(1), 2: s.increment(2)})
        assert report.merged == (1, 2) and "resync" not in sent[2]
        # 2 restarts from an older checkpoint: its copy went back to version 1
        s.version[2] = 1
        report, sent = s.play({1: s.increment(1), 2: s.increment(2)})
        assert report.merged == (1,) and s.node.compressed.rv[2] is None
        report, sent = s.play({1: s.increment(1), 2: s.increment(2)})
        assert sent[2].get("resync") is True and "resync" not in sent[1]
        assert report.merged == (1,)
        report, sent = s.play({1: s.increment(1), 2: s.full(2)})  # the answer: a dense copy
        assert report.merged == (1, 2) and sent[2].get("resync") is True  # (sent before it came)
        assert torch.equal(s.node.compressed.replicas[2], s.copy[2])
        report, sent = s.play({1: s.increment(1), 2: s.increment(2)})
        assert report.merged == (1, 2) and "resync" not in sent[2]
        # and node 0 answers a request of its own neighbour with its dense copy, once
        h, f = s.increment(1)
        s.play({1: ({**h, "resync": True}, f), 2: s.increment(2)})
        h, f = s.increment(1)
        _, sent = s.play({1: ({**h, "resync": True}, f), 2: s.increment(2)})
        assert sent[1].get("full") is True and "full" not in sent[2]
        assert torch.equal(sent[1]["frames"][0], s.node.compressed.pc.copy)
        assert s.node.compressed.stats["full_copies_sent"] == 1
        _, sent = s.play({1: s.increment(1), 2: s.increment(2)})
        assert "full" not in sent[1] and "codec" in sent[1]
    finally:
        s.close()


# -- (d) what node processes refuse ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(mode="async", compress="topk:0.01", feedback="choco:0.1"),
         r"mode='async' with compress='topk:0.01', feedback='choco:0.1'.*synchronous"),
        (dict(compress="topk:0.01", feedback="motef:0.1,0.9"),
         r"feedback='motef:0.1,0.9' runs in the simulator only.*choco:GAMMA"),
        (dict(compress="topk:0.01", feedback="ef21"), "feedback='ef21' runs in the simulator"),
        (dict(compress="topk:0.01", feedback="choco"), "feedback='choco' is not valid; use"),
        (dict(compress="topk:0.01", feedback="choco:-1"), "GAMMA must be > 0"),
        (dict(compress="top:1", feedback="choco:0.1"), "compressor spec 'top:1'"),
        (dict(compress="sign", averaging="push_sum"), "averaging='push_sum' with compress='sign'"),
        (dict(compress="sign", feedback="choco:0.1", public_copy_init="ones"),
         "public_copy_init='ones'; valid: zeros, model"),
        (dict(compress="sign", feedback="choco:0.1", topology="directed_ring"),
         "feedback='choco:0.1' needs an undirected topology"),
    ],
)  # fmt: skip
def test_unsupported_settings_name_the_argument_and_its_value(kw, match):
    hub = MemoryHub()
    t = MemoryTransport(0, hub=hub)
    kw = {"topology": build_topology(kw.pop("topology", "ring"), 3), **kw}
    try:
        with pytest.raises(ConfigError, match=match):
            Node(torch.nn.Linear(4, 2), None, transport=t, **kw)
    finally:
        t.close()


# -- (e) checkpoints -------------------------------------------------------------------------------
def test_a_resumed_compressed_node_continues_exactly(tmp_path):
    spec = ("topk:0.1", "choco-econtrol:0.3,0.05")
    _, _, straight = make_nodes(4, *spec)
    try:
        run_rounds(straight, 6)
        want = models(straight)
        want_state = [n.compressed.state_dict() for n in straight]
    finally:
        close_all(straight)
    _, _, first = make_nodes(4, *spec)
    try:
        run_rounds(first, 3)
        for n in first:
            n.save(tmp_path / f"node-{n.rank}.pt")
    finally:
        close_all(first)
    _, _, resumed = make_nodes(4, *spec)
    try:
        for n in resumed:
            n.load(tmp_path / f"node-{n.rank}.pt")
        assert [n.round for n in resumed] == [3] * 4
        run_rounds(resumed, 3)
        assert torch.equal(models(resumed), want)
        for n, ref in zip(resumed, want_state, strict=True):
            got = n.compressed.state_dict()
            for key in ("copy", "mixed", "error"):
                assert torch.equal(got[key], ref[key]), key
            assert all(torch.equal(a, b) for a, b in zip(got["replicas"], ref["replicas"]))
            assert got["replica_versions"] == ref["replica_versions"] == [6, 6]
        assert_replicas_equal_owners(resumed)
    finally:
        close_all(resumed)
    # the settings must match the checkpoint's
    for kw, match in (
        (dict(compress="none", feedback="none"), "written with compressed gossip"),
        (dict(compress="topk:0.1", feedback="choco:0.3"), "feedback='choco-econtrol:0.3,0.05'"),
    ):
        _, _, other = make_nodes(4, kw["compress"], kw["feedback"])
        try:
            with pytest.raises(ConfigError, match=match):
                other[0].load(tmp_path / "node-0.pt")
        finally:
            close_all(other)
