"""Functions the GPU tests run on every rank through topo.spawn (module-level: picklable)."""

from __future__ import annotations

import time
from typing import Any

import torch

import topo


def every_collective(device: str) -> dict[str, Any]:
    """Every collective on ``device`` tensors; results come back on the CPU for comparison
    with the same function run on gloo."""
    ctx = topo.current()
    dev = ctx.device if device == "cuda" else torch.device("cpu")
    r = ctx.rank
    x = (torch.arange(12, dtype=torch.float32) * (r + 1) + r).reshape(3, 4).to(dev)
    out: dict[str, Any] = {}
    for op in ("sum", "avg", "max", "min", "prod"):
        out[f"all_reduce_{op}"] = topo.all_reduce(x, axis="tp", op=op)
    out["all_reduce_tuple"] = topo.all_reduce(x.to(torch.int64), axis=("dp", "tp"))
    out["all_reduce_bf16"] = topo.all_reduce(x.to(torch.bfloat16), axis="dp")
    out["all_gather_0"] = topo.all_gather(x, axis="tp")
    out["all_gather_1"] = topo.all_gather(x, axis=("dp", "tp"), dim=1)
    out["all_gather_f8"] = topo.all_gather(x.to(torch.float8_e4m3fn), axis="tp").view(torch.uint8)
    out["reduce_scatter"] = topo.reduce_scatter(x, axis="tp", dim=1, op="max")
    out["broadcast"] = topo.broadcast(x, axis="dp", src=1)
    out["gather"] = topo.gather(x, axis="tp", dst=1, dim=1)
    out["scatter"] = topo.scatter(x, axis=("dp", "tp"), src=2, dim=1)
    out["all_to_all"] = topo.all_to_all(x, axis="tp", split_dim=1, concat_dim=0)
    out["ppermute"] = topo.ppermute(x, axis=("dp", "tp"), perm=[(0, 3), (3, 1), (1, 0)])
    out["shift"] = topo.shift(x, axis="dp", offset=1, wrap=False)
    out["shift_wrap"] = topo.shift(x, axis="tp", offset=1)
    if topo.axis_index("tp") == 0:
        topo.send(x * 10, axis="tp", dst=1)
        out["recv"] = None
    else:
        out["recv"] = topo.recv((3, 4), torch.float32, axis="tp", src=0, device=dev)
    topo.barrier(axis="tp")
    out["input_unchanged"] = x
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def streams_graphs_meshes() -> dict[str, bool]:
    """Ordering with other kernels, CUDA-graph capture/replay, several communicators in one
    process (every axis plus a second mesh), and prompt close."""
    ctx = topo.current()
    dev = ctx.device
    r = ctx.rank
    checks: dict[str, bool] = {}

    # Ordering: a long kernel on the current stream, then the collective, no sync between.
    big = torch.ones(4096, 4096, device=dev)
    x = (big @ big)[0, :8] / 4096 * (r + 1)  # tensor of (r + 1), computed by a matmul
    y = topo.all_reduce(x, axis=("dp", "tp"))
    checks["ordered_with_kernels"] = torch.equal(y.cpu(), torch.full((8,), 10.0))

    # Several communicators: each axis, the tuple, and a second mesh activated inside.
    a = topo.all_reduce(torch.ones(2, device=dev), axis="dp")
    b = topo.all_reduce(torch.ones(2, device=dev), axis="tp")
    with topo.DeviceMesh(world=4).activate(ctx.world, device=dev, name="second"):
        c = topo.all_reduce(torch.ones(2, device=dev), axis="world")
    checks["several_communicators"] = (a.sum() + b.sum() + c.sum()).item() == 16.0

    # CUDA graph: capture an all_reduce and an all_gather, replay with new inputs.
    inp = torch.zeros(16, device=dev)
    with topo.graph_capture(axes=["tp", ("dp", "tp")]) as graph:
        summed = topo.all_reduce(inp, axis="tp")
        gathered = topo.all_gather(inp, axis=("dp", "tp"))
    ok = True
    for step in range(3):
        inp.fill_(float(r + step))
        graph.replay()
        torch.cuda.synchronize()
        tp_peers = ctx.group("tp")
        ok &= torch.equal(summed.cpu(), torch.full((16,), float(sum(p + step for p in tp_peers))))
        ok &= torch.equal(
            gathered.cpu(), torch.cat([torch.full((16,), float(p + step)) for p in range(4)])
        )
    checks["graph_replay"] = bool(ok)

    # Prompt close: a fresh activation with NCCL communicators closes quickly.
    start = time.perf_counter()
    with topo.DeviceMesh(world=4).activate(ctx.world, device=dev, name="closing"):
        topo.all_reduce(torch.ones(1, device=dev), axis="world")
        entered = time.perf_counter()
    checks["prompt_close"] = time.perf_counter() - entered < 10.0
    checks["close_measured"] = start < entered
    return checks
