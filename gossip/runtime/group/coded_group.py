"""The coded group: the exact full gradient from the first ``n - s`` workers to answer."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ...algorithms.coding import GradientCode
from ...errors import ConfigError, DecodeError
from ...layout import ParamLayout
from .master import _Master, _resolve_task, _set_grads
from .plan import DataPlan
from .slowdown import _as_slowdown
from .worker import FIRST_ROUND

WAITS = ("first", "all")


@dataclass
class StepResult:
    """One round of a :class:`CodedGroup`.

    ``grad``: the decoded mean gradient over the whole training set (float64, flat, the model's
    layout order), computed at the model as it was before this step's update. ``arrived``: the
    workers the master waited for (their vectors came in before it stopped); ``decoded_from``:
    those with a nonzero decoding weight; ``missing``: the rest (stragglers this round).
    ``late``: vectors of earlier rounds released during this round. Times in seconds;
    ``compute_s``: each arrived worker's own measure of its compute (before any slowdown).
    """

    step: int
    grad: torch.Tensor
    arrived: tuple[int, ...]
    decoded_from: tuple[int, ...]
    missing: tuple[int, ...]
    late: int
    seconds: float
    wait_s: float
    compute_s: dict[int, float] = field(default_factory=dict)


class CodedGroup:
    """A master and ``n_workers`` workers computing the exact full gradient under stragglers.

    Args:
        task: a registered task name (``"digits"``), or a :class:`~gossip.tasks.Task` with
            ``transport="memory"``; ``task_options`` go to its builder.
        model: the model to train (default ``task.model_fn()`` under ``torch.manual_seed(seed)``);
            workers build ``task.model_fn()``, so it must have that architecture. It may already
            be bound to a flat buffer by a :class:`~gossip.runtime.node.Node`.
        n_workers: ``n``; also the number of data partitions.
        shard: train on one gossip node's shard of the task (see :func:`shard_ids`), e.g.
            ``{"nodes": 16, "rank": 3}``; default the whole training set.
        stragglers_s: ``s``, stragglers tolerated per round (any ``n - s`` workers decode).
        scheme: ``"frc"``, ``"cyclic"`` or ``"auto"`` (FRC when ``(s + 1) | n``).
        transport: ``"zmq"`` (worker processes) or ``"memory"`` (worker threads, for tests).
        workers: ``"spawn"`` (default for zmq: the group starts and always reaps them),
            ``"external"`` (start :meth:`worker_argv` yourself, then :meth:`start`), or
            ``"threads"`` (memory).
        optimizer: default SGD with ``lr`` (default ``task.lr``).
        slowdown: a :class:`Slowdown` or straggler injector (who is slow, by how much).
        wait: ``"first"`` (first ``n - s`` that decode) or ``"all"`` (the baseline).
        round_timeout_s: a round that cannot decode by then raises DecodeError.
        repeat: benchmarks only: each worker computes every partial gradient ``repeat`` times
            (same result), i.e. a heavier model without a bigger message.

    The master's own work per round is small (one snapshot, ``n`` sends, one weighted sum); when
    the workers keep every core busy, run it with ``torch.set_num_threads(1)``, or its OpenMP
    threads spin against the workers.
    """

    def __init__(self, task, model: nn.Module | None = None, *, n_workers: int,
                 stragglers_s: int = 1, scheme: str = "auto", transport: str = "zmq",
                 workers: str | None = None, optimizer=None, lr: float | None = None,
                 task_options: dict | None = None, slowdown=None, wait: str = "first",
                 seed: int = 0, round_timeout_s: float = 60.0, startup_timeout_s: float = 120.0,
                 late_window: int = 16, poll_s: float = 0.001, bind: str = "tcp://127.0.0.1:0",
                 log_dir=None, repeat: int = 1, shard: dict | None = None):  # fmt: skip
        if wait not in WAITS:
            raise ConfigError(f"wait={wait!r} is invalid; valid: {WAITS}")
        self.task, name = _resolve_task(task, task_options, transport)
        self.plan = DataPlan(len(self.task.train[0]), n_workers, seed=seed, shard=shard,
                             gc=(scheme, stragglers_s, seed), labels=self.task.groups)  # fmt: skip
        self.code: GradientCode = self.plan.gc_code
        self.n, self.s, self.wait = self.code.n, self.code.s, wait
        if model is None:
            torch.manual_seed(seed)
            model = self.task.model_fn()
        self.model, self.layout = model, ParamLayout.from_module(model)
        self.optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr or self.task.lr)
        self.round_timeout_s = float(round_timeout_s)
        self.dtype = next(model.parameters()).dtype
        self._slow = _as_slowdown(slowdown)
        self.steps = 0
        head, tensors = self._slow.to_wire() if self._slow else (None, [])
        self._config = ({"task": name, "task_options": task_options or {}, "plan": self.plan.spec(),
                         "dtype": str(self.dtype).removeprefix("torch."), "slowdown": head,
                         "repeat": int(repeat)}, tensors)  # fmt: skip
        self._m = _Master(n_workers, transport, workers, bind=bind, late_window=late_window,
                          startup_timeout_s=startup_timeout_s, poll_s=poll_s, log_dir=log_dir,
                          task=self.task)  # fmt: skip
        if self._m.workers != "external":
            self.start()

    @property
    def hub(self):
        """The memory hub (transport="memory"): inject faults keyed by wire round
        ``FIRST_ROUND + step``."""
        return self._m.hub

    @property
    def stats(self) -> dict:
        """``late`` vectors released, ``late_by_worker``, ``invalid`` replies dropped."""
        return self._m.stats

    @property
    def procs(self) -> dict[int, subprocess.Popen]:
        return self._m.procs

    @property
    def transport(self):
        return self._m.t

    @property
    def closed(self) -> bool:
        return self._m.closed

    def worker_argv(self, worker: int) -> list[str]:
        """Command line of one worker process (for ``workers="external"``)."""
        return self._m.argv(worker)

    def start(self) -> None:
        """Handshake with every worker (idempotent; :meth:`step` calls it)."""
        try:
            self._m.start(*self._config, self.plan.digest, self.layout.numel)
        except BaseException:
            self.close()
            raise

    def gradient(self, wait: str | None = None) -> StepResult:
        """One round: broadcast the model, collect, decode; the model is not updated."""
        if self._m.closed:
            raise ConfigError("this CodedGroup is closed")
        wait = wait or self.wait
        if wait not in WAITS:
            raise ConfigError(f"wait={wait!r} is invalid; valid: {WAITS}")
        self.start()
        try:
            return self._round(wait)
        except BaseException:
            self.close()
            raise

    def step(self, wait: str | None = None) -> StepResult:
        """:meth:`gradient`, then the optimizer step with the decoded mean gradient."""
        res = self.gradient(wait)
        _set_grads(self.model, self.layout, res.grad)
        self.optimizer.step()
        return res

    @torch.no_grad()
    def _round(self, wait: str) -> StepResult:
        t0, k, r = time.perf_counter(), self.steps, FIRST_ROUND + self.steps
        snapshot = self.layout.flatten(self.model).cpu()  # fresh: sent zero-copy
        tasks = [[k, "gc", 0, 0]]
        for w in range(self.n):
            if w not in self._m.dead():
                self._m.send_work(w, r, tasks, [snapshot])
        need = self.n if wait == "all" else self.n - self.s
        code = self.code

        def done(got, _first):
            return len(got) >= need and (len(got) == self.n or code.is_decodable(got))

        t_wait = time.perf_counter()
        got, _ = self._m.collect(r, dict.fromkeys(range(self.n), tasks), done,
                                 self.round_timeout_s, self.layout.numel, self.dtype)  # fmt: skip
        wait_s = time.perf_counter() - t_wait
        late = self._m.drain_late(r)
        if len(got) < self.n - self.s or not code.is_decodable(got):
            dead = self._m.dead()
            why = f"; workers gone: {dead}" if dead else ""
            try:
                code.decoding_vector(got)
                reason = f"only {len(got)} of the {need} vectors waited for arrived"
            except DecodeError as e:
                reason = str(e)
            raise DecodeError(f"step {k}: {reason} after {wait_s:.1f} s (round_timeout_s="
                              f"{self.round_timeout_s}){why}; the group is shut down")  # fmt: skip
        out = torch.empty(self.layout.numel, dtype=torch.float64)
        code.decode(None, {w: m.tensors[0] for w, m in got.items()}, out=out)
        out.div_(self.plan.samples)
        weights = code.decoding_weights(got)
        for m in got.values():
            self._m.t.release(m)
        self.steps += 1
        return StepResult(step=k, grad=out, arrived=tuple(sorted(got)),
                          decoded_from=tuple(sorted(weights)),
                          missing=tuple(w for w in range(self.n) if w not in got), late=late,
                          seconds=time.perf_counter() - t0, wait_s=wait_s,
                          compute_s={w: m.header["compute_s"] for w, m in got.items()})  # fmt: skip

    def close(self) -> None:
        """Stop the workers (processes are killed if they do not exit within 5 s), close."""
        self._m.close()

    def __enter__(self) -> CodedGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
