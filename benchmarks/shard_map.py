"""shard_map's cost over calling the same per-rank function on hand-sliced blocks.

On a dp=2 x tp=2 gloo mesh (4 processes), the global input is split over dp, each rank
all_reduces its block over tp, and the blocks are gathered back over dp:

- ``hand``: ``x.chunk(2)[dp index]``, ``topo.all_reduce(block, "tp")``, ``topo.all_gather(y, "dp")``;
- ``shard_map``: ``shard_map(lambda b: topo.all_reduce(b, "tp"), in_specs=P("dp"),
  out_specs=P("dp"), check=False)`` — the same work;
- ``shard_map check``: the same with ``check=True`` (the default): one more all_gather over
  ``tp`` and a one-int all_reduce to compare the output blocks along the left-out axis.

Each rank times blocks of calls; a figure is the slowest rank's median block. Run:
``python benchmarks/shard_map.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import statistics
import time

import torch

import topo
from topo import P

BLOCKS, CALLS = 15, 10


def measure(nbytes: int) -> dict[str, float]:
    """Per-call seconds of each way, median over blocks (this rank)."""
    ctx = topo.current()
    x = torch.ones(2 * nbytes // 4)  # a 2-block global input: each dp block is nbytes
    dp = ctx.axis_index("dp")

    def hand() -> torch.Tensor:
        block = x.chunk(2)[dp]
        return topo.all_gather(topo.all_reduce(block, "tp"), "dp")

    plain = topo.shard_map(lambda b: topo.all_reduce(b, "tp"), in_specs=P("dp"), out_specs=P("dp"), check=False)  # fmt: skip
    checked = topo.shard_map(lambda b: topo.all_reduce(b, "tp"), in_specs=P("dp"), out_specs=P("dp"))  # fmt: skip
    ways = {"hand": hand, "shard_map": lambda: plain(x), "shard_map check": lambda: checked(x)}
    assert torch.equal(ways["hand"](), ways["shard_map"]()) and torch.equal(hand(), checked(x))
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(BLOCKS):
        for name, fn in ways.items():  # interleaved: the machine's noise hits all alike
            topo.barrier()
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            times[name].append((time.perf_counter() - start) / CALLS)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    mesh = topo.DeviceMesh(dp=2, tp=2)
    print(f"# shard_map vs hand-sliced blocks, {mesh} on gloo, {BLOCKS} blocks of {CALLS} calls, "
          f"slowest rank's median; torch {torch.__version__}")  # fmt: skip
    print("| block per rank | hand | shard_map | shard_map/hand | shard_map check | check/hand |")
    print("|---:|---:|---:|---:|---:|---:|")
    for nbytes in (64 * 2**10, 2**20, 8 * 2**20):
        per_rank = topo.spawn(measure, mesh, nbytes, timeout=600)
        worst = {name: max(r[name] for r in per_rank) for name in per_rank[0]}
        h, s, c = worst["hand"], worst["shard_map"], worst["shard_map check"]
        print(f"| {nbytes // 1024} KiB | {h * 1e3:.3f} ms | {s * 1e3:.3f} ms | {s / h:.3f} | "
              f"{c * 1e3:.3f} ms | {c / h:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
