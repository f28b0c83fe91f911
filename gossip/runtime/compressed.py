"""Compressed gossip between node processes: the settings, and naive compressed D-PSGD.

``Node(..., compress="topk:0.01", feedback="choco:0.1")`` runs one of (ALGORITHMS.md §2.4-2.5):

- ``feedback="none"``: naive compressed D-PSGD, ``x_i <- W_ii x_i + sum_j W_ij C(x_j)``. No
  state; a missing neighbour is left out and the others' weights renormalised, as in D-PSGD.
- ``feedback="choco:GAMMA"``: CHOCO-SGD. Node i keeps a public copy ``x_hat_i`` and a replica of
  each neighbour's; a round is ``x_i += GAMMA (sum_j W_ij x_hat_j - x_hat_i)``, then
  ``q_i = C(x_i - x_hat_i)`` is sent and applied by i and by every neighbour to its replica.
- ``feedback="choco-econtrol:GAMMA,ETA"``: the same with ``q_i = C(ETA e_i + x_i - x_hat_i)``
  and the error ``e_i`` kept (§2.5 option B, experimental; ETA = 0 is CHOCO).

The arithmetic is :mod:`gossip.algorithms.choco`'s node form (``publish_``, ``absorb_``,
``choco_node_consensus_``), whose batched twin the simulator runs; the bytes are the
compressor's raw frames plus a small header (``transport.send(peer, round, frames, header)``).

The protocol that keeps CHOCO's public copies equal over a lossy network (versions, resync
requests, dense copies) is :mod:`gossip.runtime.public_copies`. Requests travel back on the
edge they concern, so CHOCO needs a static, undirected topology; directed or time-varying
graphs are refused (naive compressed gossip runs on any graph). Synchronous mode only; MoTEF
and the all-reduce feedback kinds (``ef14``, ``ef21``, ``econtrol``) are simulator-only.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from ..algorithms import gossip_average_
from ..algorithms.compression import Compressor, Payload, make_compressor
from ..algorithms.feedback import parse_feedback
from ..errors import ConfigError, WireError
from .neighbours import RoundReport

log = logging.getLogger("gossip.node")

RUNTIME_FEEDBACK = "none, choco:GAMMA, choco-econtrol:GAMMA,ETA"
SIMULATOR_ONLY = ("ef14", "ef21", "econtrol", "motef")
PUBLIC_COPY_INITS = ("zeros", "model")
_DENSE = ("none", "identity")


@dataclass(frozen=True)
class CompressionSpec:
    """A parsed ``compress``/``feedback`` pair: ``rule`` is ``naive`` or ``choco``."""

    compress: str
    feedback: str
    rule: str
    gamma: float = 0.0
    eta: float = 0.0
    error_control: bool = False


def parse_compression(compress: str, feedback: str) -> CompressionSpec | None:
    """Parse and check ``compress``/``feedback`` for node processes; None means dense gossip.

    >>> parse_compression("topk:0.01", "choco:0.1").gamma
    0.1
    """
    for name, value in (("compress", compress), ("feedback", feedback)):
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
    make_compressor(compress)  # a ConfigError naming the spec and the valid forms
    name = feedback.strip().partition(":")[0]
    if name in SIMULATOR_ONLY:
        raise ConfigError(
            f"feedback={feedback!r} runs in the simulator only (gossip sim); node processes "
            f"support feedback in: {RUNTIME_FEEDBACK}"
        )
    fb = parse_feedback(feedback, valid=RUNTIME_FEEDBACK)  # names the spec and the valid forms
    if fb.name == "none":
        if compress.strip().lower() in _DENSE:
            return None
        return CompressionSpec(compress, feedback, "naive")
    return CompressionSpec(compress, feedback, "choco", fb.gamma, fb.eta, fb.name != "choco")


def check_compression(spec: CompressionSpec | None, *, mode: str, averaging: str) -> None:
    """Refuse the combinations node processes do not run (each error names the argument)."""
    if spec is None:
        return
    pair = f"compress={spec.compress!r}, feedback={spec.feedback!r}"
    if mode != "sync":
        raise ConfigError(
            f"mode={mode!r} with {pair}: compressed gossip runs in synchronous rounds only; "
            "use mode='sync' (--mode sync) or leave compress and feedback at 'none'"
        )
    if averaging != "dpsgd":
        raise ConfigError(
            f"averaging={averaging!r} with {pair}: compressed gossip mixes like D-PSGD; use "
            "averaging='dpsgd'"
        )


def check_topology(spec: CompressionSpec | None, hoods) -> None:
    """CHOCO's resync requests travel back on the edge they concern: a static, undirected
    topology (one mixing matrix, every in-neighbour also an out-neighbour)."""
    if spec is None or spec.rule != "choco":
        return
    if len(hoods) != 1:
        raise ConfigError(
            f"feedback={spec.feedback!r} needs a static topology; this one changes with a "
            f"period of {len(hoods)} rounds (use feedback='none' or a static graph)"
        )
    h = hoods[0]
    if set(h.in_peers) != set(h.out_peers):
        raise ConfigError(
            f"feedback={spec.feedback!r} needs an undirected topology: in-neighbours "
            f"{sorted(h.in_peers)} differ from out-neighbours {sorted(h.out_peers)} (use "
            "feedback='none' for naive compressed gossip, or an undirected graph)"
        )


def max_message_bytes(spec: CompressionSpec | None, flat: torch.Tensor) -> int:
    """The largest message a node sends: a dense model (or resync), or one compressed payload."""
    dense = flat.numel() * flat.element_size()
    if spec is None:
        return dense
    payload = make_compressor(spec.compress).compress(torch.zeros(flat.numel(), dtype=flat.dtype))
    return max(dense, sum(f.numel() * f.element_size() for f in payload.frames))


def make_compressed(node, spec: CompressionSpec | None, public_copy_init: str = "zeros"):
    """The round driver for ``spec`` (None for dense gossip)."""
    if spec is None:
        return None
    if spec.rule == "naive":
        return NaiveCompressedGossip(node, spec)
    from .public_copies import ChocoGossip

    return ChocoGossip(node, spec, public_copy_init)


class NaiveCompressedGossip:
    """Naive compressed D-PSGD (no feedback): send ``C(x_i)``, mix with the exact own model."""

    def __init__(self, node, spec: CompressionSpec):
        self.node, self.spec = node, spec
        self.c: Compressor = make_compressor(spec.compress)
        self.d = node.flat.numel()
        zeros = torch.zeros(self.d, dtype=node.flat.dtype)
        self._expected = self.c.compress(zeros, seed=node.seed, round=0, sender=node.rank).header
        self.stats: Counter = Counter()

    # -- validation ----------------------------------------------------------------------------
    def _payload(self, msg) -> Payload | None:
        """The compressed payload in ``msg`` if every field matches this node's compressor and
        layout; otherwise None, counted in the node's metrics by reason."""
        codec = msg.header.get("codec")
        reason = None
        if not isinstance(codec, dict):
            reason = "bad_header"
        elif codec.get("codec") != self.c.name:
            reason = "bad_codec"
        elif set(codec) != set(self._expected):
            reason = "bad_header"
        else:
            for key, want in self._expected.items():
                if key == "round":
                    want = msg.round
                elif key == "sender":
                    want = msg.sender
                got = codec[key]
                if type(got) is not type(want) or got != want:
                    reason = {"dtype": "bad_dtype", "d": "size_mismatch", "k": "size_mismatch"}
                    reason = reason.get(key, "bad_header")
                    break
        payload = Payload(codec, tuple(msg.tensors)) if reason is None else None
        if payload is not None:
            try:
                self.c.check(payload, d=self.d)
            except WireError as e:
                reason, payload = getattr(e, "reason", "bad_header"), None
        if reason is not None:
            self.node.metrics.reject(reason)
            self.stats[f"rejected_{reason}"] += 1
            log.debug("node %d: dropped a compressed message from %d: %s",
                      self.node.rank, msg.sender, reason)  # fmt: skip
        return payload

    def check(self, msg) -> bool:
        """Whether ``msg`` passes this node's checks (e.g. a far-ahead message a node that fell
        behind takes as evidence, :mod:`gossip.runtime.rounds`)."""
        return self._payload(msg) is not None

    def _frames(self, payload) -> list[torch.Tensor]:
        # own CPU copies: wire transports send zero-copy after send() returns
        return [f.detach().to("cpu", copy=True) for f in payload.frames]

    # -- a round -------------------------------------------------------------------------------
    def round(self, r: int) -> RoundReport:
        node, x = self.node, self.node.flat
        hood = node._hood(r)
        payload = self.c.compress(x, seed=node.seed, round=r, sender=node.rank)
        frames, header = self._frames(payload), {"codec": payload.header}
        for p in hood.out_peers:
            node._send(p, r, frames, header)
        got, wait, missing = node._receive(r, hood)
        dense = {}
        for p, m in got.items():
            if p in hood.in_peers and (pl := self._payload(m)) is not None:
                dense[p] = self.c.decompress(pl, d=self.d).to(x.device)
        report = RoundReport(round=r, merged=tuple(sorted(dense)), missing=missing)
        report.wait_seconds = wait
        if dense:
            before = x.clone()
            received = [dense.get(p) for p in hood.in_peers]
            gossip_average_(x, received, hood.in_weights, hood.self_weight, renormalize=True)
            if hood.self_weight < 1:
                scale = 1.0 / (1.0 - hood.self_weight)
                report.consensus_distance = float(torch.dist(x, before)) * scale
        node._update_liveness(r, got)
        report.down = tuple(sorted(node.liveness.down))
        return report

    def summary(self) -> dict:
        return {"rule": self.spec.rule, **dict(self.stats)}

    def state_dict(self) -> dict:
        return {"rule": self.spec.rule, "compress": self.spec.compress,
                "feedback": self.spec.feedback}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for key in ("rule", "compress", "feedback"):
            if state.get(key) != getattr(self.spec, key):
                raise ConfigError(
                    f"checkpoint was written with {key}={state.get(key)!r}, this node runs "
                    f"{key}={getattr(self.spec, key)!r}; resume with the same settings"
                )
