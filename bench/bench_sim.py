"""Simulator scale: seconds per round for 64 ... 4096 virtual nodes.

For each size it times the same run twice in one process: with gossip on the given topology, and
with no communication at all (the reference: local SGD alone). The ratio is what gossip mixing
adds on top of the local steps, which is the part of the simulator this benchmark is about.

    python bench/bench_sim.py --task logreg --topology exponential --nodes 64 256 1024 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from gossip.sim import SimConfig, simulate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="logreg")
    p.add_argument("--topology", default="exponential")
    p.add_argument("--averaging", default="dpsgd")
    p.add_argument("--nodes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print one JSON object per size")
    args = p.parse_args(argv)

    print(f"{'nodes':>6} {'s/round gossip':>15} {'s/round local':>14} {'ratio':>6}")
    for n in args.nodes:
        base = SimConfig(
            task=args.task,
            nodes=n,
            topology=args.topology,
            rounds=args.rounds,
            averaging=args.averaging,
            eval_every=args.rounds,
            eval_samples=1000,
        )
        simulate(dataclasses.replace(base, rounds=2), progress=False)  # warm-up
        gossip = simulate(base, progress=False).summary
        local = simulate(dataclasses.replace(base, averaging="none"), progress=False).summary
        ratio = gossip["seconds_per_round"] / local["seconds_per_round"]
        if args.json:
            print(
                json.dumps(
                    {
                        "nodes": n,
                        "gossip_s_per_round": gossip["seconds_per_round"],
                        "local_s_per_round": local["seconds_per_round"],
                        "ratio": ratio,
                    }
                )
            )
        else:
            print(
                f"{n:>6} {gossip['seconds_per_round']:>15.4f} "
                f"{local['seconds_per_round']:>14.4f} {ratio:>6.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
