"""Reproducible stragglers inside a group: how long a worker sleeps after computing a round.

The master sends the :class:`Slowdown` to every worker in its config message (``to_wire``), and
each worker rebuilds it (``from_wire``) and sleeps after its compute, so "worker 3 is 4x slow"
holds whatever the machine.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import ConfigError
from ..stragglers import (
    BurstyStragglers,
    IidStragglers,
    SlowWorkers,
    StragglerInjector,
    TraceStragglers,
)


class Slowdown:
    """Extra seconds a worker sleeps after computing round ``r``, from a straggler injector.

    ``mode="relative"`` (default): ``factor = injector.delay(w, r) / base_s`` and the worker
    sleeps ``(factor - 1) * measured_compute_s`` (never negative): a 4x worker takes 4x as long.
    ``mode="absolute"``: it sleeps ``max(0, delay(w, r) - base_s)`` seconds.
    ``base_s`` defaults to the injector's ``base_s`` (SlowWorkers, IidStragglers,
    BurstyStragglers) or the median of a trace. Example: ``Slowdown(SlowWorkers(8, {3: 4.0}))``.
    """

    MODES = ("relative", "absolute")

    def __init__(self, injector: StragglerInjector, mode: str = "relative", base_s=None):
        if not isinstance(injector, StragglerInjector):
            raise ConfigError(f"injector={injector!r} is not a StragglerInjector")
        if mode not in self.MODES:
            raise ConfigError(f"mode={mode!r} is invalid; valid: {self.MODES}")
        if base_s is None:
            base_s = getattr(injector, "base_s", None)
            if base_s is None:
                base_s = float(np.median(injector.compute_s))
        if not (float(base_s) > 0 or (mode == "absolute" and float(base_s) == 0)):
            raise ConfigError(f"base_s={base_s!r} must be > 0 seconds (>= 0 in absolute mode)")
        self.injector, self.mode, self.base_s = injector, mode, float(base_s)

    def extra_s(self, worker: int, step: int, compute_s: float) -> float:
        """Seconds to sleep after ``compute_s`` seconds of work in step ``step``."""
        d = self.injector.delay(worker, step)
        if self.mode == "absolute":
            return max(0.0, d - self.base_s)
        return max(0.0, d / self.base_s - 1.0) * compute_s

    def to_wire(self) -> tuple[dict, list[torch.Tensor]]:
        """A msgpack-able header and tensors that :meth:`from_wire` rebuilds this from."""
        inj, head = self.injector, {"mode": self.mode, "base_s": self.base_s}
        if isinstance(inj, SlowWorkers):
            head.update(kind="slow", factors=inj.factor.tolist())
        elif isinstance(inj, IidStragglers):
            head.update(kind="iid", p=inj.p, slowdown=inj.slowdown)
        elif isinstance(inj, TraceStragglers | BurstyStragglers):  # tables of delays
            trace = isinstance(inj, TraceStragglers)
            table = inj.compute_s if trace else inj.delays(len(inj.pattern))
            head.update(kind="trace", wrap=bool(getattr(inj, "wrap", False)))
            return head, [torch.tensor(np.array(table, dtype=np.float64))]
        else:
            raise ConfigError(f"cannot send a {type(inj).__name__} to workers; wrap its delays in "
                              "a TraceStragglers (injector.delays(rounds))")  # fmt: skip
        head.update(n=inj.n, inj_base_s=inj.base_s, jitter=inj.jitter, seed=inj.seed)
        return head, []

    @classmethod
    def from_wire(cls, head: dict, tensors: list[torch.Tensor]) -> Slowdown:
        kind = head.get("kind")
        if kind == "trace":
            inj = TraceStragglers(tensors[0].numpy(), wrap=bool(head["wrap"]))
        else:
            common = dict(base_s=head["inj_base_s"], jitter=head["jitter"], seed=head["seed"])
            if kind == "slow":
                factors = {i: f for i, f in enumerate(head["factors"]) if f != 1.0}
                inj = SlowWorkers(head["n"], factors, **common)
            elif kind == "iid":
                inj = IidStragglers(head["n"], head["p"], slowdown=head["slowdown"], **common)
            else:
                raise ConfigError(f"slowdown kind={kind!r} is unknown; valid: slow, iid, trace")
        return cls(inj, head["mode"], head["base_s"])


def _as_slowdown(s) -> Slowdown | None:
    if s is None or isinstance(s, Slowdown):
        return s
    if isinstance(s, StragglerInjector):
        return Slowdown(s)
    raise ConfigError(f"slowdown={s!r}; pass a Slowdown, a StragglerInjector or None")
