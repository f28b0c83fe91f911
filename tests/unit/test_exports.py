"""The public names: every exported name resolves, and ``import gossip`` stays light."""

import subprocess
import sys

import pytest

import gossip
import gossip.algorithms
import gossip.runtime


@pytest.mark.parametrize(
    "module", [gossip, gossip.runtime, gossip.algorithms], ids=lambda m: m.__name__
)
def test_every_exported_name_resolves(module):
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"{module.__name__} exports names it cannot resolve: {missing}"


def test_coded_group_and_node_are_public():
    from gossip.runtime.group import CodedGroup
    from gossip.runtime.node import Node

    assert gossip.CodedGroup is CodedGroup and gossip.runtime.CodedGroup is CodedGroup
    assert gossip.Node is Node


def test_split_modules_keep_their_import_paths():
    from gossip.algorithms.compression import TopK, make_compressor
    from gossip.algorithms.sgc import MultiplexedSGC, bursty_pattern
    from gossip.runtime.group import FIRST_ROUND, CodedSweep, DataPlan, run_worker

    assert isinstance(make_compressor("topk:3"), TopK)
    assert gossip.algorithms.make_compressor is make_compressor
    assert gossip.algorithms.MultiplexedSGC is MultiplexedSGC
    assert gossip.algorithms.bursty_pattern is bursty_pattern
    assert gossip.runtime.CodedSweep is CodedSweep
    assert FIRST_ROUND == 2 and callable(run_worker) and DataPlan.__module__.endswith(".plan")


def test_import_gossip_loads_nothing_else():
    code = (
        "import sys, gossip; print([m for m in sys.modules if m.startswith(('torch', 'gossip.'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
