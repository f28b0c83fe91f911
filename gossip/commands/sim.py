"""``gossip sim``: N virtual nodes in one process; one run, or a ``--sweep`` grid.

Settings come from defaults < ``--config FILE`` (YAML/JSON) < ``GOSSIP_*`` env < flags.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import resolve
from ..errors import ConfigError
from ..sim.config import AVERAGING, INITS, PARTITIONS, VC_TARGETS, SimConfig

# flag -> (type, help); every flag maps to the SimConfig field of the same name
FLAGS = {
    "task": (str, "digits | mnist | logreg | lsq | csv (default digits)"),
    "nodes": (int, "number of virtual nodes (default 16)"),
    "topology": (str, "builder name (ring, torus, exponential, ...) or a graph file"),
    "weights": (str, "mixing weights: auto | metropolis | maxdegree | uniform | file | push_sum"),
    "averaging": (str, " | ".join(AVERAGING)),
    "rounds": (int, "gossip rounds (default: the task's)"),
    "local_steps": (int, "local SGD steps between gossip rounds (default 1)"),
    "lr": (float, "learning rate (default: the task's)"),
    "lr_schedule": (str, "constant | cosine (decays lr to 0 over the rounds)"),
    "momentum": (float, "local SGD momentum (default 0)"),
    "weight_decay": (float, "L2 weight decay (default 0)"),
    "batch_size": (int, "minibatch per node and step (default: the task's)"),
    "partition": (str, " | ".join(PARTITIONS)),
    "alpha": (float, "Dirichlet concentration for --partition dirichlet (default 0.5)"),
    "init": (str, " | ".join(INITS) + " (independent = one random init per node)"),
    "vc_target": (str, "variance-correction target: " + " | ".join(VC_TARGETS)),
    "seed": (int, "seed for init, partition, sampling and random graphs (default 0)"),
    "eval_every": (int, "evaluate every K rounds (0 = automatic)"),
    "eval_samples": (int, "evaluate on this many test samples (0 = all)"),
    "target_accuracy": (float, "report the first round whose mean accuracy reaches this"),
    "compress": (
        str,
        "none | topk:0.01 | topk:0.01:bf16:packed | randk:0.01 | quant:4 | sign | fp16 | bf16",
    ),
    "feedback": (
        str,
        "none | ef14 | ef21 | econtrol:ETA | choco:GAMMA | "
        "choco-econtrol:GAMMA,ETA | motef:GAMMA,LAMBDA",
    ),
    "device": (str, "cpu or cuda"),
    "threads": (int, "torch CPU threads (0 = torch's default)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of settings")
    for name, (tp, help_) in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=tp, default=None, help=help_)
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for the task builder, e.g. heterogeneity=2 or path=data.csv (repeatable)",
    )
    p.add_argument("--out", metavar="DIR", help="write summary.json, history.csv (and plots)")
    p.add_argument("--plot", action="store_true", help="also write PNG plots into --out")
    p.add_argument(
        "--sweep",
        nargs="+",
        metavar="KEY=V1,V2",
        help="run the grid of these settings; writes comparison.{csv,md,png} into --out",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _task_options(items: list[str]) -> dict | None:
    import yaml

    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--task-option {item!r} must look like key=value")
        opts[key.strip()] = yaml.safe_load(value)
    return opts or None


def config_from_args(args: argparse.Namespace, environ=None) -> SimConfig:
    """Pure translation of parsed flags into a validated SimConfig (no side effects)."""
    flags = {name: getattr(args, name) for name in FLAGS}
    flags["task_options"] = _task_options(args.task_option)
    return resolve(SimConfig, file=args.config, environ=environ, flags=flags)


def run(args: argparse.Namespace) -> int:
    from ..sim import parse_sweep, simulate, sweep, write_run

    cfg = config_from_args(args)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.sweep:
        if not args.out:
            raise ConfigError("--sweep needs --out DIR for its table and plot")
        rows = sweep(cfg, parse_sweep(args.sweep), args.out, progress=progress)
        print(open(f"{args.out}/comparison.md").read(), end="")
        return 0 if rows else 1
    result = simulate(cfg, progress=progress)
    if args.out:
        write_run(result, args.out, plot=args.plot)
    s = result.summary
    keys = (
        "task",
        "accuracy_mean",
        "accuracy_min",
        "loss_mean",
        "consensus_distance",
        "rounds",
        "rounds_to_target",
        "bytes_sent_total",
        "wall_seconds",
    )
    print(json.dumps({k: s[k] for k in keys}, indent=2))
    return 0
