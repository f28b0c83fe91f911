"""Sequential gradient coding (Krishnan, Ebrahimi, Khisti, ICLR 2023): code across rounds too.

The master computes a sequence of ``J`` gradients (jobs). Job ``t`` starts in round ``t`` and must
be decoded by the end of round ``t + T``. Classic gradient coding (GC) is ``T = 0``; a delay
``T > 0`` lets work a straggler missed be redone later, so fewer redundant tasks buy the same
tolerance. Stragglers follow the **(B, W, lambda)-bursty model**: in every window of ``W``
consecutive rounds at most ``lambda`` distinct workers straggle, and each worker's straggling
rounds inside a window lie in one burst of at most ``B`` consecutive rounds.

This package is pure bookkeeping (numpy, no tensors, no processes):

- :mod:`.bursty`, the model: :class:`BurstyModel`, :func:`round_violation` (the one checker,
  shared by the generator and the schemes), :func:`first_violation`, :func:`conforms`,
  :func:`bursty_pattern`;
- :mod:`.schedule`, the bookkeeping every scheme shares: :class:`SequentialScheme` (rounds, jobs
  in flight, deadlines, the wait-for-all fallback), :class:`Task`, :class:`ScheduleReport`;
- :mod:`.schemes`, loads and delays (:func:`gc_load`, :func:`sr_sgc_tolerance`,
  :func:`sr_sgc_load`, :func:`msgc_load`, :func:`msgc_delay`) and the schemes:
  :class:`GradientCodingScheme` (the GC baseline), :class:`SelectiveRepetitionSGC`,
  :class:`MultiplexedSGC`.

Each round: ``plan()`` / ``tasks()`` (what every worker computes), ``acceptable(missing)`` (may
the master stop waiting for these workers?), then ``observe(stragglers)``. A round the scheme
cannot accept falls back to **waiting for all** workers; the report names those rounds and the
jobs they served.

A straggler pattern is a bool array ``[rounds, n]``: ``pattern[r, i]`` is True when worker ``i``
straggles in round ``r`` (its results for that round never count).

Example::

    scheme = MultiplexedSGC(n=256, B=1, W=2, lam=27, n_jobs=80)
    report = scheme.run(bursty_pattern(256, scheme.total_rounds, 1, 2, 27, seed=0))
    assert not report.waited_rounds and (report.decoded_round <= report.deadline).all()
"""

from .bursty import (
    BurstyModel,
    Violation,
    bursty_pattern,
    conforms,
    first_violation,
    round_violation,
)
from .schedule import POLICIES, RoundOutcome, ScheduleReport, SequentialScheme, Task
from .schemes import (
    GradientCodingScheme,
    MultiplexedSGC,
    SelectiveRepetitionSGC,
    gc_load,
    msgc_d1_fraction,
    msgc_delay,
    msgc_load,
    sr_sgc_load,
    sr_sgc_tolerance,
)

__all__ = [
    "BurstyModel",
    "Violation",
    "round_violation",
    "first_violation",
    "conforms",
    "bursty_pattern",
    "gc_load",
    "sr_sgc_tolerance",
    "sr_sgc_load",
    "msgc_delay",
    "msgc_d1_fraction",
    "msgc_load",
    "Task",
    "RoundOutcome",
    "ScheduleReport",
    "POLICIES",
    "SequentialScheme",
    "GradientCodingScheme",
    "SelectiveRepetitionSGC",
    "MultiplexedSGC",
]
