"""The wire format: zero-copy round trips, exact sizes, and every rejection reason."""

import pickle
import re
from pathlib import Path

import msgpack
import pytest
import torch

import gossip
from gossip.algorithms.compression import make_compressor
from gossip.errors import WireError
from gossip.transport.api import REJECT_REASONS
from gossip.transport.wire import (
    REASONS,
    VERSION,
    WireLimits,
    decode,
    decode_payload,
    encode,
    encode_payload,
    encoded_bytes,
    frame_checksum,
)

META = {"run": "run-1", "sender": 2, "round": 5}


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same inputs whatever runs before it."""
    torch.manual_seed(0)


def _frames(*tensors, **meta):
    return [bytes(f) for f in encode({**META, **meta}, list(tensors))]


def _header(frames):
    return msgpack.unpackb(frames[0])


def _with_header(msg, **changes):
    h = _header(msg)
    h.update(changes)
    return [msgpack.packb(h), *msg[1:]]


def _reject(frames, reason, match, **kw):
    with pytest.raises(WireError, match=match) as e:
        decode(frames, **kw)
    assert e.value.reason == reason and reason in REASONS
    assert f"[{reason}]" in str(e.value)


def test_round_trip_every_dtype_and_shape():
    tensors = [
        torch.randn(3, 4),
        torch.randn(5, dtype=torch.float64),
        torch.randn(7).half(),
        torch.randn(7).bfloat16(),
        torch.arange(10, dtype=torch.uint8),
        torch.arange(-3, 3, dtype=torch.int8),
        torch.arange(9, dtype=torch.int16),
        torch.arange(9).to(torch.uint16),
        torch.arange(9).to(torch.uint32),
        torch.arange(9, dtype=torch.int32),
        torch.arange(9, dtype=torch.int64).view(3, 3),
        torch.empty(0),
        torch.empty(2, 0, dtype=torch.int64),
        torch.tensor(3.5),
    ]
    header, out = decode(_frames(*tensors, extra={"k": [1, 2]}))
    assert header == {**META, "extra": {"k": [1, 2]}}
    for a, b in zip(tensors, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_encode_and_decode_are_zero_copy():
    x = torch.arange(6, dtype=torch.float32)
    frames = encode(META, [x])
    x[0] = 42.0  # the memoryview is the tensor's own memory
    assert torch.frombuffer(bytearray(frames[1]), dtype=torch.float32)[0] == 42.0
    buf = bytearray(frames[1])
    h = _header(frames)
    h["frames"][0][3] = None  # no checksum, so we may change the buffer after decoding
    _, (y,) = decode([msgpack.packb(h), buf], limits=WireLimits(require_checksum=False))
    buf[:4] = torch.tensor([7.0]).numpy().tobytes()
    assert y[0] == 7.0  # y views the received buffer


def test_encoded_size_is_header_plus_raw_bytes():
    x, i = torch.randn(1000), torch.arange(17, dtype=torch.int16)
    frames = encode(META, [x, i])
    assert encoded_bytes(frames) == len(frames[0]) + 4000 + 34
    assert [memoryview(f).nbytes for f in frames[1:]] == [4000, 34]


@pytest.mark.parametrize(
    "spec", ["none", "topk:0.05", "randk:0.05", "quant:2", "quant:4", "sign", "fp16", "bf16"]
)
def test_compressor_payloads_round_trip_bit_exactly(spec):
    c = make_compressor(spec)
    for x in (torch.randn(1001), torch.randn(3, 257, dtype=torch.float64)):
        p = c.compress(x, seed=9, round=4, sender=1)
        frames = [bytes(f) for f in encode_payload(p, META)]
        meta, wp = decode_payload(frames)
        assert meta == META and wp.header == p.header
        assert torch.equal(c.decompress(wp, d=x.shape[-1]), c.decompress(p))
        assert encoded_bytes(frames) - len(frames[0]) == c.wire_bytes(p) - len(
            msgpack.packb(p.header)
        )


def test_truncated_messages():
    frames = _frames(torch.randn(4), torch.randn(2))
    _reject([], "truncated", "no header frame")
    _reject(frames[:2], "truncated", "1 frames arrived, header declares 2")
    _reject([frames[0], frames[1][:-1], frames[2]], "truncated", "frame 0 has 15 B")


def test_oversize_messages():
    frames = _frames(torch.randn(100))
    _reject(frames, "oversize", "exceeds 10 B", limits=WireLimits(max_header_bytes=10))
    _reject(frames, "oversize", "max_total_bytes=399", limits=WireLimits(max_total_bytes=399))
    huge = _with_header(frames, frames=[["float32", [10**6, 10**6], 4 * 10**12, 0]])
    _reject(huge, "oversize", "max_total_bytes")  # rejected before any buffer is touched
    many = _frames(*[torch.zeros(1)] * 5)
    _reject(many, "oversize", "5 frames exceed max_frames=4", limits=WireLimits(max_frames=4))


def test_bad_headers():
    frames = _frames(torch.randn(4))
    _reject([b"\xc1", frames[1]], "bad_header", "not valid msgpack")
    _reject([msgpack.packb([1, 2]), frames[1]], "bad_header", "must be a map")
    _reject([msgpack.packb({1: 2}), frames[1]], "bad_header", "not valid msgpack")  # int key
    ext = msgpack.packb({"v": VERSION, "x": msgpack.ExtType(5, b"abc")})
    _reject([ext, frames[1]], "bad_header", "not valid msgpack")
    long = msgpack.packb({"v": VERSION, "run": "r" * 5000})
    _reject([long, frames[1]], "bad_header", "not valid msgpack")
    _reject(_with_header(frames, run=7), "bad_header", "'run' must be a str")
    _reject(_with_header(frames, sender=-1), "bad_header", "'sender' must be an int >= 0")
    _reject(_with_header(frames, round="3"), "bad_header", "'round' must be an int >= 0")
    _reject(_with_header(frames, frames="x"), "bad_header", "'frames' must be a list")
    _reject([*frames, frames[1]], "bad_header", "2 frames arrived, header declares 1")
    _reject(_with_header(frames, frames=[["float32", [4], 16]]), "bad_header", "descriptor")
    _reject(_with_header(frames, frames=[["float32", 4, 16, 0]]), "bad_header", "shape must")
    _reject(_with_header(frames, frames=[["float32", [-4], 16, 0]]), "bad_header", "ints >= 0")
    _reject(_with_header(frames, frames=[["float32", [4], 16, -1]]), "bad_header", "uint32")
    _reject([frames[0], 3.0], "bad_header", "not a contiguous byte buffer")


def test_version_dtype_size_and_checksum():
    frames = _frames(torch.randn(4))
    _reject(_with_header(frames, v=VERSION + 1), "version", f"wire version {VERSION + 1}")
    crc = frame_checksum(frames[1])
    for name in ("complex64", "object", "bool"):
        bad = _with_header(frames, frames=[[name, [4], 16, crc]])
        _reject(bad, "bad_dtype", f"dtype '{name}' is not in the allow-list")
    _reject(_with_header(frames, frames=[["float32", [5], 16, crc]]), "size_mismatch", "x 4 B")
    _reject(_with_header(frames, frames=[["float64", [4], 16, crc]]), "size_mismatch", "!= nbytes")
    _reject([frames[0], frames[1] + b"\0"], "size_mismatch", "frame 0 has 17 B")
    flipped = bytearray(frames[1])
    flipped[3] ^= 1
    _reject([frames[0], bytes(flipped)], "checksum", "failed its CRC-32C check")
    unchecked = [bytes(f) for f in encode(META, [torch.randn(4)], checksum=False)]
    _reject(unchecked, "checksum", "no checksum")
    assert decode(unchecked, limits=WireLimits(require_checksum=False))[1][0].shape == (4,)


def test_checksum_is_crc32c_and_any_corrupted_frame_is_rejected():
    assert frame_checksum(b"123456789") == 0xE3069283  # the CRC-32C check value
    a, b = torch.randn(1000), torch.randn(300_000)
    frames = _frames(a, b)
    assert [d[3] for d in _header(frames)["frames"]] == [frame_checksum(f) for f in frames[1:]]
    nbytes = len(frames[2])
    for pos, bit in ((0, 0), (nbytes // 2, 5), (nbytes - 1, 7)):  # first, middle, last byte
        bad = bytearray(frames[2])
        bad[pos] ^= 1 << bit
        _reject([*frames[:2], bytes(bad)], "checksum", "frame 1 failed its CRC-32C check")
    # a frame swapped for another of the same size: every size check passes, the checksum fails
    _reject([frames[0], bytes(frames[2][:4000]), frames[2]], "checksum", "frame 0 failed")
    header, (x, y) = decode(frames)
    assert torch.equal(x, a) and torch.equal(y, b)


def test_version_1_messages_are_refused_by_version():
    frames = _frames(torch.randn(4))
    old = [msgpack.packb({**_header(frames), "v": 1}), frames[1]]
    _reject(old, "version", f"wire version 1, this build reads {VERSION}")


def test_wire_error_carries_its_reason():
    err = WireError("frame 0 failed", reason="checksum")
    assert err.reason == "checksum" and str(err) == "frame 0 failed"
    assert WireError("no reason given").reason == "bad_header"
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, WireError) and again.reason == "checksum" and again.args == err.args


def test_encode_refuses_what_decode_would_reject():
    with pytest.raises(WireError, match="reserved") as e:
        encode({**META, "frames": 1}, [])
    assert e.value.reason == "bad_header"
    with pytest.raises(WireError, match="cannot go on the wire") as e:
        encode(META, [torch.zeros(2, dtype=torch.complex64)])
    assert e.value.reason == "bad_dtype"
    with pytest.raises(WireError, match="'run' must be a str"):
        encode({"sender": 0, "round": 0}, [])
    with pytest.raises(WireError, match="'codec' is reserved"):
        encode_payload(make_compressor("sign").compress(torch.randn(3)), {**META, "codec": 1})
    frames = encode(META, [torch.randn(3)])
    h = _header(frames)
    h["codec"] = "not-a-map"
    with pytest.raises(WireError, match="needs a 'codec' map") as e:
        decode_payload([msgpack.packb(h), *frames[1:]])
    assert e.value.reason == "bad_header"


def test_every_reject_reason_in_the_package_is_a_known_label():
    """``reason`` is a bounded metrics label: every literal reason a module passes to a
    WireError, a transport's ``_reject`` or ``NodeMetrics.reject`` is in REJECT_REASONS."""
    assert set(REASONS) <= set(REJECT_REASONS)
    call = r'\b(?:wire_error|_error|_reject|reject)\([^"()]*"([a-z_]+)"'
    assign = r'\breason\s*=\s*"([a-z_]+)"'
    found = {}
    for path in Path(gossip.__file__).parent.rglob("*.py"):
        for m in re.finditer(f"{call}|{assign}", path.read_text()):
            found.setdefault(m.group(1) or m.group(2), path.name)
    assert {"checksum", "bad_payload", "unknown_sender"} <= set(found)  # the scan sees them
    unknown = {r: f for r, f in found.items() if r not in REJECT_REASONS}
    assert not unknown, f"reasons missing from REJECT_REASONS (reason: file): {unknown}"
