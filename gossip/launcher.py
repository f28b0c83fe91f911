"""Start N node processes on this machine, stream their logs, and gather one summary.

:class:`LocalCluster` does locally what torchrun's agent does: it hosts the c10d ``TCPStore``
the nodes rendezvous at (on a free loopback port, so there is no port to race for), starts
``N`` copies of the node entrypoint (``python -m gossip.commands.run``, what containers and
torchrun run too) with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set
and ``TORCHELASTIC_USE_AGENT_STORE=True`` (so every node is a store client, as under torchrun),
prefixes each output line with ``[rank r]``, and always cleans up: every child runs in its own
process group, and :meth:`LocalCluster.close` kills what is left (SIGTERM, then SIGKILL).

:func:`summarize` turns the nodes' ``node-<rank>.json`` files into one ``summary.json`` with the
simulator's keys (``accuracy_mean``, ``consensus_distance``, ``bytes_sent_total``, ...). Bytes are
what each node's transport counted on the wire (headers included, so compressed runs report
their real compressed sizes); only the DDP baseline estimates them (``bytes_sent_estimated``).

Example::

    with LocalCluster(8, ["--task", "digits", "--out", "run1"]) as cluster:
        codes = cluster.wait(timeout_s=600)
    summary = summarize("run1", exit_codes=codes)
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError

#: The node entrypoint: ``gossip run`` without depending on the console script being installed.
ENTRYPOINT = (sys.executable, "-m", "gossip.commands.run")


class LocalCluster:
    """N node processes on loopback around one rendezvous store (see the module docstring).

    Args:
        nodes: how many processes (ranks ``0 .. nodes-1``).
        args: command-line arguments for every node (``--task digits ...``).
        env: extra environment for every node (``OMP_NUM_THREADS`` defaults to 1 per node).
        stream: where prefixed log lines go (default stdout); None to keep them quiet.
        on_line: ``on_line(rank, line)`` for every output line (tests use it to act mid-run).
        entrypoint: the command before ``args`` (default :data:`ENTRYPOINT`).
        run_id: the nodes' run id (read from ``args`` if given there), for store look-ups.
        ranks: which ranks to start here (default all); the others join the store from
            elsewhere (another machine, or a test acting as a peer).
    """

    def __init__(
        self,
        nodes: int,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        stream=sys.stdout,
        on_line: Callable[[int, str], None] | None = None,
        entrypoint: tuple[str, ...] | list[str] = ENTRYPOINT,
        run_id: str = "gossip",
        store_timeout_s: float = 300.0,
        ranks: list[int] | None = None,
    ):
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"nodes={nodes!r}; need an integer >= 1")
        self.nodes, self.args = nodes, list(args)
        self.env = dict(env or {})
        self.stream, self.on_line = stream, on_line
        self.entrypoint = list(entrypoint)
        self.run_id = run_id
        self.store_timeout_s = store_timeout_s
        self.ranks = list(range(nodes)) if ranks is None else sorted(ranks)
        if not set(self.ranks) <= set(range(nodes)):
            raise ConfigError(f"ranks={ranks!r} must lie in 0..{nodes - 1}")
        self.procs: dict[int, subprocess.Popen] = {}
        self.tails: dict[int, deque] = {}
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.store = None
        self.port: int | None = None

    def start(self) -> LocalCluster:
        from torch.distributed import TCPStore

        self.store = TCPStore(
            "127.0.0.1",
            0,
            self.nodes + 1,
            is_master=True,
            timeout=datetime.timedelta(seconds=self.store_timeout_s),
            wait_for_workers=False,
        )
        self.port = self.store.port
        try:
            for rank in self.ranks:
                self._spawn(rank)
        except BaseException:
            self.close()
            raise
        return self

    def node_env(self, rank: int) -> dict[str, str]:
        """The environment of node ``rank`` (torchrun's variables, pointing at our store)."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.env)
        for key in ("GOSSIP_RANK", "GOSSIP_MASTER_ADDR", "GOSSIP_MASTER_PORT", "GOSSIP_PEERS",
                    "GOSSIP_BIND"):  # fmt: skip
            env.pop(key, None)  # the launcher places every node itself
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            GROUP_RANK="0",
            WORLD_SIZE=str(self.nodes),
            LOCAL_WORLD_SIZE=str(self.nodes),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(self.port),
            TORCHELASTIC_USE_AGENT_STORE="True",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, rank: int) -> None:
        proc = subprocess.Popen(
            [*self.entrypoint, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.node_env(rank),
            start_new_session=True,  # its own process group: close() reaches grandchildren
        )
        self.procs[rank] = proc
        self.tails[rank] = deque(maxlen=200)
        t = threading.Thread(target=self._read, args=(rank, proc), daemon=True)
        t.start()
        self._readers.append(t)

    def _read(self, rank: int, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tails[rank].append(line)
            if self.stream is not None:
                with self._lock:
                    print(f"[rank {rank}] {line}", file=self.stream, flush=True)
            if self.on_line is not None:
                self.on_line(rank, line)

    # -- watching ------------------------------------------------------------------------------
    def wait(self, timeout_s: float | None = None) -> dict[int, int | None]:
        """Wait for every node (at most ``timeout_s`` in all); returns ``{rank: exit code}``
        (negative: killed by that signal; None: still running at the timeout)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        for t in self._readers:
            t.join(timeout=5)
        return {r: p.poll() for r, p in sorted(self.procs.items())}

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL, i.e. ``kill -9``) to node ``rank``'s process group."""
        proc = self.procs[rank]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    def tail(self, rank: int, lines: int = 20) -> str:
        return "\n".join(list(self.tails.get(rank, ()))[-lines:])

    def metrics_ports(self, timeout_s: float = 60.0) -> dict[int, int]:
        """``{rank: port}`` of each node's metrics server, as the nodes published them."""
        keys = [f"gossip/{self.run_id}/0/metrics_port/{r}" for r in range(self.nodes)]
        self.store.wait(keys, datetime.timedelta(seconds=timeout_s))
        return {r: int(self.store.get(k)) for r, k in enumerate(keys)}

    def close(self) -> None:
        """Stop every node still running (SIGTERM, 5 s, then SIGKILL) and the store."""
        for rank in self.procs:
            self.kill(rank, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for rank, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(rank, signal.SIGKILL)
                proc.wait()
        for t in self._readers:
            t.join(timeout=5)
        for proc in self.procs.values():
            if proc.stdout is not None:
                proc.stdout.close()
        self.store = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- the run's summary -------------------------------------------------------------------------
def read_node_results(out: str | os.PathLike) -> dict[int, dict]:
    """``{rank: node-<rank>.json}`` for every node that finished and wrote its results."""
    results = {}
    for p in sorted(Path(out).glob("node-*.json")):
        data = json.loads(p.read_text())
        results[int(data["rank"])] = data
    return results


def consensus_distance_of(out: str | os.PathLike, ranks) -> float | None:
    """sqrt(mean_i ||x_i - x_bar||^2) over the final models the nodes in ``ranks`` wrote."""
    import torch

    from .runtime.checkpoint import load_checkpoint

    models = []
    for r in ranks:
        p = Path(out) / "models" / f"node-{r}.pt"
        if p.exists():
            models.append(load_checkpoint(p)["model"].double())
    if not models:
        return None
    X = torch.stack(models)
    return float((X - X.mean(0, keepdim=True)).square().sum(1).mean().sqrt())


def summarize(
    out: str | os.PathLike,
    *,
    exit_codes: dict[int, int | None] | None = None,
    wall_seconds: float | None = None,
    target_accuracy: float | None = None,
) -> dict:
    """One ``summary.json`` (the simulator's keys) from the nodes' results in ``out``; written
    there and returned. Nodes that died are listed under ``nodes_failed`` and left out of the
    means."""
    results = read_node_results(out)
    if not results:
        raise ConfigError(f"no node-<rank>.json in {str(out)!r}: no node finished")
    ok = sorted(results)
    acc = [results[r]["accuracy"] for r in ok]
    first = results[ok[0]]
    rows = _mean_history([results[r].get("history", []) for r in ok])
    hits = [h["round"] for h in rows if h.get("accuracy_mean", 0) >= (target_accuracy or 2)]
    bytes_total = sum(results[r]["bytes_sent"] for r in ok)
    summary = {
        "task": first["task"],
        "accuracy_mean": sum(acc) / len(acc),
        "accuracy_min": min(acc),
        "accuracy_max": max(acc),
        "loss_mean": sum(results[r]["loss"] for r in ok) / len(ok),
        "consensus_distance": consensus_distance_of(out, ok),
        "rounds": max(results[r]["rounds"] for r in ok),
        "rounds_to_target": hits[0] if hits else None,
        "bytes_sent_total": bytes_total,
        "bytes_sent_per_node": bytes_total / len(ok),
        "bytes_sent_estimated": any(results[r].get("bytes_sent_estimated") for r in ok),
        "resyncs_total": _compressed_total(results, ok, "full_copies_sent"),
        "wall_seconds": wall_seconds,
        "seconds_per_round": sum(results[r]["seconds_per_round"] for r in ok) / len(ok),
        "seconds_per_step": sum(results[r]["seconds_per_step"] for r in ok) / len(ok),
        "parameters": first.get("parameters"),
        "nodes": first["world_size"],
        "nodes_finished": ok,
        "nodes_failed": sorted(r for r, c in (exit_codes or {}).items() if c != 0),
        "exit_codes": {str(r): c for r, c in sorted((exit_codes or {}).items())},
        "topology": {"spec": first["config"].get("topology")},
        "config": first["config"],
    }
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if rows:
        from .sim.report import write_history

        write_history(rows, Path(out, "history.csv"))
    return summary


def _compressed_total(results: dict, ranks, key: str) -> int | None:
    """Sum of a compressed-gossip counter over nodes (None for dense runs)."""
    parts = [results[r].get("compressed") for r in ranks]
    if not any(parts):
        return None
    return sum(int((p or {}).get(key, 0)) for p in parts)


def _mean_history(histories: list[list[dict]]) -> list[dict]:
    """Per-round means over nodes (accuracy mean/min/max where every node evaluated)."""
    by_round: dict[int, list[dict]] = {}
    for hist in histories:
        for row in hist:
            by_round.setdefault(row["round"], []).append(row)
    rows = []
    for r in sorted(by_round):
        group = by_round[r]
        row = {"round": r, "train_loss": sum(g["train_loss"] for g in group) / len(group)}
        accs = [g["accuracy"] for g in group if "accuracy" in g]
        if accs and len(accs) == len(group):
            row.update(
                accuracy_mean=sum(accs) / len(accs),
                accuracy_min=min(accs),
                accuracy_max=max(accs),
                loss_mean=sum(g["loss"] for g in group) / len(group),
            )
        rows.append(row)
    return rows
