"""CHOCO-SGD between node processes, and the protocol that keeps public copies equal.

``Node(..., compress="topk:0.01", feedback="choco:0.1")`` runs :class:`ChocoGossip` (see
:mod:`gossip.runtime.compressed` for the rules and settings).

**Public copies over a lossy network.** CHOCO needs every replica of ``x_hat_j`` to equal j's
own, bit for bit; a message can miss its deadline or be lost. Each message from j carries:

- ``base``: the version of ``x_hat_j`` the update applies to (updates applied so far; after it
  the copy has version ``base + 1``);
- either ``codec`` (the compressor's header; the frames are the increment ``q_j``) or
  ``full: true`` (one frame: j's dense ``x_hat_j`` after this round's update, a *resync*);
- ``resync: true`` when j's replica of the receiver's copy is invalid (a request);
- ``x0`` (only at ``base == 0``, with ``public_copy_init="model"``): the CRC-32 of j's initial
  model, which every node must share for copies to start from it.

Receiver i keeps, per neighbour j, the replica and its version ``v_j`` (None = invalid):

- a full copy always replaces the replica (``v_j = base + 1``);
- an increment with ``base == v_j`` is applied (``decompress_add_``, as j applied it). Any other
  ``base`` invalidates the replica: ``base > v_j`` is a gap (an increment was lost), ``base < v_j``
  a sender that went back (it restarted from an older checkpoint). So does a round-0 ``x0``
  that differs from i's own;
- j's replica is mixed in round r+1 only if j's round-r update was applied in round r; otherwise
  its weight moves to i's own copy (``x_i += GAMMA sum_{j mixed} W_ij (x_hat_j - x_hat_i)``).
  Late increments (inside the transport's round window) are still applied in order, so a slow
  link catches up without any resync;
- while ``v_j`` is None, every message i sends j carries ``resync: true``. j answers a request
  that came in a message of round m unless it already sent a full copy in a round >= m (i's
  message of that round left before the copy arrived), by sending its dense copy instead of the
  increment in its next round. Its bytes count like any other message.

A neighbour that was down, or restarted from an older checkpoint, shows up as a gap or an old
``base`` and is resynced by the same path, in both directions. So does a node that fell behind
by more than the round window and skipped ahead to rejoin (:mod:`gossip.runtime.rounds`): the
increments it rejected as too far ahead, and the neighbours its stale ones, are gaps. Requests
travel back on the edge they concern, hence the static, undirected topology CHOCO needs here.

The state (own :class:`~gossip.algorithms.choco.PublicCopy`, replicas, versions, resync
bookkeeping) goes into the node's checkpoint, so a resumed node continues exactly.
"""

from __future__ import annotations

import logging
import math
import zlib

import torch

from ..algorithms import gossip_average_
from ..algorithms.choco import (
    PublicCopy,
    absorb_,
    choco_node_consensus_,
    publish_,
    warn_experimental,
)
from ..errors import ConfigError
from .compressed import PUBLIC_COPY_INITS, CompressionSpec, NaiveCompressedGossip
from .neighbours import RoundReport

log = logging.getLogger("gossip.node")


class ChocoGossip(NaiveCompressedGossip):
    """CHOCO-SGD (or its error-controlled variant) with the resync protocol of the module
    docstring. State: own :class:`~gossip.algorithms.choco.PublicCopy`, its version, and per
    neighbour a replica, its version (None = invalid) and the resync bookkeeping."""

    def __init__(self, node, spec: CompressionSpec, public_copy_init: str = "zeros"):
        super().__init__(node, spec)
        if public_copy_init not in PUBLIC_COPY_INITS:
            raise ConfigError(
                f"public_copy_init={public_copy_init!r}; valid: {', '.join(PUBLIC_COPY_INITS)}"
            )
        if spec.error_control:
            warn_experimental(spec.eta)
        hood = node._hood(0)
        self.peers = list(hood.in_peers)
        self.w = dict(zip(hood.in_peers, hood.in_weights, strict=True))
        self.w_self = hood.self_weight
        x = node.flat.detach()
        if public_copy_init == "model":  # every node starts from the same x0 (checked: "x0")
            self.pc = PublicCopy.from_common(x, error_control=spec.error_control)
            self.replicas = {p: x.clone() for p in self.peers}
            self.x0_crc = zlib.crc32(x.cpu().contiguous().view(torch.uint8).numpy())
        else:
            self.pc = PublicCopy.zeros(x, error_control=spec.error_control)
            self.replicas = {p: torch.zeros_like(x) for p in self.peers}
            self.x0_crc = None
        self.version = 0
        self.rv: dict[int, int | None] = {p: 0 for p in self.peers}
        self.mixed_set = set(self.peers)  # the replicas inside pc.mixed
        self.last_round = {p: -1 for p in self.peers}  # newest round processed per neighbour
        self.served = {p: -1 for p in self.peers}  # round of the last full copy sent to p
        self.owed: set[int] = set()  # neighbours that get a full copy next round

    def _self_weight(self) -> float:
        return self.w_self + sum(w for p, w in self.w.items() if p not in self.mixed_set)

    def _remix(self) -> None:
        """``mixed = W_ii' x_hat_i + sum_{j mixed} W_ij x_hat_j`` from scratch (after a change of
        membership or a full copy), with the left-out weights on the own copy."""
        present = sorted(self.mixed_set)
        self.pc.mixed.copy_(self.pc.copy)
        gossip_average_(self.pc.mixed, [self.replicas[p] for p in present],
                        [self.w[p] for p in present], self._self_weight())  # fmt: skip

    # -- a round -------------------------------------------------------------------------------
    def round(self, r: int) -> RoundReport:
        node, x, pc = self.node, self.node.flat, self.pc
        hood = node._hood(r)
        w_self = self._self_weight()
        distance = float(torch.dist(pc.mixed, pc.copy)) / (1 - w_self) if w_self < 1 else math.nan
        choco_node_consensus_(x, pc, self.spec.gamma)  # with the copies before this round
        sent = publish_(pc, x, self.c, self_weight=w_self, eta=self.spec.eta, seed=node.seed,
                        round=r, sender=node.rank)  # fmt: skip
        base, self.version = self.version, self.version + 1
        frames, full = self._frames(sent.payload), None
        for p in hood.out_peers:
            header: dict = {"base": base}
            if self.rv.get(p, 0) is None:
                header["resync"] = True
                self.stats["resync_requests_sent"] += 1
            if base == 0 and self.x0_crc is not None:
                header["x0"] = self.x0_crc
            if p in self.owed:
                if full is None:
                    full = pc.copy.detach().to("cpu", copy=True)
                header["full"] = True
                self.owed.discard(p)
                self.served[p] = r
                self.stats["full_copies_sent"] += 1
                node._send(p, r, [full], header)
            else:
                header["codec"] = sent.payload.header
                node._send(p, r, frames, header)
        got, wait, missing = node._receive(r, hood)
        fresh, changed = set(), False
        for p in self.peers:
            msgs = self._late(p, r) + ([got[p]] if p in got else [])
            ok = False
            for m in sorted(msgs, key=lambda m: m.round):
                ok, moved = self._absorb(p, m)
                changed |= moved
                self.last_round[p] = max(self.last_round[p], m.round)
            # mixed next round only if this round's update of p was accepted and applied
            if ok and p in got and self.rv[p] == _base(got[p]) + 1:
                fresh.add(p)
        if changed or fresh != self.mixed_set:
            self.mixed_set = fresh
            self._remix()
        report = RoundReport(round=r, merged=tuple(sorted(fresh)), missing=missing)
        report.wait_seconds, report.consensus_distance = wait, distance
        report.extra["stale"] = tuple(sorted(set(self.peers) - fresh))
        node._update_liveness(r, got)
        report.down = tuple(sorted(node.liveness.down))
        return report

    def check(self, msg) -> bool:
        """Whether ``msg`` passes this node's checks, without applying it: a far-ahead message
        that a node which fell behind takes as evidence (:mod:`gossip.runtime.rounds`). After
        the jump the versions show a gap, which the resync protocol repairs."""
        h = msg.header
        flags = (h.get("resync", False), h.get("full", False))
        if _base(msg) is None or not all(isinstance(f, bool) for f in flags):
            self._reject("bad_header")
            return False
        if not flags[1]:
            return self._payload(msg) is not None
        t = msg.tensors[0] if len(msg.tensors) == 1 and "codec" not in h else None
        ok = t is not None and t.dtype == self.node.flat.dtype and tuple(t.shape) == (self.d,)
        if not ok:
            self._reject("bad_header" if t is None else "size_mismatch")
        return ok

    def _late(self, p: int, r: int) -> list:
        """Messages of ``p`` for rounds before ``r`` that arrived after their round (in order,
        inside the transport's round window): a slow link catches up without a resync."""
        t = self.node.transport
        lo = max(self.last_round[p] + 1, r - t.round_window, 0)
        out = []
        for rr in range(lo, r):
            out += t.recv_many([p], rr, 0.0).values()
        return out

    def _absorb(self, p: int, m) -> tuple[bool, bool]:
        """Apply one message of neighbour ``p`` to its replica. Returns ``(valid, changed)``:
        whether the message passed validation, and whether the replica changed other than by an
        increment also added to ``mixed`` (then ``mixed`` is recomputed)."""
        h, base = m.header, _base(m)
        flags = (h.get("resync", False), h.get("full", False))
        if base is None or not all(isinstance(f, bool) for f in flags):
            self._reject("bad_header")
            return False, False
        resync, full = flags
        changed = False
        if full:
            t = m.tensors[0] if len(m.tensors) == 1 and "codec" not in h else None
            reason = "bad_header" if t is None else None
            if t is not None and t.dtype != self.node.flat.dtype:
                reason = "bad_dtype"
            elif t is not None and tuple(t.shape) != (self.d,):
                reason = "size_mismatch"
            if reason is not None:
                self._reject(reason)
                return False, False
            self.replicas[p].copy_(t)
            self.rv[p], changed = base + 1, True
            self.stats["full_copies_received"] += 1
        else:
            payload = self._payload(m)
            if payload is None:
                return False, False
            v = self.rv[p]
            if v is not None and base == 0 and v == 0 and h.get("x0") != self.x0_crc:
                log.warning("node %d: neighbour %d started from another model (x0 checksum); "
                            "asking for its public copy", self.node.rank, p)  # fmt: skip
                self._invalidate(p)
                v = None
            if v is None:
                pass  # waiting for a full copy
            elif base != v:  # lost an increment (base > v), or p went back (base < v)
                log.info("node %d: neighbour %d's public copy is at version %d, ours at %d; "
                         "asking for a resync", self.node.rank, p, base, v)  # fmt: skip
                self._invalidate(p)
                self.stats["gaps"] += 1
            else:
                self.c.decompress_add_(self.replicas[p], payload, 1.0)
                if p in self.mixed_set:
                    absorb_(self.pc, payload, self.w[p], self.c)
                self.rv[p] = v + 1
        if resync and m.round > self.served[p]:
            self.owed.add(p)
        return True, changed

    def _invalidate(self, p: int) -> None:
        """Stop trusting the replica of ``p`` until a full copy arrives (requested from now on)."""
        self.rv[p] = None
        self.stats["stale_copies"] += 1

    def _reject(self, reason: str) -> None:
        self.node.metrics.reject(reason)
        self.stats[f"rejected_{reason}"] += 1

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        cpu = lambda t: t.detach().cpu().clone()  # noqa: E731
        state.update(
            version=self.version,
            copy=cpu(self.pc.copy),
            mixed=cpu(self.pc.mixed),
            peers=list(self.peers),
            replicas=[cpu(self.replicas[p]) for p in self.peers],
            replica_versions=[-1 if self.rv[p] is None else self.rv[p] for p in self.peers],
            mixed_set=sorted(self.mixed_set),
            last_round=[self.last_round[p] for p in self.peers],
            served=[self.served[p] for p in self.peers],
            owed=sorted(self.owed),
            x0_crc=-1 if self.x0_crc is None else self.x0_crc,
        )
        if self.pc.error is not None:
            state["error"] = cpu(self.pc.error)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if list(state.get("peers", ())) != self.peers:
            raise ConfigError(
                f"checkpoint has neighbours {state.get('peers')!r}, this node has {self.peers}; "
                "resume with the same topology"
            )
        self.version = int(state["version"])
        self.pc.copy.copy_(state["copy"])
        self.pc.mixed.copy_(state["mixed"])
        if self.pc.error is not None:
            self.pc.error.copy_(state["error"])
        for i, p in enumerate(self.peers):
            self.replicas[p].copy_(state["replicas"][i])
            v = int(state["replica_versions"][i])
            self.rv[p] = None if v < 0 else v
            self.last_round[p] = int(state["last_round"][i])
            self.served[p] = int(state["served"][i])
        self.mixed_set = {int(p) for p in state["mixed_set"]}
        self.owed = {int(p) for p in state["owed"]}
        crc = int(state["x0_crc"])
        self.x0_crc = None if crc < 0 else crc


def _base(m) -> int | None:
    b = m.header.get("base")
    return b if isinstance(b, int) and not isinstance(b, bool) and b >= 0 else None
