"""The schemes: the GC baseline, selective-repetition SGC and multiplexed SGC, with their loads.

Normalised load is the fraction of one job's data a worker processes per round; the delay ``T``
is how many rounds after its start a job must be decoded. Example:
``sr_sgc_load(256, 2, 3, 23) == 13 / 256`` and ``MultiplexedSGC(256, 1, 2, 27, 80).T == 1``.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import ConfigError
from .bursty import BurstyModel, _int
from .schedule import SequentialScheme, Task

# -- loads and delays (normalised load: fraction of one job's data per worker per round) ---------


def gc_load(n: int, s: int) -> float:
    """GC with tolerance ``s``: ``(s + 1) / n``. Example: ``gc_load(256, 15) == 0.0625``."""
    return (s + 1) / n


def _check_sr(B: int, W: int, lam: int) -> None:
    BurstyModel(B, W, lam)
    if W <= B or (W - 1) % B:
        raise ConfigError(
            f"selective-repetition SGC needs W = x*B + 1 with x >= 1; got B={B}, W={W} "
            f"(W - 1 = {W - 1} is {'not above B' if W <= B else f'not divisible by B={B}'})"
        )


def sr_sgc_tolerance(B: int, W: int, lam: int) -> int:
    """Per-round GC tolerance of SR-SGC: ``s = ceil(B lam / (W - 1 + B))``; (1, 2, 23) -> 12."""
    _check_sr(B, W, lam)
    return math.ceil(B * lam / (W - 1 + B))


def sr_sgc_load(n: int, B: int, W: int, lam: int) -> float:
    """SR-SGC load ``(s + 1) / n``. Example: ``sr_sgc_load(256, 2, 3, 23) == 13 / 256``."""
    return gc_load(n, sr_sgc_tolerance(B, W, lam))


def msgc_delay(B: int, W: int) -> int:
    """M-SGC delay ``T = W - 2 + B`` rounds."""
    return W - 2 + B


def msgc_d1_fraction(n: int, B: int, W: int, lam: int) -> float:
    """Share of a job's data in M-SGC's repetition part D1 (the rest, D2, is gradient coded)."""
    if lam >= n:
        return 1.0
    return (lam + 1) * (W - 1) / (B + (lam + 1) * (W - 1))


def msgc_load(n: int, B: int, W: int, lam: int) -> float:
    """M-SGC load: ``(lam+1)(W-1+B) / (n (B + (W-1)(lam+1)))``, or ``(W-1+B)/(n(W-1))`` at lam = n.

    Example: ``msgc_load(256, 1, 2, 27)`` is 0.007543 (to 1e-6).
    """
    return (W - 1 + B) * msgc_d1_fraction(n, B, W, lam) / (n * (W - 1))


class _OneTaskScheme(SequentialScheme):
    """Schemes where each worker computes one (n, s) GC task per round (GC and SR-SGC).

    Only the job due this round can become infeasible: a job ``j`` missing ``v > s`` results is
    redone by ``v - s`` workers in round ``j + T``, which decodes it if nobody straggles then.
    """

    def __init__(self, n, model, n_jobs, T, s, policy):
        super().__init__(n, model, n_jobs, T, gc_load(n, s), policy)
        if s >= n:
            raise ConfigError(f"tolerance s={s} needs s < n={n}")
        self.s = s
        self.received = np.zeros((self.n_jobs, self.n), dtype=bool)

    def survivors(self, job: int) -> tuple[int, ...]:
        """Workers whose coded GC result for ``job`` arrived (decode with any n - s of them)."""
        return tuple(np.flatnonzero(self.received[job]).tolist())

    def is_decodable(self, job: int) -> bool:
        return int(self.received[job].sum()) >= self.n - self.s

    def tasks(self) -> list[list[Task]]:
        return [[Task(int(j), "gc", 0)] if j >= 0 else [] for j in self.plan()]

    def _apply(self, plan, row):
        ok = (plan >= 0) & ~row
        self.received[plan[ok], np.flatnonzero(ok)] = True

    def _feasible(self):
        due = self._due(self.round)
        return due < 0 or self.is_decodable(due)

    def _snapshot(self):
        js = self._in_flight(self.round)
        return js, self.received[js.start : js.stop].copy()

    def _restore(self, snap):
        js, rec = snap
        self.received[js.start : js.stop] = rec


class GradientCodingScheme(_OneTaskScheme):
    """The GC baseline: job ``r`` in round ``r`` with an (n, s) code, ``T = 0``, load (s+1)/n.

    Its model is "at most ``s`` stragglers per round", i.e. ``BurstyModel(1, 1, s)``.
    """

    name = "GC"

    def __init__(self, n: int, s: int, n_jobs: int, policy: str = "model"):
        s = _int("s", s, 0)
        super().__init__(n, BurstyModel(1, 1, s), n_jobs, 0, s, policy)

    def _make_plan(self) -> np.ndarray:
        """Job index per worker (``-1``: idle)."""
        return np.full(self.n, self.round if self.round < self.n_jobs else -1, dtype=np.int64)


class SelectiveRepetitionSGC(_OneTaskScheme):
    """SR-SGC: GC with ``s = ceil(B lam / (W-1+B))`` plus re-attempts ``B`` rounds later; ``T = B``.

    Round ``r``: everyone computes its job-``r`` task, except that if ``v > s`` workers missed
    job ``u = r - B``, the ``v - s`` lowest-numbered of them redo their job-``u`` task instead.
    :meth:`plan` gives the job index per worker (``-1``: idle, e.g. in the tail rounds).
    """

    name = "SR-SGC"

    def __init__(self, n: int, B: int, W: int, lam: int, n_jobs: int, policy: str = "model"):
        s = sr_sgc_tolerance(B, W, lam)
        super().__init__(n, BurstyModel(B, W, lam), n_jobs, B, s, policy)

    def _make_plan(self) -> np.ndarray:
        r = self.round
        work = np.full(self.n, r if r < self.n_jobs else -1, dtype=np.int64)
        u = r - self.T
        if 0 <= u < self.n_jobs:
            missing = np.flatnonzero(~self.received[u])
            if missing.size > self.s:
                work[missing[: missing.size - self.s]] = u
        return work


class MultiplexedSGC(SequentialScheme):
    """M-SGC: repetition part D1 plus a gradient-coded part D2, ``T = W - 2 + B``.

    Each job has ``W - 1 + B`` minitask slots per worker; in round ``r`` worker ``i`` does slot
    ``m`` of job ``r - m``. Slots ``m < W - 1`` are D1 chunks (only worker ``i`` ever computes its
    own ``W - 1`` chunks); a slot ``m >= W - 1`` computes D2 group ``m - (W - 1)`` (an (n, lam)
    code) if the worker has all its D1 chunks, else redoes a pending D1 chunk. A job decodes when
    every worker has all its D1 chunks and every D2 group has ``n - lam`` coded results.
    :meth:`plan` gives codes ``[slots, n]``: slot ``m`` works on job ``round - m``; ``-2`` no
    such job, ``-1`` idle, ``0`` a D1 chunk, ``g + 1`` D2 group ``g``.
    """

    name = "M-SGC"
    NONE, IDLE, D1 = -2, -1, 0  # plan codes; group g of D2 is code g + 1

    def __init__(self, n: int, B: int, W: int, lam: int, n_jobs: int, policy: str = "model"):
        model = BurstyModel(B, W, lam)
        if W <= B:
            raise ConfigError(f"M-SGC needs 1 <= B < W; got B={B}, W={W}")
        _int("lam", lam, 0, n)
        super().__init__(n, model, n_jobs, msgc_delay(B, W), msgc_load(n, B, W, lam), policy)
        self.slots = W - 1 + B
        self.d1_fraction = msgc_d1_fraction(n, B, W, lam)
        self.d1_done = np.zeros((self.n_jobs, self.n), dtype=np.int64)
        self.d2_received = np.zeros((self.n_jobs, B, self.n), dtype=bool)
        self._m = np.arange(self.slots)
        self._group_slot = np.arange(B) + W - 1  # the slot of each D2 group

    def _jobs(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        jobs = r - self._m
        return jobs, (jobs >= 0) & (jobs < self.n_jobs)

    def _make_plan(self) -> np.ndarray:
        W, lam = self.model.W, self.model.lam
        jobs, valid = self._jobs(self.round)
        done = self.d1_done[np.where(valid, jobs, 0)]
        group = np.maximum(self._m - (W - 1), -1)[:, None] + 1  # 0 for D1 slots
        d2 = (group > 0) & (done >= W - 1)
        codes = np.where(d2, group if lam < self.n else self.IDLE, self.D1)
        codes[~valid] = self.NONE
        return codes

    def tasks(self) -> list[list[Task]]:
        W = self.model.W
        codes = self.plan()
        jobs, _ = self._jobs(self.round)
        out: list[list[Task]] = [[] for _ in range(self.n)]
        for m, i in zip(*np.nonzero(codes >= 0), strict=True):
            j, c = int(jobs[m]), int(codes[m, i])
            chunk = int(i) * (W - 1) + int(self.d1_done[j, i])
            out[i].append(Task(j, "d1", chunk) if c == 0 else Task(j, "d2", c - 1))
        return out

    def d2_survivors(self, job: int, group: int) -> tuple[int, ...]:
        """Workers whose coded result for D2 ``group`` of ``job`` arrived."""
        return tuple(np.flatnonzero(self.d2_received[job, group]).tolist())

    def is_decodable(self, job: int) -> bool:
        need = self.n - self.model.lam
        return bool(
            (self.d1_done[job] >= self.model.W - 1).all()
            and (self.d2_received[job].sum(axis=-1) >= need).all()
        )

    def _apply(self, plan, row):
        W = self.model.W
        ok = (plan >= 0) & ~row[None, :]
        jobs, valid = self._jobs(self.round)
        self.d1_done[jobs[valid]] += (ok & (plan == self.D1))[valid]
        for m in np.flatnonzero(valid & (self._m >= W - 1)):
            g = m - (W - 1)
            self.d2_received[jobs[m], g] |= ok[m] & (plan[m] == g + 1)

    def _feasible(self):
        js = self._in_flight(self.round)
        if not len(js):
            return True
        W = self.model.W
        off = self.round - np.arange(js.start, js.stop)  # last slot processed, per job
        pending = (W - 1) - self.d1_done[js.start : js.stop]  # [jobs, n]
        if (pending > (self.T - off)[:, None]).any():
            return False
        if self.model.lam >= self.n:
            return True
        got = self.d2_received[js.start : js.stop].sum(axis=-1)  # [jobs, B]
        # a future group slot is computed by the workers done with D1 by then
        room = self._group_slot[None, :] - off[:, None] - 1  # future slots before it
        later = (pending[:, None, :] <= room[:, :, None]).sum(axis=-1)
        count = np.where(room >= 0, got + later, got)
        return bool((count >= self.n - self.model.lam).all())

    def _snapshot(self):
        js = self._in_flight(self.round)
        a, b = js.start, js.stop
        return a, b, self.d1_done[a:b].copy(), self.d2_received[a:b].copy()

    def _restore(self, snap):
        a, b, d1, d2 = snap
        self.d1_done[a:b] = d1
        self.d2_received[a:b] = d2
