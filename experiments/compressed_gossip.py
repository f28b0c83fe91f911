"""CHOCO and MoTEF against dense gossip on ``digits``: accuracy and bytes on the wire per node.

For every partition (IID and Dirichlet(alpha)) it runs dense D-PSGD and each compressed method
on the same graph, seeds and rounds, and reports each method's final mean accuracy (averaged
over the seeds) minus the dense run's (target: within 1 point) and dense bytes per node over
the method's (target: >= 50x).
Bytes are counted from the real payloads (values, narrow indices and the header of each
message). Writes ``compressed_gossip.csv``, ``compressed_gossip.md`` and
``compressed_gossip.png`` (mean test accuracy against rounds and against bytes per node).

    python experiments/compressed_gossip.py --out runs/compressed     # 600 rounds, seeds 0 1 2

(16 nodes on a 4x4 torus; about 25 minutes on 2 cores, or one partition at a time with
``--partitions dirichlet``.)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

from gossip.sim import SimConfig, simulate

METHODS = {  # name -> (compress, feedback)
    "dense": ("none", "none"),
    "choco top-1% γ=0.05": ("topk:0.01", "choco:0.05"),
    "choco top-1% γ=0.1": ("topk:0.01", "choco:0.1"),
    "choco top-1% packed γ=0.1": ("topk:0.01:bf16:packed", "choco:0.1"),
    "motef top-1% γ=0.1 λ=0.1": ("topk:0.01", "motef:0.1,0.1"),
    "motef top-1% γ=0.05 λ=0.05": ("topk:0.01", "motef:0.05,0.05"),
    "motef top-1% packed γ=0.05 λ=0.05": ("topk:0.01:bf16:packed", "motef:0.05,0.05"),
    "motef top-0.8% packed γ=0.05 λ=0.05": ("topk:0.008:bf16:packed", "motef:0.05,0.05"),
    "motef top-0.5% γ=0.05 λ=0.1": ("topk:0.005", "motef:0.05,0.1"),
}
DEFAULT_METHODS = [
    "dense",
    "choco top-1% packed γ=0.1",
    "motef top-0.8% packed γ=0.05 λ=0.05",
    "motef top-1% γ=0.05 λ=0.05",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compressed_gossip")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--topology", default="torus")
    p.add_argument("--rounds", type=int, default=600)
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lr-schedule", default="constant")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="averaged")
    p.add_argument("--hidden", type=int, default=64, help="hidden units of the digits MLP")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = SimConfig(
        task="digits", task_options={"hidden": args.hidden}, nodes=args.nodes,
        topology=args.topology, rounds=args.rounds, alpha=args.alpha,
        lr_schedule=args.lr_schedule, threads=args.threads,
    )  # fmt: skip
    methods = ["dense"] + [m for m in args.methods if m != "dense"]
    rows, curves = [], {}
    for part in args.partitions:
        dense = None
        for name in methods:
            compress, feedback = METHODS[name]
            cfg = dataclasses.replace(base, partition=part, compress=compress, feedback=feedback)
            runs = [
                simulate(dataclasses.replace(cfg, seed=sd), progress=False) for sd in args.seeds
            ]
            acc = [r.summary["accuracy_mean"] for r in runs]
            s = {
                "accuracy_mean": sum(acc) / len(acc),
                "accuracy_min": min(r.summary["accuracy_min"] for r in runs),
                "bytes_sent_per_node": runs[0].summary["bytes_sent_per_node"],
            }
            dense = dense or s
            row = {
                "partition": part if part == "iid" else f"dirichlet({args.alpha})",
                "method": name,
                "seeds": len(runs),
                "accuracy_mean": s["accuracy_mean"],
                "accuracy_per_seed": " ".join(f"{a:.4f}" for a in acc),
                "accuracy_min": s["accuracy_min"],
                "points_vs_dense": 100 * (s["accuracy_mean"] - dense["accuracy_mean"]),
                "bytes_per_node": s["bytes_sent_per_node"],
                "fewer_bytes_x": dense["bytes_sent_per_node"] / s["bytes_sent_per_node"],
            }
            rows.append(row)
            curves[f"{row['partition']} {name}"] = runs[0].history
            print(" | ".join(_fmt(v) for v in row.values()), flush=True)
    write(rows, curves, out, args.nodes)
    return 0


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write(rows: list[dict], curves: dict, out: Path, nodes: int) -> None:
    cols = list(rows[0])
    with open(out / "compressed_gossip.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    (out / "compressed_gossip.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6))
    for name, hist in curves.items():
        pts = [h for h in hist if "accuracy_mean" in h]
        acc = [h["accuracy_mean"] for h in pts]
        a.plot([h["round"] for h in pts], acc, label=name)
        b.plot([h["bytes_sent_total"] / nodes for h in pts], acc, label=name)
    a.set(xlabel="round", ylabel="mean test accuracy")
    b.set(xlabel="bytes sent per node", ylabel="mean test accuracy", xscale="log")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compressed_gossip.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
