"""Variance-corrected model averaging (Tian, Al-Ars, Kitsak, Hofstee, arXiv 2404.04616).

Averaging m uncorrelated models divides each layer's variance by m, and repeated gossip averaging
shrinks freshly initialised weights towards zero (the "vanishing variance problem"). The fix:
after averaging, rescale every weight tensor around its own mean so its population variance
equals a target, by default the mean variance of the received models (ALGORITHMS.md §1).

Per tensor (one segment of a :class:`~gossip.layout.ParamLayout`)::

    M  = beta * x_self + (1 - beta) * mean(received)
    s  = sqrt((tau + eps) / (Var(M) + eps))          # Var = population variance, one scalar
    x' = mean(M) + s * (M - mean(M))

Only slots of role ``"weight"`` are rescaled (and ``"bias"`` with ``correct_bias=True``);
``"scalar"`` slots are averaged but never rescaled; ``"buffer"`` slots (BatchNorm statistics)
keep the node's own values. A slot whose variance is 0 is skipped.

One averaging event costs two passes over memory: :func:`gossip.ops.weighted_sum_stats_` merges
and takes every per-tensor statistic the targets need in the same pass, then
:func:`gossip.ops.segment_rescale_` rescales in place.

Example (one node, after its receive buffer filled up)::

    buf = AveragingBuffer(threshold=degree)
    buf.add(model_from_neighbour)
    if buf.ready():
        x = variance_corrected_average(x, buf.drain(), layout, beta=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import AlgorithmError
from ..layout import ParamLayout
from ..ops import segment_rescale_, segment_stats, weighted_sum_stats_
from .averaging import _buffer_mask, _check_square, _matmul, _sparse_csr, as_torch_matrix, mix

#: The variance targets: tau = mean received variance, the beta-weighted mix, or the own one.
TARGETS = ("others", "follow_beta", "self")


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise AlgorithmError(f"target={target!r}; valid targets: {', '.join(TARGETS)}")


def _check_numbers(eps: float, s_max: float | None) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise AlgorithmError(f"eps={eps!r}; need a finite number >= 0 (default 0)")
    if s_max is not None and not (
        isinstance(s_max, (int, float)) and math.isfinite(s_max) and s_max > 0
    ):
        raise AlgorithmError(f"s_max={s_max!r}; need a number > 0, or None for no clamp")


def _check_options(target: str, eps: float, s_max: float | None) -> None:
    _check_target(target)
    _check_numbers(eps, s_max)


def variance_targets(
    self_var: torch.Tensor,
    received_var: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    target: str = "others",
) -> torch.Tensor:
    """Target variance ``tau`` per tensor (``[S]``) from per-tensor variances (``[S]`` each).

    ``weights[k]`` (>= 0) is received model k's weight in the mix; the self weight is
    ``1 - sum(weights)``. Targets:

    - ``"others"``: ``sum_k w_k Var_k / sum_k w_k`` (the own variance if all ``w_k`` are 0);
    - ``"follow_beta"``: ``(1 - sum_k w_k) Var_self + sum_k w_k Var_k``;
    - ``"self"``: ``Var_self``.

    Example: ``variance_targets(v0, [v1, v2], [0.25, 0.25], "follow_beta")`` is
    ``0.5 * v0 + 0.25 * (v1 + v2)``.
    """
    _check_target(target)
    self_var = torch.as_tensor(self_var, dtype=torch.float64)
    if target == "self":
        return self_var.clone()
    if isinstance(received_var, torch.Tensor):
        rv = received_var.to(torch.float64)
    else:
        if len(received_var) == 0:
            raise AlgorithmError(f"received_var is empty; target {target!r} needs at least one")
        rv = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in received_var])
    w = torch.as_tensor(weights, dtype=torch.float64, device=rv.device)
    if rv.shape[1:] != self_var.shape or w.shape != rv.shape[:1]:
        raise AlgorithmError(
            f"received_var has shape {tuple(rv.shape)}, weights {tuple(w.shape)} and self_var "
            f"{tuple(self_var.shape)}; need [m, S], [m] and [S]"
        )
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise AlgorithmError(f"weights={w.tolist()}; need finite values >= 0")
    mass = float(w.sum())
    weighted = (w[:, None] * rv).sum(0)
    if target == "others":
        return weighted / mass if mass > 0 else self_var.clone()
    if mass > 1 + 1e-9:
        raise AlgorithmError(
            f"sum(weights) = {mass!r} > 1; 'follow_beta' gives the node weight 1 - sum(weights)"
        )
    return (1.0 - mass) * self_var + weighted


def rescale_to_variance_(
    M: torch.Tensor,
    layout: ParamLayout,
    tau: torch.Tensor,
    *,
    correct_bias: bool = False,
    eps: float = 0.0,
    s_max: float | None = None,
) -> torch.Tensor:
    """Rescale each eligible tensor of ``M`` (``[..., P]``) around its mean to variance ``tau``.

    ``tau`` is ``[..., S]`` (one target per tensor and node, population variance, in squared
    parameter units). Eligible: role ``"weight"``, plus ``"bias"`` if ``correct_bias``. The
    scale is ``s = sqrt((tau + eps) / (v + eps))``, clamped to ``s_max`` if given; a tensor
    whose variance ``v`` is 0 (to the rounding of ``M``'s dtype) is skipped. With ``eps=0`` the
    result's variance is ``tau`` and its mean is unchanged. In place; returns ``M``.
    """
    _check_numbers(eps, s_max)
    layout.check(M, "M")
    mean, var = segment_stats(M, layout)
    return _rescale_with_stats_(M, layout, mean, var, tau, correct_bias, eps, s_max)


def _rescale_with_stats_(M, layout, mean, var, tau, correct_bias, eps, s_max) -> torch.Tensor:
    """:func:`rescale_to_variance_` given ``M``'s per-tensor ``mean`` and ``var`` (float64)."""
    tau = torch.as_tensor(tau, dtype=torch.float64, device=M.device)
    try:
        tau = tau.expand_as(var)
    except RuntimeError:
        raise AlgorithmError(
            f"tau has shape {tuple(tau.shape)}; need {tuple(var.shape)} (one target per tensor)"
        ) from None
    if bool((tau < 0).any()) or not bool(torch.isfinite(tau).all()):
        raise AlgorithmError("tau must be finite and >= 0 (a variance)")
    roles = ("weight", "bias") if correct_bias else ("weight",)
    eligible = layout.role_mask(*roles).to(M.device)
    # v == 0: a constant tensor; float64 stats of float32 data can leave a rounding residue
    zero_floor = (torch.finfo(M.dtype).eps * mean.abs()).square()
    eligible = eligible & (var > zero_floor)
    scale = ((tau + eps) / (var + eps).clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
    if s_max is not None:
        scale = scale.clamp_max(s_max)
    scale = torch.where(eligible, scale, torch.ones_like(scale))
    return segment_rescale_(M, layout, mean, scale)


def variance_corrected_average(
    x_self: torch.Tensor,
    received: Sequence[torch.Tensor],
    layout: ParamLayout,
    *,
    beta: float = 0.5,
    target: str = "others",
    correct_bias: bool = False,
    eps: float = 0.0,
    s_max: float | None = None,
) -> torch.Tensor:
    """One node's averaging event (§1(b)): mix with the received models, then rescale.

    ``M = beta * x_self + (1 - beta) * mean(received)``, then every eligible tensor is rescaled
    to its target variance (see :func:`variance_targets`; ``"others"`` is the mean variance of
    the received models). ``x_self`` and each of ``received`` are ``[P]`` flat buffers laid out
    by ``layout``. ``"buffer"`` slots keep ``x_self``'s values. Returns a new tensor.

    Example: ``variance_corrected_average(x, [x1, x2], layout, beta=0.0)`` averages x1 and x2
    and restores each weight tensor to the mean of their variances.
    """
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise AlgorithmError(f"beta={beta!r}; need a self weight in [0, 1] (default 0.5)")
    _check_options(target, eps, s_max)
    if not isinstance(layout, ParamLayout):
        raise AlgorithmError(f"layout is {type(layout).__name__}; need a ParamLayout")
    layout.check(x_self, "x_self")
    if len(received) == 0:
        raise AlgorithmError("received is empty; an averaging event needs at least one model")
    m = len(received)
    M = torch.empty_like(x_self)
    # one pass: M = beta x_self + sum_k (1 - beta)/m x_k, and the per-tensor mean and variance of
    # M, of x_self and of every received model (x_self as input 0 instead of a self weight
    # spares a copy; the arithmetic, and so the result, is the same)
    st = weighted_sum_stats_(M, [x_self, *received], [float(beta)] + [(1.0 - beta) / m] * m, layout)
    mask = _buffer_mask(layout, M.device)
    if mask is not None:
        # buffer slots are never rescaled, so M's statistics of them are never used
        M[mask] = x_self[mask]
    self_var, received_var = st.input_var[0], st.input_var[1:]
    if target == "self":
        tau = self_var
    else:
        # "others" is normalised, so 1/m each gives the spec's plain mean even when beta = 1
        w = [1.0 / m] * m if target == "others" else [(1.0 - beta) / m] * m
        tau = variance_targets(self_var, received_var, w, target)
    return _rescale_with_stats_(M, layout, st.mean, st.var, tau, correct_bias, eps, s_max)


def _off_diagonal(Wt: torch.Tensor) -> torch.Tensor:
    """``W`` with its diagonal set to 0 (same layout: dense or sparse CSR)."""
    if Wt.layout == torch.sparse_csr:
        crow, col = Wt.crow_indices(), Wt.col_indices()
        row = torch.repeat_interleave(torch.arange(Wt.shape[0], device=col.device), crow.diff())
        values = torch.where(row == col, torch.zeros_like(Wt.values()), Wt.values())
        return _sparse_csr(crow, col, values, tuple(Wt.shape))
    return Wt - torch.diag_embed(torch.diagonal(Wt))


def variance_corrected_mix(
    W,
    X: torch.Tensor,
    layout: ParamLayout,
    *,
    target: str = "others",
    correct_bias: bool = False,
    eps: float = 0.0,
    s_max: float | None = None,
) -> torch.Tensor:
    """Batched variance-corrected averaging for the simulator: ``M = W @ X``, then rescale.

    ``X`` is ``[N, P]`` (one model per row). The targets use the same weights as the mix:
    ``"others"`` = ``sum_{j != i} W_ij Var_j / sum_{j != i} W_ij`` (``Var_i`` where node i has no
    neighbour), ``"follow_beta"`` = ``sum_j W_ij Var_j``, ``"self"`` = ``Var_i``. With
    ``W_ii = beta`` and ``W_ij = (1 - beta) / m`` on node i's m neighbours, row i equals
    :func:`variance_corrected_average` of node i. ``"buffer"`` slots keep each node's own
    values. Returns a new tensor.
    """
    _check_options(target, eps, s_max)
    if not isinstance(layout, ParamLayout):
        raise AlgorithmError(f"layout is {type(layout).__name__}; need a ParamLayout")
    if X.dim() != 2:
        raise AlgorithmError(f"X has shape {tuple(X.shape)}; need [N, P] (one model per row)")
    M = mix(W, X, layout)
    var = segment_stats(X, layout)[1]  # [N, S] float64
    if target == "self":
        tau = var
    else:
        W64 = as_torch_matrix(W, torch.float64, X.device)
        _check_square(W64, X.shape[0])
        if target == "follow_beta":
            tau = _matmul(W64, var)
        else:
            off = _off_diagonal(W64)
            num = _matmul(off, var)
            den = _matmul(off, torch.ones(X.shape[0], dtype=torch.float64, device=X.device))
            has = den > 0
            tau = torch.where(has[:, None], num / torch.where(has, den, 1.0)[:, None], var)
    return rescale_to_variance_(M, layout, tau, correct_bias=correct_bias, eps=eps, s_max=s_max)


class AveragingBuffer:
    """A node's receive buffer ``R_i`` with threshold ``b_i`` (§1(b)).

    Received models accumulate until ``len(buffer) >= threshold``; then the node runs one
    averaging event over all of them and the buffer empties. The spec's default threshold is the
    node's degree. Models are stored as given (no copy): pass a copy if the sender's buffer is
    reused.

    Example::

        buf = AveragingBuffer(threshold=2)
        buf.add(x1); buf.ready()         # False
        buf.add(x2); buf.ready()         # True
        x = variance_corrected_average(x, buf.drain(), layout)   # buffer now empty
    """

    def __init__(self, threshold: int):
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise AlgorithmError(f"threshold={threshold!r}; need an integer >= 1 (e.g. the degree)")
        self.threshold = threshold
        self._models: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._models)

    def add(self, model: torch.Tensor) -> None:
        """Append one received flat model (all models must have the same shape)."""
        if self._models and model.shape != self._models[0].shape:
            raise AlgorithmError(
                f"model has shape {tuple(model.shape)} but the buffer holds "
                f"{tuple(self._models[0].shape)}; every received model must match"
            )
        self._models.append(model)

    def ready(self) -> bool:
        """True when ``len(buffer) >= threshold`` (time to average)."""
        return len(self._models) >= self.threshold

    def drain(self) -> list[torch.Tensor]:
        """Return the buffered models and empty the buffer."""
        models, self._models = self._models, []
        return models

    def average_if_ready(self, x_self: torch.Tensor, layout: ParamLayout, **options):
        """Run :func:`variance_corrected_average` over the buffer if it is ready, else None.

        ``options`` are that function's keywords (``beta``, ``target``, ...). The buffer is
        empty afterwards when it fired, untouched otherwise.
        """
        if not self.ready():
            return None
        return variance_corrected_average(x_self, self.drain(), layout, **options)
