"""Compressor throughput: compress + decompress of 10M and 100M floats, as ratios to references.

For every size it measures, in the same process and on the same buffers, two references:

* ``torch.topk(|x|, k)`` with the codec's k, for the top-k codecs (what a hand-rolled top-k
  would cost at least; ours adds deterministic tie-breaking, sorted indices and the narrow
  index cast);
* a plain memory copy of the same bytes (``dst.copy_(x)``, preallocated), for the others.

Each codec is timed as ``compress(x)`` then ``decompress(payload, out=dst)`` into a preallocated
output, interleaved with its reference rep by rep (after one warm-up); the table prints the
medians of the times and of the per-rep ratio ``codec time / reference time`` (lower is
better; 1.0 means as fast as the reference). On a shared machine, ``--threads 1`` keeps
OpenMP's spinning threads from distorting small operations.

    python bench/bench_compress.py --sizes 10M 100M --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gossip.algorithms.compression import make_compressor

DEFAULT_SPECS = [
    "topk:0.01",
    "topk:0.01:bf16:packed",
    "topk:0.001",
    "randk:0.01",
    "quant:8",
    "quant:4",
    "quant:2",
    "sign",
    "fp16",
    "bf16",
    "none",
]


def parse_size(s: str) -> int:
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}
    s = s.strip().lower()
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_size(size_s: str, n: int, specs, reps: int, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=g, device=device)
    dst = torch.empty_like(x)
    for spec in specs:
        c = make_compressor(spec)
        if spec.startswith("topk"):
            k = c.k_for(n)
            ref_name = "topk"

            def ref(k=k):
                torch.topk(x.abs(), k, sorted=False)
        else:
            ref_name = "memcpy"

            def ref():
                dst.copy_(x)

        box = {}

        def comp(c=c, box=box):
            box["p"] = c.compress(x, seed=1, round=0, sender=0)

        def decomp(c=c, box=box):
            c.decompress(box["p"], out=dst)

        ref(), comp(), decomp()  # warm-up
        t_ref, t_c, t_d, ratios = [], [], [], []
        for _ in range(reps):  # interleaved, so a load change hits codec and reference alike
            t_ref.append(_timed(ref, device))
            t_c.append(_timed(comp, device))
            t_d.append(_timed(decomp, device))
            ratios.append((t_c[-1] + t_d[-1]) / t_ref[-1])
        med = statistics.median
        mb = c.wire_bytes(box["p"]) / 1e6
        print(
            f"{size_s:>6} {spec:>11} {med(t_c) * 1e3:>12.2f} {med(t_d) * 1e3:>14.2f} "
            f"{(med(t_c) + med(t_d)) * 1e3:>9.2f} {ref_name:>9} {med(t_ref) * 1e3:>8.2f} "
            f"{med(ratios):>6.2f} {mb:>8.2f}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["10M", "100M"], help="e.g. 10M 100M 1e6")
    p.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} reps={args.reps} (medians)")
    print(
        f"{'size':>6} {'codec':>11} {'compress ms':>12} {'decompress ms':>14} "
        f"{'total ms':>9} {'ref':>9} {'ref ms':>8} {'ratio':>6} {'wire MB':>8}"
    )
    for size_s in args.sizes:
        bench_size(size_s, parse_size(size_s), args.specs, args.reps, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
