"""The (B, W, lambda)-bursty straggler model: one checker and a seeded pattern generator.

In every window of ``W`` consecutive rounds at most ``lambda`` distinct workers straggle, and each
worker's straggling rounds inside a window lie in one burst of at most ``B`` consecutive rounds.
A pattern is a bool array ``[rounds, n]`` (``pattern[r, i]``: worker ``i`` straggles in round
``r``). :func:`round_violation` is the one checker; :func:`first_violation`, :func:`conforms`,
:func:`bursty_pattern` and the schemes' ``"model"`` policy all go through it.

Example: ``conforms(bursty_pattern(16, 100, B=2, W=3, lam=4, seed=1), 2, 3, 4)`` is True.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import AlgorithmError, ConfigError


def _int(name: str, v, lo: int, hi: int | None = None) -> int:
    ok = not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        rng = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ConfigError(f"{name}={v!r} is invalid; need an integer with {rng}")
    return int(v)


@dataclass(frozen=True)
class BurstyModel:
    """The (B, W, lambda)-bursty straggler model (burst length, window length, distinct stragglers).

    ``1 <= B <= W``; ``B = W`` puts no temporal constraint. ``BurstyModel(1, 1, s)`` is the GC
    model "at most ``s`` stragglers in every round".
    """

    B: int
    W: int
    lam: int

    def __post_init__(self):
        _int("W", self.W, 1)
        _int("B", self.B, 1, self.W)
        _int("lam", self.lam, 0)


@dataclass(frozen=True)
class Violation:
    """Where a pattern first breaks the model: ``round``, ``kind`` and the ``workers`` involved."""

    round: int
    kind: str  # "spatial" or "temporal"
    workers: tuple[int, ...]
    message: str

    def __str__(self) -> str:
        return self.message


def _windows(history: np.ndarray, B: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """(seen, blocked) for the round after ``history``: who straggled in its last ``W - 1`` rounds,
    and who straggled in rounds ``r - W + 1 .. r - B`` (may not straggle in round ``r``)."""
    h = len(history)
    seen = history[max(0, h - W + 1) : h].any(axis=0)
    blocked = history[max(0, h - W + 1) : max(0, h - B + 1)].any(axis=0)
    return seen, blocked


def round_violation(
    history: np.ndarray, row: np.ndarray, B: int, W: int, lam: int, round_index: int | None = None
) -> Violation | None:
    """The one model checker: does round ``r`` (stragglers ``row``) break (B, W, lambda)?

    ``history`` is the bool ``[h, n]`` pattern of the rounds just before (only the last ``W - 1``
    matter); ``round_index`` (default ``h``) labels the message. Returns None when it conforms.
    """
    history = np.asarray(history, dtype=bool).reshape(-1, len(row))
    row = np.asarray(row, dtype=bool)
    r = len(history) if round_index is None else int(round_index)
    seen, blocked = _windows(history, B, W)
    again = np.flatnonzero(row & blocked)
    if again.size:
        w = int(again[0])
        lo = max(0, len(history) - W + 1)
        hits = np.flatnonzero(history[lo : max(0, len(history) - B + 1), w])
        earlier = r - (len(history) - (lo + int(hits[0])))
        return Violation(
            r,
            "temporal",
            tuple(int(i) for i in again),
            f"round {r}: worker {w} straggles again {r - earlier} rounds after round {earlier}; "
            f"(B={B}, W={W}) allows one burst of at most B consecutive rounds in any W rounds "
            f"({again.size} worker(s) affected: {again[:8].tolist()})",
        )
    distinct = np.flatnonzero(seen | row)
    if distinct.size > lam:
        return Violation(
            r,
            "spatial",
            tuple(int(i) for i in distinct),
            f"round {r}: {distinct.size} distinct stragglers in rounds "
            f"{max(0, r - W + 1)}..{r} but lam={lam} allows at most {lam} in any W={W} rounds",
        )
    return None


def first_violation(pattern: np.ndarray, B: int, W: int, lam: int) -> Violation | None:
    """The earliest round where bool ``pattern[rounds, n]`` breaks (B, W, lambda), or None."""
    BurstyModel(B, W, lam)
    p = np.asarray(pattern, dtype=bool)
    if p.ndim != 2:
        raise AlgorithmError(f"pattern has shape {p.shape}; need [rounds, n] booleans")
    for r in range(p.shape[0]):
        v = round_violation(p[max(0, r - W + 1) : r], p[r], B, W, lam, round_index=r)
        if v is not None:
            return v
    return None


def conforms(pattern: np.ndarray, B: int, W: int, lam: int) -> bool:
    """True when bool ``pattern[rounds, n]`` follows the (B, W, lambda)-bursty model."""
    return first_violation(pattern, B, W, lam) is None


def bursty_pattern(
    n: int, rounds: int, B: int, W: int, lam: int, *, p_start: float = 0.05, seed: int = 0
) -> np.ndarray:
    """A seeded random straggler pattern ``[rounds, n]`` that conforms to (B, W, lambda).

    Each round, every worker allowed to (not blocked by the temporal rule, not in a burst) starts
    a burst with probability ``p_start``; a burst lasts a uniform 1..B rounds. Proposals are cut
    to fit (blocked workers dropped, then a random subset of the newcomers kept within the
    ``lam`` budget) and every row is validated by :func:`round_violation`. High ``p_start``
    (0.3 to 1) fills the budget every window: the adversarial case for deadline tests.
    """
    model = BurstyModel(B, W, lam)
    n, rounds = _int("n", n, 1), _int("rounds", rounds, 0)
    if not 0.0 <= p_start <= 1.0:
        raise ConfigError(f"p_start={p_start!r} is invalid; need a probability in [0, 1]")
    rng = np.random.default_rng(seed)
    out = np.zeros((rounds, n), dtype=bool)
    left = np.zeros(n, dtype=np.int64)  # rounds left in each worker's current burst
    for r in range(rounds):
        hist = out[max(0, r - W + 1) : r]
        seen, blocked = _windows(hist, B, W)
        start = (left == 0) & ~blocked & (rng.random(n) < p_start)
        left[start] = rng.integers(1, B + 1, size=int(start.sum()))
        row = (left > 0) & ~blocked
        new = np.flatnonzero(row & ~seen)
        budget = max(0, model.lam - int(seen.sum()))
        if new.size > budget:
            row[rng.permutation(new)[budget:]] = False
        left[~row] = 0
        left[row] -= 1
        v = round_violation(hist, row, B, W, lam, round_index=r)
        assert v is None, f"generator broke its own model: {v}"
        out[r] = row
    return out
