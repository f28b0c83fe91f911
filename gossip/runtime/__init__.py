"""The runtime: one node process's loop (local steps, gossip rounds with deadlines, liveness,
checkpoints, metrics), its rendezvous, and coded worker groups (the exact gradient from the first
``n - s`` workers to answer; :mod:`gossip.runtime.group`).

Names are imported lazily, so ``import gossip.runtime.stragglers`` stays light.

Example::

    node = gossip.runtime.Node(model, optimizer, topology="ring", transport="zmq")
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Node": "gossip.runtime.node",
    "RoundReport": "gossip.runtime.node",
    "Neighbourhood": "gossip.runtime.node",
    "neighbourhood": "gossip.runtime.node",
    "PeerLiveness": "gossip.runtime.node",
    "save_checkpoint": "gossip.runtime.checkpoint",
    "load_checkpoint": "gossip.runtime.checkpoint",
    "checkpoint_path": "gossip.runtime.checkpoint",
    "World": "gossip.runtime.rendezvous",
    "world_from_env": "gossip.runtime.rendezvous",
    "read_peers_file": "gossip.runtime.rendezvous",
    "open_transport": "gossip.runtime.rendezvous",
    "CodedGroup": "gossip.runtime.group",
    "StepResult": "gossip.runtime.group",
    "CodedSweep": "gossip.runtime.group",
    "JobResult": "gossip.runtime.group",
    "SweepRound": "gossip.runtime.group",
    "Slowdown": "gossip.runtime.group",
    "full_batch_gradient": "gossip.runtime.group",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gossip.runtime' has no attribute {name!r}")
