"""Native merge kernels against the pure-torch reference, op checks, and backend selection.

The native library is built (or loaded from the cache) once per session by the ``gossip_ops``
fixture; where it cannot be built, the tests that need it skip with the reason native_status()
gives, and the backend-selection tests still run.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from gossip import ops
from gossip.cli import main as cli_main
from gossip.errors import AlgorithmError, ConfigError, NativeUnavailableError
from gossip.layout import ParamLayout
from gossip.ops import dispatch, feedback, merge, native, payload

SIZES = [0, 1, 7, 1023, (1 << 20) + 3]
SMALL_SIZES = [0, 1, 7, 1023, 100_003]  # past the parallel grain (32768), cheaper to check
HALF_EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
]


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("GOSSIP_MERGE_BACKEND", raising=False)


@pytest.fixture(scope="module")
def gossip_ops():
    try:
        native.load_native()
    except NativeUnavailableError:
        pytest.skip(f"native merge kernels unavailable: {native.native_status(load=False).reason}")
    return torch.ops.gossip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(n, dtype, g, scale=1.0):
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


def assert_close_to(got, oracle, magnitude, dtype):
    """|got - oracle| <= tol * magnitude, where tol is fp32 (fp64) accumulation plus one final
    rounding to a half type; ``oracle`` and ``magnitude`` are float64."""
    err = (got.double() - oracle).abs()
    if dtype == torch.float64:
        tol = 1e-13 * magnitude
    else:
        tol = 1e-6 * magnitude + HALF_EPS.get(dtype, 0.0) * oracle.abs()
        if dtype in HALF_EPS:  # subnormals round to a fixed absolute step
            tol = tol + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    assert bool((err <= tol + 1e-30).all()), f"max error {float((err - tol).max())} over bound"


def assert_stats_close(mean, var, rmean, rvar):
    """Means within 1e-12 of the spread (a mean near 0 has no relative precision), variances
    within 1e-9 relative, against the reference's two-pass float64 statistics."""
    assert mean.shape == rmean.shape and var.shape == rvar.shape
    assert bool(((mean - rmean).abs() <= 1e-12 * (rmean.abs() + rvar.sqrt())).all())
    assert bool(((var - rvar).abs() <= 1e-9 * rvar).all())


# ---------------------------------------------------------------- weighted sum


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("self_weight", [None, 0.3])
def test_weighted_sum_fp32_matches_reference(gossip_ops, n, self_weight):
    g = _gen(n)
    xs = [_rand(n, torch.float32, g) for _ in range(9)]
    w = torch.rand(9, generator=g).tolist()
    out = _rand(n, torch.float32, g)
    mag = abs(self_weight or 0.0) * out.double().abs()
    for k in range(1, 10):
        mag = mag + w[k - 1] * xs[k - 1].double().abs()
        if n > 10_000 and k not in (1, 4, 8, 9):
            continue
        got, want = out.clone(), out.clone()
        gossip_ops.weighted_sum_(got, xs[:k], w[:k], self_weight)
        merge.weighted_sum_(want, xs[:k], w[:k], self_weight)
        assert_close_to(got, want.double(), mag, torch.float32)


@pytest.mark.parametrize("out_dtype,in_dtype", PAIRS)
@pytest.mark.parametrize("n", [7, 1023, 65_537])
def test_weighted_sum_dtypes_accumulate_in_fp32(gossip_ops, out_dtype, in_dtype, n):
    g = _gen(1)
    for k in (1, 3, 8, 11):
        xs = [_rand(n, in_dtype, g) for _ in range(k)]
        w = (torch.rand(k, generator=g) - 0.3).tolist()
        out = _rand(n, out_dtype, g)
        got = out.clone()
        gossip_ops.weighted_sum_(got, xs, w, 0.5)
        oracle = 0.5 * out.double() + sum(wk * x.double() for wk, x in zip(w, xs, strict=True))
        mag = 0.5 * out.double().abs() + sum(
            abs(wk) * x.double().abs() for wk, x in zip(w, xs, strict=True)
        )
        assert_close_to(got, oracle, mag, out_dtype)


@pytest.mark.parametrize("out_dtype,in_dtype", PAIRS)
def test_weighted_sum_copy_and_scale_are_exact(gossip_ops, out_dtype, in_dtype):
    x = _rand(1023, in_dtype, _gen(2))
    out = torch.full((1023,), 7.0, dtype=out_dtype)
    gossip_ops.weighted_sum_(out, [x], [1.0], None)
    assert torch.equal(out, x.to(out_dtype))
    gossip_ops.weighted_sum_(out, [], [], 2.0)
    assert torch.equal(out, 2 * x.to(out_dtype))
    gossip_ops.weighted_sum_(out, [], [], None)
    assert torch.equal(out, torch.zeros_like(out))


def test_weighted_sum_dispatch_handles_batches_and_falls_back(gossip_ops):
    g = _gen(3)
    out = _rand((3, 1001), torch.float32, g)
    xs = [_rand((3, 1001), torch.float32, g) for _ in range(3)]
    want = merge.weighted_sum_(out.clone(), xs, [0.2, 0.3, 0.1], 0.4)
    got = ops.weighted_sum_(out.clone(), xs, [0.2, 0.3, 0.1], 0.4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    strided = [x.t().contiguous().t() for x in xs]  # non-contiguous: the reference runs
    got2 = ops.weighted_sum_(out.clone(), strided, [0.2, 0.3, 0.1], 0.4)
    torch.testing.assert_close(got2, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(AlgorithmError, match=r"inputs\[1\] has shape \(5,\), expected \(4,\)"):
        ops.weighted_sum_(torch.zeros(4), [torch.ones(4), torch.ones(5)], [1.0, 1.0])


# ---------------------------------------------------------------- payloads


@pytest.mark.parametrize("index_dtype", payload.INDEX_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 255, 1023, (1 << 20) + 3])
def test_sparse_accumulate_is_exact(gossip_ops, index_dtype, n):
    g = _gen(n)
    limit = {torch.uint8: 256, torch.int16: 32768, torch.uint16: 65536}.get(index_dtype, n)
    k = min(n, limit, 70_000)
    idx = torch.randperm(min(n, limit), generator=g)[:k]
    idx = torch.cat([idx, idx[: k // 3]])  # duplicates add up, in payload order
    for out_dtype, val_dtype in [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float32, torch.bfloat16),
    ]:
        vals = _rand(idx.numel(), val_dtype, g)
        out = _rand(n, out_dtype, g)
        got, want = out.clone(), out.clone()
        gossip_ops.sparse_accumulate_(got, idx.to(index_dtype), vals, -0.7)
        payload.sparse_accumulate_(want, idx.to(index_dtype), vals, -0.7)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_accumulate_half_buffers(gossip_ops, dtype):
    g = _gen(4)
    idx = torch.randperm(5000, generator=g)[:700]
    vals, out = _rand(700, dtype, g), _rand(5000, dtype, g)
    got = out.clone()
    gossip_ops.sparse_accumulate_(got, idx, vals, 0.25)
    oracle = out.double().index_add(0, idx, vals.double() * 0.25)
    assert_close_to(got, oracle, out.double().abs() + oracle.abs(), dtype)


def test_sparse_accumulate_rejects_bad_indices_before_writing(gossip_ops):
    out = torch.zeros(10)
    for backend in ("native", "reference"):
        for bad in (10, -1):
            idx = torch.tensor([3, bad, 4])
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("GOSSIP_MERGE_BACKEND", backend)
                with pytest.raises(AlgorithmError, match=rf"indices\[1\] = {bad} is out of range"):
                    ops.sparse_accumulate_(out, idx, torch.ones(3))
            assert torch.equal(out, torch.zeros(10))
    with pytest.raises(AlgorithmError, match="one value per index"):
        ops.sparse_accumulate_(out, torch.tensor([1, 2]), torch.ones(3))
    with pytest.raises(AlgorithmError, match="indices has dtype torch.float32"):
        ops.sparse_accumulate_(out, torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("bits", payload.QUANT_BITS)
@pytest.mark.parametrize("n", SMALL_SIZES)
def test_dequantize_accumulate_matches_reference(gossip_ops, bits, n):
    g = _gen(bits * 7 + n)
    x = _rand(n, torch.float32, g)
    for chunk in (1, 3, 64, n + 5):
        codes, scale, zero = payload.quantize_minmax(x, bits, chunk)
        out = _rand(n, torch.float32, g)
        got, want = out.clone(), out.clone()
        gossip_ops.dequantize_accumulate_(got, codes, scale, zero, bits, chunk, 0.3)
        payload.dequantize_accumulate_(want, codes, scale, zero, bits, chunk, 0.3)
        vals = payload.dequantize(codes, scale, zero, bits, chunk, n).double()
        assert_close_to(got, want.double(), out.double().abs() + 0.3 * vals.abs(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dequantize_accumulate_other_buffers(gossip_ops, dtype):
    g = _gen(5)
    codes, scale, zero = payload.quantize_minmax(_rand(3001, torch.float32, g), 4, 100)
    out = _rand(3001, dtype, g)
    got = out.clone()
    gossip_ops.dequantize_accumulate_(got, codes, scale, zero, 4, 100, -1.5)
    vals = payload.dequantize(codes, scale, zero, 4, 100, 3001).double()
    oracle = out.double() - 1.5 * vals
    assert_close_to(got, oracle, out.double().abs() + 1.5 * vals.abs(), dtype)


def test_dequantize_accumulate_rows(gossip_ops):
    g = _gen(11)
    x = _rand((3, 1001), torch.float32, g)
    codes, scale, zero = payload.quantize_minmax(x, 2, 64)
    assert codes.shape == (3, 251) and scale.shape == (3, 16)
    out = _rand((3, 1001), torch.float32, g)
    got, want = out.clone(), out.clone()
    gossip_ops.dequantize_accumulate_(got, codes, scale, zero, 2, 64, 0.5)
    payload.dequantize_accumulate_(want, codes, scale, zero, 2, 64, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(AlgorithmError, match="codes has 3 rows"):
        ops.dequantize_accumulate_(torch.zeros(2, 1001), codes, scale, zero, 2, 64)


def test_payloads_of_the_compressors_decode_identically(gossip_ops):
    compression = pytest.importorskip("gossip.algorithms.compression")
    g = _gen(12)
    x = _rand((3, 5000), torch.float32, g)
    out = _rand((3, 5000), torch.float32, g)
    quant = compression.make_compressor("quant:4:128")
    p = quant.compress(x, seed=1, round=2, sender=0)
    packed, scale, zero = p.frames
    want = quant.decompress_add_(out.clone(), p)  # weight 1: bit-identical by its contract
    assert torch.equal(ops.dequantize_accumulate_(out.clone(), packed, scale, zero, 4, 128), want)
    topk = compression.make_compressor("topk:0.01")
    p = topk.compress(x[0])
    vals, idx = p.frames
    assert idx.dtype == torch.uint16
    want = topk.decompress_add_(out[0].clone(), p, weight=0.5)
    assert torch.equal(ops.sparse_accumulate_(out[0].clone(), idx, vals, 0.5), want)


def test_pack_codes_layout_is_little_endian_within_a_byte():
    packed = payload.pack_codes(torch.tensor([1, 2, 3, 0, 3]), bits=2)
    assert packed.tolist() == [0b00111001, 0b00000011]
    assert payload.unpack_codes(packed, 2, 5).tolist() == [1, 2, 3, 0, 3]
    assert payload.pack_codes(torch.tensor([0xA, 0x5, 0xF]), bits=4).tolist() == [0x5A, 0x0F]
    with pytest.raises(AlgorithmError, match="codes must be uint8 with ceil"):
        ops.dequantize_accumulate_(torch.zeros(9), packed, torch.ones(1), torch.ones(1), 2, 9)


# ---------------------------------------------------------------- variance correction


def _layout() -> ParamLayout:
    shapes = {"w0": (300, 70), "b0": (70,), "s": (1,), "empty": (0,), "w1": (4000, 9)}
    shapes.update({"w2": (17, 3), "b2": (3,)})
    return ParamLayout.from_shapes(shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_segment_stats_match_two_pass_fp64(gossip_ops, dtype, lead):
    layout = _layout()
    g = _gen(6)
    x = (_rand((*lead, layout.numel), torch.float64, g, 0.02) + 3.0).to(dtype)  # offset mean
    offsets = dispatch._offsets(layout)
    mean, var = gossip_ops.segment_stats(x, offsets)
    rmean, rvar = merge.segment_stats(x, layout)
    assert mean.shape == rmean.shape == (*lead, len(layout)) and mean.dtype == torch.float64
    assert_stats_close(mean, var, rmean, rvar)
    m2, v2 = ops.segment_stats(x, layout)
    assert torch.equal(m2, mean) and torch.equal(v2, var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_segment_rescale_matches_reference(gossip_ops, dtype):
    layout = _layout()
    g = _gen(7)
    x = _rand((2, layout.numel), dtype, g)
    mean, _ = merge.segment_stats(x, layout)
    scale = torch.rand(2, len(layout), generator=g, dtype=torch.float64) + 0.5
    scale[:, 1] = 1.0
    got, want = x.clone(), x.clone()
    ops.segment_rescale_(got, layout, mean, scale)
    merge.segment_rescale_(want, layout, mean, scale)
    b0 = layout.slots[1]
    assert torch.equal(got[:, b0.offset : b0.offset + b0.numel], x[:, b0.offset : b0.offset + 70])
    m = mean.index_select(-1, layout.segment_ids)
    s = scale.index_select(-1, layout.segment_ids)
    oracle = m + s * (x.double() - m)
    assert_close_to(got, oracle, m.abs() + (s * (x.double() - m)).abs(), dtype)
    if dtype != torch.bfloat16:  # the reference rounds mean and scale to bf16 first
        assert_close_to(want, oracle, m.abs() + (s * (x.double() - m)).abs(), dtype)
    one = ops.segment_rescale_(x[0].clone(), layout, mean[0], scale[0])  # [S] on one row
    assert torch.equal(one, got[0])


@pytest.mark.parametrize("out_dtype,in_dtype", PAIRS)
def test_weighted_sum_stats_is_the_merge_plus_its_statistics(gossip_ops, out_dtype, in_dtype):
    layout = _layout()
    g = _gen(13)
    off = dispatch._offsets(layout)
    for k, sw in ((0, 0.5), (1, None), (3, 0.25), (9, 0.1)):
        xs = [
            (_rand((2, layout.numel), torch.float64, g, 0.05) + 1.0).to(in_dtype) for _ in range(k)
        ]
        w = torch.rand(k, generator=g).tolist()
        out = _rand((2, layout.numel), out_dtype, g)
        got, want = out.clone(), out.clone()
        mean, var, in_mean, in_var = gossip_ops.weighted_sum_stats_(got, xs, w, sw, off)
        gossip_ops.weighted_sum_(want, xs, w, sw)
        assert torch.equal(got, want)  # the same merge, bit for bit
        rmean, rvar = merge.segment_stats(got, layout)
        assert_stats_close(mean, var, rmean, rvar)
        assert in_mean.shape == in_var.shape == (k, 2, len(layout))
        for q in {0, k - 1} if k else ():
            xm, xv = merge.segment_stats(xs[q], layout)
            assert_stats_close(in_mean[q], in_var[q], xm, xv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k,sw", [(1, None), (2, 0.5), (4, 0.2), (5, None), (6, 0.3)])
def test_weighted_sum_stats_big_mean_small_variance(gossip_ops, dtype, k, sw):
    """Segments whose mean is 1e6 times their spread, over several pieces with odd tails, next
    to empty and tiny ones: the shifted fp64 sums must keep mean and variance at the two-pass
    fp64 accuracy (plain sums of squares, or fp32 ones, lose every digit of the variance)."""
    shapes = {"big": (100_003,), "empty": (0,), "one": (1,), "odd": (17,), "mid": (16_411,)}
    layout = ParamLayout.from_shapes(shapes)
    off = dispatch._offsets(layout)
    g = _gen(21)
    spread = 1e-3 if dtype != torch.bfloat16 else 4.0  # bf16 cannot resolve 1e-3 at 1000

    def model():
        return (1000.0 + _rand(layout.numel, torch.float64, g, spread)).to(dtype)

    xs = [model() for _ in range(k)]
    w = [(1.0 - (sw or 0.0)) / k] * k
    out = model()
    got, want = out.clone(), out.clone()
    mean, var, in_mean, in_var = gossip_ops.weighted_sum_stats_(got, xs, w, sw, off)
    gossip_ops.weighted_sum_(want, xs, w, sw)
    assert torch.equal(got, want)
    rmean, rvar = merge.segment_stats(got, layout)
    assert_stats_close(mean, var, rmean, rvar)
    assert float(var[0]) > 0 and float(mean[1]) == float(var[1]) == 0.0  # empty: zeros
    assert float(var[2]) == 0.0 and float(mean[2]) == float(got[100_003])  # one element
    for q in range(k):
        xm, xv = merge.segment_stats(xs[q], layout)
        assert_stats_close(in_mean[q], in_var[q], xm, xv)
        m1, v1 = gossip_ops.segment_stats(xs[q], off)
        assert_stats_close(in_mean[q], in_var[q], m1, v1)


def test_weighted_sum_stats_dispatch_and_reference_agree(gossip_ops):
    layout = _layout()
    g = _gen(14)
    xs = [_rand(layout.numel, torch.float64, g) for _ in range(2)]
    out = _rand(layout.numel, torch.float64, g)
    st = ops.weighted_sum_stats_(out.clone(), xs, [0.25, 0.25], layout, self_weight=0.5)
    rs = merge.weighted_sum_stats_(out.clone(), xs, [0.25, 0.25], layout, self_weight=0.5)
    for a, b in zip(st, rs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-300)
    with pytest.raises(AlgorithmError, match="needs inputs or a self_weight"):
        merge.weighted_sum_stats_(out, [], [], layout)


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", SMALL_SIZES)
def test_feedback_updates_match_reference(gossip_ops, dtype, n):
    g = _gen(8 + n)
    e, p, q, x, h = (_rand(n, dtype, g) for _ in range(5))
    got = e.clone()
    gossip_ops.ef14_residual_(got, p, q)
    assert_close_to(got, p.double() - q.double(), p.double().abs() + q.double().abs(), dtype)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(got, feedback.ef14_residual_(e.clone(), p, q))
    u = torch.empty_like(e)
    gossip_ops.feedback_input_(u, e, x, h, 0.1)
    oracle = 0.1 * e.double() + (x.double() - h.double())
    mag = 0.1 * e.double().abs() + x.double().abs() + h.double().abs()
    assert_close_to(u, oracle, mag, dtype)
    e1, h1 = e.clone(), h.clone()
    gossip_ops.feedback_update_(e1, h1, x, q)
    e_or = e.double() + (x.double() - h.double()) - q.double()
    mag = e.double().abs() + x.double().abs() + h.double().abs() + q.double().abs()
    assert_close_to(e1, e_or, mag, dtype)
    assert_close_to(h1, h.double() + q.double(), h.double().abs() + q.double().abs(), dtype)
    if dtype == torch.float32:
        e2, h2 = feedback.feedback_update_(e.clone(), h.clone(), x, q)
        torch.testing.assert_close(e1, e2, rtol=1e-6, atol=1e-6)
        assert torch.equal(h1, h2)


def test_feedback_dispatch_and_aliasing(gossip_ops):
    g = _gen(9)
    p, q = _rand(999, torch.float32, g), _rand(999, torch.float32, g)
    want = p - q
    assert torch.equal(ops.ef14_residual_(p, p, q), want)  # e may be p itself
    h = torch.zeros(999)
    assert torch.equal(ops.public_copy_update_(h, q), q)
    with pytest.raises(AlgorithmError, match="e and h must be different buffers"):
        ops.feedback_update_(h, h, p, q)
    with pytest.raises(AlgorithmError, match=r"q has shape \(3,\)"):
        ops.ef14_residual_(p, p, torch.ones(3))


# ---------------------------------------------------------------- torch.library.opcheck


def _opcheck_cases():
    g = _gen(10)
    f = lambda n: _rand(n, torch.float32, g)  # noqa: E731
    layout = _layout()
    x = _rand((2, layout.numel), torch.float32, g)
    off = dispatch._offsets(layout)
    codes, scale, zero = payload.quantize_minmax(f(100), 4, 32)
    return {
        "weighted_sum_": (f(100), [f(100), f(100)], [0.5, 0.25], 0.25),
        "sparse_accumulate_": (f(100), torch.tensor([3, 7, 3]), f(3), 0.5),
        "dequantize_accumulate_": (f(100), codes, scale, zero, 4, 32, 0.5),
        "segment_stats": (x, off),
        "weighted_sum_stats_": (x.clone(), [x.clone(), x.clone() * 2], [0.25, 0.5], 0.25, off),
        "segment_rescale_": (
            x,
            off,
            torch.zeros(2, len(layout), dtype=torch.float64),
            torch.full((2, len(layout)), 1.5, dtype=torch.float64),
        ),
        "ef14_residual_": (f(100), f(100), f(100)),
        "feedback_input_": (f(100), f(100), f(100), f(100), 0.1),
        "feedback_update_": (f(100), f(100), f(100), f(100)),
    }


@pytest.mark.parametrize("op", sorted(_opcheck_cases()))
def test_opcheck(gossip_ops, op):
    torch.library.opcheck(getattr(gossip_ops, op).default, _opcheck_cases()[op])


# ---------------------------------------------------------------- backend selection


@pytest.fixture
def failing_loader(monkeypatch):
    """A fresh loader whose build fails the way a broken toolchain does."""
    loader = native._Loader()
    monkeypatch.setattr(native, "_LOADER", loader)
    monkeypatch.setattr(dispatch, "_LOADER", loader)
    monkeypatch.setattr(native, "_import_installed", lambda: None)

    def boom():
        raise RuntimeError(
            "Error building extension 'gossip_C': [1/4] c++ -c merge.cpp\n"
            "merge.cpp:1:2: error: boom\nninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(native, "_jit_build", boom)
    return loader


def _count_reference_calls(monkeypatch):
    calls = []
    real = merge.weighted_sum_
    monkeypatch.setattr(merge, "weighted_sum_", lambda *a: calls.append(1) or real(*a))
    return calls


def test_reference_forced_never_builds(monkeypatch, failing_loader):
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")
    calls = _count_reference_calls(monkeypatch)
    out = ops.weighted_sum_(torch.ones(5), [torch.ones(5)], [2.0], 1.0)
    assert calls == [1] and torch.equal(out, torch.full((5,), 3.0))
    assert not failing_loader.tried
    st = ops.native_status()
    assert (st.backend, st.requested) == ("reference", "reference")
    assert st.reason == "disabled by GOSSIP_MERGE_BACKEND=reference"


def test_native_forced_uses_native(monkeypatch, gossip_ops):
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "native")
    calls = _count_reference_calls(monkeypatch)
    out = ops.weighted_sum_(torch.ones(5), [torch.ones(5)], [2.0], 1.0)
    assert calls == [] and torch.equal(out, torch.full((5,), 3.0))


def test_native_forced_but_missing_raises_chained(monkeypatch, failing_loader):
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "native")
    with pytest.raises(
        NativeUnavailableError, match="build failed: merge.cpp:1:2: error: boom"
    ) as e:
        ops.weighted_sum_(torch.ones(5), [torch.ones(5)], [1.0])
    assert isinstance(e.value.__cause__, RuntimeError)
    with pytest.raises(NativeUnavailableError, match="unavailable: build failed") as e:
        ops.load_native()
    assert "boom" in str(e.value.__cause__)


def test_auto_falls_back_with_one_logged_reason(monkeypatch, failing_loader, caplog):
    calls = _count_reference_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="gossip.ops"):
        for _ in range(3):
            ops.weighted_sum_(torch.ones(5), [torch.ones(5)], [1.0])
    assert len(calls) == 3
    assert [r.message for r in caplog.records if "unavailable" in r.message] == [
        "native merge kernels unavailable (build failed: merge.cpp:1:2: error: boom); "
        "using the reference"
    ]
    st = ops.native_status()
    assert (st.backend, st.requested, st.reason) == (
        "reference",
        "auto",
        "build failed: merge.cpp:1:2: error: boom",
    )


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    loader = native._Loader()
    monkeypatch.setattr(native, "_LOADER", loader)
    monkeypatch.setattr(native, "_import_installed", lambda: None)
    monkeypatch.setenv("GOSSIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert native.native_status(load=False).backend == "pending"
    st = native.native_status()
    assert st.backend == "reference"
    assert st.reason.startswith("compiler missing: ") and "no-such-compiler" in st.reason


def test_version_mismatch_and_bad_env_are_reported(monkeypatch):
    with pytest.raises(NativeUnavailableError, match=r"built for torch 1\.0\.0, running 2\."):
        native._check_build_info("torch=1.0.0;cuda=0;openmp=0")
    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "fast")
    with pytest.raises(ConfigError, match="GOSSIP_MERGE_BACKEND='fast' .* valid: auto, native"):
        ops.weighted_sum_(torch.ones(2), [], [])


def test_native_status_when_loaded(gossip_ops):
    st = ops.native_status()
    assert (st.backend, st.requested, st.reason) == ("native", "auto", "ok")
    major_minor = ".".join(torch.__version__.split(".")[:2])
    assert f"torch={major_minor}." in st.build_info and "openmp=" in st.build_info
    assert st.cuda == ("cuda=1" in st.build_info)
    assert str(st).startswith("native (ok)")


def test_import_never_builds():
    code = (
        "import sys, gossip.ops as o; from gossip.ops import native as n; "
        "assert not n._LOADER.tried; assert 'torch.utils.cpp_extension' not in sys.modules; "
        "assert n.native_status(load=False).backend == 'pending'; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_bench_merge_verb_prints_ratios(capsys):
    rc = cli_main(["bench", "merge", "--sizes", "64K", "--k", "1,2", "--repeats", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "nat/add_" in text and "passes over memory" in text
    assert len([ln for ln in text.splitlines() if ln.strip().startswith("65536")]) == 3
