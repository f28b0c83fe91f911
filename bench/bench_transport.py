"""Transport throughput against the raw library, both measured in the same run.

Two processes exchange a model-sized message (default 100 MB of float32) in lockstep rounds:
rank 0 sends it, rank 1 receives it and answers with a 4-byte ack. Each round is timed on
rank 0 from the send to the ack. Rounds of the reference and of the transport alternate
(A B A B ...), so both see the same load on a shared machine; the medians are compared.

* ``zmq``: :class:`~gossip.transport.zmq.ZmqTransport` (ROUTER/DEALER, wire header, receive
  into libzmq's buffer) against raw pyzmq PAIR sockets with ``copy=False`` on both sides.
  Measured without and with the per-frame CRC-32C.
* ``gloo``: :class:`~gossip.transport.torchdist.TorchDistTransport` against raw
  ``isend``/``irecv`` into a preallocated tensor on the same process group.

Ratio = transport throughput / reference throughput (target >= 0.9).

    python bench/bench_transport.py --mb 100 --rounds 10 --which zmq gloo
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def _store(host: str, port: int, master: bool) -> dist.TCPStore:
    return dist.TCPStore(
        host,
        port,
        is_master=master,
        timeout=datetime.timedelta(seconds=120),
        wait_for_workers=False,
    )


# ------------------------------------------------------------------------------- zmq side
def _zmq_role(rank: int, store: dist.TCPStore, args) -> dict:
    import zmq

    from gossip.transport.wire import WireLimits
    from gossip.transport.zmq import ZmqTransport

    nbytes = args.mb * 1_000_000
    limits = WireLimits(max_total_bytes=2 * nbytes, require_checksum=False)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PAIR)
    raw.setsockopt(zmq.LINGER, 0)
    if rank == 1:
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        store.set("zmq/raw", f"tcp://127.0.0.1:{port}")
    else:
        raw.connect(store.get("zmq/raw").decode())
    transports = {}
    for crc in (False, True):
        t = ZmqTransport(rank, run_id="bench", limits=limits, checksum=crc, sndhwm=2)
        store.set(f"zmq/{crc}/{rank}", t.address)
        transports[crc] = t
    for crc, t in transports.items():
        t.connect({1 - rank: store.get(f"zmq/{crc}/{1 - rank}").decode()})
    payload = torch.randn(nbytes // 4)
    ack = torch.zeros(1)
    times = {"raw": [], "transport": [], "transport_crc": []}

    def raw_round():
        if rank == 0:
            t0 = time.perf_counter()
            raw.send(payload.numpy(), copy=False)
            raw.recv(copy=False)
            return time.perf_counter() - t0
        frame = raw.recv(copy=False)
        got = torch.frombuffer(frame.buffer, dtype=torch.float32)
        assert got.numel() == payload.numel()
        raw.send(b"ack!")

    def transport_round(t, r):
        if rank == 0:
            t0 = time.perf_counter()
            t.send(1, r, [payload])
            t.recv(1, r, timeout_s=120)
            return time.perf_counter() - t0
        msg = t.recv(0, r, timeout_s=120)
        assert msg.tensors[0].numel() == payload.numel()
        t.send(0, r, [ack])

    for r in range(args.rounds + 1):  # round 0 is a warm-up
        for name, fn in (
            ("raw", raw_round),
            ("transport", lambda r=r: transport_round(transports[False], r)),
            ("transport_crc", lambda r=r: transport_round(transports[True], r)),
        ):
            dt = fn()
            if rank == 0 and r > 0:
                times[name].append(dt)
    for t in transports.values():
        t.close()
    raw.close()
    ctx.term()
    return times


# ------------------------------------------------------------------------------ gloo side
def _gloo_role(rank: int, store: dist.TCPStore, args) -> dict:
    from gossip.transport.torchdist import TorchDistTransport, address_of, init_process_group

    nbytes = args.mb * 1_000_000
    pg = init_process_group(
        "gloo", rank=rank, world_size=2, store=dist.PrefixStore("pg", store), timeout_s=120
    )
    from gossip.transport.wire import WireLimits

    limits = WireLimits(max_total_bytes=2 * nbytes, require_checksum=False)
    t = TorchDistTransport(rank, group=pg, timeout_s=120, checksum=False, limits=limits)
    t.connect({1 - rank: address_of(1 - rank)})
    payload = torch.randn(nbytes // 4)
    buf = torch.empty_like(payload)
    ack = torch.zeros(1)
    raw_tag = 7  # the transport uses tag 0; raw traffic must not meet its posted receives
    times = {"raw": [], "transport": []}

    def raw_round():
        if rank == 0:
            t0 = time.perf_counter()
            dist.isend(payload, dst=1, tag=raw_tag).wait()
            dist.irecv(ack, src=1, tag=raw_tag).wait()
            return time.perf_counter() - t0
        dist.irecv(buf, src=0, tag=raw_tag).wait()
        dist.isend(ack, dst=0, tag=raw_tag).wait()

    def transport_round(r):
        if rank == 0:
            t0 = time.perf_counter()
            t.send(1, r, [payload])
            t.recv(1, r, timeout_s=120)
            return time.perf_counter() - t0
        msg = t.recv(0, r, timeout_s=120)
        assert msg.tensors[0].numel() == payload.numel()
        t.release(msg)  # the raw path reuses one buffer; so does the transport after release
        t.send(0, r, [ack])

    for r in range(args.rounds + 1):
        for name, fn in (("raw", raw_round), ("transport", lambda r=r: transport_round(r))):
            dt = fn()
            if rank == 0 and r > 0:
                times[name].append(dt)
    t.close()
    dist.destroy_process_group()
    return times


# ----------------------------------------------------------------------------- driver
def _role(args) -> int:
    store = _store("127.0.0.1", args.store_port, False)
    fn = _zmq_role if args.role == "zmq" else _gloo_role
    times = fn(args.rank, store, args)
    if args.rank == 0:
        print(json.dumps(times))
    return 0


def _summarise(kind: str, times: dict, mb: int) -> list[dict]:
    ref = statistics.median(times["raw"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "transport": kind,
                "path": name,
                "median_s": med,
                "throughput_MBps": mb / med,
                "ratio_vs_raw": ref / med,
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=100, help="message size in MB (default 100)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per path (default 10)")
    p.add_argument("--which", nargs="+", default=["zmq", "gloo"], choices=["zmq", "gloo"])
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    p.add_argument("--role", choices=["zmq", "gloo"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        return _role(args)

    rows = []
    for kind in args.which:
        store = _store("127.0.0.1", 0, True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, os.path.abspath(__file__), "--role", kind, "--mb", str(args.mb)]
        cmd += ["--rounds", str(args.rounds), "--store-port", str(store.port)]
        procs = [
            subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, env=env, text=True)
            for r in (0, 1)
        ]
        try:
            outs = [proc.communicate(timeout=600)[0] for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        if any(proc.returncode for proc in procs):
            print(f"{kind}: a rank failed: {[proc.returncode for proc in procs]}", file=sys.stderr)
            return 1
        times = json.loads(outs[0].strip().splitlines()[-1])
        rows += _summarise(kind, times, args.mb)
        del store

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{args.mb} MB per message, {args.rounds} timed rounds, median of each path")
    print(f"{'transport':>9} {'path':>14} {'median s':>9} {'MB/s':>8} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['transport']:>9} {row['path']:>14} {row['median_s']:>9.4f} "
            f"{row['throughput_MBps']:>8.0f} {row['ratio_vs_raw']:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
