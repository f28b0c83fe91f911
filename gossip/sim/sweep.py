"""Grid sweeps: ``--sweep key=v1,v2 key2=...`` runs every combination and writes one table."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from pathlib import Path

from ..config import _coerce, _field_types
from ..errors import ConfigError
from .config import SimConfig
from .engine import simulate
from .report import plot_curves, write_run

TABLE_FIELDS = (
    "accuracy_mean",
    "accuracy_min",
    "loss_mean",
    "consensus_distance",
    "rounds_to_target",
    "bytes_sent_per_node",
    "seconds_per_round",
)


def parse_sweep(items: list[str]) -> dict[str, list]:
    """``["nodes=16,64", "averaging=dpsgd,allreduce"]`` -> ``{"nodes": [16, 64], ...}``.

    Values are split on ``;`` instead of ``,`` when the item has a ``;``, for values that hold
    commas themselves: ``"feedback=choco:0.1;motef:0.1,0.5"``.
    """
    types_ = _field_types(SimConfig)
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise ConfigError(f"--sweep {item!r} must look like key=v1,v2")
        if key not in types_:
            raise ConfigError(f"--sweep key {key!r} is not a setting; valid: {sorted(types_)}")
        sep = ";" if ";" in values else ","
        grid[key] = [_coerce(key, v.strip(), types_[key]) for v in values.split(sep) if v.strip()]
    return grid


def run_name(point: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in point.items()).replace("/", "_").replace(":", "_")


def sweep(base: SimConfig, grid: dict[str, list], out: str | Path, progress: bool = True):
    """Run the grid; write each run under ``out/<name>/`` and ``comparison.{csv,md,png}``."""
    out = Path(out)
    rows, curves = [], {}
    keys = list(grid)
    # seeds are repetitions: curves and the summary table group them
    group_keys = [k for k in keys if k != "seed"] or keys
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        cfg = dataclasses.replace(base, **point)
        result = simulate(cfg, progress=progress)
        write_run(result, out / run_name(point))
        group = run_name({k: point[k] for k in group_keys})
        curves.setdefault(group, []).append(result.history)
        rows.append({**point, **{f: result.summary.get(f) for f in TABLE_FIELDS}})
    write_table(rows, keys, out)
    if "seed" in keys and len(grid["seed"]) > 1 and group_keys != keys:
        write_seed_summary(rows, group_keys, out)
    plot_curves(curves, out / "comparison.png", title=f"sweep over {', '.join(keys)}")
    return rows


def write_seed_summary(rows: list[dict], keys: list[str], out: Path) -> None:
    """``comparison_by_config.md``: each configuration over its seeds (mean, and how many
    seeds reached the target accuracy)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    cols = keys + ["seeds", "accuracy_mean", "rounds_to_target (mean)", "reached target"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, rs in groups.items():
        acc = sum(r["accuracy_mean"] for r in rs) / len(rs)
        reached = [r["rounds_to_target"] for r in rs if r["rounds_to_target"] is not None]
        rtt = f"{sum(reached) / len(reached):.0f}" if reached else "never"
        cells = [*map(_fmt, key), str(len(rs)), f"{acc:.4f}", rtt, f"{len(reached)}/{len(rs)}"]
        md.append("| " + " | ".join(cells) + " |")
    (out / "comparison_by_config.md").write_text("\n".join(md) + "\n")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], keys: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = keys + list(TABLE_FIELDS)
    with open(out / "comparison.csv", "w", newline="") as f:  # quotes values holding commas
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(cols)
        writer.writerows([_fmt(r.get(c)) for c in cols] for r in rows)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "comparison.md").write_text("\n".join(md) + "\n")
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
