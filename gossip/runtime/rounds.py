"""The synchronous round and the dense merge of a :class:`~gossip.runtime.node.Node`.

:class:`SyncRounds` is mixed into ``Node``: send the model (or push-sum share) to the
out-neighbours, wait at most the round deadline for the in-neighbours (a short look at the ones
that are down), merge what arrived with the averaging rule, and update liveness. The
asynchronous exchange (:mod:`gossip.runtime.exchange`) and compressed gossip
(:mod:`gossip.runtime.compressed`) reuse its sending, receiving, validation and merge steps.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from ..algorithms import gossip_average_, push_sum_merge_, variance_corrected_average
from ..errors import TransportError
from .exchange import combine_push_sum
from .neighbours import Neighbourhood, RoundReport

log = logging.getLogger("gossip.node")


class SyncRounds:
    """Round machinery of :class:`~gossip.runtime.node.Node` (a mixin; see the module
    docstring). Uses the node's ``transport``, ``liveness``, ``metrics``, ``push_sum``,
    ``flat`` and neighbourhoods."""

    # -- one synchronous round -----------------------------------------------------------------
    def _hood(self, r: int) -> Neighbourhood:
        return self._hoods[r % len(self._hoods)]

    def _deadline(self, r: int) -> float:
        return self.startup_grace_s if r == 0 else self.round_deadline_s

    def _outgoing(self, r: int) -> tuple[list[tuple[int, dict]], float]:
        """``[(peer, header)]`` to send this round and the fraction of push-sum mass kept."""
        hood = self._hood(r)
        if self.push_sum is None:
            return [(p, {}) for p in hood.out_peers], 1.0
        w = float(self.push_sum.weight)
        keep, sends = hood.self_weight, []
        for p, share in zip(hood.out_peers, hood.out_weights, strict=True):
            if self.liveness.is_up(p):
                sends.append((p, {"w": w * share}))
            else:  # a down neighbour's share stays here, so no mass is lost
                keep += share
        return sends, keep

    def _snapshot(self) -> torch.Tensor:
        # a fresh copy per round: wire transports send it zero-copy while we keep training
        return self.flat.detach().to("cpu", copy=True)

    def _send(self, peer: int, r: int, tensors, header: dict) -> None:
        try:
            self.transport.send(peer, r, tensors, header)
        except TransportError as e:  # an unreachable peer costs this message, nothing more
            log.debug("node %d: send to %d failed in round %d: %s", self.rank, peer, r, e)

    def _send_all(self, r: int, sends, snapshot) -> None:
        for peer, header in sends:
            self._send(peer, r, [snapshot], header)

    def _receive(self, r: int, hood: Neighbourhood) -> tuple[dict, float, tuple[int, ...]]:
        """Round ``r``'s messages from the live in-neighbours (within the deadline) and from
        the down ones (a short look, so one that came back is noticed); returns ``(messages,
        seconds waited, live neighbours that missed the deadline)``."""
        live = [p for p in hood.in_peers if self.liveness.is_up(p)]
        down = [p for p in hood.in_peers if not self.liveness.is_up(p)]
        t_wait = time.perf_counter()
        got = self.transport.recv_many(live, r, self._deadline(r))
        if down:
            got.update(self.transport.recv_many(down, r, 0.005))
        wait = time.perf_counter() - t_wait
        return got, wait, tuple(p for p in live if p not in got)

    def _sync_round(self, r: int) -> RoundReport:
        hood = self._hood(r)
        sends, keep = self._outgoing(r)
        snapshot = self._snapshot()
        self._send_all(r, sends, snapshot)
        got, wait, missing = self._receive(r, hood)
        if self.push_sum is not None:  # late messages still carry mass: absorb them now
            late = defaultdict(list)
            for rr in range(max(0, r - self.transport.round_window), r):
                for p, m in self.transport.recv_many(self.in_peers, rr, 0.0).items():
                    late[p].append(m)
            for p, msgs in late.items():
                if p in got:
                    msgs.append(got.pop(p))
                usable = [m for m in msgs if self._valid(m) is not None]
                if usable:
                    got[p] = combine_push_sum(usable)
        report = self._merge(r, hood, got, keep, snapshot)
        report.wait_seconds = wait
        report.missing = missing
        self._update_liveness(r, got)
        report.down = tuple(sorted(self.liveness.down))
        return report

    def _update_liveness(self, r: int, seen) -> None:
        received = dict(self.transport.stats.messages_received)
        went_down, came_up = self.liveness.observe(r, received, seen)
        for p in went_down:
            log.warning(
                "node %d: neighbour %d sent nothing for %d rounds; taking it as down (it is "
                "no longer waited for)", self.rank, p, self.liveness.down_after,
            )  # fmt: skip
            self.metrics.peer_up.labels(peer=str(p)).set(0)
        for p in came_up:
            log.warning("node %d: neighbour %d is back", self.rank, p)
            self.metrics.peer_up.labels(peer=str(p)).set(1)

    # -- merging -------------------------------------------------------------------------------
    def _valid(self, msg) -> torch.Tensor | None:
        """The model tensor of ``msg`` if it matches ours (shape, dtype, push-sum weight)."""
        reason = None
        if len(msg.tensors) != 1:
            reason = "bad_header"
        else:
            t = msg.tensors[0]
            if t.dtype != self.flat.dtype:
                reason = "bad_dtype"
            elif t.shape != self.flat.shape:
                reason = "size_mismatch"
            elif self.push_sum is not None:
                w = msg.header.get("w")
                if not isinstance(w, float) or not (0 < w <= self.world_size):
                    reason = "bad_header"
        if reason is not None:
            self.metrics.reject(reason)
            return None
        return msg.tensors[0].to(self.flat.device)

    def _merge(
        self, r: int, hood: Neighbourhood, got: dict, keep: float, before: torch.Tensor
    ) -> RoundReport:
        """Merge the received models into ``self.flat``; ``before`` is its pre-merge copy.

        The consensus-distance estimate ``||x_i - (weighted mean of what arrived)||`` comes from
        the merge's own step (``x' - x`` is that distance times the neighbours' total weight),
        so it costs one pass, not a second average.
        """
        tensors = {p: t for p, m in got.items() if (t := self._valid(m)) is not None}
        weights = dict(zip(hood.in_peers, hood.in_weights, strict=True))
        present = [p for p in tensors if p in weights] if self.push_sum is None else list(tensors)
        report = RoundReport(round=r, merged=tuple(sorted(present)))
        if not present and self.push_sum is None:
            return report  # (push-sum still applies the kept fraction: its shares went out)
        x = self.flat
        scale = float("nan")  # ||mean - x|| = ||x' - x|| * scale
        if self.averaging == "dpsgd":
            received = [tensors.get(p) for p in hood.in_peers]
            gossip_average_(x, received, hood.in_weights, hood.self_weight, renormalize=True)
            if hood.self_weight < 1:
                scale = 1.0 / (1.0 - hood.self_weight)
        elif self.averaging == "variance_corrected":
            models = [tensors[p] for p in present]
            report.consensus_distance = float(torch.dist(torch.stack(models).mean(0), x))
            x.copy_(
                variance_corrected_average(
                    x, models, self.layout, beta=hood.self_weight, target=self.vc_target
                )
            )
            return report
        elif self.averaging == "push_sum":
            w = self.push_sum.weight
            x.mul_(w.to(x.dtype))  # de-biased model -> numerator
            rw = [got[p].header["w"] for p in present]
            rx = [tensors[p].mul_(got[p].header["w"]) for p in present]
            push_sum_merge_(x, w, rx, rw, self_weight=keep)
            x.div_(w.to(x.dtype))
            if not present:
                return report
            scale = float(w) / sum(rw)
        report.consensus_distance = float(torch.dist(x, before.to(x.device))) * scale
        return report
