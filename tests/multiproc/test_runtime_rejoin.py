"""A ZeroMQ node process that is stopped (SIGSTOP) for longer than the round window, then
continued (SIGCONT), rejoins its neighbours instead of training alone.

The stop and the continue are keyed to rounds the processes logged, not to sleeps: the victim is
stopped once it logged round ``STOP_AT``, and continued once a neighbour logged a round more than
the window beyond that (and at least a few deadlines later). Children are always killed at the
end, pass or fail.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from gossip.launcher import LocalCluster

pytestmark = pytest.mark.multiproc

ENV = {"GOSSIP_MERGE_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
DEADLINE_S = 0.5
STOP_AT, AHEAD = 5, 40  # continue once a neighbour is AHEAD rounds past the stop (window: 3)
ARGS = ["--task", "digits", "--topology", "ring", "--rounds", "400", "--local-steps", "1",
        "--batch-size", "16", "--lr", "0.1", "--threads", "1", "--log-every", "1",
        "--transport", "zmq", "--round-deadline-s", str(DEADLINE_S)]  # fmt: skip
VICTIM, NEIGHBOUR = 2, 1


def round_of(line: str) -> int | None:
    m = re.search(r"round (\d+)/\d+", line)
    return int(m.group(1)) if m else None


@pytest.mark.timeout(120)
def test_a_stopped_zmq_node_rejoins_after_sigcont(tmp_path):
    state = {"stopped": None, "stop_round": None, "continued": None, "lines": []}

    def on_line(rank: int, line: str) -> None:
        state["lines"].append((rank, line))
        r = round_of(line)
        if r is None:
            return
        cluster = state["cluster"]
        if rank == VICTIM and r >= STOP_AT and state["stopped"] is None:
            cluster.kill(VICTIM, signal.SIGSTOP)
            state["stopped"], state["stop_round"] = time.monotonic(), r
        elif (
            rank == NEIGHBOUR
            and state["stopped"] is not None
            and state["continued"] is None
            and r >= state["stop_round"] + AHEAD
            and time.monotonic() - state["stopped"] >= 4 * DEADLINE_S
        ):
            cluster.kill(VICTIM, signal.SIGCONT)
            state["continued"] = time.monotonic()

    cluster = LocalCluster(4, [*ARGS, "--out", str(tmp_path)], env=ENV, stream=None,
                           on_line=on_line)  # fmt: skip
    state["cluster"] = cluster
    try:
        with cluster:
            codes = cluster.wait(90)
            cluster.kill(VICTIM, signal.SIGCONT)  # never leave it stopped, pass or fail
    finally:
        cluster.close()
    tails = "\n".join(f"rank {r}: exit {c}\n{cluster.tail(r, 8)}" for r, c in codes.items())
    assert state["continued"] is not None, tails
    assert all(c == 0 for c in codes.values()), tails
    lines = state["lines"]
    assert any(r == VICTIM and "fell behind" in ln for r, ln in lines), tails
    for p in (1, 3):
        assert any(r == p and f"neighbour {VICTIM} is back" in ln for r, ln in lines), tails
    prom = (tmp_path / f"node-{VICTIM}.prom").read_text()
    skipped = float(re.search(r"^gossip_rounds_skipped_total (\S+)", prom, re.M).group(1))
    assert skipped >= AHEAD - 4, prom
    for p in (1, 3):
        other = (tmp_path / f"node-{p}.prom").read_text()
        assert f'gossip_peer_up{{peer="{VICTIM}"}} 1.0' in other
