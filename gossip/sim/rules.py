"""What a simulated round does after (or instead of) the local steps, for every averaging rule.

Two kinds of rule:

- *gossip rules* run after the local SGD steps and mix the nodes' models: D-PSGD, push-sum,
  variance-corrected, the exact all-reduce and no-communication baselines, naive compressed
  gossip, CHOCO-SGD and error-controlled CHOCO;
- *update rules* own the whole round, gradient included: MoTEF (gradient tracking with two
  compressed public copies) and compressed all-reduce of gradients with EF14, EF21 or EControl
  (the data-parallel setting EControl was designed for).

Bytes are counted from the real payloads: a node's message goes once to each out-neighbour
(gossip) or once to the aggregator (all-reduce of compressed gradients, uplink only).
"""

from __future__ import annotations

import torch

from ..algorithms import (
    as_torch_matrix,
    mix,
    push_sum_debias,
    push_sum_mix,
    variance_corrected_mix,
)
from ..algorithms.choco import (
    ChocoEControlState,
    ChocoState,
    MoTEFState,
    choco_econtrol_gossip,
    choco_gossip,
    motef_step,
)
from ..algorithms.compression import make_compressor
from ..algorithms.feedback import (
    EControlState,
    EF14State,
    EF21State,
    Feedback,
    ServerState,
    apply_mean_update,
    compressed_sgd_step,
    econtrol_step,
    ef14_step,
    ef21_step,
    parse_feedback,
    server_step,
)
from ..errors import ConfigError

SERVER_FEEDBACK = ("ef14", "ef21", "econtrol")


def _out_degrees(W) -> torch.Tensor:
    """Messages each node sends in a round: the off-diagonal nonzeros of its column of W."""
    coo = W.tocoo()
    off = coo.row != coo.col
    return torch.bincount(torch.as_tensor(coo.col[off]), minlength=W.shape[0])


def _gossip_bytes(W, sent) -> int:
    """Every compressor here has a fixed message size for a given d: nbytes / N per node."""
    n = W.shape[0]
    per_node = sent.nbytes // n
    return int(_out_degrees(W).sum()) * per_node


class RoundRule:
    """Base. A gossip rule defines ``communicate(r, Z) -> (Z, bytes)``; a rule with
    ``owns_update`` defines ``update(r, Z, grad_fn, lr) -> (Z, loss, bytes)`` instead."""

    owns_update = False


class Dense(RoundRule):
    """Uncompressed rules: D-PSGD, push-sum, variance-corrected, all-reduce, none."""

    def __init__(self, cfg, schedule, layout, N):
        self.cfg, self.schedule, self.layout = cfg, schedule, layout
        self.ps_weight = None

    def communicate(self, r, Z):
        cfg, N, P = self.cfg, Z.shape[0], Z.shape[1]
        item = Z.element_size()
        if cfg.averaging == "none":
            return Z, 0
        if cfg.averaging == "allreduce":  # ring all-reduce: each node sends 2 (N - 1) / N models
            return Z.mean(0, keepdim=True).expand(N, -1).clone(), 2 * (N - 1) * P * item
        W = self.schedule.weights(r)
        messages = int(_out_degrees(W).sum())
        if cfg.averaging == "dpsgd":
            return mix(W, Z, self.layout), messages * P * item
        if cfg.averaging == "variance_corrected":
            Z = variance_corrected_mix(
                W, Z, self.layout, target=cfg.vc_target, correct_bias=cfg.vc_correct_bias
            )
            return Z, messages * P * item
        # push-sum: numerators x = w z travel with their weight w (one extra value per message)
        if self.ps_weight is None:
            self.ps_weight = torch.ones(N, dtype=Z.dtype, device=Z.device)
        X, self.ps_weight = push_sum_mix(
            W, Z * self.ps_weight[:, None], self.ps_weight, self.layout
        )
        return push_sum_debias(X, self.ps_weight), messages * (P + 1) * item


class NaiveCompressed(RoundRule):
    """Compressed D-PSGD without feedback: node i mixes its own exact model with the
    neighbours' compressed models, ``x_i <- W_ii x_i + sum_{j != i} W_ij C(x_j)``."""

    def __init__(self, cfg, schedule, compressor):
        self.cfg, self.schedule, self.c = cfg, schedule, compressor

    def communicate(self, r, Z):
        W = self.schedule.weights(r)
        payload = self.c.compress(Z, seed=self.cfg.seed, round=r)
        CZ = self.c.decompress(payload)
        diag = torch.as_tensor(W.diagonal(), dtype=Z.dtype)[:, None]
        out = mix(W, CZ) + diag * (Z - CZ)
        per_node = self.c.message_bytes(payload) // Z.shape[0]
        return out, int(_out_degrees(W).sum()) * per_node


class Choco(RoundRule):
    """CHOCO-SGD (and its error-controlled variant when ``eta`` is set)."""

    def __init__(self, cfg, schedule, compressor, fb: Feedback, Z0, shared_init: bool):
        self.cfg, self.schedule, self.c, self.fb = cfg, schedule, compressor, fb
        # neighbours can only start from x0's public copy if everyone knows x0 (shared init)
        zeros = not shared_init
        if fb.name == "choco":
            self.state = ChocoState.init(Z0, zeros=zeros)
        else:
            self.state = ChocoEControlState.init(Z0, eta=fb.eta, zeros=zeros)

    def communicate(self, r, Z):
        Wsp = self.schedule.weights(r)
        W = as_torch_matrix(Wsp, Z.dtype)
        if self.fb.name == "choco":
            Z, self.state, sent = choco_gossip(
                Z,
                self.state,
                W,
                gamma=self.fb.gamma,
                compressor=self.c,
                seed=self.cfg.seed,
                round=r,
            )
        else:
            Z, self.state, sent = choco_econtrol_gossip(
                Z,
                self.state,
                W,
                gamma=self.fb.gamma,
                eta=self.fb.eta,
                compressor=self.c,
                seed=self.cfg.seed,
                round=r,
            )
        return Z, _gossip_bytes(Wsp, sent)


class MoTEF(RoundRule):
    """MoTEF: one gradient step per round with gradient tracking and two compressed copies."""

    owns_update = True

    def __init__(self, cfg, schedule, compressor, fb: Feedback):
        self.cfg, self.schedule, self.c, self.fb = cfg, schedule, compressor, fb
        self.state = None

    def update(self, r, Z, grad_fn, lr):
        losses = []

        def grads(X):
            g, loss = grad_fn(X)
            losses.append(loss)
            return g

        if self.state is None:
            self.state = MoTEFState.init(Z, grads(Z))
        Wsp = self.schedule.weights(r)
        self.state, q, g = motef_step(
            self.state,
            grads,
            Wsp,
            lr=lr,
            gamma=self.fb.gamma,
            lmbd=self.fb.lmbd,
            compressor=self.c,
            seed=self.cfg.seed,
            round=r,
        )
        return self.state.x, losses[-1], _gossip_bytes(Wsp, q) + _gossip_bytes(Wsp, g)


class CompressedAllReduce(RoundRule):
    """Data-parallel SGD on one shared model with compressed gradients: no feedback, EF14,
    EF21 or EControl. Every node computes its gradient at the shared model; the aggregate of
    the nodes' messages updates it (bytes: one message per node, uplink)."""

    owns_update = True

    def __init__(self, cfg, compressor, fb: Feedback):
        self.cfg, self.c, self.fb = cfg, compressor, fb
        self.state = self.server = None

    def update(self, r, Z, grad_fn, lr):
        fb, N = self.fb, Z.shape[0]
        g, loss = grad_fn(Z)
        kw = dict(compressor=self.c, seed=self.cfg.seed, round=r)
        if fb.name in ("ef21", "econtrol") and self.server is None:
            self.server = ServerState(x=Z[0].clone(), h=g.mean(0))
            self.state = EF21State(g.clone()) if fb.name == "ef21" else EControlState.init(g)
        if fb.name == "none":
            sent = compressed_sgd_step(g, lr=lr, **kw)
            x = apply_mean_update(Z[0], sent.dense)
        elif fb.name == "ef14":
            self.state = self.state or EF14State.zeros_like(g)
            self.state, sent = ef14_step(self.state, g, lr=lr, **kw)
            x = apply_mean_update(Z[0], sent.dense)
        else:
            if fb.name == "ef21":
                self.state, sent = ef21_step(self.state, g, **kw)
            else:
                self.state, sent = econtrol_step(self.state, g, eta=fb.eta, **kw)
            self.server = server_step(self.server, sent.dense, lr)
            x = self.server.x
        return x.expand(N, -1).clone(), loss, self.c.message_bytes(sent.payload)


def make_rule(cfg, schedule, layout, Z0) -> RoundRule:
    """The round rule for ``cfg.averaging``, ``cfg.compress`` and ``cfg.feedback``."""
    fb = parse_feedback(cfg.feedback)
    compressed = cfg.compress not in ("none", "identity")
    if not compressed and fb.name == "none":
        return Dense(cfg, schedule, layout, Z0.shape[0])
    compressor = make_compressor(cfg.compress)
    if (fb.name in SERVER_FEEDBACK or fb.name == "motef" or cfg.averaging == "allreduce") and (
        cfg.local_steps != 1
    ):
        raise ConfigError(
            f"feedback={cfg.feedback!r} with averaging={cfg.averaging!r} takes one gradient step "
            f"per round; local_steps={cfg.local_steps} must be 1"
        )
    if fb.name in SERVER_FEEDBACK or cfg.averaging == "allreduce":
        if cfg.averaging != "allreduce":
            raise ConfigError(
                f"feedback={cfg.feedback!r} compresses gradients sent to an aggregator: use it "
                "with averaging='allreduce'; for gossip use choco, choco-econtrol or motef"
            )
        return CompressedAllReduce(cfg, compressor, fb)
    if cfg.averaging != "dpsgd":
        raise ConfigError(
            f"compressed gossip mixes like D-PSGD; averaging={cfg.averaging!r} cannot be "
            "combined with compress/feedback (use averaging='dpsgd')"
        )
    if fb.name == "none":
        return NaiveCompressed(cfg, schedule, compressor)
    if fb.name == "motef":
        return MoTEF(cfg, schedule, compressor, fb)
    return Choco(cfg, schedule, compressor, fb, Z0, shared_init=cfg.init == "shared")
