"""The master's plumbing shared by :class:`~.CodedGroup` and :class:`~.CodedSweep`: transport,
worker lifecycle (spawn, threads or external), handshake, collection with a stop rule, and
draining vectors that arrive after their round."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError, TransportError
from ...layout import ParamLayout
from ...tasks import Task, get_task
from .worker import run_worker

log = logging.getLogger("gossip.group")

TRANSPORTS = ("zmq", "memory")


class _Master:
    """Transport, worker lifecycle, handshake, collection with a stop rule, late-vector draining."""

    def __init__(self, n: int, transport: str, workers: str | None, *, bind: str, late_window: int,
                 startup_timeout_s: float, poll_s: float, log_dir, task: Task):  # fmt: skip
        if transport not in TRANSPORTS:
            raise ConfigError(f"transport={transport!r} is invalid; valid: {TRANSPORTS}")
        workers = workers or ("threads" if transport == "memory" else "spawn")
        valid = ("threads",) if transport == "memory" else ("spawn", "external")
        if workers not in valid:
            raise ConfigError(f"workers={workers!r} with transport={transport!r}; valid: {valid}")
        self.n, self.rank, self.kind, self.workers = n, n, transport, workers
        self.startup_timeout_s, self.poll_s, self.task = startup_timeout_s, poll_s, task
        self.run_id = f"coded-{secrets.token_hex(4)}"
        self.procs: dict[int, subprocess.Popen] = {}
        self.threads: dict[int, threading.Thread] = {}
        self.errors: dict[int, str] = {}
        self.stats = {"late": 0, "invalid": 0, "late_by_worker": Counter()}
        self._open: dict[int, set[int]] = {}  # wire round -> workers whose vector is still out
        self.started = self.closed = False
        self.last_round = 1  # the highest wire round sent so far (0, 1: the handshake)
        self.hub = None
        kw = dict(round_window=late_window, max_rounds_ahead=4, senders=range(n))
        if transport == "memory":
            from ...transport.memory import MemoryHub, MemoryTransport

            self.hub = MemoryHub()
            self.t = MemoryTransport(n, hub=self.hub, **kw)
        else:
            from ...transport.zmq import ZmqTransport

            self.t = ZmqTransport(n, bind=bind, run_id=self.run_id, send_timeout_s=0.05, **kw)
        if workers == "spawn":
            self.log_dir = Path(log_dir) if log_dir else None
            self._spawn()
        elif workers == "threads":
            for w in range(n):
                wt = MemoryTransport(w, hub=self.hub, round_window=2, max_rounds_ahead=64)
                th = threading.Thread(target=run_worker, args=(wt, w, n, self.t.address),
                                      kwargs={"task": task}, daemon=True,
                                      name=f"coded-worker-{w}")  # fmt: skip
                th.start()
                self.threads[w] = th
        self._finalizer = weakref.finalize(self, _kill, self.procs)

    def argv(self, w: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gossip.runtime.group",
            "worker",
            "--master",
            self.t.address,
            "--master-rank",
            str(self.rank),
            "--worker",
            str(w),
            "--run-id",
            self.run_id,
        ]

    def _spawn(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for w in range(self.n):
            out = subprocess.DEVNULL
            if self.log_dir is not None:
                out = open(self.log_dir / f"worker{w}.log", "wb")  # noqa: SIM115 - child owns it
            argv = [*self.argv(w), "--parent-pid", str(os.getpid())]
            self.procs[w] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)  # fmt: skip
            if out is not subprocess.DEVNULL:
                out.close()

    def start(self, config: dict, tensors: list, digest: str, numel: int) -> None:
        """Hello from every worker, config to each, ready from each (or raise ConfigError)."""
        if self.started:
            return
        everyone = list(range(self.n))
        hello = self._gather(everyone, 0, "hello")
        self.t.connect({w: m.header["address"] for w, m in hello.items()})
        for w in everyone:
            self.t.send(w, 0, tensors, {**config, "op": "config", "worker": w})
        for w, m in self._gather(everyone, 1, "ready").items():
            if m.header.get("op") == "error":
                raise ConfigError(f"worker {w} rejected the group's config: {m.header['message']}")
            if m.header.get("digest") != digest or m.header.get("numel") != numel:
                raise ConfigError(
                    f"worker {w} built data plan {m.header.get('digest', '')[:12]} with "
                    f"{m.header.get('numel')} parameters; the master has {digest[:12]} with "
                    f"{numel} (workers build task.model_fn(); pass a model of that architecture)"
                )
        self.started = True

    def _gather(self, who, r: int, what: str) -> dict:
        got, deadline = {}, time.monotonic() + self.startup_timeout_s
        while len(got) < len(who) and time.monotonic() < deadline:
            got.update(self.t.recv_many([w for w in who if w not in got], r, 0.1))
            if gone := {w: why for w, why in self.dead().items() if w not in got}:
                got.update(self.t.recv_many(list(gone), r, 0.05))  # their last word, if any
                if gone := {w: why for w, why in gone.items() if w not in got}:
                    raise ConfigError(f"workers {sorted(gone)} died before {what!r}: {gone}")
        if len(got) < len(who):
            missing = sorted(set(who) - set(got))
            raise ConfigError(f"workers {missing} sent no {what!r} within "
                              f"startup_timeout_s={self.startup_timeout_s} s")  # fmt: skip
        return got

    def dead(self) -> dict[int, str]:
        """Workers known to be gone, with why (exit code / error / thread ended)."""
        out = {w: f"exit code {p.poll()}" for w, p in self.procs.items() if p.poll() is not None}
        out.update({w: "thread ended" for w, th in self.threads.items() if not th.is_alive()})
        out.update(self.errors)
        return out

    def send_work(self, w: int, r: int, tasks: list, models: list) -> None:
        self.last_round = max(self.last_round, r)
        try:
            self.t.send(w, r, models, {"op": "work", "tasks": tasks})
        except TransportError as e:
            self.errors[w] = f"unreachable ({e})"

    def collect(self, r: int, expected: dict[int, list], done, timeout_s: float, numel, dtype):
        """Arrivals for wire round ``r`` until ``done(got, t_first)`` is true.

        ``expected[w]`` is the task list sent to ``w``; a reply that does not match it (tasks,
        tensor count, size or dtype) is dropped and counted in ``stats["invalid"]``. Returns
        ``(got, finished)``; ``finished`` is False when ``timeout_s`` ran out first, or when
        every worker still pending is known to be gone (so waiting cannot help).
        """
        got: dict = {}
        t0 = time.monotonic()
        t_first, deadline, gone, next_check = None, t0 + timeout_s, set(), t0
        finished = True
        while not done(got, t_first):
            now = time.monotonic()
            if now >= next_check:  # a dead worker costs one check, never the whole timeout
                gone, next_check = set(self.dead()), now + 0.05
            pending = [w for w in expected if w not in got and w not in gone]
            if now >= deadline or not pending:
                finished = False
                break
            for w, m in self.t.recv_many(pending, r, min(self.poll_s, deadline - now)).items():
                if m.header.get("op") == "error":
                    self.errors[w] = f"error: {m.header.get('message')}"
                    log.warning("coded group: worker %d failed: %s", w, self.errors[w])
                    continue
                tasks = m.header.get("tasks")
                ok = tasks == [x[:3] for x in expected[w]] and len(m.tensors) == len(tasks)
                if not ok or any(x.numel() != numel or x.dtype != dtype for x in m.tensors):
                    if not self.stats["invalid"]:
                        log.warning("coded group: dropped an invalid reply from worker %d in "
                                    "round %d (further ones are only counted)", w, r)  # fmt: skip
                    self.stats["invalid"] += 1
                    self.t.release(m)
                    continue
                got[w] = m
                t_first = t_first if t_first is not None else time.monotonic() - t0
        self._open[r] = {w for w in expected if w not in got}
        return got, finished

    def drain_late(self, r: int) -> int:
        """Release vectors of earlier rounds that arrived after their round; returns the count."""
        n = 0
        for rr in sorted(self._open):
            if rr < r - self.t.round_window or not self._open[rr]:
                del self._open[rr]
                continue
            if rr >= r:
                continue
            for w, m in self.t.recv_many(sorted(self._open[rr]), rr, 0.0).items():
                self._open[rr].discard(w)
                self.t.release(m)
                self.stats["late_by_worker"][w] += 1
                n += 1
        self.stats["late"] += n
        return n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        r = self.last_round + 1  # a round no worker has seen, so no stop is taken for a replay
        if self.started:
            live = [w for w in range(self.n) if w not in self.dead()]
            for w in live:
                try:
                    self.t.send(w, r, [], {"op": "stop"})
                except TransportError:
                    pass
            # each worker answers "bye": the stop is delivered before our sockets close
            self.t.recv_many(live, r, 2.0)
        end = time.monotonic() + 5.0
        for p in self.procs.values():
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _kill(self.procs)
        self.t.close()  # memory workers see the master leave the hub and exit
        for th in self.threads.values():
            th.join(max(0.0, end - time.monotonic()))


def _kill(procs: dict) -> None:
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(10)


def _set_grads(model: nn.Module, layout: ParamLayout, flat_grad: torch.Tensor) -> None:
    views = layout.views(flat_grad)
    for name, p in model.named_parameters():
        g = views[name].to(p.device, p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _resolve_task(task, task_options, transport) -> tuple[Task, str]:
    if isinstance(task, str):
        return get_task(task, **(task_options or {})), task
    if isinstance(task, Task) and transport == "memory":
        return task, task.name
    raise ConfigError(f"task={task!r}: worker processes rebuild the task by name; pass a "
                      "registered task name (see gossip.tasks.task_names()), or a Task object "
                      "with transport='memory'")  # fmt: skip
