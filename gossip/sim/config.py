"""The simulator's settings (one keyword-only dataclass, validated on creation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

AVERAGING = ("dpsgd", "push_sum", "variance_corrected", "allreduce", "none")
INITS = ("shared", "independent")
PARTITIONS = ("iid", "dirichlet")
VC_TARGETS = ("others", "follow_beta", "self")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(kw_only=True)
class SimConfig:
    """One simulated experiment.

    Rounds: each node takes ``local_steps`` SGD steps on minibatches of its own shard, then one
    gossip round with its neighbours under ``averaging``:

    - ``dpsgd``: x_i <- sum_j W_ij x_j (needs row-stochastic weights; doubly for an unbiased mean);
    - ``push_sum``: SGP with column-stochastic weights and de-biasing (directed graphs);
    - ``variance_corrected``: D-PSGD mixing, then each weight tensor rescaled to the target
      variance (``vc_target``; ALGORITHMS.md section 1);
    - ``allreduce``: the exact mean of all nodes (what DDP / FedAvg compute) — a baseline;
    - ``none``: no communication — a baseline.

    ``lr``, ``batch_size`` and ``rounds`` default to the task's own (``None``). ``topology`` is
    a builder name (``ring``, ``torus``, ``random_regular:degree=6``, ...) or a graph file.
    ``compress`` (``topk:0.01``, ``randk:0.01``, ``quant:4``, ``sign``, ``bf16``, ``none``) and
    ``feedback`` (``choco:GAMMA``, ``choco-econtrol:GAMMA,ETA``, ``motef:GAMMA,LAMBDA`` for
    gossip; ``ef14``, ``ef21``, ``econtrol:ETA`` with ``averaging="allreduce"``) compress the
    messages (see :mod:`gossip.sim.rules`).
    ``init="independent"`` draws every node's initial model separately (the vanishing-variance
    setting); ``"shared"`` starts all nodes from one model, as DDP does.
    """

    task: str = "digits"
    task_options: dict | None = None
    nodes: int = 16
    topology: str = "ring"
    weights: str = "auto"
    averaging: str = "dpsgd"
    rounds: int | None = None
    local_steps: int = 1
    lr: float | None = None
    lr_schedule: str = "constant"
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int | None = None
    partition: str = "iid"
    alpha: float = 0.5
    init: str = "shared"
    vc_target: str = "others"
    vc_correct_bias: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_samples: int = 0
    target_accuracy: float | None = None
    device: str = "cpu"
    threads: int = 0
    compress: str = "none"
    feedback: str = "none"

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.nodes >= 1, f"nodes={self.nodes} must be >= 1")
        need(self.averaging in AVERAGING, f"averaging={self.averaging!r}; valid: {AVERAGING}")
        need(self.init in INITS, f"init={self.init!r}; valid: {INITS}")
        need(self.partition in PARTITIONS, f"partition={self.partition!r}; valid: {PARTITIONS}")
        need(self.vc_target in VC_TARGETS, f"vc_target={self.vc_target!r}; valid: {VC_TARGETS}")
        need(self.rounds is None or self.rounds >= 1, f"rounds={self.rounds} must be >= 1")
        need(self.local_steps >= 1, f"local_steps={self.local_steps} must be >= 1")
        need(self.lr is None or self.lr > 0, f"lr={self.lr} must be > 0")
        need(
            self.lr_schedule in LR_SCHEDULES,
            f"lr_schedule={self.lr_schedule!r}; valid: {LR_SCHEDULES}",
        )
        need(0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(
            self.batch_size is None or self.batch_size >= 1,
            f"batch_size={self.batch_size} must be >= 1",
        )
        need(self.alpha > 0, f"alpha={self.alpha} must be > 0")
        need(self.threads >= 0, f"threads={self.threads} must be >= 0 (0 = torch's default)")
        need(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0 (0 = automatic)")
        need(self.eval_samples >= 0, f"eval_samples={self.eval_samples} must be >= 0 (0 = all)")
        need(
            self.target_accuracy is None or 0 < self.target_accuracy <= 1,
            f"target_accuracy={self.target_accuracy} must be in (0, 1]",
        )


def lr_at(schedule: str, base: float, r: int, rounds: int) -> float:
    """The learning rate of round ``r`` (0-based): constant, or cosine from ``base`` to 0."""
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * r / rounds))
    return base
