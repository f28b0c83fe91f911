"""Decoding bookkeeping shared by every sequential scheme: rounds, jobs in flight, deadlines.

:class:`SequentialScheme` drives a schedule round by round (``plan()`` / ``tasks()``,
``acceptable(missing)``, ``observe(stragglers)``) and keeps the invariant "every job in flight can
still meet its deadline"; a scheme (:mod:`.schemes`) only says what each worker computes and when
a job decodes. :class:`ScheduleReport` is the record of a whole run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ...errors import AlgorithmError, ConfigError, DecodeError
from .bursty import BurstyModel, _int, round_violation


class Task(NamedTuple):
    """One unit of work: ``part`` is ``"gc"`` (the worker's coded GC task), ``"d1"`` (M-SGC
    repetition chunk ``index``, global chunk id) or ``"d2"`` (M-SGC coded group ``index``)."""

    job: int
    part: str
    index: int


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did: whether the master ``waited`` for all (and why), the stragglers it
    skipped (empty when it waited) and the jobs first decodable at the end of the round."""

    round: int
    waited: bool
    reason: str
    stragglers: tuple[int, ...]
    decoded: tuple[int, ...]


@dataclass
class ScheduleReport:
    """A whole schedule: rounds ``n_jobs + T``; per job the first round it was decodable and its
    deadline ``t + T``; the rounds that waited for all, why, and the jobs in flight then."""

    scheme: str
    n_jobs: int
    T: int
    load: float
    rounds: int
    decoded_round: np.ndarray
    deadline: np.ndarray
    waited_rounds: tuple[int, ...] = ()
    wait_reasons: dict[int, str] = field(default_factory=dict)
    fallback_jobs: tuple[int, ...] = ()


POLICIES = ("model", "deadline")


class SequentialScheme(ABC):
    """A schedule of ``n_jobs`` jobs on ``n`` workers with delay ``T`` under a straggler model.

    Drive it round by round: ``plan()`` / ``tasks()`` say what each worker computes in the
    current round; ``acceptable(stragglers)`` says whether the master may stop waiting while
    those workers are still missing (ask it as arrivals come in); ``observe(stragglers)``
    applies the round (or waits for all) and advances. ``run(pattern)`` does every round.
    ``is_decodable(job)`` and the survivor accessors tell the runtime what decodes each job.

    ``policy`` decides when the master waits for everyone:

    - ``"model"`` (the paper's): when the round breaks the (B, W, lambda) model, or when a job in
      flight could otherwise miss its deadline. Never waits on a conforming pattern.
    - ``"deadline"``: only when a job in flight could otherwise miss its deadline, i.e. would not
      decode by ``t + T`` even if nobody straggled from the next round on. In any state it
      waits only where ``"model"`` would too; on patterns that break the model it waits less.

    Both keep the invariant "every job in flight can still meet its deadline", so waiting for
    all in a round always restores it and no job is ever late.
    """

    name = ""

    def __init__(
        self, n: int, model: BurstyModel, n_jobs: int, T: int, load: float, policy: str = "model"
    ):
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r} is invalid; valid: {POLICIES}")
        self.n, self.model, self.policy = _int("n", n, 1), model, policy
        self.n_jobs, self.T, self.load = _int("n_jobs", n_jobs, 0), T, load
        self.total_rounds = self.n_jobs + T
        self.round = 0
        self.history = np.zeros((self.total_rounds, self.n), dtype=bool)
        self.decoded_round = np.full(self.n_jobs, -1, dtype=np.int64)
        self.wait_reasons: dict[int, str] = {}
        self._plan: tuple[int, np.ndarray] | None = None

    @abstractmethod
    def _make_plan(self) -> np.ndarray:
        """Integer codes of the current round's work (layout is per scheme)."""

    @abstractmethod
    def tasks(self) -> list[list[Task]]:
        """Per worker, the tasks of the current round."""

    @abstractmethod
    def is_decodable(self, job: int) -> bool:
        """Whether ``job`` can be decoded from the results received so far."""

    @abstractmethod
    def _apply(self, plan: np.ndarray, row: np.ndarray) -> None:
        """Credit the results of the workers not in ``row`` for the current round."""

    @abstractmethod
    def _feasible(self) -> bool:
        """After ``_apply``: can every job in flight still decode by its deadline if nobody
        straggles from the next round on?"""

    @abstractmethod
    def _snapshot(self) -> tuple:
        """Copies of the state ``_apply`` may change this round."""

    @abstractmethod
    def _restore(self, snap: tuple) -> None:
        """Undo ``_apply`` (put back a ``_snapshot``)."""

    def plan(self) -> np.ndarray:
        """The current round's work, as integer codes (see the scheme); cached per round."""
        if self._plan is None or self._plan[0] != self.round:
            self._plan = (self.round, self._make_plan())
        return self._plan[1]

    def _due(self, r: int) -> int:
        j = r - self.T
        return j if 0 <= j < self.n_jobs else -1

    def _in_flight(self, r: int) -> range:
        return range(max(0, r - self.T), min(self.n_jobs, r + 1))

    def _row(self, stragglers) -> np.ndarray:
        row = np.zeros(self.n, dtype=bool)
        idx = np.asarray(stragglers)
        if idx.dtype == bool:
            if idx.shape != (self.n,):
                raise AlgorithmError(f"stragglers has shape {idx.shape}; need ({self.n},)")
            row[:] = idx
        elif idx.size:
            idx = idx.astype(np.int64).ravel()
            if idx.min() < 0 or idx.max() >= self.n:
                raise AlgorithmError(
                    f"stragglers {idx.tolist()} name a worker outside 0..{self.n - 1}"
                )
            row[idx] = True
        return row

    def _why_wait(self, row: np.ndarray) -> str:
        """Empty when the round may go on without ``row``; else the reason to wait for all."""
        r = self.round
        if r >= self.total_rounds:
            raise AlgorithmError(f"all {self.total_rounds} rounds (n_jobs + T) are done")
        if not row.any():
            return ""
        if self.policy == "model":
            m = self.model
            hist = self.history[max(0, r - m.W + 1) : r]
            v = round_violation(hist, row, m.B, m.W, m.lam, round_index=r)
            if v is not None:
                return str(v)
        snap = self._snapshot()
        self._apply(self.plan(), row)
        ok = self._feasible()
        self._restore(snap)
        if ok:
            return ""
        return (
            f"round {r}: without workers {np.flatnonzero(row)[:8].tolist()}"
            f"{'...' if row.sum() > 8 else ''} a job in flight would miss its deadline"
        )

    def acceptable(self, stragglers) -> bool:
        """Would the current round go on without ``stragglers`` (bool ``[n]`` or ids)?

        Monotone: if a set is acceptable, so is every subset. A master collecting arrivals can
        stop waiting as soon as the workers still missing form an acceptable set.
        """
        return self._why_wait(self._row(stragglers)) == ""

    def observe(self, stragglers) -> RoundOutcome:
        """Apply the current round's stragglers (bool ``[n]`` or worker ids) and advance.

        The round goes on without them when :meth:`acceptable`; otherwise the master waits for
        everyone (the fallback) and no one straggles in this round's history.
        """
        row = self._row(stragglers)
        reason = self._why_wait(row)
        r = self.round
        if reason:
            row[:] = False
            self.wait_reasons[r] = reason
        self._apply(self.plan(), row)
        if not self._feasible():  # our invariant: waiting for all always restores feasibility
            raise DecodeError(f"round {r}: a job in flight can no longer meet its deadline")
        self.history[r] = row
        newly = []
        for j in self._in_flight(r):
            if self.decoded_round[j] < 0 and self.is_decodable(j):
                self.decoded_round[j] = r
                newly.append(j)
        self.round = r + 1
        return RoundOutcome(
            r, bool(reason), reason, tuple(np.flatnonzero(row).tolist()), tuple(newly)
        )

    def run(self, pattern: np.ndarray) -> ScheduleReport:
        """Run every remaining round with ``pattern[r]`` as round ``r``'s stragglers."""
        p = np.asarray(pattern, dtype=bool)
        if p.ndim != 2 or p.shape[1] != self.n or p.shape[0] < self.total_rounds:
            raise AlgorithmError(
                f"pattern has shape {p.shape}; need [rounds >= n_jobs + T = {self.total_rounds}, "
                f"n = {self.n}]"
            )
        while self.round < self.total_rounds:
            self.observe(p[self.round])
        return self.report()

    def report(self) -> ScheduleReport:
        waited = tuple(sorted(self.wait_reasons))
        fallback = sorted({j for r in waited for j in self._in_flight(r)})
        return ScheduleReport(
            scheme=self.name,
            n_jobs=self.n_jobs,
            T=self.T,
            load=self.load,
            rounds=self.round,
            decoded_round=self.decoded_round.copy(),
            deadline=np.arange(self.n_jobs) + self.T,
            waited_rounds=waited,
            wait_reasons=dict(self.wait_reasons),
            fallback_jobs=tuple(fallback),
        )
