"""EF14 / EF21 / EControl (ALGORITHMS.md §2(d) 1-6), CHOCO (§2.4(d) 1-4), error-controlled CHOCO
(§2.5, eta = 0), MoTEF (§2.6, 1-4); float64 where the spec says so."""

import numpy as np
import pytest
import torch

from gossip.algorithms.averaging import as_torch_matrix, dpsgd_step
from gossip.algorithms.choco import (
    ChocoEControlState,
    ChocoState,
    MoTEFState,
    PublicCopy,
    absorb_,
    choco_econtrol_gossip,
    choco_gossip,
    choco_node_consensus_,
    motef_node_model_,
    motef_node_tracker_,
    motef_step,
    publish_,
)
from gossip.algorithms.compression import make_compressor
from gossip.algorithms.feedback import (
    EControlState,
    EF14State,
    EF21State,
    ServerState,
    apply_mean_update,
    compressed_sgd_step,
    econtrol_step,
    ef14_step,
    ef21_step,
    server_step,
)
from gossip.errors import AlgorithmError
from gossip.transport.wire import decode_payload, encode_payload

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same inputs whatever runs before it."""
    torch.manual_seed(0)


def ring(n: int) -> np.ndarray:
    W = np.zeros((n, n))
    for i in range(n):
        W[i, i] = W[i, (i + 1) % n] = W[i, (i - 1) % n] = 1 / 3
    return W


class LSQ:
    """Heterogeneous least squares: client i has f_i(x) = 0.5 ||A_i x - b_i||^2 / m."""

    def __init__(self, n=6, d=40, m=80, zeta=1.0, seed=0, dtype=F64):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(n, m, d, generator=g, dtype=dtype) / m**0.5
        x_i = torch.randn(d, generator=g, dtype=dtype) + zeta * torch.randn(
            n, d, generator=g, dtype=dtype
        )
        self.H = A.transpose(1, 2) @ A
        self.c = (A.transpose(1, 2) @ (A @ x_i.unsqueeze(2))).squeeze(2)
        self.x_star = torch.linalg.solve(self.H.mean(0), self.c.mean(0))
        self.n, self.d, self.dtype = n, d, dtype
        self.noise = torch.Generator().manual_seed(seed + 1)

    def grad(self, x, sigma=0.0):
        """Per-client gradients at a common x ([d]) or at per-node models ([n, d])."""
        xs = x.expand(self.n, self.d) if x.dim() == 1 else x
        g = (self.H @ xs.unsqueeze(2)).squeeze(2) - self.c
        if sigma:
            g = g + sigma * torch.randn(g.shape, generator=self.noise, dtype=self.dtype)
        return g


# -- EControl and friends (§2(d)) -------------------------------------------------------------
def _econtrol_run(prob, comp, eta, T, lr=0.1, sigma=0.0, dtype=F64):
    x = torch.zeros(prob.d, dtype=dtype)
    g0 = prob.grad(x, sigma).to(dtype)
    st, srv = EControlState.init(g0), ServerState(x=x, h=g0.mean(0))
    hist = []
    for t in range(T):
        g = prob.grad(srv.x, sigma).to(dtype)
        new, sent = econtrol_step(st, g, eta=eta, compressor=comp, seed=3, round=t)
        hist.append((srv.x, st, g, new, sent))
        st, srv = new, server_step(srv, sent.dense, lr)
    return srv, st, hist


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.5, 1.0])
def test_identity_compressor_econtrol_is_gradient_descent(eta):
    """§2(d)1: with C = id, EControl's iterates equal GD's to 1e-10 (float64), for any eta."""
    prob, ident, lr = LSQ(), make_compressor("none"), 0.1
    srv, _, _ = _econtrol_run(prob, ident, eta, 50, lr)
    x = torch.zeros(prob.d, dtype=F64)
    for _ in range(50):
        x = x - lr * prob.grad(x).mean(0)
    assert float((srv.x - x).abs().max()) <= 1e-10
    # EF14 and EF21 reduce to GD the same way
    x14, e14 = torch.zeros(prob.d, dtype=F64), EF14State.zeros_like(prob.grad(x))
    x21 = ServerState(x=x14.clone(), h=prob.grad(x14).mean(0))
    h21 = EF21State(prob.grad(torch.zeros(prob.d, dtype=F64)))
    for _ in range(50):
        e14, s = ef14_step(e14, prob.grad(x14), lr=lr, compressor=ident)
        x14 = apply_mean_update(x14, s.dense)
        h21, s = ef21_step(h21, prob.grad(x21.x), compressor=ident)
        x21 = server_step(x21, s.dense, lr)
    assert float((x14 - x).abs().max()) <= 1e-10 and float((x21.x - x).abs().max()) <= 1e-10


@pytest.mark.parametrize("spec", ["topk:0.1", "randk:0.1", "sign", "quant:4"])
def test_eta_zero_econtrol_is_ef21_bit_for_bit(spec):
    """§2(d)2: eta = 0 gives bitwise-identical trajectories to EF21 (same seeds)."""
    prob, comp = LSQ(), make_compressor(spec)
    srv, st, _ = _econtrol_run(prob, comp, 0.0, 40, sigma=0.01)
    prob = LSQ()  # same noise stream again
    x = torch.zeros(prob.d, dtype=F64)
    g0 = prob.grad(x, 0.01)
    h, ref = EF21State(g0), ServerState(x=x, h=g0.mean(0))
    for t in range(40):
        h, sent = ef21_step(h, prob.grad(ref.x, 0.01), compressor=comp, seed=3, round=t)
        ref = server_step(ref, sent.dense, 0.1)
    assert torch.equal(srv.x, ref.x) and torch.equal(st.h, h.h)


def test_error_bookkeeping_and_virtual_iterate():
    """§2(d)3: e_i^T = sum_{s<T} (g_i^s - h_i^{s+1}); §2(d)4: x - lr mean e follows exact SGD."""
    prob, comp, lr = LSQ(), make_compressor("topk:0.1"), 0.1
    srv, st, hist = _econtrol_run(prob, comp, 0.2, 60, lr, sigma=0.05)
    acc = torch.zeros_like(st.e)
    for _, _, g, new, _ in hist:
        acc += g - new.h
    assert float((st.e - acc).norm() / acc.norm()) <= 1e-9
    for (x, old, g, new, _), (x_next, *_rest) in zip(hist, hist[1:] + [(srv.x,)], strict=True):
        virt, virt_next = x - lr * old.e.mean(0), x_next - lr * new.e.mean(0)
        expected = virt - lr * g.mean(0)
        assert float((virt_next - expected).norm() / expected.norm()) <= 1e-9


def test_server_estimator_matches_client_mean_in_float32():
    """§2(d)5: h_server == mean_i h_i to 1e-6 relative after every round (float32).

    Relative to the clients' scale mean_i ||h_i||: mean_i h_i itself tends to grad f(x*) = 0,
    so float32 rounding (~6e-7 absolute here) is measured against what was summed."""
    prob = LSQ(dtype=torch.float32)
    comp = make_compressor("topk:0.1")
    x = torch.zeros(prob.d)
    g0 = prob.grad(x)
    st, srv = EControlState.init(g0), ServerState(x=x, h=g0.mean(0))
    for t in range(100):
        st, sent = econtrol_step(st, prob.grad(srv.x), eta=0.1, compressor=comp, round=t)
        srv = server_step(srv, sent.dense, 0.1)
        scale = float(st.h.norm(dim=1).mean())
        assert float((srv.h - st.h.mean(0)).norm()) <= 1e-6 * scale


def test_traffic_is_k_values_and_k_indices_per_client():
    """§2(d)6: each client sends nnz(delta) = k values plus indices per round, nothing else."""
    prob, comp = LSQ(n=5, d=300), make_compressor("topk:0.02")
    k = comp.k_for(300)
    _, _, hist = _econtrol_run(prob, comp, 0.1, 10)
    one = comp.wire_bytes(comp.compress(torch.randn(300, dtype=F64)))
    for *_, sent in hist:
        assert int((sent.dense != 0).sum(1).max()) <= k
        vals, idx = sent.payload.frames
        assert vals.shape == (5, k) and idx.shape == (5, k) and idx.element_size() == 2
        assert sent.nbytes == 5 * one  # one message per client, header included


def test_batched_clients_equal_single_client_calls():
    prob, comp = LSQ(), make_compressor("randk:0.1")
    g0, g1 = prob.grad(torch.zeros(prob.d, dtype=F64)), prob.grad(torch.ones(prob.d, dtype=F64))
    batch, sent = econtrol_step(EControlState.init(g0), g1, eta=0.1, compressor=comp, round=4)
    for i in range(prob.n):
        one, s1 = econtrol_step(
            EControlState.init(g0[i]), g1[i], eta=0.1, compressor=comp, round=4, sender=i
        )
        assert torch.equal(one.e, batch.e[i]) and torch.equal(s1.dense, sent.dense[i])
    with pytest.raises(AlgorithmError, match="need eta >= 0"):
        econtrol_step(batch, g1, eta=-0.1, compressor=comp)
    with pytest.raises(AlgorithmError, match=r"grad has shape \(40,\), expected \(6, 40\)"):
        econtrol_step(batch, g1[0], eta=0.1, compressor=comp)


def test_heterogeneous_least_squares_story():
    """Naive compression stalls far from x*, EF14 stalls at a heterogeneity floor, EF21 and
    EControl (eta = 0.1) converge; eta = 1 diverges (the spec's toy observations)."""
    prob, comp, lr, T = LSQ(n=6, d=40, m=80, zeta=1.0), make_compressor("topk:0.1"), 0.2, 250
    x_naive = torch.zeros(prob.d, dtype=F64)
    x14, e14 = x_naive.clone(), EF14State.zeros_like(prob.grad(x_naive))
    for t in range(T):
        s = compressed_sgd_step(prob.grad(x_naive), lr=lr, compressor=comp, round=t)
        x_naive = apply_mean_update(x_naive, s.dense)
        e14, s = ef14_step(e14, prob.grad(x14), lr=lr, compressor=comp, round=t)
        x14 = apply_mean_update(x14, s.dense)

    def dist(x):
        return float((x - prob.x_star).pow(2).sum())

    srv, *_ = _econtrol_run(prob, comp, 0.1, T, lr)
    srv21, *_ = _econtrol_run(prob, comp, 0.0, T, lr)
    bad, *_ = _econtrol_run(prob, comp, 1.0, 100, lr)
    start = dist(torch.zeros(prob.d, dtype=F64))
    assert dist(srv.x) < 1e-10 * start and dist(srv21.x) < 1e-10 * start
    assert dist(x_naive) > 1e-2 * start and dist(x14) > 1e-3 * start
    assert not dist(bad.x) < 1e3 * start


# -- CHOCO (§2.4(d)) --------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["topk:0.1", "randk:0.1", "quant:4", "sign", "bf16"])
def test_choco_gossip_preserves_the_mean(spec):
    """§2.4(d)1: gossip only, 100 rounds, doubly stochastic W: |mean x - mean x0| <= 1e-6
    (float64, so the check sees the algebra, not float32 rounding of 100 sums)."""
    W = as_torch_matrix(ring(8), F64)
    x = torch.randn(8, 200, dtype=F64)
    m0 = x.mean(0)
    state = ChocoState.init(x, zeros=True)
    for t in range(100):
        x, state, _ = choco_gossip(
            x, state, W, gamma=0.1, compressor=make_compressor(spec), round=t
        )
    assert float((x.mean(0) - m0).abs().max()) <= 1e-6


def test_identity_choco_with_gamma_one_is_dpsgd():
    """§2.4(d)2: C = id, gamma = 1, x_hat0 = x0 gives x' = W x - lr g(x) (Lian-form D-PSGD);
    with x_hat0 = 0 the same recursion holds from the second iteration on."""
    prob, W, lr = LSQ(n=8), ring(8), 0.05
    x0 = torch.randn(8, prob.d, dtype=F64)
    for zeros in (False, True):
        x, st, ref = x0.clone(), ChocoState.init(x0, zeros=zeros), x0.clone()
        for t in range(30):
            x_prev = x
            x = x - lr * prob.grad(x)
            x, st, _ = choco_gossip(x, st, W, gamma=1.0, compressor=make_compressor("none"))
            ref = dpsgd_step(W, x_prev if zeros else ref, prob.grad(x_prev if zeros else ref), lr)
            if not zeros or t >= 1:
                assert float((x - ref).abs().max()) <= 1e-12, t


def _node_round(nodes, replicas, x, W, comp, t, gamma):
    """One CHOCO round for every node in node form; messages go through the wire codec."""
    n = len(nodes)
    outbox = {}
    for i in range(n):
        choco_node_consensus_(x[i], nodes[i], gamma)
        sent = publish_(nodes[i], x[i], comp, self_weight=W[i, i], round=t, sender=i)
        meta = {"run": "t", "sender": i, "round": t}
        outbox[i] = decode_payload([bytes(f) for f in encode_payload(sent.payload, meta)])[1]
    for i in range(n):
        for j in range(n):
            if j != i and W[i, j] > 0:
                absorb_(nodes[i], outbox[j], W[i, j], comp)
                comp.decompress_add_(replicas[i][j], outbox[j], 1.0)


def test_choco_replicas_stay_bit_identical_and_node_form_matches_batched():
    """§2.4(d)3: every neighbour's copy of x_hat_j equals node j's own, bit for bit."""
    n, d, W = 6, 100, ring(6)
    comp = make_compressor("topk:0.05")
    x0 = torch.randn(n, d)
    x, nodes = x0.clone(), [PublicCopy.zeros(x0[i]) for i in range(n)]
    replicas = [{j: torch.zeros(d) for j in range(n) if W[i, j] > 0 and j != i} for i in range(n)]
    xb, st = x0.clone(), ChocoState.init(x0, zeros=True)
    for t in range(50):
        _node_round(nodes, replicas, x, W, comp, t, 0.3)
        for i in range(n):
            for j, rep in replicas[i].items():
                assert torch.equal(rep.view(torch.int32), nodes[j].copy.view(torch.int32))
        xb, st, _ = choco_gossip(xb, st, W, gamma=0.3, compressor=comp, round=t)
    assert float((x - xb).abs().max()) <= 1e-4 * float(xb.abs().max())


@pytest.mark.parametrize("gamma", [0.05, 0.1, 0.2])
def test_choco_gossip_reaches_consensus(gamma):
    """§2.4(d)4: top-10%, 8-node ring, weights 1/3: max |x_i - mean| < 1e-12 within 3000 rounds."""
    W = as_torch_matrix(ring(8), F64)
    x = torch.randn(8, 50, dtype=F64, generator=torch.Generator().manual_seed(4))
    state, comp = ChocoState.init(x, zeros=True), make_compressor("topk:0.1")
    for t in range(3000):
        x, state, _ = choco_gossip(x, state, W, gamma=gamma, compressor=comp, round=t)
        if float((x - x.mean(0)).abs().max()) < 1e-12:
            break
    assert float((x - x.mean(0)).abs().max()) < 1e-12


def test_error_controlled_choco_with_eta_zero_is_choco():
    """§2.5: eta = 0 gives exactly CHOCO; eta > 0 warns (experimental)."""
    W, comp = ring(8), make_compressor("topk:0.1")
    x0 = torch.randn(8, 60)
    a, sa = x0.clone(), ChocoState.init(x0, zeros=True)
    b, sb = x0.clone(), ChocoEControlState.init(x0, eta=0.0, zeros=True)
    for t in range(100):
        a, sa, _ = choco_gossip(a, sa, W, gamma=0.2, compressor=comp, round=t)
        b, sb, _ = choco_econtrol_gossip(b, sb, W, gamma=0.2, eta=0.0, compressor=comp, round=t)
    assert torch.equal(a, b) and torch.equal(sa.x_hat, sb.x_hat)
    with pytest.warns(UserWarning, match="eta=0.05 is experimental"):
        ChocoEControlState.init(x0, eta=0.05)
    m0, c = x0.mean(0), x0.clone()
    sc = ChocoEControlState(torch.zeros_like(x0), torch.zeros_like(x0))
    with pytest.warns(UserWarning, match="experimental"):
        for t in range(300):
            c, sc, _ = choco_econtrol_gossip(
                c, sc, W, gamma=0.1, eta=0.05, compressor=comp, round=t
            )
    assert float((c.mean(0) - m0).abs().max()) <= 1e-5
    assert float((c - c.mean(0)).abs().max()) < 1e-2 * float((x0 - m0).abs().max())


# -- MoTEF (§2.6) -----------------------------------------------------------------------------
def _motef(prob, comp, T, lr=0.05, gamma=0.3, lmbd=0.9, sigma=0.0):
    W = as_torch_matrix(ring(prob.n), F64)
    x0 = torch.zeros(prob.n, prob.d, dtype=F64)
    st = MoTEFState.init(x0, prob.grad(x0))
    hist = [st]
    for t in range(T):
        st, q, r = motef_step(
            st,
            lambda x: prob.grad(x, sigma),
            W,
            lr=lr,
            gamma=gamma,
            lmbd=lmbd,
            compressor=comp,
            round=t,
        )
        hist.append((st, q, r))
    return st, hist


def test_motef_tracking_invariant_and_identity_copies():
    """§2.6(1): sum_i v_i == sum_i m_i (1e-9 rel, float64); (3): with C = id, h == x and
    g == v right after each send."""
    prob = LSQ(n=8)
    _, hist = _motef(prob, make_compressor("topk:0.1"), 60, sigma=0.1)
    for st, *_ in hist[1:]:
        sv, sm = st.v.sum(0), st.m.sum(0)
        assert float((sv - sm).norm() / sm.norm()) <= 1e-9
    _, hist = _motef(LSQ(n=8), make_compressor("none"), 20)
    for st, *_ in hist[1:]:  # h + (x - h) is x up to one rounding
        assert float((st.h - st.x).abs().max()) <= 1e-12 * float(st.x.abs().max())
        assert float((st.g - st.v).abs().max()) <= 1e-12 * float(st.v.abs().max())


def test_motef_node_form_keeps_replicas_and_matches_batched():
    """§2.6(2): replicas of h_j and g_j stay bit-identical; node form equals the batched form."""
    prob, W, comp = LSQ(n=6), ring(6), make_compressor("topk:0.1")
    lr, gamma, lmbd, n = 0.05, 0.3, 0.9, 6
    ref, _ = _motef(prob, comp, 25, lr, gamma, lmbd)
    x0 = torch.zeros(n, prob.d, dtype=F64)
    x, v, m = x0.clone(), prob.grad(x0), prob.grad(x0)
    hs = [PublicCopy.zeros(x0[i]) for i in range(n)]
    gs = [PublicCopy.zeros(x0[i]) for i in range(n)]
    reps = {
        (i, j): (torch.zeros(prob.d, dtype=F64), torch.zeros(prob.d, dtype=F64))
        for i in range(n)
        for j in range(n)
        if i != j and W[i, j] > 0
    }
    for t in range(25):
        out = {}
        for i in range(n):
            motef_node_model_(x[i], v[i], hs[i], lr=lr, gamma=gamma)
            q = publish_(hs[i], x[i], comp, self_weight=W[i, i], round=2 * t, sender=i)
            motef_node_tracker_(v[i], m[i], gs[i], prob.grad(x)[i], gamma=gamma, lmbd=lmbd)
            r = publish_(gs[i], v[i], comp, self_weight=W[i, i], round=2 * t + 1, sender=i)
            out[i] = (q.payload, r.payload)
        for (i, j), (rh, rg) in reps.items():
            absorb_(hs[i], out[j][0], W[i, j], comp)
            absorb_(gs[i], out[j][1], W[i, j], comp)
            comp.decompress_add_(rh, out[j][0], 1.0)
            comp.decompress_add_(rg, out[j][1], 1.0)
            assert torch.equal(rh, hs[j].copy) and torch.equal(rg, gs[j].copy)
    assert float((x - ref.x).abs().max()) <= 1e-9 * float(ref.x.abs().max())


def test_motef_keeps_converging_where_compressed_dpsgd_stalls():
    """§2.6(4): heterogeneous least squares on a ring with top-10%."""
    prob, comp = LSQ(n=8, d=40, m=80, zeta=1.0), make_compressor("topk:0.1")
    st, hist = _motef(prob, comp, 300)
    dist = [float((s[0].x - prob.x_star).pow(2).sum(1).mean()) for s in hist[1:]]
    assert dist[299] < 1e-2 * dist[99] < 1e-2 * dist[0]
    W = as_torch_matrix(ring(prob.n), F64)  # D-PSGD on compressed models, no feedback
    x = torch.zeros(prob.n, prob.d, dtype=F64)
    for t in range(300):
        cx = comp.decompress(comp.compress(x, round=t))
        x = x - 0.05 * prob.grad(x) + 0.3 * (W @ cx - cx)
        if t == 99:
            mid = float((x - prob.x_star).pow(2).sum(1).mean())
    end = float((x - prob.x_star).pow(2).sum(1).mean())
    assert end > 0.5 * mid > 1e3 * dist[299]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("choco", "feedback='choco' is not valid; use none"),
        ("motef:0.1", "feedback='motef:0.1' is not valid"),
        ("choco:x", "parameters must be numbers"),
        ("choco:nan", "parameters must be finite"),
        ("choco:0", "consensus step GAMMA must be > 0"),
        ("econtrol:-0.1", "feedback strength ETA must be >= 0"),
    ],
)
def test_feedback_specs_are_parsed_once_and_errors_name_the_spec(spec, match):
    from gossip.algorithms.feedback import parse_feedback
    from gossip.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        parse_feedback(spec)
    fb = parse_feedback("choco-econtrol:0.2,0.05")
    assert (fb.name, fb.gamma, fb.eta) == ("choco-econtrol", 0.2, 0.05)
    assert parse_feedback(" motef:0.1,0.5 ").lmbd == 0.5
