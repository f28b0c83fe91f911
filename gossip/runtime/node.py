"""The node: one process's model, its neighbours, and the gossip rounds between them.

:class:`Node` wraps an ordinary model and optimizer. Their parameters become views of one flat
buffer (:meth:`gossip.layout.ParamLayout.bind_`), so a round sends one buffer and merges in place.
Every ``local_steps`` calls to :meth:`Node.step` it runs one gossip round with the rule from
:mod:`gossip.algorithms`:

- ``dpsgd``: ``x_i <- W_ii x_i + sum_j W_ij x_j`` (:func:`~gossip.algorithms.gossip_average_`);
- ``push_sum``: SGP; each message carries the model and its share of push-sum mass
  (:func:`~gossip.algorithms.push_sum_merge_`), so directed and irregular graphs stay unbiased;
- ``variance_corrected``: mix with self weight ``W_ii``, then restore each weight tensor's
  variance (:func:`~gossip.algorithms.variance_corrected_average`);
- ``none``: no communication (a baseline).

With ``compress``/``feedback`` (e.g. ``compress="topk:0.01", feedback="choco:0.1"``) a
``dpsgd`` node sends compressed messages instead: naive compressed gossip or CHOCO-SGD, with a
protocol that keeps the neighbours' public copies equal over a lossy network
(:mod:`gossip.runtime.compressed`).

**Synchronous** rounds (``mode="sync"``): send, then wait at most ``round_deadline_s`` for the
in-neighbours. One that misses the deadline is left out of this round: D-PSGD renormalises the
weights of those that arrived; push-sum adds the late message's mass in a later round (while it
is inside the transport's round window), so no mass is lost to a slow link. A neighbour
that sent nothing at all for ``down_after`` rounds is taken as down: it is no longer waited for
(so a dead peer costs ``down_after`` deadlines once, never a hang), push-sum keeps the share it
would have sent, and it is taken back as soon as a message from it arrives. A node that fell
behind by more than the transport's round window (it was paused, say) skips ahead to its
neighbours' round once a majority of them (or, when it is isolated, one of them several times in
a row) shows it valid messages from that far ahead; the rule and why one forged message cannot
trigger it are in :mod:`gossip.runtime.rounds`.

**Asynchronous** rounds (``mode="async"``): a background thread owns the transport, sends the
latest snapshot and collects what arrives while the caller computes. At round ``r`` the node
merges the freshest message of each neighbour whose round is at least ``r - max_staleness``,
waiting (at most ``round_deadline_s``) only for neighbours that are further behind: bounded
staleness, with communication overlapped with compute (:mod:`gossip.runtime.exchange`).

Example (add to an existing training script; under ``torchrun`` the rank, world size and
rendezvous come from the environment)::

    node = gossip.runtime.Node(model, optimizer, topology="ring", transport="zmq")
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        node.step()                   # every local_steps calls: one gossip round
    node.close()
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from ..algorithms import PushSumState
from ..algorithms.variance import TARGETS
from ..errors import ConfigError, TransportError
from ..layout import ParamLayout
from ..metrics import NodeMetrics
from ..ops import native_status
from ..topology import Schedule, build_topology
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .compressed import (
    check_compression,
    check_topology,
    make_compressed,
    max_message_bytes,
    parse_compression,
)
from .exchange import _Exchange
from .neighbours import (
    Neighbourhood,
    PeerLiveness,
    RoundReport,
    check_choice,
    check_int,
    check_seconds,
    neighbourhood,
)
from .rounds import SyncRounds

__all__ = ["Node", "Neighbourhood", "PeerLiveness", "RoundReport", "neighbourhood"]

log = logging.getLogger("gossip.node")

AVERAGING = ("dpsgd", "push_sum", "variance_corrected", "none")
MODES = ("sync", "async")


class Node(SyncRounds):
    """One gossip node around a user's model and optimizer (see the module docstring).

    Args:
        model: the ``nn.Module`` to train; its parameters are re-bound to one flat buffer.
        optimizer: the optimizer stepping ``model`` (kept in checkpoints); may be None.
        topology: a builder spec (``"ring"``, ``"torus"``, a graph file) or a built
            :class:`~gossip.topology.Schedule`; nodes are the ranks ``0 .. world_size-1``.
        transport: ``"zmq"``, ``"gloo"``, or a connected
            :class:`~gossip.transport.Transport` (then rank comes from it).
        averaging: ``dpsgd`` | ``push_sum`` | ``variance_corrected`` | ``none``.
        local_steps: calls to :meth:`step` per gossip round (H).
        mode: ``sync`` (deadline per round) or ``async`` (bounded staleness, overlapped).
        round_deadline_s: the longest a round waits for neighbours (seconds).
        startup_grace_s: the deadline of the first round, which absorbs start-up skew.
        max_staleness: async mode: the oldest neighbour round merged at round r is
            ``r - max_staleness``.
        down_after: rounds without any message before a neighbour counts as down.
        weights: mixing rule (``auto`` picks ``push_sum`` for push-sum averaging).
        compress: compressor spec of :func:`~gossip.algorithms.compression.make_compressor`
            (``topk:0.01``, ``randk:0.01``, ``quant:4``, ``sign``, ``bf16``; ``none``).
        feedback: ``none`` (naive compressed gossip when ``compress`` is set), ``choco:GAMMA``
            or ``choco-econtrol:GAMMA,ETA``; needs ``averaging="dpsgd"`` and ``mode="sync"``,
            and CHOCO a static undirected topology (:mod:`gossip.runtime.compressed`).
        public_copy_init: CHOCO's public copies start at ``zeros`` (always consistent) or at
            the ``model`` when every node starts from the same one (checked at round 0; a
            node that started elsewhere costs one dense resync).
        seed: seed of random topologies and of randomised compressors (rand-k, quant).
        rank, world_size: default from the environment (torchrun, ``GOSSIP_*``).
        world: a resolved :class:`~gossip.runtime.rendezvous.World` instead of rank/world_size.
        fail_fast: stop the whole job when one node fails (default: with torch.distributed,
            which cannot route around a dead peer): the first node to see a peer fail records
            why in the store, and every other node stops at its next round with that message,
            which names the dead rank, so torchrun can restart the job from checkpoints.
        metrics: a :class:`~gossip.metrics.NodeMetrics` (default: a new one, not served).
        **rendezvous: options of :func:`gossip.runtime.rendezvous.open_transport`
            (``peers``, ``bind``, ``run_id``, ``timeout_s``, ``transport_options``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        topology: str | Schedule = "ring",
        transport="zmq",
        averaging: str = "dpsgd",
        local_steps: int = 1,
        mode: str = "sync",
        round_deadline_s: float = 30.0,
        startup_grace_s: float = 60.0,
        max_staleness: int = 1,
        down_after: int = 3,
        weights: str = "auto",
        vc_target: str = "others",
        compress: str = "none",
        feedback: str = "none",
        public_copy_init: str = "zeros",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        world=None,
        fail_fast: bool | None = None,
        metrics: NodeMetrics | None = None,
        **rendezvous,
    ):
        check_choice("averaging", averaging, AVERAGING)
        check_choice("mode", mode, MODES)
        check_choice("vc_target", vc_target, TARGETS)
        check_int("local_steps", local_steps, 1)
        check_int("max_staleness", max_staleness, 0)
        check_seconds("round_deadline_s", round_deadline_s)
        check_seconds("startup_grace_s", startup_grace_s)
        compression = parse_compression(compress, feedback)
        check_compression(compression, mode=mode, averaging=averaging)
        self.model, self.optimizer = model, optimizer
        self.averaging, self.mode = averaging, mode
        self.local_steps = local_steps
        self.round_deadline_s = float(round_deadline_s)
        self.startup_grace_s = float(startup_grace_s)
        self.max_staleness, self.vc_target = max_staleness, vc_target
        self.seed = seed
        # load (or build, once per machine) the merge kernels now, so a just-in-time build
        # never eats into a round deadline
        log.info("merge kernels: %s", native_status())
        self.layout = ParamLayout.from_module(model)
        self.flat = self.layout.bind_(model)
        self.round = 0
        self.steps = 0
        self.push_sum = PushSumState.ones(None) if averaging == "push_sum" else None
        self.store = None
        self.world = None

        if isinstance(transport, str):
            from .rendezvous import open_transport, resolve_world

            self.world = world or resolve_world(rank=rank, world_size=world_size)
            self.rank, self.world_size = self.world.rank, self.world.world_size
        else:
            self.rank = transport.rank
            self.world_size = world_size
        rule = "push_sum" if averaging == "push_sum" and weights == "auto" else weights
        if isinstance(topology, Schedule):
            self.schedule = topology
        else:
            n = self.world_size
            if n is None:
                raise ConfigError("pass world_size= with a transport object and a topology spec")
            self.schedule = build_topology(topology, n, weights=rule, seed=seed)
        self.world_size = self.schedule.nodes
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank={self.rank} is outside topology of {self.world_size} nodes")
        period = self.schedule.period
        self._hoods = [neighbourhood(self.schedule.weights(r), self.rank) for r in range(period)]
        self.in_peers = sorted({p for h in self._hoods for p in h.in_peers})
        self.out_peers = sorted({p for h in self._hoods for p in h.out_peers})
        check_topology(compression, self._hoods)

        self.metrics = metrics if metrics is not None else NodeMetrics(self.rank)
        self.metrics.set_peers(sorted(set(self.in_peers) | set(self.out_peers)))
        if isinstance(transport, str):
            self.transport, self.store = open_transport(
                transport,
                self.world,
                in_peers=self.in_peers,
                out_peers=self.out_peers,
                message_bytes=max_message_bytes(compression, self.flat),
                window=max_staleness + 2,
                **rendezvous,
            )
        else:
            self.transport = transport
            if rendezvous:
                raise ConfigError(f"rendezvous options {sorted(rendezvous)} need a transport name")
        self.metrics.attach_transport(lambda: self.transport.stats)
        self.run_id = rendezvous.get("run_id", "gossip")
        if fail_fast is None:
            fail_fast = getattr(self.transport, "kind", "") == "torchdist"
        self.fail_fast = bool(fail_fast) and self.store is not None
        self.liveness = PeerLiveness(self.in_peers, down_after)
        # rejoining after falling behind (gossip.runtime.rounds): far-ahead rounds seen per
        # in-neighbour, and who the last round merged (None before the first round)
        self._rejoin_evidence: dict[int, list[int]] = {}
        self._last_merged: tuple[int, ...] | None = None
        self._rejoin_refused = False
        self._unconfirmed: set[int] = set()  # rejoined neighbours not yet heard from currently
        self._exchange = _Exchange(self) if mode == "async" and averaging != "none" else None
        self.compressed = make_compressed(self, compression, public_copy_init)
        self._closed = False

    # -- the training-loop API -----------------------------------------------------------------
    def step(self, loss: float | torch.Tensor | None = None) -> RoundReport | None:
        """Count one local step (call after ``optimizer.step()``); every ``local_steps`` calls,
        run one gossip round and return its report (None otherwise). ``loss`` is exported."""
        self.steps += 1
        self.metrics.local_steps.inc()
        if loss is not None:
            self.metrics.observe_loss(float(loss), "train")
        if self.steps % self.local_steps:
            return None
        return self.gossip()

    @torch.no_grad()
    def gossip(self) -> RoundReport:
        """Run round ``self.round`` now (send, wait within the deadline, merge)."""
        if self._closed:
            raise ConfigError(f"node {self.rank} is closed")
        r, t0 = self.round, time.perf_counter()
        if self.fail_fast:
            from .rendezvous import job_failure

            failure = job_failure(self.store, self.world, self.run_id)
            if failure is not None:
                raise TransportError(f"node {self.rank}: stopping, the job failed: {failure}")
        skipped = 0
        if self.mode == "sync" and self.averaging != "none":
            skipped = self._rejoin(r)
            r = self.round
        try:
            if self.averaging == "none":
                report = RoundReport(round=r)
            elif self.compressed is not None:
                report = self.compressed.round(r)
            elif self._exchange is not None:
                report = self._exchange.round(r)
            else:
                report = self._sync_round(r)
        except TransportError as e:
            if self.fail_fast:
                from .rendezvous import report_failure

                report_failure(self.store, self.world, str(e), self.run_id)
            raise
        report.seconds = time.perf_counter() - t0
        report.skipped = skipped
        self._last_merged = report.merged
        self.metrics.observe_round(r, report.seconds, report.wait_seconds, len(report.merged))
        if math.isfinite(report.consensus_distance):
            self.metrics.consensus_distance.set(report.consensus_distance)
        for p in report.missing:
            self.metrics.stragglers.labels(peer=str(p)).inc()
        self.round += 1
        return report

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain-data state: model buffer, optimizer, round, steps, RNG and algorithm state."""
        algorithm = {"averaging": self.averaging}
        if self.push_sum is not None:
            algorithm["push_sum_weight"] = self.push_sum.weight.clone()
        if self.compressed is not None:
            algorithm["compressed"] = self.compressed.state_dict()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "round": self.round,
            "steps": self.steps,
            "numel": self.layout.numel,
            "model": self.flat.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "rng": capture_rng(),
            "algorithm": algorithm,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (from the same rank, model and rule)."""
        for key, mine in (("rank", self.rank), ("numel", self.layout.numel),
                          ("world_size", self.world_size)):  # fmt: skip
            if state.get(key) != mine:
                raise ConfigError(
                    f"checkpoint has {key}={state.get(key)!r} but this node has {key}={mine}; "
                    "resume with the same rank, model and number of nodes"
                )
        if state["algorithm"].get("averaging") != self.averaging:
            raise ConfigError(
                f"checkpoint was written with averaging={state['algorithm'].get('averaging')!r}, "
                f"this node runs averaging={self.averaging!r}"
            )
        saved = state["algorithm"].get("compressed")
        if (saved is None) != (self.compressed is None):
            have = "without" if saved is None else "with"
            raise ConfigError(
                f"checkpoint was written {have} compressed gossip (compress/feedback), this "
                f"node runs {'with' if self.compressed is not None else 'without'}; resume "
                "with the same compress and feedback"
            )
        if self.compressed is not None:
            self.compressed.load_state_dict(saved)
        self.flat.copy_(state["model"])
        if self.optimizer is not None and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.push_sum is not None:
            self.push_sum = PushSumState(state["algorithm"]["push_sum_weight"].clone())
        restore_rng(state["rng"])
        self.round, self.steps = int(state["round"]), int(state["steps"])

    def save(self, path) -> None:
        """Write :meth:`state_dict` atomically to ``path`` (timed into the metrics)."""
        t0 = time.perf_counter()
        save_checkpoint(path, self.state_dict())
        self.metrics.checkpoint_duration.observe(time.perf_counter() - t0)

    def load(self, path) -> None:
        """Resume from a checkpoint written by :meth:`save`."""
        self.load_state_dict(load_checkpoint(path))

    # -- shutdown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background thread, close the transport and the metrics server."""
        if self._closed:
            return
        self._closed = True
        if self._exchange is not None:
            self._exchange.stop()
        self.transport.close()
        self.metrics.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
