"""Compressed gossip in real processes: ``gossip launch`` starts 4 ZeroMQ nodes that train
``digits`` on a ring with top-1% CHOCO-SGD; they land where the simulator does on the same
settings and send >= 30x fewer bytes than dense gossip would.

The launcher runs in this process (``gossip.commands.launch.main``), so its cluster is always
closed, and its children killed, when the test ends, pass or fail.
"""

from __future__ import annotations

import json

import pytest

from gossip.commands.launch import main as launch_main
from gossip.sim import SimConfig, simulate

pytestmark = pytest.mark.multiproc

# 200 rounds of one local step: top-1% CHOCO needs many rounds to mix (the simulator: ~0.91
# mean accuracy and consensus distance ~0.37; without communication 0.90 and ~1.24; naive
# top-1% gossip without feedback ~0.2)
SETTINGS = {
    "task": "digits",
    "nodes": 4,
    "topology": "ring",
    "rounds": 200,
    "local_steps": 1,
    "batch_size": 32,
    "lr": 0.1,
    "threads": 1,
    "compress": "topk:0.01",
    "feedback": "choco:0.1",
}


@pytest.mark.timeout(240)
def test_launch_four_zmq_nodes_with_top1pct_choco(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--transport", "zmq", "--out", str(tmp_path), "--quiet", "--timeout-s", "180"]
    argv += ["--log-every", "50", "--round-deadline-s", "20"]
    for key, value in SETTINGS.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    code = launch_main(argv)
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nodes_finished"] == [0, 1, 2, 3] and summary["rounds"] == 200

    sim = simulate(SimConfig(**SETTINGS), progress=False).summary
    assert summary["accuracy_mean"] >= 0.85, summary
    assert abs(summary["accuracy_mean"] - sim["accuracy_mean"]) <= 0.04, (summary, sim)
    # the models mixed: twice the simulator's distance is still half the no-communication one
    assert summary["consensus_distance"] <= max(0.7, 2 * sim["consensus_distance"]), summary
    assert summary["resyncs_total"] == 0  # loopback loses nothing: no dense copy was needed

    # bytes are the transport's real counts; a dense run sends one model per message
    for r in range(4):
        node = json.loads((tmp_path / f"node-{r}.json").read_text())
        assert node["messages_sent"] == 200 * 2
        dense = node["messages_sent"] * node["dense_message_bytes"]
        assert 30 * node["bytes_sent"] <= dense, (node["bytes_sent"], dense)
    assert summary["bytes_sent_total"] == sum(
        json.loads((tmp_path / f"node-{r}.json").read_text())["bytes_sent"] for r in range(4)
    )
    assert 30 * summary["bytes_sent_per_node"] <= 400 * 4810 * 4
