"""``topo.all_to_allv`` vs the raw ``torch.distributed.all_to_all_single`` with split sizes, on
gloo, 4 local ranks, printed (not asserted).

Each rank sends every peer an uneven number of rows of 256 float32 (1 KiB a row; a fixed
random table, the same for both), at three sizes. The raw call runs on a default process
group that this benchmark creates with ``init_process_group("gloo", store=...)`` on topo's
rendezvous store (topo itself never touches the default group), into preallocated outputs;
topo's call allocates its result, as it always does. ``topo, exchanged`` passes
``recv_sizes=None`` (one more small all_gather). The three run interleaved in blocks, each in
every position in turn, so machine noise hits them alike; each figure is the median over
blocks of the time per call.

Run: ``python benchmarks/all_to_allv.py`` (about half a minute on 2 cores).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import topo

MESH = topo.DeviceMesh(ep=4)
WIDTH = 256  # float32 per row: 1 KiB rows
#: Mean rows per (sender, receiver) pair; each pair gets between 0 and twice as many.
SIZES = (16, 256, 2048)
BLOCKS, CALLS = 15, 10
KINDS = ("topo", "topo, exchanged", "raw all_to_all_single")


def table(mean: int, n: int) -> list[list[int]]:
    """Row ``i``: index ``i``'s send sizes (the same table on every rank)."""
    rng = random.Random(mean)
    return [[rng.randint(0, 2 * mean) for _ in range(n)] for _ in range(n)]


def _calls(
    x: torch.Tensor, out: torch.Tensor, sends: list[int], recvs: list[int]
) -> dict[str, Any]:
    import torch.distributed as dist

    return {
        "topo": lambda: topo.all_to_allv(x, "ep", sends, recvs),
        "topo, exchanged": lambda: topo.all_to_allv(x, "ep", sends),
        "raw all_to_all_single": lambda: dist.all_to_all_single(out, x, recvs, sends),
    }


def measure() -> dict[str, dict[str, list[float]]]:
    import torch.distributed as dist

    import topo._dist as topo_dist

    ctx = topo.current()
    n, me = ctx.axis_size("ep"), ctx.axis_index("ep")
    store = topo_dist.PrefixStore(ctx.coordinator.key("bench-a2av"), ctx.coordinator.store)
    dist.init_process_group("gloo", store=store, rank=ctx.rank, world_size=ctx.world.world_size)
    try:
        times: dict[str, dict[str, list[float]]] = {}
        for mean in SIZES:
            sizes = table(mean, n)
            sends, recvs = sizes[me], [row[me] for row in sizes]
            x = torch.randn(sum(sends), WIDTH)
            out = torch.empty(sum(recvs), WIDTH)
            calls = _calls(x, out, sends, recvs)
            check = topo.all_to_allv(x, "ep", sends, recvs)
            dist.all_to_all_single(out, x, recvs, sends)
            assert torch.equal(check, out)
            per_kind: dict[str, list[float]] = {k: [] for k in KINDS}
            for block in range(BLOCKS + 1):  # block 0 warms up
                for shift in range(len(KINDS)):
                    kind = KINDS[(block + shift) % len(KINDS)]
                    topo.barrier("ep")
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        calls[kind]()
                    elapsed = (time.perf_counter() - start) / CALLS
                    if block:
                        per_kind[kind].append(elapsed)
            times[f"{mean}"] = per_kind
        return times
    finally:
        dist.destroy_process_group()


def main() -> None:
    results = topo.spawn(measure, MESH, timeout=600)
    print(f"gloo, {MESH.size} local ranks, rows of {WIDTH} float32 (1 KiB); median of "
          f"{BLOCKS} blocks of {CALLS} calls, rank 0: MiB it sends, time per call (ms)")  # fmt: skip
    print(f"{'rows/pair (mean)':>16} {'MiB sent':>9} " + " ".join(f"{k:>22}" for k in KINDS)
          + f" {'topo/raw':>9}")  # fmt: skip
    for mean in SIZES:
        per_kind: Any = results[0][f"{mean}"]
        mib = sum(table(mean, MESH.size)[0]) * WIDTH * 4 / 2**20
        medians = {k: statistics.median(per_kind[k]) * 1e3 for k in KINDS}
        ratio = medians["topo"] / medians["raw all_to_all_single"]
        print(f"{mean:>16} {mib:>9.2f} " + " ".join(f"{medians[k]:>22.3f}" for k in KINDS)
              + f" {ratio:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
