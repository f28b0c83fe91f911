"""Jobs in flight: ``M`` models trained concurrently by one coded group under sequential gradient
coding (:mod:`gossip.algorithms.sgc`); job ``t`` is a gradient of model ``t mod M`` and must
decode by round ``t + T``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...algorithms.sgc import GradientCodingScheme, MultiplexedSGC, SelectiveRepetitionSGC
from ...errors import ConfigError, DecodeError
from ...layout import ParamLayout
from ...ops import weighted_sum_
from .master import _Master, _resolve_task, _set_grads
from .plan import DataPlan
from .slowdown import _as_slowdown
from .worker import FIRST_ROUND

SWEEP_SCHEMES = ("gc", "srsgc", "msgc")


@dataclass
class JobResult:
    """A decoded job: the mean gradient of model ``model`` at parameters ``params``."""

    job: int
    model: int
    decoded_round: int
    deadline: int
    grad: torch.Tensor
    params: torch.Tensor


@dataclass
class SweepRound:
    """One round of a :class:`CodedSweep`: who was missing, whether it waited for all, the jobs
    it decoded, the late vectors released, and its duration (seconds)."""

    round: int
    missing: tuple[int, ...]
    waited: bool
    decoded: list[JobResult] = field(default_factory=list)
    late: int = 0
    seconds: float = 0.0


class CodedSweep:
    """``M = len(lrs)`` models trained concurrently by one coded group with jobs in flight.

    Job ``t`` is the full gradient of model ``t mod M`` at its parameters when round ``t``
    starts; the SGC ``scheme`` (``"gc"`` with ``s``; ``"srsgc"``/``"msgc"`` with ``B, W, lam``)
    decides each worker's minitasks per round and guarantees job ``t`` decodes by round
    ``t + T``; the model is updated as soon as its job decodes. ``M >= T + 1`` makes every job
    of a model start after its previous update. A round waits ``max(min_wait_s, (1 + mu) *
    first arrival)``, then stops as soon as the missing workers form a set the scheme accepts
    (it waits for all otherwise). Other arguments as in :class:`CodedGroup`.

    Example: ``CodedSweep("digits", [0.1, 0.3], n_workers=4, scheme="msgc", B=1, W=2, lam=1,
    n_jobs=20, transport="memory").run()``.
    """

    def __init__(self, task, lrs: Sequence[float], *, n_workers: int, n_jobs: int,
                 scheme: str = "msgc", B: int = 1, W: int = 2, lam: int = 1, s: int = 1,
                 code_scheme: str = "auto", transport: str = "memory", workers: str | None = None,
                 task_options: dict | None = None, slowdown=None, mu: float = 1.0,
                 min_wait_s: float = 0.05, policy: str = "model", seed: int = 0,
                 round_timeout_s: float = 60.0, startup_timeout_s: float = 120.0,
                 poll_s: float = 0.001, bind: str = "tcp://127.0.0.1:0", log_dir=None,
                 shard: dict | None = None):  # fmt: skip
        self.task, name = _resolve_task(task, task_options, transport)
        n = n_workers
        if scheme == "gc":
            self.scheme = GradientCodingScheme(n, s, n_jobs, policy)
        elif scheme == "srsgc":
            self.scheme = SelectiveRepetitionSGC(n, B, W, lam, n_jobs, policy)
        elif scheme == "msgc":
            self.scheme = MultiplexedSGC(n, B, W, lam, n_jobs, policy)
        else:
            raise ConfigError(f"scheme={scheme!r} is invalid; valid: {SWEEP_SCHEMES}")
        T = self.scheme.T
        if len(lrs) < T + 1:
            raise ConfigError(f"scheme {scheme!r} has delay T={T}, so a model's next job starts "
                              f"before its gradient decodes unless there are at least T + 1 = "
                              f"{T + 1} models; got {len(lrs)} learning rates")  # fmt: skip
        common = dict(seed=seed, shard=shard, labels=self.task.groups)
        if scheme == "msgc":
            msgc = {"B": B, "W": W, "lam": lam, "scheme": code_scheme, "code_seed": seed}
            self.plan = DataPlan(len(self.task.train[0]), n, msgc=msgc, **common)
        else:
            gc = (code_scheme, self.scheme.s, seed)
            self.plan = DataPlan(len(self.task.train[0]), n, gc=gc, **common)
        self.models, self.optimizers = [], []
        for lr in lrs:
            torch.manual_seed(seed)
            m = self.task.model_fn()
            self.models.append(m)
            self.optimizers.append(torch.optim.SGD(m.parameters(), lr=float(lr)))
        self.layout = ParamLayout.from_module(self.models[0])
        self.dtype = next(self.models[0].parameters()).dtype
        self.mu, self.min_wait_s = float(mu), float(min_wait_s)
        self.round_timeout_s = float(round_timeout_s)
        self.rounds: list[SweepRound] = []
        self._params: dict[int, torch.Tensor] = {}
        self._results: dict[int, dict] = {}
        slow = _as_slowdown(slowdown)
        head, tensors = slow.to_wire() if slow else (None, [])
        config = {"task": name, "task_options": task_options or {}, "plan": self.plan.spec(),
                  "dtype": str(self.dtype).removeprefix("torch."), "slowdown": head}  # fmt: skip
        self._m = _Master(n, transport, workers, bind=bind, late_window=T + 4,
                          startup_timeout_s=startup_timeout_s, poll_s=poll_s, log_dir=log_dir,
                          task=self.task)  # fmt: skip
        try:
            self._m.start(config, tensors, self.plan.digest, self.layout.numel)
        except BaseException:
            self.close()
            raise

    @property
    def stats(self) -> dict:
        return self._m.stats

    @property
    def hub(self):
        return self._m.hub

    @property
    def done(self) -> bool:
        return self.scheme.round >= self.scheme.total_rounds

    @torch.no_grad()
    def round(self) -> SweepRound:
        """Run the scheme's next round; returns what it did (raises DecodeError and shuts down
        when a round the scheme must wait for does not complete within round_timeout_s)."""
        if self._m.closed:
            raise ConfigError("this CodedSweep is closed")
        try:
            return self._round()
        except BaseException:
            self.close()
            raise

    def _round(self) -> SweepRound:
        sc, t0 = self.scheme, time.perf_counter()
        r, M = sc.round, len(self.models)
        wire = FIRST_ROUND + r
        if r < sc.n_jobs:
            self._params[r] = self.layout.flatten(self.models[r % M]).cpu()
            self._results[r] = {}
        expected = {}
        for w, tasks in enumerate(sc.tasks()):
            if not tasks:
                continue
            jobs = sorted({tk.job for tk in tasks})
            expected[w] = [[tk.job, tk.part, tk.index, jobs.index(tk.job)] for tk in tasks]
            self._m.send_work(w, wire, expected[w], [self._params[j] for j in jobs])

        def done(got, t_first):
            missing = [w for w in expected if w not in got]
            if not missing:
                return True
            if t_first is None:
                return False
            window = max(self.min_wait_s, (1.0 + self.mu) * t_first)
            return time.monotonic() - t_start >= window and sc.acceptable(missing)

        t_start = time.monotonic()
        got, ok = self._m.collect(wire, expected, done, self.round_timeout_s, self.layout.numel,
                                  self.dtype)  # fmt: skip
        late = self._m.drain_late(wire)
        missing = tuple(w for w in expected if w not in got)
        if not ok:
            dead = self._m.dead()
            raise DecodeError(
                f"round {r}: workers {list(missing)} did not answer within round_timeout_s="
                f"{self.round_timeout_s} s and the scheme cannot go on without them (a job in "
                f"flight would miss its deadline){f'; workers gone: {dead}' if dead else ''}; "
                f"the sweep is shut down"
            )
        outcome = sc.observe(list(missing))
        for w, m in got.items():
            for (job, part, index, _), vec in zip(expected[w], m.tensors, strict=True):
                if job in self._results:
                    self._results[job][(part, index, w)] = vec
        res = SweepRound(round=r, missing=missing, waited=outcome.waited, late=late)
        for job in outcome.decoded:
            grad = self._decode(job)
            k = job % M
            _set_grads(self.models[k], self.layout, grad)
            self.optimizers[k].step()
            res.decoded.append(JobResult(job, k, r, job + sc.T, grad, self._params[job]))
            del self._results[job]  # a later result for it (none is scheduled) is dropped
        for job in [j for j in self._params if j <= r - sc.T]:  # past its deadline: decoded
            del self._params[job]
        res.seconds = time.perf_counter() - t0
        self.rounds.append(res)
        return res

    def _decode(self, job: int) -> torch.Tensor:
        """Sum of every minitask result of ``job`` with its decoding weight (one weighted sum)."""
        results, plan, inputs, weights = self._results[job], self.plan, [], []
        if plan.gc_code is not None:
            coded = {w: v for (part, _, w), v in results.items() if part == "gc"}
            for w, a in plan.gc_code.decoding_weights(coded).items():
                inputs.append(coded[w])
                weights.append(a)
        else:
            d1 = {i: v for (part, i, _), v in results.items() if part == "d1"}
            if len(d1) != len(plan.d1_chunks):
                raise DecodeError(f"job {job}: {len(d1)} of {len(plan.d1_chunks)} D1 chunks")
            inputs += list(d1.values())
            weights += [1.0] * len(d1)
            for g in range(len(plan.d2_groups)) if plan.lam_code is not None else ():
                coded = {w: v for (part, i, w), v in results.items() if part == "d2" and i == g}
                for w, a in plan.lam_code.decoding_weights(coded).items():
                    inputs.append(coded[w])
                    weights.append(a)
        out = torch.empty(self.layout.numel, dtype=torch.float64)
        return weighted_sum_(out, inputs, weights).div_(plan.samples)

    def run(self):
        """Run every remaining round; returns the scheme's
        :class:`~gossip.algorithms.sgc.ScheduleReport`."""
        while not self.done:
            self.round()
        return self.scheme.report()

    def close(self) -> None:
        self._m.close()

    def __enter__(self) -> CodedSweep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
