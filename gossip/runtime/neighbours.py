"""A node's view of its neighbours: who it mixes with (:class:`Neighbourhood`), which of them
are up (:class:`PeerLiveness`), and what a round did (:class:`RoundReport`).

Example::

    hood = neighbourhood(schedule.weights(r), rank)   # in/out peers and weights of row ``rank``
    liveness = PeerLiveness(hood.in_peers, down_after=3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class Neighbourhood:
    """Node ``i``'s view of one round's mixing matrix ``W`` (row i = what i receives).

    ``in_peers``/``in_weights``: the j with ``W[i, j] > 0``; ``out_peers``/``out_weights``: the k
    with ``W[k, i] > 0`` (for push-sum, the share of i's mass sent to k); ``self_weight`` is
    ``W[i, i]``.
    """

    in_peers: tuple[int, ...]
    in_weights: tuple[float, ...]
    out_peers: tuple[int, ...]
    out_weights: tuple[float, ...]
    self_weight: float


def neighbourhood(W, i: int) -> Neighbourhood:
    """Node ``i``'s in- and out-neighbours and weights in the scipy sparse matrix ``W``.

    >>> import numpy as np, scipy.sparse as sp
    >>> nb = neighbourhood(sp.csr_array(np.array([[.5, .5, 0], [.25, .5, .25], [0, .5, .5]])), 1)
    >>> nb.in_peers, nb.in_weights, nb.out_peers, nb.self_weight
    ((0, 2), (0.25, 0.25), (0, 2), 0.5)
    """
    row = W.tocsr()
    col = W.tocsc()

    def entries(m, k):
        lo, hi = m.indptr[k], m.indptr[k + 1]
        return [
            (int(j), float(v))
            for j, v in zip(m.indices[lo:hi], m.data[lo:hi], strict=True)
            if v != 0
        ]

    ins = [(j, v) for j, v in entries(row, i) if j != i]
    outs = [(k, v) for k, v in entries(col, i) if k != i]
    return Neighbourhood(
        in_peers=tuple(j for j, _ in ins),
        in_weights=tuple(v for _, v in ins),
        out_peers=tuple(k for k, _ in outs),
        out_weights=tuple(v for _, v in outs),
        self_weight=float(W[i, i]),
    )


class PeerLiveness:
    """Which neighbours count as up: one that gave no sign of life for ``down_after`` rounds is
    down.

    ``observe(round, received, seen)`` takes each peer's running count of accepted messages
    (late ones included: a slow peer is alive) and the peers whose message this round used (a
    message that arrived early, during an earlier round, is a sign of life when it is used), and
    returns the peers that changed state this round.
    """

    def __init__(self, peers, down_after: int):
        if isinstance(down_after, bool) or not isinstance(down_after, int) or down_after < 1:
            raise ConfigError(f"down_after={down_after!r}; need an integer >= 1 (rounds)")
        self.down_after = down_after
        self._last_count = {p: 0 for p in peers}
        self._last_seen = {p: -1 for p in peers}
        self.down: set[int] = set()

    def is_up(self, peer: int) -> bool:
        return peer not in self.down

    def observe(self, r: int, received: dict[int, int], seen=()) -> tuple[list[int], list[int]]:
        went_down, came_up = [], []
        for p in self._last_count:
            count = received.get(p, 0)
            if count > self._last_count[p] or p in seen:
                self._last_count[p] = count
                self._last_seen[p] = r
                if p in self.down:
                    self.down.discard(p)
                    came_up.append(p)
            elif p not in self.down and r - self._last_seen[p] >= self.down_after:
                self.down.add(p)
                went_down.append(p)
        return went_down, came_up


@dataclass
class RoundReport:
    """What one gossip round did: who was merged, who was missing, how long it took (seconds).

    ``skipped``: rounds skipped just before this one to rejoin neighbours that had moved ahead
    further than the round window (:mod:`gossip.runtime.rounds`); 0 normally.
    """

    round: int
    merged: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()
    down: tuple[int, ...] = ()
    skipped: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    consensus_distance: float = float("nan")
    extra: dict = field(default_factory=dict)


def check_choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r}; valid: {', '.join(valid)}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}; need an integer >= {minimum}")


def check_seconds(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}={value!r}; need a number of seconds > 0")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}; need a finite number of seconds")
