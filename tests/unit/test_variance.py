"""Variance-corrected averaging (ALGORITHMS.md §1(d)): mean, variance target, Xavier oracle,
no-op, positive-affine and scale-equivariant, exclusions, receive buffer, batched equivalence."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gossip.algorithms import (
    TARGETS,
    AveragingBuffer,
    rescale_to_variance_,
    variance,
    variance_corrected_average,
    variance_corrected_mix,
    variance_targets,
)
from gossip.errors import AlgorithmError
from gossip.layout import ParamLayout
from gossip.ops import merge

LAYOUT = ParamLayout.from_shapes(
    {
        "conv.weight": (8, 3, 3, 3),
        "conv.bias": (8,),
        "bn.weight": (8,),
        "bn.running_mean": (8,),
        "bn.running_var": (8,),
        "bn.num_batches_tracked": (1,),
        "fc.weight": (10, 72),
        "fc.bias": (10,),
        "temperature": (1,),
    }
)
ROLE = {s.name: s.role for s in LAYOUT.slots}


def models(k, seed=0, dtype=torch.float64, layout=LAYOUT):
    """k independent flat models; each tensor has its own random scale and offset per model."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(k, layout.numel, dtype=torch.float64)
    for s in layout.slots:
        scale = torch.rand(k, 1, generator=gen, dtype=torch.float64) + 0.2
        shift = torch.randn(k, 1, generator=gen, dtype=torch.float64) * 0.1
        noise = torch.randn(k, s.numel, generator=gen, dtype=torch.float64)
        out[:, s.offset : s.offset + s.numel] = shift + scale * noise
    return out.to(dtype)


def seg(x, name, layout=LAYOUT):
    s = next(s for s in layout.slots if s.name == name)
    return x[..., s.offset : s.offset + s.numel].double()


def pvar(t):
    return float(t.double().var(unbiased=False))


def plain_mix(x_self, received, beta):
    return beta * x_self + (1 - beta) * torch.stack(received).mean(0)


def expected_tau(x_self, received, beta, target, name):
    self_v = pvar(seg(x_self, name))
    others = float(np.mean([pvar(seg(r, name)) for r in received]))
    return {"others": others, "follow_beta": beta * self_v + (1 - beta) * others, "self": self_v}[
        target
    ]


# -- §1(d) 1 and 2: mean preserved, variance hits the target -----------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_mean_is_preserved_and_variance_hits_the_target(target, dtype, tol):
    X = models(5, seed=1, dtype=dtype)
    x_self, received, beta = X[0], list(X[1:]), 0.3
    out = variance_corrected_average(x_self, received, LAYOUT, beta=beta, target=target)
    M = plain_mix(x_self.double(), [r.double() for r in received], beta)
    assert out.dtype == dtype
    for name in ("conv.weight", "fc.weight"):
        mean_m = float(seg(M, name).mean())
        assert abs(float(seg(out, name).mean()) - mean_m) <= 1e-6 * max(1.0, abs(mean_m))
        tau = expected_tau(x_self, received, beta, target, name)
        assert abs(pvar(seg(out, name)) - tau) <= tol * tau
        assert abs(pvar(seg(M, name)) - tau) > 10 * tol * tau  # the correction did something


# -- §1(d) 3: the Xavier oracle -----------------------------------------------------------------
@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_xavier_oracle(m):
    fan_in, fan_out = 512, 256
    layout = ParamLayout.from_shapes({"w": (fan_out, fan_in)})
    sigma2 = 2.0 / (fan_in + fan_out)
    bound = math.sqrt(3 * sigma2)  # Xavier-uniform: U(-a, a) with a^2 / 3 = sigma^2
    gen = torch.Generator().manual_seed(m)
    X = (torch.rand(m + 1, layout.numel, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    received = list(X[1:])
    A = torch.stack(received).mean(0)
    assert abs(pvar(A) / sigma2 - 1 / m) <= 0.05 / m
    out = variance_corrected_average(X[0], received, layout, beta=0.0, target="others")
    assert abs(pvar(out) / sigma2 - 1) <= 0.05


def test_positive_eps_restores_only_part_of_the_variance():
    layout = ParamLayout.from_shapes({"w": (256, 512)})
    sigma2 = 2.0 / 768
    gen = torch.Generator().manual_seed(0)
    X = (torch.rand(17, layout.numel, generator=gen, dtype=torch.float64) * 2 - 1) * math.sqrt(
        3 * sigma2
    )
    out = variance_corrected_average(X[0], list(X[1:]), layout, beta=0.0, eps=1e-4)
    assert 0.6 < pvar(out) / sigma2 < 0.7  # the spec's warning: 0.64 sigma^2 at m = 16
    # and exactly the formula s = sqrt((tau + eps) / (v + eps))
    v = pvar(X[1:].mean(0))
    tau = float(np.mean([pvar(r) for r in X[1:]]))
    assert abs(pvar(out) - v * (tau + 1e-4) / (v + 1e-4)) <= 1e-9 * pvar(out)


def test_s_max_clamps_the_scale():
    layout = ParamLayout.from_shapes({"w": (64, 64)})
    X = models(17, seed=2, layout=layout)
    A = X[1:].mean(0)
    out = variance_corrected_average(X[0], list(X[1:]), layout, beta=0.0, s_max=1.5)
    assert abs(math.sqrt(pvar(out) / pvar(A)) - 1.5) <= 1e-12
    free = variance_corrected_average(X[0], list(X[1:]), layout, beta=0.0)
    assert math.sqrt(pvar(free) / pvar(A)) > 3  # the clamp was active


# -- §1(d) 4 and 5: no-op, positive-affine, scale-equivariant ----------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_identical_inputs_are_a_no_op(target):
    x = models(1, seed=3)[0]
    out = variance_corrected_average(x, [x.clone(), x.clone(), x.clone()], LAYOUT, target=target)
    assert float((out - x).abs().max()) <= 1e-6


def test_each_tensor_is_an_increasing_affine_function_of_the_mix():
    X = models(4, seed=4)
    out = variance_corrected_average(X[0], list(X[1:]), LAYOUT, beta=0.5)
    M = plain_mix(X[0], list(X[1:]), 0.5)
    for name in ("conv.weight", "fc.weight"):
        a, b = seg(M, name), seg(out, name)
        pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(pearson - 1) <= 1e-12
        assert bool((b[torch.argsort(a)].diff() >= 0).all())  # ranks unchanged
        assert not torch.allclose(a, b)  # and it is not the identity


@pytest.mark.parametrize("c", [0.25, 3.0])
def test_scale_equivariance(c):
    X = models(4, seed=5)
    out = variance_corrected_average(X[0], list(X[1:]), LAYOUT, correct_bias=True)
    scaled = variance_corrected_average(c * X[0], list(c * X[1:]), LAYOUT, correct_bias=True)
    torch.testing.assert_close(scaled, c * out, rtol=1e-12, atol=1e-14)


# -- the fused path: one merge-and-statistics pass, one rescale pass ---------------------------
def unfused_average(x_self, received, layout, *, beta, target, **options):
    """The averaging event as separate passes (the implementation before the fused op): copy
    x_self, merge, restore buffers, statistics of x_self and of each received model, then
    statistics of the merge and the rescale. Run it with the reference backend."""
    m = len(received)
    M = x_self.clone()
    merge.weighted_sum_(M, received, [(1 - beta) / m] * m, self_weight=beta)
    mask = layout.element_mask("buffer")
    M[mask] = x_self[mask]
    self_var = merge.segment_stats(x_self, layout)[1]
    received_var = [merge.segment_stats(r, layout)[1] for r in received]
    w = [1 / m] * m if target == "others" else [(1 - beta) / m] * m
    tau = self_var if target == "self" else variance_targets(self_var, received_var, w, target)
    return rescale_to_variance_(M, layout, tau, **options)  # its own statistics pass of M


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_fused_path_equals_the_unfused_reference(backend, target, beta, monkeypatch):
    X = models(5, seed=12)
    options = dict(correct_bias=True, eps=1e-6, s_max=4.0)
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")
    want = unfused_average(X[0], list(X[1:]), LAYOUT, beta=beta, target=target, **options)
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", backend)
    got = variance_corrected_average(X[0], list(X[1:]), LAYOUT, beta=beta, target=target, **options)
    if backend == "reference":
        assert torch.equal(got, want)  # the same operations in the same order
    else:  # native kernels (when built) match the reference's float64 statistics to ~1e-12
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_correction_is_one_fused_merge_and_one_rescale(monkeypatch):
    calls = []

    def counted(name):
        real = getattr(variance, name)

        def op(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return op

    for name in ("weighted_sum_stats_", "segment_stats", "segment_rescale_"):
        monkeypatch.setattr(variance, name, counted(name))
    X = models(4, seed=13)
    for target in TARGETS:
        calls.clear()
        variance_corrected_average(X[0], list(X[1:]), LAYOUT, target=target)
        assert calls == ["weighted_sum_stats_", "segment_rescale_"], (target, calls)


# -- §1(d) 6: exclusions and the receive buffer --------------------------------------------------
def test_buffers_keep_self_scalars_and_biases_are_the_plain_average():
    X = models(4, seed=6)
    beta = 0.4
    out = variance_corrected_average(X[0], list(X[1:]), LAYOUT, beta=beta)
    M = plain_mix(X[0], list(X[1:]), beta)
    for name, role in ROLE.items():
        if role == "buffer":
            assert torch.equal(seg(out, name), seg(X[0], name)), name
        elif role in ("scalar", "bias"):
            torch.testing.assert_close(seg(out, name), seg(M, name), rtol=0, atol=1e-15)
        else:
            assert not torch.allclose(seg(out, name), seg(M, name)), name
    # with correct_bias=True the biases are rescaled too, scalars still are not
    out_b = variance_corrected_average(X[0], list(X[1:]), LAYOUT, beta=beta, correct_bias=True)
    for name in ("conv.bias", "fc.bias", "bn.weight"):
        tau = expected_tau(X[0], list(X[1:]), beta, "others", name)
        assert abs(pvar(seg(out_b, name)) - tau) <= 1e-5 * tau
    torch.testing.assert_close(seg(out_b, "temperature"), seg(M, "temperature"), rtol=0, atol=0)


def test_constant_tensor_is_skipped():
    layout = ParamLayout.from_shapes({"w": (4, 4), "v": (4, 4)})
    x = torch.full((32,), 0.1, dtype=torch.float32)
    X = models(3, seed=7, dtype=torch.float32, layout=layout)
    x[16:] = X[0, 16:]
    # beta = 1: M = x_self, whose "w" has variance 0 while the received ones do not
    out = variance_corrected_average(x, list(X[1:]), layout, beta=1.0)
    assert torch.equal(out[:16], x[:16])
    assert bool(torch.isfinite(out).all())
    tau = float(np.mean([pvar(r[16:]) for r in X[1:]]))
    assert abs(pvar(out[16:]) - tau) <= 1e-4 * tau  # the other tensor follows the received ones


def test_averaging_buffer_fires_only_when_full_and_empties():
    X = models(4, seed=8)
    buf = AveragingBuffer(threshold=3)
    for k in (1, 2):
        buf.add(X[k])
        assert not buf.ready()
        assert buf.average_if_ready(X[0], LAYOUT) is None
        assert len(buf) == k
    buf.add(X[3])
    assert buf.ready()
    out = buf.average_if_ready(X[0], LAYOUT, beta=0.5)
    assert len(buf) == 0 and not buf.ready()
    torch.testing.assert_close(out, variance_corrected_average(X[0], list(X[1:]), LAYOUT))
    buf.add(X[1])
    assert [t.data_ptr() for t in buf.drain()] == [X[1].data_ptr()] and len(buf) == 0
    with pytest.raises(AlgorithmError, match=r"threshold=0; need an integer >= 1"):
        AveragingBuffer(0)
    with pytest.raises(AlgorithmError, match=r"model has shape \(3,\) but the buffer holds"):
        buf.add(X[1])
        buf.add(torch.zeros(3))


# -- batched form --------------------------------------------------------------------------------
NEIGHBOURS = {0: [1, 2], 1: [0, 2, 3, 4], 2: [0, 1], 3: [1], 4: [1], 5: []}


def vc_matrix(beta):
    n = len(NEIGHBOURS)
    W = np.zeros((n, n))
    for i, nb in NEIGHBOURS.items():
        W[i, i] = beta if nb else 1.0
        for j in nb:
            W[i, j] = (1 - beta) / len(nb)
    return W


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("sparse", [False, True])
def test_batched_mix_equals_the_per_node_rule(target, sparse):
    beta = 0.3
    W = vc_matrix(beta)
    X = models(6, seed=9)
    out = variance_corrected_mix(sp.csr_array(W) if sparse else W, X, LAYOUT, target=target)
    for i, nb in NEIGHBOURS.items():
        if not nb:  # no neighbour: "others" falls back to the own variance, a no-op
            assert torch.equal(out[i], X[i])
            continue
        ref = variance_corrected_average(X[i], [X[j] for j in nb], LAYOUT, beta=beta, target=target)
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-12)
    buf = LAYOUT.element_mask("buffer")
    assert torch.equal(out[:, buf], X[:, buf])


def test_batched_rescale_with_per_node_targets():
    X = models(3, seed=10)
    tau = torch.full((3, len(LAYOUT)), 0.5, dtype=torch.float64)
    tau[1] = 2.0
    out = rescale_to_variance_(X.clone(), LAYOUT, tau)
    for i, t in enumerate((0.5, 2.0, 0.5)):
        assert abs(pvar(seg(out[i], "fc.weight")) - t) <= 1e-5 * t
        assert torch.equal(seg(out[i], "fc.bias"), seg(X[i], "fc.bias"))


def test_variance_targets_formulas():
    v0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    rv = [torch.tensor([3.0, 4.0]), torch.tensor([5.0, 8.0])]
    others = torch.tensor([4.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(variance_targets(v0, rv, [0.25, 0.25], "others"), others)
    torch.testing.assert_close(variance_targets(v0, rv, [0.1, 0.1], "others"), others)
    torch.testing.assert_close(
        variance_targets(v0, rv, [0.25, 0.25], "follow_beta"), 0.5 * v0 + 0.5 * others
    )
    torch.testing.assert_close(variance_targets(v0, rv, [0.25, 0.25], "self"), v0)
    torch.testing.assert_close(variance_targets(v0, rv, [0.0, 0.0], "others"), v0)


# -- argument validation -------------------------------------------------------------------------
def test_errors_name_the_argument_and_the_valid_values():
    X = models(3, seed=11)
    x, rec = X[0], list(X[1:])
    with pytest.raises(AlgorithmError, match="target='mean'; valid targets: others, follow_beta"):
        variance_corrected_average(x, rec, LAYOUT, target="mean")
    with pytest.raises(AlgorithmError, match=r"beta=1.5; need a self weight in \[0, 1\]"):
        variance_corrected_average(x, rec, LAYOUT, beta=1.5)
    with pytest.raises(AlgorithmError, match=r"eps=-0.1; need a finite number >= 0"):
        variance_corrected_average(x, rec, LAYOUT, eps=-0.1)
    with pytest.raises(AlgorithmError, match=r"s_max=0; need a number > 0, or None"):
        variance_corrected_mix(np.eye(3), X, LAYOUT, s_max=0)
    with pytest.raises(AlgorithmError, match="received is empty"):
        variance_corrected_average(x, [], LAYOUT)
    with pytest.raises(AlgorithmError, match="layout is NoneType; need a ParamLayout"):
        variance_corrected_average(x, rec, None)
    with pytest.raises(AlgorithmError, match=r"x_self has shape \(5,\); its last dimension"):
        variance_corrected_average(torch.zeros(5), rec, LAYOUT)
    with pytest.raises(AlgorithmError, match=r"tau has shape \(2,\); need \(9,\)"):
        rescale_to_variance_(x.clone(), LAYOUT, torch.ones(2))
    with pytest.raises(AlgorithmError, match=r"sum\(weights\) = 1.5 > 1; 'follow_beta'"):
        variance_targets(torch.ones(2), [torch.ones(2)], [1.5], "follow_beta")
    with pytest.raises(AlgorithmError, match=r"weights=\[-1.0\]; need finite values >= 0"):
        variance_targets(torch.ones(2), [torch.ones(2)], [-1.0], "others")
