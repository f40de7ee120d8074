"""Host time per call of topo's NCCL path on a one-rank group, against raw cupy NCCL and
torch's ProcessGroupNCCL, plus CUDA-graph replay of captured calls. Needs one GPU and cupy.

Run: ``python benchmarks/nccl_overhead.py`` (a few seconds). On a one-rank group NCCL moves
no data, so the figures are pure host cost. ``topo.all_reduce`` on a size-1 *axis* returns a
copy without calling NCCL at all, so the NCCL communicator is timed through
``MeshContext.communicator`` (that is what a size > 1 axis calls), and topo's dispatch cost
(context lookup and validation, measured on CPU) is printed separately.
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

import topo


def _per_call(fn: Any, calls: int = 2000, reps: int = 7) -> float:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    import torch.distributed as dist
    from cupy.cuda import nccl

    world = topo.World(rank=0, world_size=1, master_port=0)
    x = torch.ones(16, device="cuda:0")
    with topo.DeviceMesh(world=1).activate(world, timeout=60, device="cuda:0") as ctx:
        comm: Any = ctx.communicator(("world",), "cuda")
        raw = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
        out = torch.empty_like(x)
        stream = torch.cuda.current_stream()
        store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30))  # type: ignore[attr-defined]
        opts = dist.ProcessGroupNCCL.Options()  # type: ignore[attr-defined]
        pg = dist.ProcessGroupNCCL(store, 0, 1, opts)  # type: ignore[attr-defined]
        pg.allreduce([x]).wait()
        figures = {
            "topo NCCL communicator all_reduce": _per_call(lambda: comm.all_reduce(x, "sum")),
            "raw cupy NcclCommunicator.allReduce": _per_call(
                lambda: raw.allReduce(
                    x.data_ptr(),
                    out.data_ptr(),
                    16,
                    nccl.NCCL_FLOAT32,
                    nccl.NCCL_SUM,
                    stream.cuda_stream,
                )
            ),
            "torch ProcessGroupNCCL allreduce": _per_call(lambda: pg.allreduce([x])),
            "topo.all_reduce on the size-1 axis (copy only)": _per_call(
                lambda: topo.all_reduce(x, axis="world")
            ),
        }
        g_topo, g_raw = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with topo.graph_capture(graph=g_topo):
            for _ in range(100):
                comm.all_reduce(x, "sum")
        with torch.cuda.graph(g_raw):
            for _ in range(100):
                raw.allReduce(
                    x.data_ptr(), out.data_ptr(), 16, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                    torch.cuda.current_stream().cuda_stream,
                )  # fmt: skip
        figures["graph replay of 100 topo all_reduces"] = _per_call(g_topo.replay, 50)
        figures["graph replay of 100 raw allReduces"] = _per_call(g_raw.replay, 50)
        raw.destroy()
    print(f"# torch {torch.__version__}, NCCL {nccl.get_version()}, {torch.cuda.get_device_name()}")
    for label, seconds in figures.items():
        print(f"{label:<48} {seconds * 1e6:9.2f} us")
    t = figures["topo NCCL communicator all_reduce"]
    print(f"topo / raw cupy            {t / figures['raw cupy NcclCommunicator.allReduce']:.3f}")
    print(f"topo / ProcessGroupNCCL    {t / figures['torch ProcessGroupNCCL allreduce']:.3f}")
    print(
        f"graph replay topo / raw    "
        f"{figures['graph replay of 100 topo all_reduces'] / figures['graph replay of 100 raw allReduces']:.3f}"
    )


if __name__ == "__main__":
    main()
