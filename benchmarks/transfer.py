"""Weight-transfer figures for issue 10 (P7), printed (not asserted), on gloo between 2 local
processes (sender index 0, one receiver):

1. 1,000 small tensors (mixed shapes and dtypes, ~100 MiB): ``send_weights`` packed (default
   1 GiB bucket, and 16 MiB buckets double-buffered) vs ``packed=False`` (one broadcast per
   tensor), same processes: goal >= 3x faster;
2. one 1 GiB tensor: ``send_weights`` packed vs a plain ``topo.broadcast``: goal within 5 %.

Run: ``python benchmarks/transfer.py [--big-mib 1024]``. Medians of repeats, the variants
interleaved in the same processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import topo

REPEATS = 3
BIG_REPEATS = 6


def small_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    out = []
    for i in range(1000):
        dtype = dtypes[i % 4]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        nbytes = int(torch.randint(4 << 10, 200 << 10, (1,), generator=g))
        cols = [64, 128, 256, 512][i % 4]
        rows = max(1, nbytes // itemsize // cols)
        out.append((f"layer{i}", torch.zeros(rows, cols, dtype=dtype)))
    return out


def run(big_mib: int) -> dict[str, list[float]]:
    sender = topo.axis_index("x") == 0
    weights = small_tensors() if sender else []
    expect = None if sender else dict(small_tensors())
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: object) -> None:
        topo.barrier("x")
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        topo.barrier("x")
        times.setdefault(name, []).append(time.perf_counter() - start)

    def transfer(**kw: object) -> object:
        if sender:
            return lambda: topo.transfer.send_weights(weights, "x", **kw)
        return lambda: topo.transfer.receive_weights("x", load=lambda n, t: None, expect=expect)

    for repeat in range(REPEATS + 1):
        for name, kw in (("packed", {}), ("packed16", {"bucket_bytes": 16 << 20}),
                         ("unpacked", {"packed": False})):  # fmt: skip
            timed(name, transfer(**kw))
        if repeat == 0:
            times.clear()  # warm-up round
    big = torch.zeros(big_mib << 20, dtype=torch.uint8)
    named = [("big", big)]

    def plain() -> None:
        topo.broadcast(big, "x")

    def packed() -> None:
        if sender:
            topo.transfer.send_weights(named, "x")
        else:
            topo.transfer.receive_weights("x", load=lambda n, t: None)

    for repeat in range(BIG_REPEATS):  # alternate which goes first
        order = (("plain", plain), ("big_packed", packed))
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            timed(name, fn)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big-mib", type=int, default=1024)
    args = parser.parse_args()
    t = topo.spawn(run, topo.DeviceMesh(x=2), args.big_mib, timeout=600)[1]
    med = {k: statistics.median(v) for k, v in t.items()}
    total = sum(w.numel() * w.element_size() for _, w in small_tensors()) / 2**20
    print(f"1,000 small tensors, {total:.0f} MiB, gloo, 2 processes (median of {REPEATS}):")
    print(f"  packed (1 GiB bucket)      {med['packed'] * 1e3:9.1f} ms")
    print(f"  packed (16 MiB buckets)    {med['packed16'] * 1e3:9.1f} ms")
    print(f"  unpacked (1 bcast/tensor)  {med['unpacked'] * 1e3:9.1f} ms")
    print(
        f"  speed-up packed / unpacked       = {med['unpacked'] / med['packed']:.2f}x (goal >= 3)"
    )
    print(f"  speed-up packed16 / unpacked     = {med['unpacked'] / med['packed16']:.2f}x")
    print(f"one {args.big_mib} MiB tensor (median of {BIG_REPEATS}, alternating order):")
    print(f"  send_weights (packed)      {med['big_packed'] * 1e3:9.1f} ms")
    print(f"  topo.broadcast             {med['plain'] * 1e3:9.1f} ms")
    print(
        f"  ratio packed / plain             = {med['big_packed'] / med['plain']:.3f} (goal <= 1.05)"
    )
    low = {k: min(v) for k, v in t.items()}
    print(
        f"  ratio of the fastest runs        = {low['big_packed'] / low['plain']:.3f} "
        f"({low['big_packed'] * 1e3:.0f} vs {low['plain'] * 1e3:.0f} ms)"
    )


if __name__ == "__main__":
    main()
