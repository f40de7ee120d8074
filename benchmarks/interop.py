"""Cost of a topo ProcessGroup: ``dist.all_reduce`` through ``ctx.torch_group(...)`` vs through
torch's own gloo group (``init_process_group("gloo")``) in the same processes, 4 B and 64 MiB,
printed (not asserted). The issue's bar is a ratio of at most 1.05. Both groups run the very
same ``ProcessGroupGloo`` code (topo's group *is* a gloo backend), so the ratio is 1 up to
noise; the spread of the ratios of neighbouring calls shows how much noise there is.

Run: ``python benchmarks/interop.py`` (about a minute on 2 cores). Calls alternate between the
two groups and the medians are taken over calls, so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

import topo

MESH = topo.DeviceMesh(dp=2, tp=2)
CASES = {"4 B": (1, 3000), "64 MiB": (16 * 2**20, 16)}  # elements, calls per group


def compare() -> dict[str, dict[str, list[float]]]:
    """On each rank: the seconds of every call through either group, for every case. Calls
    alternate between the groups (topo, torch, torch, topo, ...), so load spikes on the shared
    machine hit both alike."""
    ctx = topo.current()
    world = ctx.world
    store = dist.TCPStore(
        world.master_addr, world.master_port, world.world_size, False, timeout=timedelta(60)
    )
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("bench-torch", store), rank=ctx.rank,
        world_size=world.world_size,
    )
    try:
        groups = {"topo": ctx.torch_group(ctx.mesh.axis_names), "torch": dist.group.WORLD}
        out: dict[str, dict[str, list[float]]] = {}
        for case, (numel, calls) in CASES.items():
            x = torch.ones(numel)
            times: dict[str, list[float]] = {"topo": [], "torch": []}
            for name in ("topo", "torch"):  # warm up both
                for _ in range(min(calls, 20)):
                    dist.all_reduce(x, group=groups[name])
            for i in range(calls):
                for name in ("topo", "torch") if i % 2 == 0 else ("torch", "topo"):
                    start = time.perf_counter()
                    dist.all_reduce(x, group=groups[name])
                    times[name].append(time.perf_counter() - start)
            out[case] = times
        return out
    finally:
        dist.destroy_process_group()


def dispatch(calls: int = 20000) -> tuple[float, float]:
    """Median seconds of a 4-byte ``dist.all_reduce`` through a one-rank topo group and a
    one-rank torch gloo group in this process: what each call costs besides the network, with
    little scheduling noise."""
    world = topo.World(rank=0, world_size=1, master_port=0)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=dist.PrefixStore("torch", store), rank=0, world_size=1)
    try:
        with topo.DeviceMesh(a=1).activate(world, store=store, timeout=60) as ctx:
            groups = {"topo": ctx.torch_group("a"), "torch": dist.group.WORLD}
            x = torch.ones(1)
            times: dict[str, list[float]] = {"topo": [], "torch": []}
            for i in range(calls):
                for name in ("topo", "torch") if i % 2 == 0 else ("torch", "topo"):
                    start = time.perf_counter()
                    dist.all_reduce(x, group=groups[name])
                    times[name].append(time.perf_counter() - start)
        return statistics.median(times["topo"]), statistics.median(times["torch"])
    finally:
        dist.destroy_process_group()


def main() -> None:
    results: list[Any] = topo.spawn(compare, MESH, timeout=600)
    print(f"dist.all_reduce over {MESH} (4 ranks, gloo on CPU), torch {torch.__version__}")
    print(f"{'size':>8} {'topo group':>12} {'torch group':>12} {'ratio':>7} {'pair ratios (IQR)':>20}")
    for case, (_, calls) in CASES.items():
        # per call, the slowest rank's time (a collective ends when its last rank does)
        topo_t = [max(r[case]["topo"][i] for r in results) for i in range(calls)]
        torch_t = [max(r[case]["torch"][i] for r in results) for i in range(calls)]
        t, w = statistics.median(topo_t), statistics.median(torch_t)
        q = statistics.quantiles([a / b for a, b in zip(topo_t, torch_t, strict=True)], n=4)
        unit, scale = ("us", 1e6) if t < 1e-2 else ("ms", 1e3)
        print(
            f"{case:>8} {t * scale:>9.1f} {unit} {w * scale:>9.1f} {unit} {t / w:>7.3f} "
            f"{q[0]:>9.3f} .. {q[2]:.3f}"
        )
    t, w = dispatch()
    print("one rank, this process (per-call cost without the network), 4 B:")
    print(f"{'4 B':>8} {t * 1e6:>9.1f} us {w * 1e6:>9.1f} us {t / w:>7.3f}")

if __name__ == "__main__":
    main()
