"""The worker process of a coded group: its loop and the messages it exchanges with the master.

Messages are keyed by wire round; every header carries an ``op``:

- round 0: worker -> master ``hello`` (its ``address``, ``pid``); master -> worker ``config``
  (task, data plan, dtype, slowdown; the slowdown's tables as tensors);
- round 1: worker -> master ``ready`` (the data plan's ``digest``, the model's ``numel``) or
  ``error`` (the config was rejected);
- round ``FIRST_ROUND + k``: master -> worker ``work`` (``tasks`` ``[job, part, index, slot]``,
  the models as tensors); worker -> master ``result`` (the tasks, ``compute_s``, one vector per
  task) or ``error``; master -> worker ``stop`` (answered by ``bye``) on a round no worker has
  seen.

A worker keeps no model state between rounds, so one that was slow or skipped rounds is never
out of date: it answers the newest round the master sent. Run one with
``python -m gossip.runtime.group worker --master ADDR --master-rank N --worker I --run-id ID``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ...errors import ConfigError, DeadlineError, GossipError, TransportError
from ...layout import ParamLayout
from ...tasks import Task, get_task
from .plan import DataPlan
from .slowdown import Slowdown

#: Wire round of step 0 (round 0 carries hello/config, round 1 the workers' "ready").
FIRST_ROUND = 2


def _partial_gradient(model, grad_flat, task: Task, x, y) -> torch.Tensor:
    """Gradient of the SUM of per-sample losses over the batch ``(x, y)`` (a new flat tensor)."""
    grad_flat.zero_()
    if len(x):
        (task.loss_fn(model(x), y) * len(x)).backward()
    return grad_flat.clone()


class _Worker:
    """A worker's compute state: task, model bound to one flat buffer, data plan, slowdown."""

    def __init__(self, worker: int, head: dict, tensors, task: Task | None):
        self.worker = worker
        self.task = task if task is not None else get_task(head["task"], **head["task_options"])
        self.dtype = getattr(torch, head["dtype"])
        x, y = self.task.train
        if len(x) != head["plan"]["total"]:
            raise ConfigError(f"task {head['task']!r} has {len(x)} training samples here, the "
                              f"master has {head['plan']['total']}")  # fmt: skip
        self.x = x.to(self.dtype)
        self.y = y if self.task.classification else y.to(self.dtype)
        self.model = self.task.model_fn().to(self.dtype)
        self.flat = ParamLayout.from_module(self.model).bind_(self.model)
        self.grad = self.model._gossip_flat_grad
        self.plan = DataPlan.from_spec(head["plan"], labels=self.task.groups)
        sd = head.get("slowdown")
        self.slowdown = Slowdown.from_wire(sd, tensors) if sd else None
        self.repeat = int(head.get("repeat", 1))
        self._held: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # the data we hold

    def _batch(self, part: str, index: int, j: int, idx) -> tuple[torch.Tensor, torch.Tensor]:
        key = (part, index, j)
        if key not in self._held:
            ii = torch.as_tensor(idx, dtype=torch.int64)
            self._held[key] = (self.x[ii], self.y[ii])
        return self._held[key]

    def compute(self, tasks: list, models: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for _job, part, index, slot in tasks:
            self.flat.copy_(models[slot])
            code, pieces = self.plan.pieces(part, index, self.worker)
            batches = {j: self._batch(part, index, j, idx) for j, idx in pieces.items()}
            for _ in range(self.repeat):  # a benchmark's stand-in for a heavier model
                partials = {
                    j: _partial_gradient(self.model, self.grad, self.task, *xy)
                    for j, xy in batches.items()
                }
            out.append(partials[0] if code is None else code.encode(self.worker, partials))
        return out


def _next_message(t, master: int, r: int, idle_timeout_s: float, parent_pid: int | None):
    """The master's message for round ``r`` (or the newest one after it: skip rounds the master
    has already left); None when the master went silent, closed or our parent died."""
    idle = 0.0
    while True:
        try:
            msg = t.recv(master, r, timeout_s=0.25)
            break
        except DeadlineError:
            idle += 0.25
            gone = parent_pid is not None and os.getppid() != parent_pid
            if idle >= idle_timeout_s or gone or master in t.unreachable:
                return None
    while (newer := t.recv_many([master], msg.round + 1, 0.0).get(master)) is not None:
        t.release(msg)
        msg = newer
    return msg


def run_worker(transport, worker: int, master: int, master_address: str, *,
               task: Task | None = None, idle_timeout_s: float = 60.0,
               parent_pid: int | None = None) -> int:  # fmt: skip
    """Serve one worker of a group until the master says stop; returns an exit code.

    ``transport`` is this worker's (rank ``worker``); the master (rank ``master``) sends the
    task, data plan and stragglers in its config message. ``task`` (threads only) replaces
    rebuilding the task by name. Exits 0 on stop, 1 on a bad config, 3 when the master went
    silent for ``idle_timeout_s`` or ``parent_pid`` is no longer our parent.
    """
    t = transport
    try:
        t.connect({master: master_address})
        t.send(master, 0, [], {"op": "hello", "address": t.address, "pid": os.getpid()})
        msg = _next_message(t, master, 0, idle_timeout_s, parent_pid)
        if msg is None:
            return 3
        try:
            state = _Worker(worker, msg.header, msg.tensors, task)
        except (GossipError, KeyError, TypeError, AttributeError) as e:
            t.send(master, 1, [], {"op": "error", "message": f"{type(e).__name__}: {e}"})
            return 1
        ready = {"op": "ready", "digest": state.plan.digest, "numel": state.flat.numel()}
        t.send(master, 1, [], ready)
        r = FIRST_ROUND
        while (msg := _next_message(t, master, r, idle_timeout_s, parent_pid)) is not None:
            if msg.header.get("op") == "stop":
                t.send(master, msg.round, [], {"op": "bye"})  # the master waits for it, briefly
                return 0
            t0 = time.perf_counter()
            tasks = msg.header["tasks"]
            try:
                out = state.compute(tasks, msg.tensors)
                compute_s = time.perf_counter() - t0
                slow = state.slowdown
                extra = slow.extra_s(worker, msg.round - FIRST_ROUND, compute_s) if slow else 0.0
            except GossipError as e:  # e.g. a straggler trace shorter than the run
                t.send(
                    master, msg.round, [], {"op": "error", "message": f"{type(e).__name__}: {e}"}
                )
                return 1
            if extra > 0:
                time.sleep(extra)
            head = {"op": "result", "tasks": [x[:3] for x in tasks], "compute_s": compute_s}
            t.send(master, msg.round, out, head)
            r = msg.round + 1
            t.release(msg)
        return 3
    except TransportError:
        return 3
    finally:
        t.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m gossip.runtime.group worker --master ADDR --worker I --run-id ID``."""
    p = argparse.ArgumentParser(prog="python -m gossip.runtime.group")
    sub = p.add_subparsers(dest="verb", required=True)
    w = sub.add_parser("worker", help="serve one worker of a coded group")
    w.add_argument("--master", required=True, help="the master's address (tcp://HOST:PORT)")
    w.add_argument("--master-rank", type=int, required=True, help="the master's rank (n)")
    w.add_argument("--worker", type=int, required=True, help="this worker's index 0..n-1")
    w.add_argument("--run-id", required=True, help="the group's run id (from the master)")
    w.add_argument("--bind", default="tcp://127.0.0.1:0", help="where this worker listens")
    w.add_argument("--idle-timeout-s", type=float, default=60.0)
    w.add_argument("--parent-pid", type=int, default=None, help="exit when it is gone")
    w.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ...transport.zmq import ZmqTransport

    t = ZmqTransport(a.worker, bind=a.bind, run_id=a.run_id, round_window=2, max_rounds_ahead=64)
    return run_worker(t, a.worker, a.master_rank, a.master, idle_timeout_s=a.idle_timeout_s,
                      parent_pid=a.parent_pid)  # fmt: skip
