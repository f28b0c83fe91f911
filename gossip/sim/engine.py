"""The batched simulator: N virtual nodes in one process.

All nodes' models are the rows of one ``[N, P]`` tensor laid out by a :class:`ParamLayout`.
Local SGD runs for every node at once (``torch.func.functional_call`` + ``vmap``); a gossip round
is a sparse matrix product through the same algorithm functions the runtime uses
(:mod:`gossip.algorithms`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad_and_value, vmap
from tqdm.auto import tqdm

from ..config import to_dict
from ..errors import ConfigError
from ..layout import ParamLayout
from ..tasks import Task, get_task, partition
from ..topology import build_topology, check_stochastic
from .config import SimConfig, lr_at
from .rules import make_rule

#: node x test-sample products scored per evaluation when eval_samples is automatic
EVAL_BUDGET = 1_000_000


@dataclass
class SimResult:
    """What a run produced: ``summary`` (final figures, resolved config) and ``history``."""

    summary: dict
    history: list[dict] = field(default_factory=list)
    models: torch.Tensor | None = None  # [N, P] final (de-biased) models


class Shards:
    """Each node's training indices, padded into one ``[N, L]`` tensor for batched sampling."""

    def __init__(self, shards, device):
        lengths = [len(s) for s in shards]
        table = torch.zeros(len(shards), max(lengths), dtype=torch.int64)
        for i, s in enumerate(shards):
            table[i, : len(s)] = torch.as_tensor(s)
        self.table = table.to(device)
        self.lengths = torch.tensor(lengths, dtype=torch.float64, device=device)

    def sample(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """``[N, batch]`` train indices, drawn uniformly with replacement from each node's shard."""
        u = torch.rand(self.table.shape[0], batch, generator=gen, dtype=torch.float64)
        pos = (u.to(self.lengths.device) * self.lengths[:, None]).long()
        return torch.gather(self.table, 1, pos)


def initial_models(task: Task, layout: ParamLayout, cfg: SimConfig) -> torch.Tensor:
    """``[N, P]`` initial models: one shared draw, or one independent draw per node."""
    draws = 1 if cfg.init == "shared" else cfg.nodes
    rows = []
    for i in range(draws):
        torch.manual_seed(cfg.seed * 1_000_003 + i)
        rows.append(layout.flatten(task.model_fn()))
    X = torch.stack(rows)
    return X.expand(cfg.nodes, -1).clone() if draws == 1 else X


class BatchedModel:
    """Loss, gradient and predictions of N models at once (the rows of ``[N, P]``)."""

    def __init__(self, task: Task, layout: ParamLayout, device):
        self.task, self.layout = task, layout
        self.module = task.model_fn().to(device)

        def loss(flat, x, y):
            out = functional_call(self.module, self.layout.views(flat), (x,))
            return task.loss_fn(out, y)

        self._grad = vmap(grad_and_value(loss))
        self._forward = vmap(
            lambda flat, x: functional_call(self.module, self.layout.views(flat), (x,)),
            in_dims=(0, None),
        )

    def grad(self, X, xb, yb):
        """Per-node gradients ``[N, P]`` and minibatch losses ``[N]``."""
        return self._grad(X, xb, yb)

    @torch.no_grad()
    def evaluate(self, X, x, y, chunk_elems: int = 2**25):
        """Per-node test loss ``[N]`` and accuracy ``[N]`` (NaN for regression)."""
        n = X.shape[0]
        per = max(1, chunk_elems // max(1, len(x) * 16))
        losses, accs = [], []
        for s in range(0, n, per):
            out = self._forward(X[s : s + per], x)  # [c, T, C]
            if self.task.classification:
                picked = out.gather(-1, y.expand(out.shape[0], -1).unsqueeze(-1)).squeeze(-1)
                losses.append((torch.logsumexp(out, -1) - picked).mean(1))  # cross-entropy
                accs.append((out.argmax(-1) == y).float().mean(1))
            else:
                losses.append((out.squeeze(-1) - y).square().mean(1))
                accs.append(torch.full((out.shape[0],), float("nan")))
        return torch.cat(losses), torch.cat(accs)


def consensus_distance(Z: torch.Tensor) -> float:
    """sqrt(mean_i ||z_i - z_bar||^2): how far the nodes are from agreeing (0 = consensus)."""
    return float((Z - Z.mean(0, keepdim=True)).square().sum(1).mean().sqrt())


def simulate(cfg: SimConfig, task: Task | None = None, progress: bool = True) -> SimResult:
    """Run one experiment; ``task`` overrides ``cfg.task`` (a user's own model and data)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    task = task or get_task(cfg.task, **(cfg.task_options or {}))
    rounds = cfg.rounds or task.rounds
    lr = base_lr = cfg.lr or task.lr
    batch = cfg.batch_size or task.batch_size
    N = cfg.nodes

    schedule = build_topology(cfg.topology, N, weights=_weights_rule(cfg), seed=cfg.seed)
    if schedule.nodes != N:
        raise ConfigError(f"topology {cfg.topology!r} has {schedule.nodes} nodes, nodes={N}")
    if cfg.averaging in ("dpsgd", "variance_corrected"):
        check_stochastic(schedule.weights(0), kind="row")

    shards = partition(
        cfg.partition,
        num_samples=len(task.train[0]),
        labels=task.groups,
        nodes=N,
        alpha=cfg.alpha,
        seed=cfg.seed,
    )
    shards = Shards(shards, device)
    xtr, ytr = (t.to(device) for t in task.train)
    xte, yte = (t.to(device) for t in task.test)
    # Evaluation scores every node on the test set: bound its cost (node x sample products)
    # with a fixed test subset and a stride, unless the user set them.
    eval_samples = cfg.eval_samples or min(len(xte), max(500, EVAL_BUDGET // N))
    if eval_samples < len(xte):
        keep = torch.randperm(len(xte), generator=torch.Generator().manual_seed(0))
        xte, yte = xte[keep[:eval_samples]], yte[keep[:eval_samples]]
    eval_every = cfg.eval_every or max(1, math.ceil(N * len(xte) * rounds / (20 * EVAL_BUDGET)))

    layout = ParamLayout.from_module(task.model_fn())
    model = BatchedModel(task, layout, device)
    Z = initial_models(task, layout, cfg).to(device)  # de-biased models (what nodes train)
    rule = make_rule(cfg, schedule, layout, Z)
    velocity = torch.zeros_like(Z) if cfg.momentum else None
    gen = torch.Generator().manual_seed(cfg.seed)

    def minibatch_grad(X):
        idx = shards.sample(batch, gen)
        g, loss = model.grad(X, xtr[idx], ytr[idx])
        return (g.add(X, alpha=cfg.weight_decay) if cfg.weight_decay else g), loss

    history, bytes_total, reached = [], 0, None
    t_loop = time.perf_counter()
    bar = tqdm(range(1, rounds + 1), desc=f"sim {task.name}", disable=not progress, unit="round")
    for r in bar:
        lr = lr_at(cfg.lr_schedule, base_lr, r - 1, rounds)
        if rule.owns_update:
            Z, train_loss, sent = rule.update(r - 1, Z, minibatch_grad, lr)
        else:
            train_loss = torch.zeros(N, device=device)
            for _ in range(cfg.local_steps):
                g, loss = minibatch_grad(Z)
                if velocity is not None:
                    g = velocity.mul_(cfg.momentum).add_(g)
                Z = Z.sub(g, alpha=lr)
                train_loss += loss / cfg.local_steps
            Z, sent = rule.communicate(r - 1, Z)
        bytes_total += sent

        row = {"round": r, "train_loss": float(train_loss.mean())}
        if r % eval_every == 0 or r == rounds:
            test_loss, acc = model.evaluate(Z, xte, yte)
            row.update(
                accuracy_mean=float(acc.mean()),
                accuracy_min=float(acc.min()),
                accuracy_max=float(acc.max()),
                loss_mean=float(test_loss.mean()),
            )
            if (
                reached is None
                and cfg.target_accuracy
                and row["accuracy_mean"] >= cfg.target_accuracy
            ):
                reached = r
            bar.set_postfix(acc=f"{row['accuracy_mean']:.3f}", loss=f"{row['loss_mean']:.3f}")
        row.update(
            consensus_distance=consensus_distance(Z),
            bytes_sent_total=bytes_total,
            wall_seconds=time.perf_counter() - t_start,
        )
        history.append(row)
        if not math.isfinite(row["train_loss"]):
            raise ConfigError(
                f"training diverged at round {r} (train loss {row['train_loss']}); "
                f"lower lr={base_lr}"
            )

    last = history[-1]
    summary = {
        "task": task.name,
        "accuracy_mean": last.get("accuracy_mean"),
        "accuracy_min": last.get("accuracy_min"),
        "accuracy_max": last.get("accuracy_max"),
        "loss_mean": last.get("loss_mean"),
        "consensus_distance": last["consensus_distance"],
        "rounds": rounds,
        "rounds_to_target": reached,
        "bytes_sent_total": bytes_total,
        "bytes_sent_per_node": bytes_total / N,
        "wall_seconds": time.perf_counter() - t_start,
        "seconds_per_round": (time.perf_counter() - t_loop) / rounds,  # the loop, no setup
        "parameters": layout.numel,
        "eval_samples": len(xte),
        "eval_every": eval_every,
        "topology": {
            "spec": cfg.topology,
            "period": schedule.period,
            "directed": schedule.directed,
        },
        "config": {**to_dict(cfg), "rounds": rounds, "lr": base_lr, "batch_size": batch},
    }
    return SimResult(summary=summary, history=history, models=Z)


def _weights_rule(cfg: SimConfig) -> str:
    if cfg.weights != "auto":
        return cfg.weights
    return "push_sum" if cfg.averaging == "push_sum" else "auto"
