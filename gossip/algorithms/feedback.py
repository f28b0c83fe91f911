"""Error feedback for compressed messages: EF14, EF21 and EControl (ALGORITHMS.md §2).

These are client/server methods: n clients each send one compressed message per round and an
aggregator averages them. Every function is pure (returns new tensors and a new state, never
changes its inputs) and works for one client (``[P]``) or for n clients at once (``[n, P]``,
one row each, the compressor applied row by row with sender ids ``sender + i``).

Every message goes through the real compressor: :func:`send` returns ``decompress(compress(.))``
(the exact tensor the receiver reconstructs) together with the payload and its byte count, so
traffic is counted from real payload sizes. For the decentralized methods built on public
copies (CHOCO, MoTEF) see :mod:`gossip.algorithms.choco`.

Example (n clients, batched)::

    c = make_compressor("topk:0.1")
    state = EControlState.init(grads0)                 # h_i = g_i(x0), sent once uncompressed
    server = ServerState(x=x0, h=grads0.mean(0))
    for t in range(T):
        state, sent = econtrol_step(state, grad(server.x), eta=0.1, compressor=c, round=t)
        server = server_step(server, sent.dense, lr=0.05)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import AlgorithmError, ConfigError
from .compression import Compressor, Payload

FEEDBACK_FORMS = (
    "none | ef14 | ef21 | econtrol:ETA | choco:GAMMA | choco-econtrol:GAMMA,ETA "
    "| motef:GAMMA,LAMBDA"
)


@dataclass(frozen=True)
class Feedback:
    """A parsed ``--feedback`` value."""

    name: str
    gamma: float = 1.0
    eta: float = 0.0
    lmbd: float = 1.0


def parse_feedback(spec: str, valid: str = FEEDBACK_FORMS) -> Feedback:
    """``"choco:0.5"`` -> ``Feedback("choco", gamma=0.5)``; errors list ``valid``, the forms the
    caller accepts (node processes accept fewer than the simulator)."""
    if not isinstance(spec, str):
        raise ConfigError(f"feedback={spec!r} must be a string; use {valid}")
    name, _, args = spec.strip().partition(":")
    try:
        nums = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        raise ConfigError(f"feedback={spec!r}: parameters must be numbers; use {valid}") from None
    arity = {
        "none": 0,
        "ef14": 0,
        "ef21": 0,
        "econtrol": 1,
        "choco": 1,
        "choco-econtrol": 2,
        "motef": 2,
    }
    if name not in arity or len(nums) != arity[name]:
        raise ConfigError(f"feedback={spec!r} is not valid; use {valid}")
    if not all(math.isfinite(v) for v in nums):
        raise ConfigError(f"feedback={spec!r}: parameters must be finite; use {valid}")
    if name in ("choco", "choco-econtrol", "motef") and not nums[0] > 0:
        raise ConfigError(f"feedback={spec!r}: the consensus step GAMMA must be > 0")
    if name in ("econtrol", "choco-econtrol") and not nums[-1] >= 0:
        raise ConfigError(f"feedback={spec!r}: the feedback strength ETA must be >= 0")
    if name == "econtrol":
        return Feedback(name, eta=nums[0])
    if name == "choco":
        return Feedback(name, gamma=nums[0])
    if name == "choco-econtrol":
        return Feedback(name, gamma=nums[0], eta=nums[1])
    if name == "motef":
        return Feedback(name, gamma=nums[0], lmbd=nums[1])
    return Feedback(name)


@dataclass(frozen=True)
class Sent:
    """What one step put on the wire.

    ``dense`` is ``C(.)`` exactly as every receiver reconstructs it (``[P]`` or ``[n, P]``);
    ``payload`` is what travels; ``nbytes`` is its exact size in bytes, one message per row
    (codec header plus frames; the transport adds its envelope, see ``gossip.transport.wire``).
    """

    dense: torch.Tensor
    payload: Payload
    nbytes: int


def send(
    compressor: Compressor,
    x: torch.Tensor,
    *,
    seed: int = 0,
    round: int = 0,
    sender: int | Sequence[int] = 0,
) -> Sent:
    """Compress ``x`` and return what the receivers will see: ``decompress(compress(x))``."""
    payload = compressor.compress(x, seed=seed, round=round, sender=sender)
    return Sent(compressor.decompress(payload), payload, compressor.message_bytes(payload))


def _same_shape(name: str, a: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if a.shape != ref.shape:
        raise AlgorithmError(
            f"{name} has shape {tuple(a.shape)}, expected {tuple(ref.shape)} like {ref_name}"
        )


# -- server side ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerState:
    """The aggregator: model ``x`` (``[P]``) and, for EF21/EControl, the estimator ``h``.

    ``h`` equals ``mean_i h_i`` of the clients after every round (§2(d)5).
    """

    x: torch.Tensor
    h: torch.Tensor | None = None


def server_step(server: ServerState, deltas: torch.Tensor, lr: float) -> ServerState:
    """EF21/EControl aggregation: ``h <- h + mean_i delta_i``; ``x <- x - lr * h``.

    ``deltas`` is ``[n, P]`` (one decompressed message per client) or a ``[P]`` mean.
    """
    if server.h is None:
        raise AlgorithmError("server_step needs ServerState.h (init it to mean_i g_i(x0))")
    mean = deltas.mean(0) if deltas.dim() == 2 else deltas
    _same_shape("mean delta", mean, server.h, "server.h")
    h = server.h + mean
    return ServerState(x=server.x - lr * h, h=h)


def apply_mean_update(x: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """EF14 / plain compressed SGD aggregation: ``x <- x - mean_i delta_i`` (lr already inside)."""
    mean = deltas.mean(0) if deltas.dim() == 2 else deltas
    _same_shape("mean delta", mean, x, "x")
    return x - mean


# -- EF14 -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EF14State:
    """Classic error feedback (Seide et al. 2014): the accumulated compression error ``e_i``.

    Tuning: EF14 re-sends everything the compressor dropped, so it tolerates any contractive
    compressor with homogeneous data; with heterogeneous clients its theory needs bounded
    gradients or bounded heterogeneity (§2(a)). ``error`` starts at 0.
    """

    error: torch.Tensor

    @classmethod
    def zeros_like(cls, x: torch.Tensor) -> EF14State:
        return cls(torch.zeros_like(x))


def ef14_step(
    state: EF14State,
    grad: torch.Tensor,
    *,
    lr: float,
    compressor: Compressor,
    seed: int = 0,
    round: int = 0,
    sender: int | Sequence[int] = 0,
) -> tuple[EF14State, Sent]:
    """Client: ``p = e + lr*g``; ``delta = C(p)``; ``e <- p - delta``; send delta.

    The server applies ``x <- x - mean_i delta_i`` (:func:`apply_mean_update`).
    """
    _same_shape("grad", grad, state.error, "state.error")
    p = state.error + lr * grad
    sent = send(compressor, p, seed=seed, round=round, sender=sender)
    return EF14State(p - sent.dense), sent


# -- EF21 -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EF21State:
    """EF21 (Richtarik et al. 2021): each client's gradient estimator ``h_i``.

    Initialise ``h_i = g_i(x0)`` (one uncompressed message; what EControl uses too) or 0.
    """

    h: torch.Tensor


def ef21_step(
    state: EF21State,
    grad: torch.Tensor,
    *,
    compressor: Compressor,
    seed: int = 0,
    round: int = 0,
    sender: int | Sequence[int] = 0,
) -> tuple[EF21State, Sent]:
    """Client: ``delta = C(g - h)``; ``h <- h + delta``; send delta. Server: :func:`server_step`."""
    _same_shape("grad", grad, state.h, "state.h")
    sent = send(compressor, grad - state.h, seed=seed, round=round, sender=sender)
    return EF21State(state.h + sent.dense), sent


# -- EControl ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EControlState:
    """EControl (Gao, Islamov, Stich, ICLR 2024): error ``e_i`` and estimator ``h_i`` per client.

    The update is ALGORITHMS.md §2(b), marked [I] there (reconstructed; the paper's Algorithm 1
    was not read): the message ``C(eta*e + g - h)`` feeds back only the fraction ``eta`` of the
    accumulated error. Tuning: ``eta`` is the knob that matters; eta = 0 is EF21 (the error is
    kept but unused), eta = 1 diverged in the spec's toy runs; sweep {0.01, 0.05, 0.1, 0.2}
    (default 0.1). ``init`` sets ``e = 0`` and ``h = g(x0)`` (one uncompressed message).
    """

    e: torch.Tensor
    h: torch.Tensor

    @classmethod
    def init(cls, grad0: torch.Tensor) -> EControlState:
        return cls(e=torch.zeros_like(grad0), h=grad0.clone())


def econtrol_step(
    state: EControlState,
    grad: torch.Tensor,
    *,
    eta: float,
    compressor: Compressor,
    seed: int = 0,
    round: int = 0,
    sender: int | Sequence[int] = 0,
) -> tuple[EControlState, Sent]:
    """Client round of EControl (§2(b) [I]); the server then runs :func:`server_step`.

    ``delta = C(eta*e + g - h)``; ``e <- e + g - h - delta``; ``h <- h + delta``; send delta.
    With ``eta == 0`` the message is ``C(g - h)`` exactly (bit-identical to :func:`ef21_step`).
    """
    if not eta >= 0.0:
        raise AlgorithmError(f"eta is the feedback strength, need eta >= 0, got {eta!r}")
    _same_shape("grad", grad, state.h, "state.h")
    diff = grad - state.h
    target = diff if eta == 0 else diff + eta * state.e
    sent = send(compressor, target, seed=seed, round=round, sender=sender)
    return EControlState(e=state.e + diff - sent.dense, h=state.h + sent.dense), sent


def compressed_sgd_step(
    grad: torch.Tensor,
    *,
    lr: float,
    compressor: Compressor,
    seed: int = 0,
    round: int = 0,
    sender: int | Sequence[int] = 0,
) -> Sent:
    """Naive compressed SGD (no feedback): send ``C(lr * g)``; server :func:`apply_mean_update`."""
    return send(compressor, lr * grad, seed=seed, round=round, sender=sender)
