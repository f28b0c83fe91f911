"""Helpers for tests that start real processes.

* :class:`Ranks` (fixture ``ranks``): starts one process per rank, each in its own session, and
  reports every rank's exit code and output tail. Whatever happens in the test, teardown kills
  every process group it started (SIGKILL), so no child outlives the test and every port a child
  held is released.
* :func:`free_port`: a TCP port on 127.0.0.1 that was free a moment ago.
* :func:`rendezvous_store`: a c10d ``TCPStore`` served by the test process (children connect to
  it to exchange addresses, as the runtime does under torchrun).
* :class:`ZmqAttacker` (fixture ``zmq_attacker``): a raw pyzmq DEALER that sends hand-made bad
  messages to a :class:`~gossip.transport.zmq.ZmqTransport`; reused by the runtime's bad-input
  test on a running node.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listened on when this was called."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_store(world_size: int, timeout_s: float = 60.0):
    """A ``TCPStore`` server on a free loopback port; returns ``(store, port)``.

    ``world_size`` counts the children only (the test process is an extra client), so children
    connect with ``TCPStore("127.0.0.1", port, is_master=False)``.
    """
    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size + 1,
        True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return store, store.port


@dataclass
class RankResult:
    """How one rank ended: exit code (negative = killed by that signal) and its output tail."""

    rank: int
    returncode: int | None
    output: str

    def __str__(self) -> str:
        tail = "\n    ".join(self.output.strip().splitlines()[-15:])
        return f"rank {self.rank}: exit code {self.returncode}\n    {tail}"


class Ranks:
    """Start, watch and always clean up one process per rank.

    Example::

        procs = ranks.start(4, lambda r: [sys.executable, __file__, "worker", str(r)])
        results = ranks.wait(timeout_s=60)
        assert all(r.returncode == 0 for r in results), ranks.report(results)
    """

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[int, subprocess.Popen] = {}
        self._logs: dict[int, Path] = {}
        self._stores: list = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def start(self, n: int, argv_for_rank, env_for_rank=None) -> list[subprocess.Popen]:
        """Start ranks ``0..n-1``; ``argv_for_rank(r)`` gives each command line."""
        for r in range(n):
            self.start_one(r, argv_for_rank(r), env_for_rank(r) if env_for_rank else None)
        return [self.procs[r] for r in range(n)]

    def start_one(self, rank: int, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.log_dir / f"rank{rank}.log"
        self._logs[rank] = log
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env(env),
                cwd=str(REPO_ROOT),
                start_new_session=True,  # own process group: teardown kills grandchildren too
            )
        self.procs[rank] = proc
        return proc

    def output(self, rank: int) -> str:
        log = self._logs.get(rank)
        return log.read_text(errors="replace") if log and log.exists() else ""

    def wait(self, timeout_s: float) -> list[RankResult]:
        """Wait for every rank (at most ``timeout_s`` in all); kill the ones still running."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()
        return [RankResult(r, p.returncode, self.output(r)) for r, p in sorted(self.procs.items())]

    @staticmethod
    def argv(script: Path | str, *args) -> list[str]:
        """``[python, script, *args]`` with this interpreter."""
        return [sys.executable, str(script), *map(str, args)]

    def store(self, world_size: int, timeout_s: float = 60.0):
        """A rendezvous ``TCPStore`` served by the test process; see :func:`rendezvous_store`."""
        store, port = rendezvous_store(world_size, timeout_s)
        self._stores.append(store)
        return store, port

    @staticmethod
    def report(results: list[RankResult]) -> str:
        return "\n".join(str(r) for r in results)

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[rank]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill_all(self) -> None:
        for rank, proc in self.procs.items():
            self.kill(rank)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        self._stores.clear()  # dropping the server closes its port


@pytest.fixture
def ranks(tmp_path):
    r = Ranks(tmp_path)
    try:
        yield r
    finally:
        r.kill_all()


# ------------------------------------------------------------------------------ attacker
class ZmqAttacker:
    """A raw pyzmq DEALER that speaks the gossip wire format badly, on purpose.

    ``identity`` is the routing id it claims (default: that of ``rank``, a known neighbour, so
    its messages get past the sender check and reach the decoder). Each ``send_*`` method sends
    one kind of bad message; :meth:`send_good` sends a valid one. ``CASES`` maps each bad case
    to the reject reason the receiver must count.
    """

    CASES = {
        "malformed_header": "bad_header",
        "not_msgpack": "bad_header",
        "wrong_version": "version",
        "oversized_claim": "oversize",
        "wrong_dtype": "bad_dtype",
        "wrong_shape": "size_mismatch",
        "truncated": "truncated",
        "bad_checksum": "checksum",
        "wrong_run": "run_id",
        "replayed": "replayed",
    }

    def __init__(self, address: str, rank: int, run_id: str = "", identity: bytes | None = None):
        import zmq

        from gossip.transport.wire import VERSION, frame_checksum
        from gossip.transport.zmq import routing_id

        self.version, self.checksum = VERSION, frame_checksum
        self.zmq = zmq
        self.rank = rank
        self.run_id = run_id
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, identity or routing_id(rank))
        self.sock.connect(address)

    def header(self, round: int, frames: list, **over) -> bytes:
        h = {"v": self.version, "run": self.run_id, "sender": self.rank, "round": round, "h": {}}
        h["frames"] = frames
        h.update(over)
        return msgpack.packb(h)

    def send(self, parts: list) -> None:
        self.sock.send_multipart(parts, copy=True)

    def send_good(self, round: int, payload: bytes = b"\x00" * 16) -> None:
        desc = [["float32", [len(payload) // 4], len(payload), self.checksum(payload)]]
        self.send([self.header(round, desc), payload])

    def send_case(self, case: str, round: int) -> None:
        """Send the bad message named ``case`` (a key of :attr:`CASES`) for ``round``."""
        p = b"\x01" * 16
        crc = self.checksum(p)
        good = [["float32", [4], 16, crc]]
        if case == "malformed_header":
            self.send([msgpack.packb({"v": self.version, "run": self.run_id, "frames": good}), p])
        elif case == "not_msgpack":
            self.send([b"\xc1\xc1\xc1 definitely not msgpack", p])
        elif case == "wrong_version":
            self.send([self.header(round, good, v=99), p])
        elif case == "oversized_claim":
            # Claims 64 GiB; sends 16 bytes. Must be refused before anything is allocated.
            huge = [["float32", [2**34], 2**36, crc]]
            self.send([self.header(round, huge), p])
        elif case == "wrong_dtype":
            self.send([self.header(round, [["object", [4], 16, crc]]), p])
        elif case == "wrong_shape":
            self.send([self.header(round, [["float32", [5], 16, crc]]), p])
        elif case == "truncated":
            self.send([self.header(round, [["float32", [8], 32, crc]]), p])
        elif case == "bad_checksum":
            self.send([self.header(round, [["float32", [4], 16, crc ^ 1]]), p])
        elif case == "wrong_run":
            self.send([self.header(round, good, run="someone-else"), p])
        elif case == "replayed":
            self.send_good(round, p)
            self.send_good(round, p)
        else:
            raise ValueError(f"case must be one of {sorted(self.CASES)}, got {case!r}")

    def send_oversized_frame(self, nbytes: int) -> None:
        """A real frame of ``nbytes`` (use more than the receiver's MAXMSGSIZE)."""
        self.send([self.header(0, [["uint8", [nbytes], nbytes, None]]), b"\x00" * nbytes])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def zmq_attacker():
    """Factory: ``zmq_attacker(address, rank, run_id)``; every attacker is closed at teardown."""
    made: list[ZmqAttacker] = []

    def make(address: str, rank: int, run_id: str = "", identity: bytes | None = None):
        a = ZmqAttacker(address, rank, run_id, identity)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()
