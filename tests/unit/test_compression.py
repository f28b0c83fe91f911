"""Compressors: ALGORITHMS.md §0 invariants 1-4, exact round trips, wire sizes, seeds, parsing."""

import math

import msgpack
import pytest
import torch

from gossip.algorithms.compression import (
    Identity,
    RandK,
    StochasticQuantizer,
    TopK,
    index_dtype,
    make_compressor,
    pack_bits,
    randk_indices,
    stream_seed,
    topk_indices,
    unpack_bits,
)
from gossip.errors import AlgorithmError, ConfigError, WireError
from gossip.transport.wire import decode_payload, encode_payload, encoded_bytes

SPECS = [
    "none",
    "topk:0.01",
    "topk:5",
    "randk:0.01",
    "randk:5",
    "quant:2",
    "quant:4",
    "quant:8",
    "quant:4:7",
    "sign",
    "fp16",
    "bf16",
]
SIZES = [0, 1, 7, 1000, 1_000_003]
META = {"run": "t", "sender": 3, "round": 11}


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same inputs whatever runs before it."""
    torch.manual_seed(0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so -0.0 != 0.0 and NaN payloads compare exactly."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _wire(payload):
    frames = [bytes(f) for f in encode_payload(payload, META)]  # what a socket delivers
    meta, wp = decode_payload(frames)
    assert meta == META
    return wp


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(0)
    return {d: torch.randn(d, generator=g) for d in SIZES}


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_is_bit_exact_for_odd_sizes_and_through_the_wire(spec, vectors):
    c = make_compressor(spec)
    for d in SIZES:
        x = vectors[d]
        p = c.compress(x, seed=5, round=2, sender=3)
        dense = c.decompress(p)
        assert dense.shape == x.shape and dense.dtype == x.dtype
        # the receiver rebuilds the sender's C(x) bit for bit from the bytes alone
        received = c.decompress(_wire(p), d=d)
        assert torch.equal(_bits(dense), _bits(received))
        if d <= 1000:  # C(x) is a pure function of (x, seed, round, sender)
            again = c.decompress(c.compress(x, seed=5, round=2, sender=3))
            assert torch.equal(_bits(dense), _bits(again))
            out = torch.empty_like(x)
            assert torch.equal(_bits(c.decompress(p, out=out)), _bits(dense))
        assert c.wire_bytes(p) == len(msgpack.packb(p.header)) + sum(
            f.numel() * f.element_size() for f in p.frames
        )


@pytest.mark.parametrize("spec", SPECS)
def test_decompressed_values_have_the_codec_meaning(spec):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g)
    c = make_compressor(spec)
    q = c.decompress(c.compress(x))
    name = spec.split(":")[0]
    if name == "none":
        assert torch.equal(q, x)
    elif name in ("topk", "randk"):
        k = c.k_for(1000)
        kept = q != 0
        assert int(kept.sum()) == k and torch.equal(q[kept], x[kept])
        if name == "topk":
            assert x.abs()[kept].min() >= x.abs()[~kept].max()
    elif name == "quant":
        chunk = c.chunk
        for s in range(0, 1000, chunk):
            xs, qs = x[s : s + chunk], q[s : s + chunk]
            step = (xs.max() - xs.min()) / ((1 << c.bits) - 1)
            assert ((qs - xs).abs() <= step * 1.0001 + 1e-6).all()
    elif name == "sign":
        s = x.abs().sum() / 1000
        assert torch.equal(q, torch.where(x < 0, -s, s))
    else:
        assert torch.equal(q, x.to(torch.float16 if name == "fp16" else torch.bfloat16).float())


def test_top_k_contraction_bound_holds_for_every_vector():
    """§0.1: ||C(v) - v||^2 <= (1 - k/d) ||v||^2, deterministically."""
    d, k = 1000, 10
    c = TopK(k)
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    vs = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(50)]
    vs += [torch.ones(d, dtype=torch.float64), torch.rand(d, generator=g, dtype=torch.float64)]
    for v in vs:
        err = (c.decompress(c.compress(v)) - v).pow(2).sum() / v.pow(2).sum()
        worst = max(worst, float(err))
    assert worst <= 1 - k / d
    assert c.delta(d) == k / d


def test_rand_k_contraction_in_expectation():
    """§0.2: mean of ||C(v)-v||^2/||v||^2 over 10^4 draws within 2% of 1 - k/d."""
    d, k = 1000, 10
    v = torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = RandK(k)
    V = v.expand(10_000, d)
    q = c.decompress(c.compress(V, seed=7, round=0, sender=0))  # 10^4 senders, 10^4 draws
    ratio = float(((q - V).pow(2).sum(1) / v.pow(2).sum()).mean())
    assert abs(ratio - (1 - k / d)) <= 0.02 * (1 - k / d)
    assert c.delta(d) == k / d


def test_identity_and_full_top_k_are_exact():
    """§0.3: k = d gives C(v) == v bit for bit."""
    v = torch.randn(777, dtype=torch.float64)
    for c in (Identity(), make_compressor("topk:1.0"), TopK(777), RandK(777)):
        assert torch.equal(_bits(c.decompress(c.compress(v))), _bits(v))
        assert c.delta(777) == 1.0


def test_top_k_message_carries_exactly_k_values_and_k_indices():
    """§0.4: the frames are k values and k narrowest-int indices; the byte count is exact."""
    for d, idt in [(200, torch.uint8), (5000, torch.uint16), (70_000, torch.uint32)]:
        c = TopK(fraction=0.01)
        k = c.k_for(d)
        p = c.compress(torch.randn(d))
        values, indices = p.frames
        assert values.shape == (k,) and values.dtype == torch.float32
        assert indices.shape == (k,) and indices.dtype == idt
        head = len(msgpack.packb(p.header))
        assert c.wire_bytes(p) == head + k * 4 + k * indices.element_size()
        frames = encode_payload(p, META)
        assert encoded_bytes(frames) == len(frames[0]) + k * (4 + indices.element_size())


def test_index_dtype_is_the_narrowest_that_fits():
    assert index_dtype(1) == torch.uint8 and index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.uint16 and index_dtype(65_536) == torch.uint16
    assert index_dtype(65_537) == torch.uint32 and index_dtype(2**32) == torch.uint32
    assert index_dtype(2**32 + 1) == torch.int64
    p = TopK(3).compress(torch.randn(65_537))
    assert p.frames[1].dtype == torch.uint32 and int(p.frames[1].to(torch.int64).max()) < 65_537


def test_top_k_breaks_ties_by_lower_index_and_sorts_indices():
    x = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.5])
    assert topk_indices(x.unsqueeze(0), 3).tolist() == [[1, 2, 3]]
    assert topk_indices(x.unsqueeze(0), 4).tolist() == [[1, 2, 3, 4]]
    assert topk_indices(torch.ones(2, 6), 2).tolist() == [[0, 1], [0, 1]]
    assert topk_indices(torch.zeros(1, 5), 2).tolist() == [[0, 1]]
    with pytest.raises(ConfigError, match="NaN"):
        topk_indices(torch.tensor([[float("nan"), 1.0, 2.0]]), 1)


def test_top_k_matches_a_stable_sort_reference_with_many_ties():
    g = torch.Generator().manual_seed(5)
    X = torch.randint(-4, 5, (6, 300), generator=g).float()  # 9 values: ties everywhere
    X[0] = torch.randn(300, generator=g)  # and a row without ties
    for k in (1, 7, 64, 299):
        order = torch.sort(-X.abs(), dim=1, stable=True).indices  # lower index first on ties
        expected = order[:, :k].sort(dim=1).values
        assert torch.equal(topk_indices(X, k), expected), k


def test_rand_k_sender_and_receiver_agree_from_the_seed_alone():
    c = RandK(fraction=0.05)
    x = torch.randn(5000)
    p = c.compress(x, seed=42, round=9, sender=4)
    assert len(p.frames) == 1  # values only: the indices are regenerated
    assert p.header["seed"] == 42 and p.header["round"] == 9 and p.header["sender"] == 4
    receiver = make_compressor("randk:0.05")  # a fresh instance, as in another process
    assert torch.equal(receiver.decompress(_wire(p), d=5000), c.decompress(p))
    idx = randk_indices(5000, c.k_for(5000), stream_seed(42, 9, 4))
    assert torch.equal(c.decompress(p).nonzero().squeeze(1), idx)
    others = [randk_indices(5000, 250, stream_seed(42, r, s)) for r, s in [(9, 5), (10, 4)]]
    assert all(not torch.equal(o, idx) for o in others)
    assert idx.unique().numel() == 250 and bool((idx[1:] > idx[:-1]).all())


@pytest.mark.parametrize("spec", ["topk:0.1", "randk:0.1", "quant:4", "sign", "bf16", "none"])
def test_batched_rows_equal_single_node_messages(spec):
    c = make_compressor(spec)
    X = torch.randn(4, 333, dtype=torch.float64)
    p = c.compress(X, seed=1, round=3, sender=10)
    Q = c.decompress(p)
    rows = c.split(p)
    for i in range(4):
        single = c.compress(X[i], seed=1, round=3, sender=10 + i)
        assert torch.equal(c.decompress(single), Q[i])
        assert torch.equal(c.decompress(rows[i]), Q[i])
        assert c.wire_bytes(rows[i]) == c.wire_bytes(single)
    assert c.message_bytes(p) == sum(c.wire_bytes(r) for r in rows)


@pytest.mark.parametrize("spec", SPECS)
def test_decompress_add_is_the_merge_path(spec):
    c = make_compressor(spec)
    x = torch.randn(3, 1001)
    p = c.compress(x)
    base = torch.randn(3, 1001)
    exact = c.decompress_add_(base.clone(), p, 1.0)
    assert torch.equal(exact, base + c.decompress(p))  # weight 1: bit-identical
    scaled = c.decompress_add_(base.clone(), p, 0.3)
    assert torch.allclose(scaled, base + 0.3 * c.decompress(p), rtol=1e-6, atol=1e-6)
    with pytest.raises(AlgorithmError, match="payload is"):
        c.decompress_add_(torch.zeros(3, 1001, dtype=torch.float64), p, 1.0)


def test_quantizer_format_packing_and_unbiasedness():
    codes = torch.tensor([[1, 2, 3, 0, 2]], dtype=torch.uint8)
    packed = pack_bits(codes, 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 2]]  # little-endian within a byte
    assert torch.equal(unpack_bits(packed, 2, 5), codes)
    c4 = torch.randint(0, 16, (2, 11), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(c4, 4), 4, 11), c4)
    q = StochasticQuantizer(4, chunk=64)
    x = torch.randn(256, dtype=torch.float64)
    p = q.compress(x)
    codes, scale, zero = p.frames
    assert codes.shape == (128,) and scale.shape == (4,) and zero.shape == (4,)
    assert scale.dtype == zero.dtype == torch.float32
    manual = (unpack_bits(codes.unsqueeze(0), 4, 256)[0].float().view(4, 64) * scale[:, None]).add(
        zero[:, None]
    )
    assert torch.equal(q.decompress(p), manual.view(-1).double())
    mean = q.decompress(q.compress(x.expand(2000, 256))).mean(0)  # 2000 senders
    assert float((mean - x).abs().max()) < 0.08 * float(scale.max())  # unbiased rounding
    assert float((q.decompress(q.compress(x, round=1)) - q.decompress(p)).abs().max()) > 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_whole_chunks_decode_like_the_general_path(bits):
    """d a multiple of the chunk (float32) takes a shorter decode path; same values."""
    q = StochasticQuantizer(bits, chunk=64)
    x = torch.randn(2, 512)
    p = q.compress(x, seed=2)
    codes, scale, zero = p.frames
    vals = unpack_bits(codes, bits, 512).float().view(2, 8, 64) * scale[..., None]
    expected = (vals + zero[..., None]).view(2, 512)
    assert torch.equal(q.decompress(p), expected)
    assert torch.equal(q.decompress(p).double(), q.decompress(q.compress(x.double(), seed=2)))


def test_delta_values_are_documented_bounds():
    assert make_compressor("sign").delta(100) == pytest.approx(0.01)
    assert make_compressor("quant:8").delta(10_000) == pytest.approx(1 - 254 / (2 * 255**2))
    assert make_compressor("quant:2").delta(10_000) == 0.0
    assert make_compressor("quant:2:16").delta(10_000) == pytest.approx(1 - 14 / 18)
    assert make_compressor("fp16").delta(10) == 1 - 2.0**-22
    x = torch.randn(4096, dtype=torch.float64)
    for spec in ("quant:8", "quant:4", "quant:2:16", "sign", "bf16", "fp16"):
        c = make_compressor(spec)
        err = float((c.decompress(c.compress(x)) - x).pow(2).sum() / x.pow(2).sum())
        assert err <= 1 - c.delta(4096) + 1e-12, spec


def test_make_compressor_parses_every_form_and_names_bad_specs():
    assert isinstance(make_compressor("none"), Identity)
    assert make_compressor("topk:0.01").fraction == 0.01 and make_compressor("topk:100").k == 100
    assert make_compressor("randk:1e-2").fraction == 0.01
    assert make_compressor("quant:4").bits == 4 and make_compressor("quant:8:128").chunk == 128
    for spec in SPECS:
        assert make_compressor(make_compressor(spec).spec()).spec() == make_compressor(spec).spec()
    for bad, why in [
        ("topk", "malformed"),
        ("topk:0", "k must be"),
        ("topk:1.5", "fraction must be"),
        ("quant:3", "bits must be 2, 4 or 8"),
        ("quant:4:0", "chunk"),
        ("zstd", "unknown"),
        ("sign:2", "unknown"),
    ]:
        with pytest.raises(ConfigError, match=rf"spec '{bad}'.*{why}.*valid forms: none"):
            make_compressor(bad)


def test_check_rejects_inconsistent_payloads_before_allocating():
    c = TopK(4)
    p = c.compress(torch.randn(100))
    with pytest.raises(WireError, match="expected d=50") as e:
        c.decompress(p, d=50)
    assert e.value.reason == "size_mismatch"
    bad_idx = p._replace(frames=(p.frames[0], torch.tensor([1, 2, 99, 200], dtype=torch.uint8)))
    with pytest.raises(WireError, match="strictly increasing and < 100") as e:
        c.decompress(bad_idx)
    assert e.value.reason == "bad_payload"
    dup = p._replace(frames=(p.frames[0], torch.tensor([1, 2, 2, 3], dtype=torch.uint8)))
    with pytest.raises(WireError, match="strictly increasing"):
        c.decompress(dup)
    with pytest.raises(WireError, match="dtype torch.int32, expected torch.uint8") as e:
        c.decompress(p._replace(frames=(p.frames[0], p.frames[1].to(torch.int32))))
    assert e.value.reason == "bad_dtype"
    with pytest.raises(WireError, match=r"shape \(3,\), expected \(4,\)") as e:
        c.decompress(p._replace(frames=(p.frames[0][:3], p.frames[1])))
    assert e.value.reason == "size_mismatch"
    with pytest.raises(WireError, match="codec 'topk' is not 'sign'") as e:
        make_compressor("sign").decompress(p)
    assert e.value.reason == "bad_header"
    huge_k = p._replace(header={**p.header, "k": 10**9})
    with pytest.raises(WireError, match="k=1000000000 must be in"):
        c.decompress(huge_k)
    with pytest.raises(WireError, match="dtype 'int8' not allowed"):
        c.decompress(p._replace(header={**p.header, "dtype": "int8"}))


def test_float64_and_low_precision_inputs_keep_their_dtype():
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(300).to(dtype)
        for spec in ("topk:0.1", "randk:0.1", "quant:8", "sign", "none"):
            c = make_compressor(spec)
            q = c.decompress(_wire(c.compress(x)), d=300)
            assert q.dtype == dtype
            assert math.isfinite(float(q.double().abs().sum()))
    with pytest.raises(ConfigError, match="float16/bfloat16/float32/float64"):
        TopK(1).compress(torch.arange(5))


@pytest.mark.parametrize("spec", ["topk:0.01:bf16:packed", "topk:0.01:packed", "topk:3:bf16"])
@pytest.mark.parametrize("d", [0, 1, 2, 7, 100, 4810, 1_000_003])
def test_topk_options_round_trip_the_rounded_values_bit_for_bit(spec, d):
    c = make_compressor(spec)
    assert c.spec() == spec
    x = torch.randn(d)
    p = c.compress(x, sender=2)
    y = c.decompress(_wire(p), d=d)
    k = c.k_for(d)
    idx = topk_indices(x.unsqueeze(0), k)[0]
    vals = x[idx].to(torch.bfloat16).float() if "bf16" in spec else x[idx]
    assert torch.equal(_bits(y), _bits(torch.zeros(d).index_put_((idx,), vals)))
    out = torch.ones(d)
    c.decompress_add_(out, p, 0.5)
    assert torch.allclose(out, 1 + 0.5 * y)
    # the contraction bound holds for the rounded values too
    if d:
        assert (y - x).square().sum() <= (1 - c.delta(d)) * x.square().sum() + 1e-6


def test_packed_indices_cost_about_two_plus_log2_d_over_k_bits_and_rows_batch():
    from gossip.algorithms.compression.sparse import elias_fano_bytes

    assert elias_fano_bytes(4810, 48) == 52  # 48 x 6 low bits + a bitmap of 48 + 76 bits
    assert elias_fano_bytes(1, 1) == 1 and elias_fano_bytes(0, 0) == 0
    c = make_compressor("topk:0.01:bf16:packed")
    X = torch.randn(6, 4810)
    P = c.compress(X, sender=0)
    assert torch.equal(c.decompress(P), torch.stack([c.decompress(q) for q in c.split(P)]))
    plain = make_compressor("topk:0.01")
    one = c.compress(X[0])
    assert c.wire_bytes(one) < 0.65 * plain.wire_bytes(plain.compress(X[0]))


def test_malformed_packed_indices_are_rejected_with_a_reason():
    c = make_compressor("topk:4:packed")
    p = c.compress(torch.randn(100))
    vals, packed = p.frames
    for bad, reason in [
        (torch.zeros_like(packed), "bad_payload"),  # no index at all
        (torch.full_like(packed, 255), "bad_payload"),  # too many
        (packed[:-1], "size_mismatch"),
    ]:
        with pytest.raises(WireError) as e:
            c.decompress(type(p)(p.header, (vals, bad)), d=100)
        assert e.value.reason == reason
    other = make_compressor("topk:4")
    with pytest.raises(WireError, match="do not match this compressor") as e:
        other.decompress(p, d=100)
    assert e.value.reason == "bad_header"
    with pytest.raises(ConfigError, match="topk options"):
        make_compressor("topk:4:fp8")
    with pytest.raises(ConfigError, match="randk takes no options"):
        make_compressor("randk:4:bf16")
