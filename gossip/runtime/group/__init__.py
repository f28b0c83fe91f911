"""Coded worker groups: the exact full gradient from the first ``n - s`` workers to answer.

A group is a **master** (any process, e.g. a gossip node's) and ``n`` **workers** (processes
over ZeroMQ, or threads over the in-memory transport). The training set is split into ``n``
partitions; worker ``i`` holds the ``s + 1`` partitions a gradient code assigns it
(:mod:`gossip.algorithms.coding`). Every round:

1. the master broadcasts the current flat model (workers keep no model state of their own, so a
   worker that was slow, restarted or skipped rounds is never out of date);
2. each worker computes the partial gradients of its partitions at that model (sum of per-sample
   losses), encodes them into **one** vector with ``code.encode`` and sends it;
3. the master collects arrivals until at least ``n - s`` are in and they decode (it never waits
   for the slowest), decodes the exact sum of all partial gradients through the merge path
   (``code.decode`` -> :func:`gossip.ops.weighted_sum_`, float64), divides by the number of
   samples (the mean gradient of the whole training set) and applies the optimizer step.

A vector that arrives after its round is released and counted (``stats["late"]``), never mixed
into another round: messages are keyed by round. A round that cannot decode within
``round_timeout_s`` (or at once, when spawned workers are known dead) raises
:class:`~gossip.errors.DecodeError` and shuts the group down.

Stragglers are injected reproducibly (:class:`Slowdown` over :mod:`gossip.runtime.stragglers`):
worker ``w`` in round ``r`` sleeps ``(factor(w, r) - 1)`` times its measured compute time, so
"worker 3 is 4x slow" means its compute takes 4x as long, whatever the machine.

:class:`CodedSweep` runs **jobs in flight** (sequential gradient coding, :mod:`.sgc`): ``M``
models (e.g. one MLP with ``M`` learning rates) share one group; job ``t`` is a gradient of model
``t mod M`` and must decode by round ``t + T``. The scheme (GC, SR-SGC or M-SGC) says which
minitasks each worker computes per round; the master stops waiting once the missing workers form
an acceptable straggler set and falls back to waiting for all when the scheme says so.

Worker processes run ``python -m gossip.runtime.group worker --master ADDR --worker I --run-id
ID``; the master sends everything else (task, code, data plan, stragglers) over the wire.

The package: :mod:`.coded_group` (:class:`CodedGroup`, the API), :mod:`.sweep` (jobs in flight),
:mod:`.master` (the master's transport, worker lifecycle and collection), :mod:`.worker` (the
worker loop and the messages), :mod:`.plan` (data plans, shards, the reference gradient) and
:mod:`.slowdown` (injected stragglers).

Example::

    with CodedGroup("digits", n_workers=8, stragglers_s=1, transport="zmq",
                    slowdown=SlowWorkers(8, {3: 4.0})) as group:
        for _ in range(100):
            res = group.step()           # res.grad: exact mean gradient; res.missing: (3,)

A gossip node can be such a group: its process is the master, its workers share the node's data
shard, and a straggler inside the node costs nothing while the node keeps gossiping::

    node = Node(model, opt, topology="ring", transport="zmq")
    group = CodedGroup("digits", model, optimizer=opt, n_workers=4, stragglers_s=1,
                       shard={"nodes": node.world_size, "rank": node.rank})
    for _ in range(rounds):
        group.step()                     # exact gradient of this node's shard, first n - s
        node.step()                      # one gossip round with the neighbours
"""

from .coded_group import WAITS, CodedGroup, StepResult
from .master import TRANSPORTS
from .plan import SHARD_KEYS, DataPlan, full_batch_gradient, shard_ids
from .slowdown import Slowdown
from .sweep import SWEEP_SCHEMES, CodedSweep, JobResult, SweepRound
from .worker import FIRST_ROUND, main, run_worker

__all__ = [
    "CodedGroup",
    "StepResult",
    "CodedSweep",
    "JobResult",
    "SweepRound",
    "DataPlan",
    "Slowdown",
    "shard_ids",
    "full_batch_gradient",
    "run_worker",
    "main",
    "FIRST_ROUND",
    "TRANSPORTS",
    "WAITS",
    "SWEEP_SCHEMES",
    "SHARD_KEYS",
]
