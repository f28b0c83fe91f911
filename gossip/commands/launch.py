"""``gossip launch --nodes N``: N local node processes on loopback, one summary.

Takes the simulator's flags (``--task``, ``--topology``, ``--rounds``, ``--seed``, ...) and the
node's (``--transport zmq|gloo``, ``--mode``, ``--round-deadline-s``, ...), starts N copies of
``gossip run`` around one rendezvous store (:class:`gossip.launcher.LocalCluster`), streams their
logs with a ``[rank r]`` prefix, and writes ``summary.json`` (the simulator's keys) plus each
node's ``node-<rank>.json`` into ``--out``. ``--baseline ddp`` runs the same model, data and
steps as N-process DDP (gradient all-reduce over gloo) instead: the reference for
``bench/bench_gossip_vs_ddp.py`` (it drops ``--compress``/``--feedback``: the reference is dense).
``bytes_sent_total``/``bytes_sent_per_node`` are the transports' own counts, so a compressed run
(``--compress topk:0.01 --feedback choco:0.2``) reports the bytes it really sent.

Example::

    gossip launch --nodes 8 --task digits --topology ring --transport zmq --out runs/ring8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from ..errors import GossipError
from .run import RUN_FLAGS
from .run import add_arguments as add_run_arguments
from .run import config_from_args as run_config
from .sim import FLAGS as SIM_FLAGS

#: Flags the launcher sets itself for each node (rank and rendezvous).
LAUNCHER_OWNED = ("rank", "master_addr", "master_port", "peers", "bind")
BASELINES = ("none", "ddp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default="none",
        help="ddp: run N-process DDP (all-reduce every step, gloo) on the same model instead",
    )
    p.add_argument("--timeout-s", type=float, default=None, help="stop every node after this")
    p.add_argument("--quiet", action="store_true", help="do not stream the nodes' logs")


def child_args(args: argparse.Namespace, out: str) -> list[str]:
    """The command line every node gets: the flags given here, minus the launcher's own."""
    argv: list[str] = []
    if getattr(args, "config", None):
        argv += ["--config", args.config]
    for name in {**SIM_FLAGS, **RUN_FLAGS}:
        value = getattr(args, name, None)
        if name in LAUNCHER_OWNED or name == "out" or value is None:
            continue
        if args.baseline == "ddp" and name in ("compress", "feedback", "averaging"):
            continue  # the reference is dense DDP
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    for item in getattr(args, "task_option", []) or []:
        argv += ["--task-option", item]
    if args.baseline == "ddp":
        argv += ["--averaging", "allreduce", "--transport", "gloo"]
    return [*argv, "--out", out]


def launch_plan(args: argparse.Namespace, environ=None):
    """Pure translation: ``(config, nodes, node argv, out dir)``; validates every setting."""
    for name in LAUNCHER_OWNED:
        if getattr(args, name, None) is not None:
            raise GossipError(
                f"--{name.replace('_', '-')} is set by the launcher for each node; leave it out "
                "(use torchrun or a peers file to place nodes yourself)"
            )
    out = args.out or tempfile.mkdtemp(prefix="gossip-launch-")
    argv = child_args(args, out)
    probe = argparse.ArgumentParser()
    add_run_arguments(probe)
    cfg = run_config(probe.parse_args(argv), environ=environ)
    return cfg, cfg.nodes, argv, out


def run(args: argparse.Namespace) -> int:
    from ..launcher import LocalCluster, summarize

    cfg, nodes, argv, out = launch_plan(args)
    t0 = time.perf_counter()
    cluster = LocalCluster(
        nodes, argv, run_id=cfg.run_id, stream=None if args.quiet else sys.stdout
    )
    with cluster:
        codes = cluster.wait(args.timeout_s)
        failed = {r: c for r, c in codes.items() if c != 0}
        for r in failed:
            print(
                f"gossip launch: rank {r} exited with {codes[r]}:\n{cluster.tail(r, 8)}",
                file=sys.stderr,
            )
    try:
        summary = summarize(
            out,
            exit_codes=codes,
            wall_seconds=time.perf_counter() - t0,
            target_accuracy=cfg.target_accuracy,
        )
    except GossipError as e:
        raise GossipError(f"{e}; exit codes {codes}") from e
    keys = (
        "task",
        "nodes",
        "accuracy_mean",
        "accuracy_min",
        "loss_mean",
        "consensus_distance",
        "rounds",
        "bytes_sent_total",
        "bytes_sent_per_node",
        "seconds_per_step",
        "wall_seconds",
        "nodes_failed",
    )
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"gossip launch: results in {out}", file=sys.stderr)
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m gossip.commands.launch``: the same as ``gossip launch``."""
    import logging

    parser = argparse.ArgumentParser(prog="gossip launch", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run(args)
    except GossipError as e:
        print(f"gossip launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
