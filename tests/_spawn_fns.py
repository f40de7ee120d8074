"""Functions that tests run on every rank with ``topo.spawn`` (module level, so picklable).

The inputs and the list of cases live here too, so the parent can rebuild every rank's inputs
and compute its own reference from the mesh's pure rank math. Nothing in this module computes
an expected result: the ranks only run collectives and report what they got.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

import topo
from topo import DeviceMesh

#: Bound on every wait inside the ranks (the spawns themselves use timeout=120).
WAIT = 60.0

Case = tuple[str, str, str, dict[str, Any]]

# ----------------------------------------------------------------------------- inputs


def rank_inputs(rank: int) -> dict[str, torch.Tensor]:
    """Distinct, deterministic inputs of ``rank``: several dtypes, a 3-d tensor, 0-d tensors
    and a non-contiguous (transposed) tensor. Shapes have a dimension of 8, divisible by every
    group size in the tests."""
    r = rank
    grid = torch.arange(32).reshape(4, 8)
    f32 = grid.to(torch.float32) * (r + 1) + r
    return {
        "f32": f32,
        "f64": (grid.to(torch.float64) - 7.5) / (r + 3),
        "i64": grid * (r + 1) - 5 * r,
        "i32": (grid * (r + 2) - 3 * r).to(torch.int32),
        "bf16": (grid % 7 + r).to(torch.bfloat16),  # small integers: sums are exact
        "small": (grid % 3 + 1).to(torch.float32) + 0.25 * r,  # for prod
        "small_i": grid % 3 + (r % 3) - 1,  # for prod: values in -1..3
        "c64": torch.complex(f32, -f32 / 2),
        "bool": (grid % (r + 2)) == 0,
        "t3": torch.arange(48, dtype=torch.float64).reshape(2, 3, 8) + 100 * r,
        "scalar": torch.tensor(1.5 * r - 2.0, dtype=torch.float64),
        "scalar_i": torch.tensor(r - 1, dtype=torch.int64),
        "nc": (torch.arange(32, dtype=torch.float32).reshape(8, 4) * (r + 2) - r).t(),
    }


def rank_object(rank: int) -> dict[str, Any]:
    """A picklable object whose size differs per rank."""
    return {"rank": rank, "name": f"rank-{rank}", "items": list(range(rank * 3)), "t": (rank,)}


def cases(n: int) -> list[Case]:
    """Every (key, collective, input name, kwargs) run on a group of size ``n``, in order."""
    out: list[Case] = []

    def add(collective: str, name: str, **kw: Any) -> None:
        key = f"{collective}/{name}/" + ",".join(f"{k}={v}" for k, v in kw.items())
        out.append((key, collective, name, kw))

    for name in ("f32", "f64", "nc", "scalar", "bf16"):
        for op in ("sum", "avg", "max", "min"):
            add("all_reduce", name, op=op)
    for name in ("i64", "i32", "scalar_i"):
        for op in ("sum", "max", "min"):
            add("all_reduce", name, op=op)
    for name in ("small", "small_i", "scalar", "scalar_i"):
        add("all_reduce", name, op="prod")

    for name, dim in [
        ("f32", 0), ("f32", 1), ("t3", 1), ("t3", -2), ("t3", -1), ("c64", 0),
        ("bool", -1), ("nc", 0), ("nc", 1), ("bf16", 1), ("i32", -2),
    ]:  # fmt: skip
        add("all_gather", name, dim=dim)

    for name, dim, op in [
        ("f32", 1, "sum"), ("f32", -1, "max"), ("i64", 1, "min"), ("f64", 1, "avg"),
        ("small", 1, "prod"), ("t3", 2, "sum"), ("t3", -1, "min"), ("nc", 1, "sum"),
        ("bf16", -1, "sum"), ("i32", 1, "sum"),
    ]:  # fmt: skip
        add("reduce_scatter", name, dim=dim, op=op)

    for name, src in [
        ("f32", n - 1), ("c64", n // 2), ("scalar", n - 1), ("nc", 0), ("bool", n - 1),
        ("bf16", 0),
    ]:  # fmt: skip
        add("broadcast", name, src=src)

    for name, dim, src in [
        ("f32", 1, n - 1), ("bool", -1, n // 2), ("t3", 2, 0), ("nc", 1, n - 1), ("c64", 1, n - 1),
    ]:  # fmt: skip
        add("scatter", name, dim=dim, src=src)

    for name, dim, dst in [("f32", 0, n - 1), ("c64", 1, n // 2), ("t3", -2, 0), ("nc", 1, n - 1)]:
        add("gather", name, dim=dim, dst=dst)

    for name, split, concat in [
        ("f32", 1, 0), ("t3", 2, 1), ("c64", 1, 1), ("nc", 1, 0), ("i64", -1, -2), ("bool", 1, 0),
        ("t3", -1, 0),
    ]:  # fmt: skip
        add("all_to_all", name, split_dim=split, concat_dim=concat)

    if 4 % n == 0:  # dim 0 of the (4, 8) inputs splits evenly
        add("reduce_scatter", "f32", dim=0, op="sum")
        add("scatter", "f32", dim=0, src=n - 1)
        add("all_to_all", "f32", split_dim=0, concat_dim=1)

    ring = [(i, (i + 1) % n) for i in range(n)]
    back = [(i, (i - 1) % n) for i in range(n)]
    partial = [(0, n - 1)] + [(i, i - 1) for i in range(2, n)]  # index 0 receives zeros
    identity = [(i, i) for i in range(n)]
    add("ppermute", "f32", perm=ring)
    add("ppermute", "c64", perm=back)
    add("ppermute", "f64", perm=partial)
    add("ppermute", "bool", perm=identity)
    add("ppermute", "scalar", perm=ring)
    add("ppermute", "nc", perm=partial)
    add("ppermute", "i64", perm=[])

    for name, offset, wrap in [
        ("f32", 1, True), ("f32", 1, False), ("i64", 2, True), ("i64", 2, False),
        ("c64", -1, True), ("bf16", -1, False), ("nc", 1, False), ("scalar", 3, True),
        ("bool", 1, True),
    ]:  # fmt: skip
        add("shift", name, offset=offset, wrap=wrap)
    return out


# ----------------------------------------------------------------------------- the suite


def _call(collective: str, x: torch.Tensor, axis: Any, kw: dict[str, Any]) -> Any:
    fn = getattr(topo, collective)
    return fn(x, axis, **kw)


def run_suite(axes: list[Any]) -> dict[str, Any]:
    """Run every case of :func:`cases` on each axis of the innermost mesh; report the results,
    the point-to-point results, the object collectives, barrier checks and the inputs as they
    are afterwards (to check that nothing was mutated)."""
    ctx = topo.current()
    rank = ctx.rank
    x = rank_inputs(rank)
    results: dict[tuple[Any, str], Any] = {}
    for axis in axes:
        n = topo.axis_size(axis)
        me = topo.axis_index(axis)
        results[(axis, "axis_size")] = n
        results[(axis, "axis_index")] = me
        for key, collective, name, kw in cases(n):
            results[(axis, key)] = _call(collective, x[name], axis, kw)
        results[(axis, "broadcast_object")] = topo.broadcast_object(
            rank_object(rank), axis, src=n - 1
        )
        results[(axis, "all_gather_object")] = topo.all_gather_object(rank_object(rank), axis)
        # send/recv: index 0 -> n-1 (float32), n-1 -> 0 (complex64, into a contiguous out=),
        # 1 -> 2 (a non-contiguous tensor, into a non-contiguous out=)
        if n >= 2:
            if me == 0:
                topo.send(x["f32"], axis, dst=n - 1)
                out = torch.full((4, 8), -1, dtype=torch.complex64)
                got = topo.recv((4, 8), torch.complex64, axis, src=n - 1, out=out)
                results[(axis, "recv/c64")] = got
                results[(axis, "recv/c64 is out")] = got is out
            if me == n - 1:
                results[(axis, "recv/f32")] = topo.recv(torch.Size([4, 8]), torch.float32, axis, 0)
                topo.send(x["c64"], axis, dst=0)
        if n >= 3:
            if me == 1:
                topo.send(x["nc"], axis, dst=2)
            if me == 2:
                strided = torch.full((8, 4), -1.0).t()  # (4, 8), not contiguous
                got = topo.recv([4, 8], torch.float32, axis, src=1, out=strided)
                results[(axis, "recv/nc")] = got
                results[(axis, "recv/nc is out")] = got is strided
        # barrier(axis): every member's mark is in the store once the barrier returns
        store = ctx.coordinator.store
        label = "+".join(axis) if isinstance(axis, tuple) else axis
        store.set(f"test-barrier/{label}/{rank}", b"1")
        topo.barrier(axis)
        group = ctx.mesh.group(axis, rank)
        results[(axis, "barrier_marks")] = store.check([f"test-barrier/{label}/{r}" for r in group])
    topo.barrier()
    return {"rank": rank, "results": results, "inputs_after": x}


# ----------------------------------------------------------------------------- extras


def _nested(world: topo.World, x: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    outer = topo.current()
    with DeviceMesh(tp=4).activate(world, name="nested-tp", timeout=WAIT) as inner:
        out["depth"] = len(topo.active_contexts())
        out["current_is_inner"] = topo.current() is inner
        out["tp_size"] = topo.axis_size("tp")  # the inner mesh's tp wins
        out["tp_index"] = topo.axis_index("tp")
        out["dp_size"] = topo.axis_size("dp")  # only the outer mesh has dp
        out["dp_index"] = topo.axis_index("dp")
        out["tp_sum"] = topo.all_reduce(x, "tp")
        out["dp_sum"] = topo.all_reduce(x, "dp")
        with DeviceMesh(a=2, b=2).activate(world, name="nested-ab", timeout=WAIT):
            out["depth2"] = len(topo.active_contexts())
            out["ab_gather"] = topo.all_gather(x, ("a", "b"))
            out["b_gather"] = topo.all_gather(x, "b")
            out["tp_size2"] = topo.axis_size("tp")
            out["dp_sum2"] = topo.all_reduce(x, "dp")
            try:
                topo.all_reduce(x, "zz")
            except ValueError as error:
                out["unknown"] = str(error)
        out["depth_after_ab"] = len(topo.active_contexts())
    out["inner_repr"] = repr(inner)
    out["depth_after"] = len(topo.active_contexts())
    out["current_is_outer"] = topo.current() is outer
    out["tp_size_after"] = topo.axis_size("tp")
    out["tp_sum_after"] = topo.all_reduce(x, "tp")
    return out


def _side_by_side(world: topo.World, x: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(DeviceMesh(xfer=4).activate(world, name="xfer", timeout=WAIT))
        stack.enter_context(DeviceMesh(row=2, col=2).activate(world, name="grid", timeout=WAIT))
        out["xfer1"] = topo.all_reduce(x, "xfer")
        out["col"] = topo.all_gather(x, "col")
        out["row"] = topo.all_reduce(x, "row", op="max")
        out["xfer2"] = topo.broadcast(x, "xfer", src=3)
        out["tp"] = topo.all_reduce(x, "tp")  # the spawned mesh is still reachable
        out["depth"] = len(topo.active_contexts())
    return out


def _thread_body(
    world: topo.World, mesh: DeviceMesh, name: str, axis: str, x: torch.Tensor, out: dict[str, Any]
) -> None:
    try:
        out["before"] = len(topo.active_contexts())
        with mesh.activate(world, name=name, timeout=WAIT) as ctx:
            out["inside"] = [c.mesh for c in topo.active_contexts()]
            out["current_is_own"] = topo.current() is ctx
            sums = []
            for i in range(5):
                sums.append(topo.all_reduce(x + i, axis))
                time.sleep(0.01)
            out["sums"] = sums
            out["gather"] = topo.all_gather(x, axis)
        out["after"] = len(topo.active_contexts())
    except BaseException as error:  # reported to the parent, which fails the test
        out["error"] = f"{type(error).__name__}: {error}"


def _threads(world: topo.World, x: torch.Tensor) -> dict[str, Any]:
    outer = topo.current()
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    threads = [
        threading.Thread(
            target=_thread_body,
            args=(world, DeviceMesh(dp=2, tp=2), "thread-a", "tp", x, a),
        ),
        threading.Thread(
            target=_thread_body, args=(world, DeviceMesh(all4=4), "thread-b", "all4", x * 10, b)
        ),
    ]
    for thread in threads:
        thread.start()
    during = [c is outer for c in topo.active_contexts()]
    for thread in threads:
        thread.join(WAIT * 2)
    return {
        "a": a,
        "b": b,
        "alive": [t.is_alive() for t in threads],
        "main_during": during,
        "main_after": [c is outer for c in topo.active_contexts()],
    }


def _reactivate(world: topo.World, x: torch.Tensor, times: int) -> dict[str, Any]:
    """Activate the same mesh ``times`` times on one explicit store; report its key count."""
    from torch.distributed import TCPStore

    rank = world.rank
    wait = timedelta(seconds=WAIT)
    host = TCPStore("127.0.0.1", 0, None, True, wait, wait_for_workers=False) if rank == 0 else None
    port = topo.broadcast_object(host.port if host is not None else None, ("dp", "tp"), src=0)
    store = host if host is not None else TCPStore("127.0.0.1", port, None, False, wait)
    keys, sums, ops = [], [], []
    for i in range(times):
        with DeviceMesh(dp=2, tp=2).activate(world, store=store, timeout=WAIT) as ctx:
            sums.append(topo.all_reduce(x + i, "tp"))
            sums.append(topo.all_gather(x + i, "dp"))
            topo.barrier()
            ops.append(ctx.store_ops)
        topo.barrier()  # the spawned mesh: every rank has closed activation i
        keys.append(store.num_keys())
        topo.barrier()  # every rank has counted before anyone activates again
    return {"keys": keys, "sums": sums, "ops": ops}


def _store_ops(world: topo.World, mesh: DeviceMesh, x: torch.Tensor) -> int:
    with mesh.activate(world, name="store-ops", timeout=WAIT) as ctx:
        topo.all_reduce(x, "tp")
        return ctx.store_ops


def _errors(x: torch.Tensor) -> dict[str, tuple[str, str]]:
    """Argument errors that need an axis of size >= 2; the context stays usable afterwards."""
    me = topo.axis_index("tp")
    attempts: dict[str, Any] = {
        "reduce_scatter_uneven": lambda: topo.reduce_scatter(torch.ones(3), "tp"),
        "scatter_uneven": lambda: topo.scatter(torch.ones(2, 3), "tp", dim=1),
        "all_to_all_uneven": lambda: topo.all_to_all(torch.ones(5), "dp"),
        "broadcast_src_range": lambda: topo.broadcast(x, "tp", src=2),
        "gather_dst_range": lambda: topo.gather(x, ("dp", "tp"), dst=4),
        "scatter_src_negative": lambda: topo.scatter(x, "tp", src=-1, dim=1),
        "broadcast_src_bool": lambda: topo.broadcast(x, "tp", src=True),
        "ppermute_duplicate_dst": lambda: topo.ppermute(x, "tp", [(0, 1), (1, 1)]),
        "ppermute_duplicate_src": lambda: topo.ppermute(x, "tp", [(0, 1), (0, 0)]),
        "ppermute_range": lambda: topo.ppermute(x, "tp", [(0, 2)]),
        "send_self": lambda: topo.send(x, "tp", dst=me),
        "recv_self": lambda: topo.recv((4, 8), torch.float32, "tp", src=me),
        "unknown_axis": lambda: topo.all_reduce(x, "ep"),
    }
    out: dict[str, tuple[str, str]] = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except Exception as error:
            out[name] = (type(error).__name__, str(error))
        else:
            out[name] = ("no error", "")
    return out


def _coordinator() -> dict[str, Any]:
    """The activation's Coordinator: byte broadcast, object all-gather and barriers over all
    ranks and over subsets (only the members call)."""
    coord = topo.current().coordinator
    rank = coord.rank
    out: dict[str, Any] = {"is_master": coord.is_master, "is_local_master": coord.is_local_master}
    out["bcast_all"] = coord.broadcast(b"from-2" if rank == 2 else None, src=2)
    if rank in (1, 3):
        out["bcast_13"] = coord.broadcast(b"from-3" if rank == 3 else None, src=3, ranks=(1, 3))
        out["gather_13"] = coord.all_gather_json({"r": rank}, ranks=(1, 3))
        coord.barrier("pair", ranks=(1, 3))
    out["gather_all"] = coord.all_gather_json(("rank", rank, "x" * rank))
    for i in range(3):  # repeated rounds of one scope
        out[f"bcast_round{i}"] = coord.broadcast(bytes([i, rank]) if rank == i else None, src=i)
    try:
        coord.broadcast(b"", src=7)
    except ValueError as error:
        out["bad_src"] = str(error)
    coord.barrier()
    return out


def mesh_main(axes: list[Any], extras: list[str]) -> dict[str, Any]:
    """The function spawned on each mesh: the suite on ``axes``, then the named extras."""
    report = run_suite(axes)
    ctx = topo.current()
    world = ctx.world
    x = rank_inputs(ctx.rank)["f32"]
    if "errors" in extras:
        report["errors"] = _errors(x)
        report["after_errors"] = topo.all_reduce(x, "tp")
    if "coordinator" in extras:
        report["coordinator"] = _coordinator()
    if "nested" in extras:
        report["nested"] = _nested(world, x)
    if "side_by_side" in extras:
        report["side_by_side"] = _side_by_side(world, x)
    if "threads" in extras:
        report["threads"] = _threads(world, x)
    if "reactivate" in extras:
        report["reactivate"] = _reactivate(world, x, times=6)
    if "store_ops" in extras:
        report["store_ops"] = _store_ops(world, ctx.mesh, x)
    report["world"] = world
    report["pid"] = os.getpid()
    return report


# ----------------------------------------------------------------------------- failures


def raise_on_rank(bad: int) -> None:
    if topo.current().rank == bad:
        raise KeyError(f"deliberate failure on rank {bad}")
    topo.barrier()  # the others wait here until the parent ends them
    time.sleep(100)


def exit_on_rank(bad: int, code: int) -> None:
    if topo.current().rank == bad:
        os._exit(code)
    time.sleep(100)


def rank3_goes_missing(outdir: str, short: float) -> None:
    """Rank 3 takes part in nothing after two (short-timeout) activations and one collective.
    The others first catch three timeouts (a nested activation, a communicator rendezvous, a
    collective on an existing communicator) and write what they caught to ``outdir``; then a
    barrier times out uncaught.

    The spawned activation keeps its long timeout (a rank that starts slowly on a loaded
    machine must not fail it); the activations with the short timeout reuse its store, so
    they open no new store connections."""
    outer = topo.current()
    store = outer.coordinator.store
    world = outer.world
    with contextlib.ExitStack() as stack:
        ctx = stack.enter_context(
            DeviceMesh(dp=2, tp=2).activate(world, timeout=short, store=store, name="short")
        )
        stack.enter_context(
            DeviceMesh(every=4).activate(world, timeout=short, store=store, name="short2")
        )
        topo.all_reduce(torch.ones(2), "every")  # every rank creates this communicator
        rank = ctx.rank
        if rank == 3:
            time.sleep(100)
            return
        caught: dict[str, Any] = {}
        start = time.monotonic()
        try:
            with DeviceMesh(a=4).activate(world, timeout=1.5, store=store, name="never"):
                caught["activation"] = "no error"
        except topo.RendezvousTimeout as error:
            caught["activation"] = str(error)
        caught["activation_s"] = time.monotonic() - start
        for step, axis in (("communicator", ("dp", "tp")), ("collective", "every")):
            start = time.monotonic()
            try:
                topo.all_reduce(torch.ones(2), axis)
                caught[step] = ("no error", "")
            except Exception as error:
                caught[step] = (type(error).__name__, str(error))
            caught[f"{step}_s"] = time.monotonic() - start
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(caught))
        topo.barrier(("dp", "tp"))


def small_job(tag: int) -> tuple[int, int, float, int, str, str]:
    ctx = topo.current()
    total = topo.all_reduce(torch.tensor([float(tag * 10 + ctx.rank)]), "tp")
    env = f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
    return tag, ctx.rank, float(total.item()), ctx.world.master_port, env, os.environ["TEST_TAG"]


def back_to_back_on_own_store(times: int) -> list[float]:
    """Activate a mesh several times in a row on a world whose store rank 0 hosts itself
    (nothing else keeps that server alive between activations, as under srun or mpirun)."""
    import socket

    ctx = topo.current()
    if ctx.rank == 0:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        payload: bytes | None = str(port).encode()
    else:
        payload = None
    port = int(ctx.coordinator.broadcast(payload, src=0))
    world = topo.World(rank=ctx.rank, world_size=ctx.world.world_size, master_port=port)
    sums = []
    for i in range(times):
        with DeviceMesh(a=world.world_size).activate(world, timeout=60):
            sums.append(float(topo.all_reduce(torch.tensor([float(i)]), axis="a").item()))
        with DeviceMesh(a=world.world_size).activate(world, timeout=60):
            pass  # an empty block: the quickest close-then-join
    return sums


def stop_rank_then_all_reduce(victim: int) -> float:
    """Rank ``victim`` stops itself (SIGSTOP) before an all_reduce the others wait on."""
    import os
    import signal

    if topo.current().rank == victim:
        os.kill(os.getpid(), signal.SIGSTOP)
    return float(topo.all_reduce(torch.ones(1), axis=("dp", "tp")).item())


def repeated_sends(calls: int) -> list[int]:
    """Index 0 sends one tensor ``calls`` times to index 1 along "pp", which receives them;
    each rank reports how many tensors its pair communicator holds for gloo's worker after
    every call (tests/test_handoff.py)."""
    ctx = topo.current()
    me = ctx.axis_index("pp")
    x = torch.ones(1)
    held = []
    for _ in range(calls):
        if me == 0:
            topo.send(x, "pp", dst=1)
        else:
            topo.recv((1,), torch.float32, "pp", src=0)
        held.append(len(ctx.pair_communicator(("pp",), 1 - me, "cpu").handed))  # type: ignore[attr-defined]
    return held


def under_default_device(device: str) -> dict[str, Any]:
    """CPU collectives of rank-dependent values inside ``with torch.device(device):`` (as
    around a model's deferred init): what each returns, and the devices of its tensors."""
    me = topo.axis_index("tp")
    x = torch.tensor([1.0 + me, 10.0 * (me + 1)], device="cpu")
    with torch.device(device):
        got = {
            "broadcast_object": topo.broadcast_object({"from": me}, axis="tp", src=1),
            "empty tensor object": topo.broadcast_object(torch.zeros(0, device="cpu"), "tp"),
            "all_gather_object": topo.all_gather_object(f"rank {me}", axis="tp"),
            "all_gather": topo.all_gather(x, axis="tp"),
            "broadcast": topo.broadcast(x, axis="tp", src=1),
            "reduce_scatter": topo.reduce_scatter(x, axis="tp"),
            "all_to_all": topo.all_to_all(x, axis="tp"),
            "all_gatherv": topo.all_gatherv(x[: me + 1], axis="tp"),
            "broadcast_tensor_dict": topo.broadcast_tensor_dict(
                {"x": x, "step": 3} if me == 1 else None, axis="tp", src=1
            )["x"],
        }
    return {
        k: (v.tolist(), v.device.type) if isinstance(v, torch.Tensor) else v for k, v in got.items()
    }


def recv_into_views() -> dict[str, Any]:
    """Index 0 sends three tensors; index 1 receives them into ``out=`` tensors that gloo
    cannot take as they are or that autograd watches: a lazy ``conj()`` view, and a plain
    buffer that a graph saved before the receive (its backward must refuse the changed data,
    as after any in-place op)."""
    c = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (1 + 2j)
    c = c.to(torch.complex64)
    if topo.axis_index("pp") == 0:
        topo.send(c, "pp", dst=1)
        topo.send(torch.full((3,), 7.0), "pp", dst=1)
        topo.send(torch.full((3,), 8.0), "pp", dst=1)
        return {}
    base = torch.zeros(2, 3, dtype=torch.complex64)
    conj_view = base.conj()
    got = topo.recv((2, 3), torch.complex64, "pp", src=0, out=conj_view)
    buf = torch.zeros(3)
    version = buf._version
    topo.recv((3,), torch.float32, "pp", src=0, out=buf)
    bumped = buf._version > version
    w = torch.ones(3, requires_grad=True)
    loss = (buf * w).sum()  # saves buf (7s) for w's gradient
    topo.recv((3,), torch.float32, "pp", src=0, out=buf)  # the next micro-batch (8s)
    try:
        loss.backward()
        refused = False
    except RuntimeError as error:
        refused = "inplace operation" in str(error)
    return {
        "conj is out": got is conj_view,
        "conj value": got.resolve_conj().tolist() == c.tolist(),
        "base": base.tolist() == c.conj().tolist(),
        "version bumped": bumped,
        "buf": buf.tolist(),
        "backward refused": refused,
    }


def shared_gloo_devices() -> dict[str, Any]:
    """In a fresh dp×tp activation: which gloo devices the axis and pair communicators run
    over, the collectives' results over both axes, and what is shared after the close."""
    world = topo.current().world
    mesh = topo.DeviceMesh(dp=2, tp=2)
    with mesh.activate(name="shared-devices") as ctx:
        x = torch.tensor([float(world.rank + 1)])
        sums = {axis: topo.all_reduce(x, axis).item() for axis in ("dp", "tp")}
        peer = 1 - topo.axis_index("tp")
        if peer == 1:
            topo.send(x, "tp", dst=peer)
            received = None
        else:
            received = topo.recv((1,), torch.float32, "tp", src=peer).item()
        comms = [ctx.communicator(("dp",), "cpu"), ctx.communicator(("tp",), "cpu"),
                 ctx.pair_communicator(("tp",), peer, "cpu")]  # fmt: skip
        shared = list(ctx.coordinator.shared.values())
        same = [comm.devices is shared[0] for comm in comms]  # type: ignore[attr-defined]
    return {"sums": sums, "received": received, "entries": len(shared), "same": same,
            "after": dict(ctx.coordinator.shared)}  # fmt: skip


def out_writes_bump_versions(device: str = "cpu") -> dict[str, list[bool]]:
    """Every ``out=`` collective over "tp", into a contiguous buffer (the communicator writes
    into its memory) or in place: ``[the buffer's version moved, a graph that saved the buffer
    before refused it at backward]`` — what a torch op's ``out=`` gives."""
    dev = topo.current().device if device == "cuda" else torch.device("cpu")
    n = topo.axis_size("tp")
    x = torch.ones(4, device=dev)
    cases: dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], object]]] = {
        "all_reduce in place": (x.clone(), lambda b: topo.all_reduce(b, "tp", out=b)),
        "all_reduce": (x.clone(), lambda b: topo.all_reduce(x, "tp", out=b)),
        "broadcast in place": (x.clone(), lambda b: topo.broadcast(b, "tp", src=0, out=b)),
        "broadcast": (x.clone(), lambda b: topo.broadcast(x, "tp", src=0, out=b)),
        "all_gather": (x.repeat(n), lambda b: topo.all_gather(x, "tp", out=b)),
        "reduce_scatter": (x.clone(), lambda b: topo.reduce_scatter(x.repeat(n), "tp", out=b)),
    }
    got = {}
    for name, (buffer, write) in cases.items():
        w = torch.ones_like(buffer, requires_grad=True)
        loss = (buffer * w).sum()  # saves buffer for w's gradient
        version = buffer._version
        write(buffer)
        try:
            loss.backward()
            refused = False
        except RuntimeError as error:
            refused = "inplace operation" in str(error)
        got[name] = [buffer._version > version, refused]
    return got
