"""The synchronous round and the dense merge of a :class:`~gossip.runtime.node.Node`.

:class:`SyncRounds` is mixed into ``Node``: send the model (or push-sum share) to the
out-neighbours, wait at most the round deadline for the in-neighbours (a short look at the ones
that are down), merge what arrived with the averaging rule, and update liveness. The
asynchronous exchange (:mod:`gossip.runtime.exchange`) and compressed gossip
(:mod:`gossip.runtime.compressed`) reuse its sending, receiving, validation and merge steps.

**Rejoining after falling behind.** A node paused for longer than the round window (its
neighbours moved more than ``max_rounds_ahead`` rounds ahead) would otherwise never merge again:
it rejects their messages as ``"future"``, they reject its own as ``"stale"``. The transport
keeps each sender's newest far-ahead message (:meth:`gossip.transport.Transport.ahead`); at the
start of every synchronous round (dense or compressed) the node looks at them and skips ahead
to the neighbours' round when the evidence is strong enough. The rule:

- *evidence* from in-neighbour ``j``: far-ahead messages from ``j`` that pass every check a
  current one must pass (allowed sender, run id and wire checks in the transport; shape, dtype,
  push-sum weight or compressed payload here), each newer than the last one counted. It is
  cleared as soon as a current message from ``j`` is accepted, and after a jump;
- the node jumps when **a strict majority of its in-neighbours** each have evidence and their
  newest rounds agree within ``round_window + max_rounds_ahead`` (the target is the highest of
  them), or when it is **isolated** (it merged nobody in its last round) and one neighbour sent
  ``REJOIN_STREAK`` consecutive, increasing far-ahead messages (the target is the lowest such
  neighbour's round);
- a jump is at most ``REJOIN_MAX_JUMP`` rounds; larger claims are ignored (logged once).

So one forged or corrupted message with a huge round number never moves a node: with a single
such message there is neither a majority (of at least two in-neighbours) nor a streak, and a
current neighbour keeps the node from taking the isolated path. A *persistent* misbehaving
neighbour that passes every check can already send any model; the bound limits what it can do
to the round counter.

A jump from round ``r`` to ``T`` skips rounds ``r .. T-1``: no local steps are owed, nothing is
sent for them. It is logged, counted in ``gossip_rounds_skipped_total`` and reported in the next
:class:`~gossip.runtime.neighbours.RoundReport` (``skipped``). The transport's window moves to
``T``, and the kept far-ahead messages that now fit are admitted, so the neighbours count as up
again and their round-``T`` models are merged at once. The neighbours, which had taken the node
as down, take it back as soon as one of its (now current) messages is accepted.

Push-sum: the node keeps its weight (mass is neither created nor lost by the jump); messages
already buffered for the skipped rounds are absorbed before the window moves, so their mass is
kept too. To give a node that fell behind something to see, a push-sum node sends down
neighbours (and neighbours it holds far-ahead evidence of, or has just rejoined and not yet
heard from in a current round) a *probe*: its de-biased model with
weight 0, which carries no mass and is never merged, only counted as a sign of life; their share
stays home as before. CHOCO: a jump leaves gaps in the public-copy versions, which
:mod:`gossip.runtime.public_copies` detects and resyncs in both directions, as after any loss.

The asynchronous mode (:mod:`gossip.runtime.exchange`) has no such rule: it merges whatever
is freshest within ``max_staleness``, and its window follows the node's own round.
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

#: Consecutive, increasing far-ahead messages from one neighbour that let an isolated node jump.
REJOIN_STREAK = 3
#: The largest jump (rounds) a node takes to rejoin its neighbours.
REJOIN_MAX_JUMP = 1_000_000


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
            if (
                self.liveness.is_up(p)
                and p not in self._unconfirmed
                and p not in self._rejoin_evidence
            ):
                sends.append((p, {"w": w * share}))
            else:  # a down neighbour's share stays here, so no mass is lost; it gets a probe
                keep += share
                sends.append((p, {"w": 0.0}))
        return sends, keep

    # -- rejoining after falling behind (see the module docstring) -----------------------------
    def _ahead_ok(self, msg) -> bool:
        """Whether a far-ahead message passes the checks a current one must pass."""
        if self.compressed is not None:
            return self.compressed.check(msg)
        return self._valid(msg) is not None

    def _rejoin(self, r: int) -> int:
        """Skip ahead to the neighbours' round if the evidence says this node fell behind; the
        number of rounds skipped (``self.round`` is moved), or 0."""
        t = self.transport
        t.poll(0.0)  # what queued while this node was away
        held = t.ahead()
        evidence = self._rejoin_evidence
        for p in self.in_peers:
            m = held.get(p)
            ev = evidence.get(p)
            if m is None or (ev and m.round <= ev[-1]):
                continue
            if not self._ahead_ok(m):
                evidence.pop(p, None)
                continue
            evidence.setdefault(p, []).append(m.round)
            del evidence[p][:-REJOIN_STREAK]
        # only evidence whose message is still kept (not yet inside the window) counts
        newest = {
            p: ev[-1]
            for p, ev in evidence.items()
            if ev and held.get(p) and held[p].round == ev[-1]
        }
        if not newest:
            return 0
        target = None
        rounds = sorted(newest.values())
        if 2 * len(newest) > len(self.in_peers) and (
            rounds[-1] - rounds[0] <= t.round_window + t.max_rounds_ahead
        ):
            target, why = rounds[-1], f"a majority of in-neighbours ({sorted(newest)})"
        elif self._last_merged == ():
            streaks = [newest[p] for p, ev in evidence.items()
                       if p in newest and len(ev) >= REJOIN_STREAK]  # fmt: skip
            if streaks:
                target, why = min(streaks), f"{REJOIN_STREAK} messages in a row, isolated"
        if target is None or target <= r:
            return 0
        if target - r > REJOIN_MAX_JUMP:
            if not self._rejoin_refused:
                self._rejoin_refused = True
                log.warning("node %d: neighbours claim round %d, %d ahead of round %d, more than "
                            "the largest jump (%d); not rejoining", self.rank, target, target - r,
                            r, REJOIN_MAX_JUMP)  # fmt: skip
            return 0
        skipped = target - r
        log.warning(
            "node %d: fell behind: neighbours are at round %d (evidence: %s); skipping rounds "
            "%d..%d to rejoin them", self.rank, target, why, r, target - 1,
        )  # fmt: skip
        if self.push_sum is not None:
            self._absorb_buffered(r, target)
        t.rejoin(target)
        self._unconfirmed = set(evidence)  # push-sum: probes until a current message from them
        evidence.clear()
        self.round = target
        self.metrics.rounds_skipped.inc(skipped)
        return skipped

    def _absorb_buffered(self, r: int, target: int) -> None:
        """Push-sum: add the mass of every message buffered for rounds below ``target`` now (their
        rounds are skipped), so none is lost when the window moves."""
        t, msgs = self.transport, []
        for rr in range(max(0, r - t.round_window), min(target, r + t.max_rounds_ahead + 1)):
            msgs += t.recv_many(self.in_peers, rr, 0.0).values()
        usable = [m for m in msgs if self._valid(m) is not None and m.header["w"] > 0]
        if not usable:
            return
        x, w = self.flat, self.push_sum.weight
        x.mul_(w.to(x.dtype))
        rw = [m.header["w"] for m in usable]
        rx = [m.tensors[0].to(x.device).mul_(m.header["w"]) for m in usable]
        push_sum_merge_(x, w, rx, rw, self_weight=1.0)
        x.div_(w.to(x.dtype))

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
                massive = [m for m in usable if m.header["w"] > 0]  # probes carry no mass
                if massive:
                    got[p] = combine_push_sum(massive)
                elif usable:
                    got[p] = usable[-1]
        report = self._merge(r, hood, got, keep, snapshot)
        report.wait_seconds = wait
        report.missing = missing
        self._update_liveness(r, got)
        report.down = tuple(sorted(self.liveness.down))
        return report

    def _update_liveness(self, r: int, seen) -> None:
        for p in seen:  # a current message: p is not far ahead
            self._rejoin_evidence.pop(p, None)
            self._unconfirmed.discard(p)
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
                if not isinstance(w, float) or not (0 <= w <= self.world_size):
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
        if self.push_sum is None:
            present = [p for p in tensors if p in weights]
        else:  # a weight-0 probe is a sign of life, not something to merge
            present = [p for p in tensors if got[p].header["w"] > 0]
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
