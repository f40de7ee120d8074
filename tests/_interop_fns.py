"""Functions tests/test_interop.py runs on every rank with ``topo.spawn`` (module level, so
picklable). They only run torch's APIs on topo's groups and meshes and report what they got;
the parent computes every expected value from all ranks' inputs and the mesh's rank math.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed import distributed_c10d as c10d

import topo
from topo import DeviceMesh

WAIT = 60.0
AXES: list[Any] = ["tp", "dp", ("dp", "tp")]


def rank_input(rank: int) -> torch.Tensor:
    """Distinct per-rank input with a first dimension divisible by every group size."""
    return torch.arange(8, dtype=torch.float32).reshape(4, 2) * (rank + 1) + rank


def weight() -> torch.Tensor:
    """The same full matrix on every rank, for DTensor sharding."""
    return torch.arange(32, dtype=torch.float32).reshape(4, 8) / 7


def _torch_state() -> dict[str, Any]:
    """What torch has registered in this process (names only, comparable across calls)."""
    default = c10d._world.default_pg
    return {
        "default": None if default is None else c10d._world.pg_names.get(default),
        "names": sorted(c10d._world.pg_names.values()),
        "tags": sorted(k for k, v in c10d._world.tags_to_pg.items() if v),
    }


def _resolvable(name: str) -> bool:
    try:
        return c10d._resolve_process_group(name) is not None
    except (RuntimeError, ValueError, KeyError):
        return False


def _groups(ctx: topo.MeshContext) -> dict[str, Any]:
    """torch collectives, rank queries and functional collectives over each topo axis, through
    the gloo group and (``wrapper:`` keys) through the CUDA wrapper group with CPU tensors,
    which it forwards to topo's gloo communicator."""
    out: dict[str, Any] = {}
    x = rank_input(ctx.rank)
    for axis, device_type in [(a, "cpu") for a in AXES] + [(a, "cuda") for a in AXES[1:]]:
        pg = ctx.torch_group(axis, device_type=device_type)
        key = axis if isinstance(axis, str) else ".".join(axis)
        key = key if device_type == "cpu" else f"wrapper:{key}"
        reduced = x.clone()
        dist.all_reduce(reduced, group=pg)
        maxed = x.clone()
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=pg)
        gathered = torch.empty(pg.size() * 4, 2)
        dist.all_gather_into_tensor(gathered, x, group=pg)
        scattered = torch.empty(4 // pg.size(), 2)
        dist.reduce_scatter_tensor(scattered, x, group=pg)
        broadcast = x.clone()
        dist.broadcast(broadcast, src=dist.get_global_rank(pg, pg.size() - 1), group=pg)
        a2a = torch.empty(4, 2)
        dist.all_to_all_single(a2a, x, group=pg)
        listed = [torch.empty(4, 2) for _ in range(pg.size())]
        dist.all_gather(listed, x, group=pg)
        first, last = dist.get_global_rank(pg, 0), dist.get_global_rank(pg, pg.size() - 1)
        reduced_to_last = x.clone()
        dist.reduce(reduced_to_last, dst=last, group=pg)
        gathered_at_first = [torch.empty(4, 2) for _ in range(pg.size())] if ctx.rank == first else None
        dist.gather(x, gathered_at_first, dst=first, group=pg)
        scattered_from_first = torch.empty(4 // pg.size(), 2)
        chunks = list(x.chunk(pg.size())) if ctx.rank == first else None
        dist.scatter(scattered_from_first, chunks, src=first, group=pg)
        out[key] = {
            "same": topo.torch_group(axis, device_type=device_type) is pg,
            "all_to_all": a2a,
            "all_gather_list": torch.cat(listed),
            "rank": dist.get_rank(pg),
            "size": dist.get_world_size(pg),
            "ranks": dist.get_process_group_ranks(pg),
            "backend": str(dist.get_backend(pg)),
            "all_reduce": reduced,
            "max": maxed,
            "all_gather": gathered,
            "reduce_scatter": scattered,
            "broadcast": broadcast,
            "f_all_reduce": funcol.all_reduce(x, "sum", pg).wait(),
            "f_all_gather": funcol.all_gather_tensor(x, 0, pg).wait(),
            "f_by_name": funcol.all_reduce(x, "sum", pg.group_name).wait(),
            "f_reduce_scatter": _reduce_scatter(x, pg),
            "reduce": reduced_to_last if ctx.rank == last else None,
            "gather": None if gathered_at_first is None else torch.cat(gathered_at_first),
            "scatter": scattered_from_first,
            "name": pg.group_name,
        }
    return out


def _mesh(ctx: topo.MeshContext) -> dict[str, Any]:
    """The torch DeviceMesh's layout and groups, and DTensor sharding on it."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dm = ctx.torch_mesh(device_type="cpu")  # gloo: a GPU, if any, is not one per rank
    out: dict[str, Any] = {
        "same": ctx.torch_mesh(device_type="cpu") is dm and topo.torch_mesh(device_type="cpu") is dm,
        "names": dm.mesh_dim_names,
        "layout": dm.mesh.tolist(),
        "coordinate": dm.get_coordinate(),
        "groups": {n: dist.get_process_group_ranks(dm.get_group(n)) for n in ("dp", "tp")},
        "local_ranks": {n: dm.get_local_rank(n) for n in ("dp", "tp")},
        "group_is_topo": dm.get_group("tp") is ctx.torch_group("tp", device_type="cpu"),
    }
    w = weight()
    sharded = distribute_tensor(w, dm, [Shard(0), Shard(1)])
    out["local"] = sharded.to_local()
    out["full"] = sharded.full_tensor()
    rows = distribute_tensor(w, dm, [Replicate(), Shard(0)])
    out["matmul"] = (rows @ rows.T).full_tensor()  # a DTensor op with communication
    out["rowsum"] = rows.sum(dim=1).full_tensor()
    transposed = ctx.torch_mesh(("tp", "dp"), device_type="cpu")
    out["transposed"] = (transposed.mesh_dim_names, transposed.mesh.tolist())
    flat = ctx.torch_mesh((("dp", "tp"),), device_type="cpu")
    out["flat"] = (flat.mesh_dim_names, flat.mesh.tolist())
    out["from_torch"] = repr(DeviceMesh.from_torch(dm))
    return out


def _teardown(world: topo.World) -> dict[str, Any]:
    """Two activations, each with its own torch mesh; what remains registered after each."""
    out: dict[str, Any] = {"before": _torch_state()}
    with DeviceMesh(dp=2, tp=2).activate(world, name="interop-a", timeout=WAIT) as a:
        mesh_a = a.torch_mesh(device_type="cpu")
        out["default_a"] = _torch_state()["default"]
        with DeviceMesh(x=4).activate(world, name="interop-b", timeout=WAIT) as b:
            mesh_b = b.torch_mesh(device_type="cpu")
            names_b = [mesh_b.get_group("x").group_name]
            t = torch.ones(2) * world.rank
            dist.all_reduce(t, group=mesh_b.get_group("x"))
            u = torch.ones(2) * world.rank
            dist.all_reduce(u, group=mesh_a.get_group("tp"))  # the outer mesh still works
            out["inner"] = {"x_sum": t, "tp_sum": u, "distinct": names_b[0] not in
                            [mesh_a.get_group(n).group_name for n in ("dp", "tp")]}
        out["after_b"] = _torch_state()
        out["b_resolvable"] = [_resolvable(n) for n in names_b]
        names_a = [mesh_a.get_group(n).group_name for n in ("dp", "tp")]
    out["after_a"] = _torch_state()
    out["a_resolvable"] = [_resolvable(n) for n in names_a]
    out["is_initialized"] = dist.is_initialized()
    try:
        a.torch_mesh(device_type="cpu")
    except topo.NoActiveMeshError as error:
        out["closed_error"] = str(error)
    return out


def _user_default(world: topo.World, shuffled: bool) -> dict[str, Any]:
    """A user's own init_process_group before the activation survives it (same object, still
    working); with ``shuffled`` its ranks differ from topo's, so topo swaps its own in."""
    rank, n = world.rank, world.world_size
    user_rank = n - 1 - rank if shuffled else rank
    base = dist.TCPStore(world.master_addr, world.master_port, n, False, timeout=_timeout())
    store = dist.PrefixStore(f"user-{shuffled}", base)
    dist.init_process_group("gloo", store=store, rank=user_rank, world_size=n)
    user = c10d._world.default_pg
    out: dict[str, Any] = {}
    name = f"interop-user-{shuffled}"
    # Without shuffling, topo rendezvouses through the user's store (no second TCPStore).
    reuse = {} if shuffled else {"store": topo.torch_store()}
    with DeviceMesh(dp=2, tp=2).activate(world, name=name, timeout=WAIT, **reuse) as ctx:
        pg = ctx.torch_group("tp", device_type="cpu")
        out["tp_rank"] = dist.get_rank(pg)
        out["ranks"] = dist.get_process_group_ranks(pg)
        out["inside_is_user"] = c10d._world.default_pg is user
        dm = ctx.torch_mesh(device_type="cpu")
        out["coordinate"] = dm.get_coordinate()
    out["after_is_user"] = c10d._world.default_pg is user
    out["after_rank"] = dist.get_rank()
    t = torch.ones(1) * user_rank
    dist.all_reduce(t)  # the user's own group still works
    out["user_sum"] = t.item()
    dist.destroy_process_group()
    out["after_destroy"] = _torch_state()
    return out


def _timeout() -> Any:
    from datetime import timedelta

    return timedelta(seconds=WAIT)


def interop_main() -> dict[str, Any]:
    """Everything over one 2×2 spawn: registrations first (they need a clean process), then
    the spawn's own activation's groups, mesh, DTensor and the FSDP2 + TP example's step."""
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    ctx = topo.current()
    out: dict[str, Any] = {"rank": ctx.rank}
    out["teardown"] = _teardown(ctx.world)
    out["user_same"] = _user_default(ctx.world, shuffled=False)
    out["user_shuffled"] = _user_default(ctx.world, shuffled=True)
    out["groups"] = _groups(ctx)
    out["mesh"] = _mesh(ctx)
    import fsdp2_tp  # examples/, on sys.path in the parent and so here

    out["fsdp2_tp"] = fsdp2_tp.train_step()  # FSDP2 over dp + TP over tp on this activation
    return out


def _all_gather(x: torch.Tensor, pg: Any) -> torch.Tensor:
    gather = getattr(funcol, "all_gather_single", None)  # torch >= 2.12; older: *_tensor
    if gather is None:
        return funcol.all_gather_tensor(x, 0, pg).wait()
    return gather(x, 0, pg).wait()


def _reduce_scatter(x: torch.Tensor, pg: Any) -> torch.Tensor:
    scatter = getattr(funcol, "reduce_scatter_single", None)  # torch >= 2.12; older: *_tensor
    if scatter is None:
        return funcol.reduce_scatter_tensor(x, "sum", 0, pg).wait()
    return scatter(x, "sum", 0, pg).wait()


def stress_main(iters: int) -> dict[str, Any]:
    """torch's functional collectives interleaved with topo's own collectives on the same
    groups, ``iters`` times, through the gloo group (``tp``) and the CUDA wrapper group with
    CPU tensors (``dp``). Temporaries are dropped at once, as DTensor and FSDP2 do: before
    the wrapper served torch's coalesced calls in Python, this deadlocked a gloo worker
    against the GIL within the first few hundred iterations. Returns the sums seen."""
    ctx = topo.current()
    x = rank_input(ctx.rank)
    seen: dict[str, list[float]] = {}
    for axis, device_type in (("tp", "cpu"), ("dp", "cuda")):
        pg = ctx.torch_group(axis, device_type=device_type)
        sums = seen.setdefault(f"{axis}:{device_type}", [0.0] * 5)
        for i in range(iters):
            sums[0] += float(funcol.all_reduce(x, "sum", pg).wait().sum())
            sums[1] += float(_all_gather(x, pg).sum())
            sums[2] += float(topo.all_reduce(torch.full((3,), float(i)), axis=axis).sum())
            sums[3] += float(_all_gather(x, pg).sum())
            sums[4] += float(_reduce_scatter(x, pg).sum())
    return seen
