"""``gossip run``: one node process on a built-in task (what containers, torchrun and
``gossip launch`` start).

Settings come from defaults < ``--config FILE`` < ``GOSSIP_*`` env < flags; the simulator's flags
(``--task``, ``--topology``, ``--rounds``, ``--averaging``, ...) mean the same here. Rank and
world size come from ``--rank``/``--nodes`` (``GOSSIP_RANK``/``GOSSIP_NODES``), else from
torchrun's ``RANK``/``WORLD_SIZE``. ``--averaging allreduce`` runs the DDP baseline instead
(gradient all-reduce every step over gloo). ``--compress``/``--feedback`` (``GOSSIP_COMPRESS``,
``GOSSIP_FEEDBACK``) send compressed messages: naive compressed gossip, ``choco:GAMMA`` or
``choco-econtrol:GAMMA,ETA`` (:mod:`gossip.runtime.compressed`); with ``--init shared`` the
public copies start from the common first model.

Writes into ``--out``: ``node-<rank>.json`` (final accuracy and loss, bytes, stragglers, dead
peers, history), ``node-<rank>.prom`` (the last metrics scrape) and ``models/node-<rank>.pt``
(the final model, for the launcher's consensus distance).

Example::

    torchrun --standalone --nproc-per-node 4 -m gossip run --task digits --topology ring
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import load_file, resolve, to_dict
from ..errors import ConfigError, GossipError
from ..sim.config import SimConfig, lr_at
from .sim import FLAGS as SIM_FLAGS
from .sim import _task_options

log = logging.getLogger("gossip.run")

TRANSPORTS = ("zmq", "gloo")
MODES = ("sync", "async")
RESUME = ("no", "auto", "yes")

RUN_FLAGS = {
    "transport": (str, "zmq | gloo (default zmq)"),
    "mode": (str, "sync (deadline per round) | async (bounded staleness, overlapped)"),
    "rank": (int, "this node's rank (default: RANK from torchrun)"),
    "master_addr": (str, "rendezvous store host (default: MASTER_ADDR)"),
    "master_port": (int, "rendezvous store port (default: MASTER_PORT)"),
    "peers": (str, "static peers file {rank: tcp://host:port} instead of a store"),
    "bind": (str, "ZeroMQ endpoint to listen on (default tcp://<auto>:0)"),
    "run_id": (str, "run id carried by every message (default gossip)"),
    "round_deadline_s": (float, "longest wait for neighbours in a round, seconds (default 10)"),
    "startup_grace_s": (float, "deadline of the first round, seconds (default 60)"),
    "max_staleness": (int, "async: oldest neighbour round merged is r - this (default 1)"),
    "down_after": (int, "rounds without messages before a neighbour counts as down (3)"),
    "peer_timeout_s": (float, "gloo: a silent peer fails the run after this (default 30)"),
    "rendezvous_timeout_s": (float, "how long to wait for all nodes to join (default 300)"),
    "metrics_port": (int, "serve Prometheus /metrics on this base port + rank (0 = any)"),
    "metrics_host": (str, "metrics listen address (default 0.0.0.0)"),
    "checkpoint_dir": (str, "write node-<rank>.pt here"),
    "checkpoint_every": (int, "checkpoint every K rounds (0 = only at the end)"),
    "resume": (str, "continue from --checkpoint-dir: yes (must exist) | auto (if any) | no"),
    "out": (str, "directory for node-<rank>.json, .prom and the final model"),
    "log_every": (int, "log a progress line every K rounds (default 10)"),
}


@dataclass(kw_only=True)
class RunConfig(SimConfig):
    """One node process: the simulator's experiment settings plus where and how to run.

    ``nodes`` is the world size. Deadlines are in seconds; ``metrics_port`` is a base port
    (node r serves on base + r; 0 picks a free port; ``None`` serves nothing).
    """

    transport: str = "zmq"
    mode: str = "sync"
    rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    peers: str | None = None
    bind: str | None = None
    run_id: str = "gossip"
    round_deadline_s: float = 10.0
    startup_grace_s: float = 60.0
    max_staleness: int = 1
    down_after: int = 3
    peer_timeout_s: float = 30.0
    rendezvous_timeout_s: float = 300.0
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: str = "no"
    out: str | None = None
    log_every: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport={self.transport!r}; valid: {', '.join(TRANSPORTS)}")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; valid: {', '.join(MODES)}")
        if self.averaging == "allreduce" and self.transport != "gloo":
            raise ConfigError(
                f"averaging='allreduce' (the DDP baseline) runs over gloo; got "
                f"transport={self.transport!r}: add --transport gloo"
            )
        if self.compress != "none" or self.feedback != "none":
            from ..runtime.compressed import check_compression, parse_compression

            spec = parse_compression(self.compress, self.feedback)
            check_compression(spec, mode=self.mode, averaging=self.averaging)
        if self.resume not in RESUME:
            raise ConfigError(f"resume={self.resume!r}; valid: {', '.join(RESUME)}")
        if self.resume != "no" and not self.checkpoint_dir:
            raise ConfigError(f"resume={self.resume!r} needs checkpoint_dir (--checkpoint-dir)")
        if self.checkpoint_every < 0 or self.log_every < 0:
            raise ConfigError(
                f"checkpoint_every={self.checkpoint_every} and log_every={self.log_every} "
                "must be >= 0"
            )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of settings")
    for name, (tp, help_) in {**SIM_FLAGS, **RUN_FLAGS}.items():
        flag = "--" + name.replace("_", "-")
        if name == "resume":  # a bare --resume means "yes"
            p.add_argument(flag, dest=name, nargs="?", const="yes", default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, type=tp, default=None, help=help_)
    p.add_argument(
        "--task-option", action="append", default=[], metavar="KEY=VALUE",
        help="option for the task builder, e.g. hidden=128 (repeatable)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace, environ=None) -> RunConfig:
    """Pure translation of parsed flags (+ environment) into a validated :class:`RunConfig`.

    Without ``--nodes``/``GOSSIP_NODES``/a file setting, the world size is torchrun's
    ``WORLD_SIZE``; the rank likewise falls back to ``RANK`` (see
    :func:`gossip.runtime.rendezvous.world_from_env`).
    """
    environ = os.environ if environ is None else environ
    flags = {name: getattr(args, name, None) for name in {**SIM_FLAGS, **RUN_FLAGS}}
    flags["task_options"] = _task_options(getattr(args, "task_option", []) or [])
    from_file = load_file(args.config) if getattr(args, "config", None) else {}
    if flags["nodes"] is None and "GOSSIP_NODES" not in environ and "nodes" not in from_file:
        if environ.get("WORLD_SIZE"):
            flags["nodes"] = environ["WORLD_SIZE"]
    return resolve(RunConfig, file=getattr(args, "config", None), environ=environ, flags=flags)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from ..runtime.rendezvous import resolve_world

    world = resolve_world(
        rank=cfg.rank,
        world_size=cfg.nodes,
        master_addr=cfg.master_addr,
        master_port=cfg.master_port,
    )
    result = run_ddp(cfg, world) if cfg.averaging == "allreduce" else run_node(cfg, world)
    keys = ("rank", "accuracy", "loss", "rounds", "bytes_sent", "wall_seconds")
    print(json.dumps({k: result.get(k) for k in keys}))
    return 0


# -- one node's program ---------------------------------------------------------------------------
def _setup(cfg: RunConfig, world):
    """Task, this node's shard, model (seeded as the simulator seeds it), optimizer, settings."""
    import torch

    from ..tasks import get_task, partition

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = get_task(cfg.task, **(cfg.task_options or {}))
    shards = partition(
        cfg.partition,
        num_samples=len(task.train[0]),
        labels=task.groups,
        nodes=world.world_size,
        alpha=cfg.alpha,
        seed=cfg.seed,
    )
    shard = torch.as_tensor(shards[world.rank], device=cfg.device)
    torch.manual_seed(cfg.seed * 1_000_003 + (world.rank if cfg.init == "independent" else 0))
    model = task.model_fn().to(cfg.device)
    torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (world.rank + 1))  # this node's batches
    lr = cfg.lr or task.lr
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    xte, yte = task.test
    if cfg.eval_samples and cfg.eval_samples < len(xte):
        keep = torch.randperm(len(xte), generator=torch.Generator().manual_seed(0))
        xte, yte = xte[keep[: cfg.eval_samples]], yte[keep[: cfg.eval_samples]]
    data = {
        "train": tuple(t.to(cfg.device) for t in task.train),
        "test": (xte.to(cfg.device), yte.to(cfg.device)),
    }
    settings = {
        "lr": lr,
        "batch_size": cfg.batch_size or task.batch_size,
        "rounds": cfg.rounds or task.rounds,
    }
    return task, shard, model, opt, data, settings


def _evaluate(task, model, data) -> tuple[float, float]:
    """Test loss and accuracy (NaN for regression) of ``model``."""
    import torch

    x, y = data["test"]
    with torch.no_grad():
        out = model(x)
        loss = float(task.loss_fn(out, y))
        acc = float((out.argmax(-1) == y).float().mean()) if task.classification else float("nan")
    return loss, acc


def _train_step(task, model, opt, shard, data, batch: int):
    import torch

    x, y = data["train"]
    idx = shard[torch.randint(len(shard), (batch,), device=shard.device)]
    opt.zero_grad(set_to_none=False)  # keeps the gradients in the node's flat grad buffer
    loss = task.loss_fn(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    return loss.detach()


def run_node(cfg: RunConfig, world) -> dict:
    """Train this node for ``rounds`` gossip rounds; returns (and writes) its results."""
    from collections import Counter

    from .. import __version__
    from ..metrics import NodeMetrics
    from ..runtime.checkpoint import checkpoint_path
    from ..runtime.node import Node
    from ..runtime.rendezvous import publish

    t_start = time.perf_counter()
    task, shard, model, opt, data, s = _setup(cfg, world)
    rounds = s["rounds"]
    info = {"transport": cfg.transport, "topology": cfg.topology, "averaging": cfg.averaging,
            "mode": cfg.mode, "version": __version__}  # fmt: skip
    metrics = NodeMetrics(world.rank, info=info)
    port = None
    if cfg.metrics_port is not None:
        port = metrics.serve(cfg.metrics_port + world.rank if cfg.metrics_port else 0,
                             cfg.metrics_host)  # fmt: skip
        log.info("node %d: metrics on port %d", world.rank, port)
    try:
        node = Node(
            model, opt, topology=cfg.topology, transport=cfg.transport,
            averaging=cfg.averaging, local_steps=cfg.local_steps, mode=cfg.mode,
            round_deadline_s=cfg.round_deadline_s, startup_grace_s=cfg.startup_grace_s,
            max_staleness=cfg.max_staleness, down_after=cfg.down_after, weights=cfg.weights,
            vc_target=cfg.vc_target, compress=cfg.compress, feedback=cfg.feedback,
            public_copy_init="model" if cfg.init == "shared" else "zeros",
            seed=cfg.seed, world=world, metrics=metrics,
            peers=cfg.peers, bind=cfg.bind, run_id=cfg.run_id,
            timeout_s=cfg.rendezvous_timeout_s, peer_timeout_s=cfg.peer_timeout_s,
        )  # fmt: skip
    except BaseException:
        metrics.close()
        raise
    try:
        if node.store is not None and port is not None:
            publish(node.store, world, "metrics_port", str(port), run_id=cfg.run_id)
        ckpt = checkpoint_path(cfg.checkpoint_dir, world.rank) if cfg.checkpoint_dir else None
        if ckpt is not None and (cfg.resume != "no" or world.restart_count > 0):
            if ckpt.exists():
                node.load(ckpt)
                log.info("node %d: resumed from %s at round %d", world.rank, ckpt, node.round)
            elif cfg.resume == "yes":
                raise ConfigError(f"resume='yes' but there is no checkpoint at {str(ckpt)!r}")
        eval_every = cfg.eval_every or max(1, rounds // 10)
        history, stragglers, row = [], Counter(), {}
        t_loop, steps0, rounds0 = time.perf_counter(), node.steps, node.round
        while node.round < rounds:
            for group in opt.param_groups:  # a function of the round, so a resumed run agrees
                group["lr"] = lr_at(cfg.lr_schedule, s["lr"], node.round, rounds)
            train_loss = 0.0
            for _ in range(cfg.local_steps):
                loss = _train_step(task, model, opt, shard, data, s["batch_size"])
                report = node.step(loss)
                train_loss += float(loss) / cfg.local_steps
            r = node.round
            stragglers.update(report.missing)
            row = {"round": r, "train_loss": train_loss, "merged": len(report.merged),
                   "wait_seconds": report.wait_seconds, "down": list(report.down)}  # fmt: skip
            if r % eval_every == 0 or r == rounds:
                row["loss"], row["accuracy"] = _evaluate(task, model, data)
                metrics.observe_loss(row["loss"], "test")
                metrics.accuracy.set(row["accuracy"])
            history.append(row)
            if cfg.log_every and (r % cfg.log_every == 0 or r == rounds):
                log.info(
                    "node %d: round %d/%d train_loss %.4f accuracy %s merged %d down %s",
                    world.rank, r, rounds, train_loss, f"{row.get('accuracy', float('nan')):.4f}",
                    len(report.merged), list(report.down),
                )  # fmt: skip
            if ckpt is not None and cfg.checkpoint_every and r % cfg.checkpoint_every == 0:
                node.save(ckpt)
        loop_s = time.perf_counter() - t_loop
        if ckpt is not None:
            node.save(ckpt)
        loss, acc = _evaluate(task, model, data)
        stats = node.transport.stats
        result = {
            "rank": world.rank,
            "world_size": world.world_size,
            "task": task.name,
            "accuracy": acc,
            "loss": loss,
            "train_loss": row.get("train_loss"),
            "rounds": node.round,
            "steps": node.steps,
            "seconds_per_round": loop_s / max(1, node.round - rounds0),
            "seconds_per_step": loop_s / max(1, node.steps - steps0),
            "wall_seconds": time.perf_counter() - t_start,
            "bytes_sent": sum(stats.bytes_sent.values()),
            "messages_sent": sum(stats.messages_sent.values()),
            "dense_message_bytes": node.layout.numel * node.flat.element_size(),
            "bytes_received": sum(stats.bytes_received.values()),
            "stragglers": {str(p): n for p, n in sorted(stragglers.items())},
            "down": sorted(node.liveness.down),
            "transport_stats": stats.as_dict(),
            "compressed": node.compressed.summary() if node.compressed is not None else None,
            "metrics_port": port,
            "address": node.transport.address,
            "parameters": node.layout.numel,
            "history": history,
            "config": {**to_dict(cfg), **s},
        }
        if cfg.out:
            _write_results(cfg.out, world.rank, result, node.flat, metrics.exposition())
        if node.store is not None:  # let the neighbours take our last messages before we go
            from ..runtime.rendezvous import wait_for_all

            publish(node.store, world, "done", "1", run_id=cfg.run_id)
            wait_for_all(node.store, world, "done", cfg.round_deadline_s, run_id=cfg.run_id)
        return result
    finally:
        node.close()


def _write_results(out: str, rank: int, result: dict, flat, exposition: str) -> None:
    from ..runtime.checkpoint import save_checkpoint

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"node-{rank}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (d / f"node-{rank}.prom").write_text(exposition)
    save_checkpoint(d / "models" / f"node-{rank}.pt", {"model": flat.detach().cpu()})


# -- the DDP baseline --------------------------------------------------------------------------
def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: ``2 (n - 1) / n * nbytes``."""
    return int(round(2 * (world_size - 1) * nbytes / world_size)) if world_size > 1 else 0


def run_ddp(cfg: RunConfig, world) -> dict:
    """The baseline: the same model, data and steps under DistributedDataParallel (gloo)."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed import PrefixStore
    from torch.nn.parallel import DistributedDataParallel

    from ..runtime.rendezvous import connect_store

    t_start = time.perf_counter()
    task, shard, model, opt, data, s = _setup(cfg, world)
    store = connect_store(world, cfg.rendezvous_timeout_s)
    dist.init_process_group(
        "gloo",
        store=PrefixStore(f"gossip/{cfg.run_id}/{world.restart_count}/ddp/", store),
        rank=world.rank,
        world_size=world.world_size,
        timeout=timedelta(seconds=cfg.peer_timeout_s),
    )
    try:
        ddp = DistributedDataParallel(model)
        steps = s["rounds"] * cfg.local_steps
        t_loop = time.perf_counter()
        for _ in range(steps):
            loss = _train_step(task, ddp, opt, shard, data, s["batch_size"])
        loop_s = time.perf_counter() - t_loop
        test_loss, acc = _evaluate(task, model, data)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        result = {
            "rank": world.rank,
            "world_size": world.world_size,
            "task": task.name,
            "accuracy": acc,
            "loss": test_loss,
            "train_loss": float(loss),
            "rounds": s["rounds"],
            "steps": steps,
            "seconds_per_step": loop_s / max(1, steps),
            "seconds_per_round": loop_s / max(1, steps),
            "wall_seconds": time.perf_counter() - t_start,
            "bytes_sent": steps * ring_allreduce_bytes(nbytes, world.world_size),
            "bytes_sent_estimated": True,
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": {**to_dict(cfg), **s},
        }
        if cfg.out:
            from ..layout import ParamLayout

            flat = ParamLayout.from_module(model).flatten(model)
            _write_results(cfg.out, world.rank, result, flat, "")
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``python -m gossip.commands.run``: the same as ``gossip run``."""
    parser = argparse.ArgumentParser(prog="gossip run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run(args)
    except GossipError as e:
        print(f"gossip run: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
