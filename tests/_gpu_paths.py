"""Every CUDA path of topo as one function per path, run on every rank of DeviceMesh(dp=2, tp=2)
through ``topo.spawn`` twice: on ``"cuda"`` tensors (NCCL, the ranks sharing one GPU) and on
``"cpu"`` tensors (gloo). tests/test_gpu_paths.py compares the two, path by path, and
scripts/gpu-check reports each path.

Each path returns plain values and CPU tensors. :func:`all_paths` runs them in order and
records a path that raises as ``{"error": ...}`` instead of stopping, so one broken path does
not hide the others (its peers may then wait out the activation's timeout).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import topo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))  # fsdp2_tp, moe_ep

import _all_to_allv_fns
import _autograd_fns
import _gpu_fns
import _spawn_fns
import _transport_fns
import moe_ep

#: The mesh both runs use (4 ranks).
MESH = topo.DeviceMesh(dp=2, tp=2)


def _dev(device: str) -> torch.device:
    return topo.current().device if device == "cuda" else torch.device("cpu")


def _cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def _to(value: Any, dev: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dev)
    if isinstance(value, dict):
        return {k: _to(v, dev) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, dev) for v in value)
    return value


# --------------------------------------------------------------------------------- paths


def collectives(device: str) -> dict[str, Any]:
    """Every collective, tuple axes, dtypes moved as bytes, send/recv, barrier."""
    return _gpu_fns.every_collective(device)


def v_collectives(device: str) -> dict[str, Any]:
    """all_gatherv by every method on both axes, with and without sizes; reduce_scatterv."""
    ctx, dev = topo.current(), _dev(device)
    out: dict[str, Any] = {}
    for axis in ("tp", "dp", ("dp", "tp")):
        key = axis if isinstance(axis, str) else "dp,tp"
        for dim in (0, 1):
            for method in ("auto", "padded", "broadcast", "p2p"):
                x = _transport_fns.uneven_input(ctx.rank, dim).to(dev)
                out[f"gatherv/{key}/{dim}/{method}"] = topo.all_gatherv(
                    x, axis, dim=dim, method=method
                )
        sizes = [r % 3 for r in ctx.group(axis)]
        x = _transport_fns.uneven_input(ctx.rank, 1, torch.bfloat16).to(dev)
        out[f"gatherv/{key}/sizes"] = topo.all_gatherv(x, axis, dim=1, sizes=sizes)
        n = ctx.axis_size(axis)
        for op in ("sum", "max", "avg"):
            sizes = [1, 3] if n == 2 else [0, 1, 1, 2]
            rs = _transport_fns.rs_input(ctx.rank, 4).to(dev)
            out[f"rs/{key}/{op}"] = topo.reduce_scatterv(rs, axis, sizes, dim=0, op=op)
    return _cpu(out)


def uneven_all_to_all(device: str) -> dict[str, Any]:
    """all_to_allv on both axes and the tuple, dims 0 and 1, dtypes moved as bytes, zero
    sizes, sizes exchanged; a gradient; the MoE layer of examples/moe_ep.py both ways."""
    ctx, dev = topo.current(), _dev(device)
    fns = _all_to_allv_fns
    out: dict[str, Any] = {}
    for k, (name, axis, dim, dtype, table, given) in enumerate(fns.GLOO_CASES):
        me = ctx.axis_index(axis)
        x = fns.make_input(k, ctx.rank, fns.shape_for(fns.REST, dim, sum(table[me])), dtype)
        recvs = fns.recv_sizes(table, me) if given else None
        out[name] = topo.all_to_allv(x.to(dev), axis, table[me], recvs, dim=dim)
    _, axis, dim, _, table, _ = fns.GLOO_CASES[3]
    me = ctx.axis_index(axis)
    shape = fns.shape_for(fns.REST, dim, sum(table[me]))
    x = fns.make_input(3, ctx.rank, shape, torch.float64).to(dev).requires_grad_(True)
    y = topo.all_to_allv(x, axis, table[me], dim=dim)
    (y * fns.grad_weight(ctx.rank, tuple(y.shape)).to(dev)).sum().backward()
    out["grad"] = x.grad
    with ctx.view(moe_ep.MESH):  # dp × tp with the derived axis ep = ("dp", "tp")
        out["moe"] = moe_ep.run_both(dev)
    return _cpu(out)


def tensor_dicts(device: str) -> dict[str, Any]:
    """broadcast_tensor_dict over an axis and a tuple, send/recv_tensor_dict plain and with
    the all-gather split; on CUDA the dict mixes CUDA tensors (NCCL) and CPU ones (gloo)."""
    ctx, dev = topo.current(), _dev(device)

    def mixed(seed: int) -> dict[str, Any]:
        d = _transport_fns.tensor_dict(seed)
        cpu_part = {"ids", "mask", "meta"}  # these stay on the CPU: both backends in one dict
        return {k: (v if k in cpu_part else _to(v, dev)) for k, v in d.items()}

    out: dict[str, Any] = {}
    me = ctx.axis_index("tp")
    out["bcast/tp"] = topo.broadcast_tensor_dict(mixed(ctx.rank) if me == 1 else None, "tp", 1)
    me4 = ctx.axis_index(("dp", "tp"))
    got = topo.broadcast_tensor_dict(mixed(ctx.rank) if me4 == 2 else None, ("dp", "tp"), 2)
    out["bcast/all"] = got
    out["devices"] = sorted({str(v.device.type) for v in got.values() if torch.is_tensor(v)})
    stage = ctx.axis_index("dp")
    for ag in (None, "tp"):
        if stage == 0:
            topo.send_tensor_dict(mixed(10), "dp", dst=1, all_gather_axis=ag)
        else:
            out[f"p2p/{ag}"] = topo.recv_tensor_dict("dp", src=0, all_gather_axis=ag)
    return _cpu(out)


def objects(device: str) -> dict[str, Any]:
    """Object collectives (CPU communicator) on a machine with a GPU: broadcast, all-gather,
    point to point."""
    ctx = topo.current()
    out: dict[str, Any] = {}
    me = ctx.axis_index("tp")
    out["bcast"] = topo.broadcast_object({"cfg": [1, 2, ctx.rank]} if me == 1 else None, "tp", 1)
    out["gather"] = topo.all_gather_object({"rank": ctx.rank, "s": "x" * ctx.rank}, ("dp", "tp"))
    if ctx.axis_index("dp") == 0:
        topo.send_object({"from": ctx.rank, "data": list(range(300))}, "dp", dst=1)
        out["p2p"] = None
    else:
        out["p2p"] = topo.recv_object("dp", src=0)
    return out


def _weights(dev: torch.device) -> list[tuple[str, torch.Tensor]]:
    return [(n, t.to(dev)) for n, t in _transport_fns.weights()]


def _receive(axis: str, **kw: Any) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def load(name: str, t: torch.Tensor) -> None:
        got[name] = t.detach().cpu().clone()

    topo.transfer.receive_weights(axis, load=load, **kw)
    return got


def weights(device: str) -> dict[str, Any]:
    """send_weights / receive_weights over 'tp': packed (small buckets, 2 and 3 buffers) and
    unpacked, with the receivers' expectations checked."""
    dev = _dev(device)
    out: dict[str, Any] = {}
    modes = {"packed": {"bucket_bytes": 4096}, "three": {"bucket_bytes": 1024, "num_buffers": 3},
             "unpacked": {"packed": False}}  # fmt: skip
    for key, kw in modes.items():
        if topo.axis_index("tp") == 0:
            out[key] = topo.transfer.send_weights(_weights(dev), "tp", **kw).calls
        else:
            out[key] = _receive("tp", expect=dict(_weights(dev)))
    return out


def weights_bridge(device: str) -> dict[str, Any]:
    """The trainer → inference bridge: the 4 ranks join ``topo.transfer.bridge`` on a port
    rank 0 picks; bridge rank 0 sends, packed and not."""
    ctx, dev = topo.current(), _dev(device)
    if ctx.rank == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        data = ctx.coordinator.broadcast(str(port).encode(), src=0)
    else:
        data = ctx.coordinator.broadcast(None, src=0)
    out: dict[str, Any] = {}
    with topo.transfer.bridge(
        "127.0.0.1", int(data), rank=ctx.rank, world_size=4, timeout=60,
        device=ctx.device if device == "cuda" else None,
    ) as b:  # fmt: skip
        for key, kw in {"packed": {"bucket_bytes": 2048}, "unpacked": {"packed": False}}.items():
            if b.rank == 0:
                out[key] = topo.transfer.send_weights(_weights(dev), "bridge", **kw).calls
            else:
                out[key] = _receive("bridge")
    return out


def torch_group(device: str) -> dict[str, Any]:
    """torch.distributed and functional collectives on ``ctx.torch_group(axis, device_type)``."""
    import torch.distributed._functional_collectives as funcol

    ctx, dev = topo.current(), _dev(device)
    out: dict[str, Any] = {}
    x = (torch.arange(8, dtype=torch.float32).reshape(4, 2) + 10 * ctx.rank).to(dev)
    for axis in ("tp", "dp", ("dp", "tp")):
        key = axis if isinstance(axis, str) else "dp,tp"
        pg = ctx.torch_group(axis, device_type=device)
        reduced = x.clone()
        dist.all_reduce(reduced, group=pg)
        gathered = torch.empty(pg.size() * 4, 2, device=dev)
        dist.all_gather_into_tensor(gathered, x, group=pg)
        scattered = torch.empty(4 // pg.size(), 2, device=dev)
        _REDUCE_SCATTER(scattered, x, group=pg)
        broadcast = x.clone()
        dist.broadcast(broadcast, src=dist.get_global_rank(pg, pg.size() - 1), group=pg)
        out[key] = {
            "all_reduce": reduced,
            "all_gather": gathered,
            "reduce_scatter": scattered,
            "broadcast": broadcast,
            "f_all_reduce": funcol.all_reduce(x, "sum", pg).wait(),
            "f_all_gather": funcol.all_gather_tensor(x, 0, pg).wait(),
        }
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return _cpu(out)


#: torch >= 2.13 renames reduce_scatter_tensor (deprecated) to reduce_scatter_single.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def dtensor(device: str) -> dict[str, Any]:
    """DTensor sharding and an op with communication on ``ctx.torch_mesh(device_type)``."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ctx = topo.current()
    dm = ctx.torch_mesh(device_type=device)
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 7
    sharded = distribute_tensor(w, dm, [Shard(0), Shard(1)])
    rows = distribute_tensor(w, dm, [Replicate(), Shard(0)])
    out = {
        "local": sharded.to_local(),
        "full": sharded.full_tensor(),
        "matmul": (rows @ rows.T).full_tensor(),
        "rowsum": rows.sum(dim=1).full_tensor(),
    }
    return _cpu(out)


def fsdp2_step(device: str) -> dict[str, Any]:
    """One FSDP2 (over dp) + tensor-parallel (over tp) step of examples/fsdp2_tp.py."""
    import fsdp2_tp

    os.environ["TOPO_EXAMPLE_DEVICE"] = device
    try:
        return fsdp2_tp.train_step()
    finally:
        del os.environ["TOPO_EXAMPLE_DEVICE"]


def gradients(device: str) -> dict[str, Any]:
    """Every differentiable collective's forward and gradient (test_autograd's cases); on
    CUDA autograd runs the backward on its own device thread."""
    return _autograd_fns.grad_cases(device=device)


def regions(device: str) -> dict[str, Any]:
    """Megatron's four regions in a tensor-parallel MLP."""
    return _autograd_fns.tp_mlp(device=device)


def compiled(device: str) -> dict[str, Any]:
    """torch.compile(fullgraph=True) of test_autograd's model: forward, backward, the gather;
    then the same compiled graph with its backward in a thread with no active mesh."""
    ctx, dev = topo.current(), _dev(device)
    x = _autograd_fns.rank_input(ctx.rank, 1).float().to(dev).requires_grad_(True)
    w = _autograd_fns.rank_input(ctx.rank, 2).float().to(dev).requires_grad_(True)
    use = topo.axis_index("tp") == 0
    fn = torch.compile(
        _autograd_fns.model, fullgraph=True, options={"reorder_for_peak_memory": False}
    )
    loss, gathered = fn(x, w, use)
    loss.backward()
    out: dict[str, Any] = {"loss": loss, "x": x.grad, "w": w.grad, "gathered": gathered}
    x.grad = w.grad = None
    again, _ = fn(x, w, use)
    _autograd_fns.backward(again, elsewhere=True)
    out.update(again=again, x_again=x.grad, w_again=w.grad)
    return _cpu(out)


def graphs(device: str) -> dict[str, Any]:
    """An all_reduce and an all_gather captured once in a CUDA graph and replayed with new
    inputs three times (on the CPU: the same calls, eagerly)."""
    ctx, dev = topo.current(), _dev(device)
    inp = torch.zeros(16, device=dev)
    out: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        with topo.graph_capture(axes=["tp", ("dp", "tp")]) as graph:
            summed = topo.all_reduce(inp, axis="tp")
            gathered = topo.all_gather(inp, axis=("dp", "tp"))
        for step in range(3):
            inp.fill_(float(ctx.rank + step))
            graph.replay()
            torch.cuda.synchronize()
            out[f"step{step}"] = (summed.cpu(), gathered.cpu())
    else:
        for step in range(3):
            inp.fill_(float(ctx.rank + step))
            out[f"step{step}"] = (topo.all_reduce(inp, "tp"), topo.all_gather(inp, ("dp", "tp")))
    return out


def out_versions(device: str) -> dict[str, Any]:
    """Every ``out=`` collective moves the buffer's version counter (NCCL and gloo write it
    behind autograd's back), so a graph that saved the buffer refuses it at backward."""
    return _spawn_fns.out_writes_bump_versions(device)


def watchdog(device: str) -> dict[str, Any]:
    """An activation with the NCCL watchdog on: collectives give the same results and the
    watchdog reports nothing."""
    ctx, dev = topo.current(), _dev(device)
    out: dict[str, Any] = {}
    with MESH.activate(ctx.world, name="watched", watchdog=0.05, timeout=60,
                       device=ctx.device) as watched:  # fmt: skip
        x = torch.arange(6, dtype=torch.float32, device=dev) + ctx.rank
        for _i in range(20):
            x = topo.all_reduce(x, "tp") / 2 + topo.all_gather(x, "dp").sum() / 100
        time.sleep(0.3)  # a few polls
        out["value"] = x.cpu()
        errors = [getattr(c, "async_error", None) for c in watched._communicators.values()]
        out["async_errors"] = [e for e in errors if e is not None]
    return out


#: Every path, in the order they run.
PATHS: dict[str, Callable[[str], Any]] = {
    "collectives": collectives,
    "v-collectives": v_collectives,
    "all_to_allv + MoE": uneven_all_to_all,
    "tensor dicts": tensor_dicts,
    "objects": objects,
    "weight transfer": weights,
    "weight transfer over a bridge": weights_bridge,
    "torch_group": torch_group,
    "torch_mesh + DTensor": dtensor,
    "FSDP2 + TP step": fsdp2_step,
    "gradients": gradients,
    "Megatron regions": regions,
    "torch.compile forward + backward": compiled,
    "CUDA graphs": graphs,
    "out= versions": out_versions,
    "watchdog": watchdog,
}


def all_paths(device: str) -> dict[str, Any]:
    """Run every path on ``device`` tensors; ``{path: result or {"error": traceback}}`` plus
    ``"seconds"`` per path."""
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, path in PATHS.items():
        started = time.perf_counter()
        try:
            results[name] = path(device)
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
        seconds[name] = time.perf_counter() - started
        state = "FAILED" if "error" in results[name] else "ok"
        print(f"[{device} rank {topo.current().rank}] {name}: {state} in {seconds[name]:.1f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    results["seconds"] = seconds
    return results
