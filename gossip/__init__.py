"""gossip: a decentralized (gossip) training runtime for PyTorch.

The public names are imported lazily, so ``import gossip`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "GossipError": "gossip.errors",
    "ConfigError": "gossip.errors",
    "TopologyError": "gossip.errors",
    "ParamLayout": "gossip.layout",
    "build_topology": "gossip.topology",
    "mixing_weights": "gossip.topology",
    "spectral_gap": "gossip.topology",
    "Schedule": "gossip.topology",
    "describe": "gossip.topology",
    "SimConfig": "gossip.sim",
    "simulate": "gossip.sim",
    "Task": "gossip.tasks",
    "Node": "gossip.runtime",
    "CodedGroup": "gossip.runtime",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gossip' has no attribute {name!r}")
