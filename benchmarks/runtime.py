"""Runtime figures for the runtime issue, printed (not asserted):

1. host time of ``topo.all_reduce`` on a 4-byte CPU tensor vs the raw ProcessGroupGloo
   allreduce of a clone on the same process group (and the raw in-place call, for reference),
   as the median of per-block ratios with their quartiles; plus the same comparison on a
   one-rank group in this process (host cost only, little scheduling noise);
2. 64 MiB ``topo.all_reduce`` in place (``out=x``) algbw vs the raw in-place call;
3. activating a 2×2 mesh and running one collective on each axis, vs torch's
   ``init_device_mesh`` on gloo (+ one collective per dim), in the same processes;
4. store operations per rank at activation (and for a first collective), at 4 and 8 ranks;
5. every collective on gloo (4 ranks, 4 B and 64 MiB per rank): topo allocating, topo with
   ``out=``, the raw call on the same process group and torch.distributed's function on it
   (``--gloo`` runs only this; ``--rounds N``: 4 B calls of each, interleaved call by call,
   default 600; ``--reps N``: 64 MiB calls of each, default 12, in an order where each
   implementation follows each other one equally often).

Run: ``python benchmarks/runtime.py`` (a few minutes on 2 cores); ``--small`` runs only
section 1 (under a minute). topo and raw calls are interleaved in blocks (in section 5 at
4 B, call by call) and the statistics are taken over blocks (calls), so that machine noise hits
both alike.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import topo
from topo.bench import RawGroup as _RawGroup
from topo.communicators.recorder import FlightRecorder

# ------------------------------------------------------------------------- on each rank


def small_all_reduce(blocks: int, per_block: int) -> dict[str, list[float]]:
    """Blocks of ``per_block`` calls, each kind in every position in turn: ``topo.all_reduce``
    (out-of-place: a new tensor per call), the raw ``ProcessGroupGloo`` allreduce of a clone
    (the like-for-like call: also a new tensor per call) and, for reference, the raw in-place
    allreduce.

    The raw calls go to the same ``ProcessGroupGloo`` object topo's communicator wraps. On a
    loaded 2-core machine a process group that sat idle while another one was busy runs the
    identical call up to ~1.8x slower for a whole block, so a raw call on a second process
    group measures which group was warm, not topo's cost."""
    import topo._dist as dist

    ctx = topo.current()
    names = ctx.mesh.axis_names
    x = torch.ones(1)
    raw_x = torch.ones(1)
    opts = dist.AllreduceOptions()
    topo.all_reduce(x, axis=names)  # creates the communicator
    comm: Any = ctx.communicator(names, "cpu")
    pg = comm.pg

    def run_topo() -> None:
        for _ in range(per_block):
            topo.all_reduce(x, axis=names)

    def run_raw() -> None:
        for _ in range(per_block):
            y = raw_x.clone()
            pg.allreduce([y], opts).wait()

    def run_inplace() -> None:
        for _ in range(per_block):
            pg.allreduce([raw_x], opts).wait()

    runs = {"topo": run_topo, "raw": run_raw, "raw in-place": run_inplace}
    for _ in range(2):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {which: [] for which in runs}
    orders = list(itertools.permutations(runs))  # every position for each, in turn
    for block in range(blocks):
        for which in orders[block % len(orders)]:
            pg.barrier(dist.BarrierOptions()).wait()
            start = time.perf_counter()
            runs[which]()
            times[which].append((time.perf_counter() - start) / per_block)
    return times


def host_cost_one_rank(blocks: int, calls: int) -> dict[str, list[float]]:
    """Host time per call on a one-rank gloo group in this process (no peers, so almost no
    scheduling noise): topo's gloo communicator ``all_reduce`` vs the raw allreduce of a
    clone on the same process group, alternating blocks."""
    from datetime import timedelta

    import torch.distributed as torch_dist

    import topo._dist as dist
    from topo.communicators.gloo import GlooCommunicator

    comm = GlooCommunicator(
        torch_dist.HashStore(), (0,), 0, timedelta(seconds=60), True, "one-rank bench group"
    )
    pg = comm.pg
    x = torch.ones(1)
    opts = dist.AllreduceOptions()

    def run_topo() -> None:
        for _ in range(calls):
            comm.all_reduce(x, "sum")

    def run_raw() -> None:
        for _ in range(calls):
            y = x.clone()
            pg.allreduce([y], opts).wait()

    runs = {"topo": run_topo, "raw": run_raw}
    times: dict[str, list[float]] = {"topo": [], "raw": []}
    run_topo(), run_raw()
    for block in range(blocks):
        for which in ("topo", "raw") if block % 2 == 0 else ("raw", "topo"):
            start = time.perf_counter()
            runs[which]()
            times[which].append((time.perf_counter() - start) / calls)
    comm.close()
    return times


class _StubCommunicator:
    """Returns the input as it is: isolates topo's own per-call work from communication."""

    def __init__(self, real: Any) -> None:
        self.ranks, self.index, self.label = real.ranks, real.index, real.label

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return x


def layer_overhead(calls: int) -> dict[str, float]:
    """Per-call cost of topo's layer (context lookup, validation, dispatch) with a stub
    communicator, of a 4-byte clone (the out-of-place copy), and of one flight record (which
    every gloo and NCCL call makes; the stub makes none)."""
    ctx = topo.current()
    names = ctx.mesh.axis_names
    key = (names, "cpu", None)
    real = ctx.communicator(names, "cpu")
    stub = _StubCommunicator(real)
    x = torch.ones(1)
    ctx._communicators[key] = stub  # type: ignore[assignment]
    flight = FlightRecorder()  # what each gloo and NCCL call records before it runs
    try:
        out = {}
        for label, fn in (
            ("topo.all_reduce (stub comm)", lambda: topo.all_reduce(x, axis=names)),
            ("stub comm called directly", lambda: stub.all_reduce(x, "sum")),
            ("x.clone() of 4 bytes", lambda: x.clone()),
            ("flight recorder, one record", lambda: flight.record("all_reduce", x.shape, x.dtype)),
        ):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best = min(best, (time.perf_counter() - start) / calls)
            out[label] = best
    finally:
        ctx._communicators[key] = real
    return out


def large_all_reduce(reps: int, nbytes: int) -> dict[str, list[float]]:
    ctx = topo.current()
    names = ctx.mesh.axis_names
    raw = _RawGroup(ctx, names)
    x = torch.ones(nbytes // 4)
    raw_x = torch.ones(nbytes // 4)
    opts = raw.dist.AllreduceOptions()
    topo.all_reduce(x, axis=names)
    raw.pg.allreduce([raw_x], opts).wait()
    topo_times, raw_times = [], []
    for rep in range(reps):
        order = ("topo", "raw") if rep % 2 == 0 else ("raw", "topo")
        for which in order:
            raw.pg.barrier(raw.dist.BarrierOptions()).wait()
            start = time.perf_counter()
            if which == "topo":  # in place, as the raw call: no 64 MiB clone in either
                topo.all_reduce(x, axis=names, out=x)
                topo_times.append(time.perf_counter() - start)
            else:
                raw.pg.allreduce([raw_x], opts).wait()
                raw_times.append(time.perf_counter() - start)
    return {"topo": topo_times, "raw": raw_times}


def activation_vs_init_device_mesh(reps: int) -> dict[str, list[float]]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    ctx = topo.current()
    world = ctx.world
    x = torch.ones(4)
    out: dict[str, list[float]] = {"topo": [], "torch": []}
    for rep in range(reps):
        # torch re-initialized on one store reads stale keys: give each rep a fresh store port
        port = int(
            ctx.coordinator.broadcast(str(_free_port()).encode() if world.rank == 0 else None)
        )
        for which in ("topo", "torch") if rep % 2 == 0 else ("torch", "topo"):
            ctx.coordinator.barrier("bench-start")
            start = time.perf_counter()
            if which == "topo":
                mesh = topo.DeviceMesh(dp=2, tp=2)
                with mesh.activate(world, name=f"bench-activate-{rep}"):
                    topo.all_reduce(x, axis="dp")
                    topo.all_reduce(x, axis="tp")
            else:
                dist.init_process_group(
                    "gloo",
                    init_method=f"tcp://127.0.0.1:{port}",
                    rank=world.rank,
                    world_size=world.world_size,
                )
                dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
                for dim in ("dp", "tp"):
                    y = x.clone()
                    dist.all_reduce(y, group=dm.get_group(dim))
                dist.destroy_process_group()
            out[which].append(time.perf_counter() - start)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_ops() -> dict[str, int]:
    ctx = topo.current()
    mesh = ctx.mesh
    x = torch.ones(1)
    with mesh.activate(ctx.world, name="bench-ops") as fresh:
        joined = fresh.store_ops
        topo.all_reduce(x, axis="tp")
        after_tp = fresh.store_ops
        topo.all_reduce(x, axis="dp")
        after_dp = fresh.store_ops
    return {"activation": joined, "first tp collective": after_tp - joined,
            "first dp collective": after_dp - after_tp}  # fmt: skip


def gloo_every_collective(nbytes: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Section 5 on each rank of a 4- or 2-rank mesh: every collective with ``nbytes`` per rank —
    topo allocating, topo with ``out=`` (where it has one), the raw call on the same
    ``ProcessGroupGloo`` topo's communicator wraps, into preallocated outputs, and
    ``torch.distributed``'s own function on that group (``ctx.torch_group``), allocating its
    output as a user of it does for the same result.

    Small messages (under 1 MiB): ``reps`` rounds of single calls, each round calling every
    implementation once in turn (the order rotates), each call timed on its own: the
    implementations share the machine's noise call by call, and the figure is the median
    over calls. Large ones: ``reps`` timed calls of each, in a balanced order
    (:func:`balanced_sequence`)."""
    import torch.distributed as torch_dist

    import topo._dist as dist

    ctx = topo.current()
    names = ctx.mesh.axis_names
    n, me = ctx.axis_size(names), ctx.axis_index(names)
    count = max(nbytes // 4, n)
    count -= count % n
    x, out = torch.ones(count), torch.empty(count)
    gathered, part = torch.empty(n * count), torch.empty(count // n)
    topo.all_reduce(x, axis=names)
    pg: Any = ctx.communicator(names, "cpu").pg  # type: ignore[attr-defined]
    group = ctx.torch_group(names)
    peer = me ^ 1  # pairs (0, 1), (2, 3) for send/recv
    ranks = ctx.group(names)
    sizes = [count if i % 2 == 0 else count // 2 for i in range(n)]
    mine = torch.ones(sizes[me])
    allreduce, bcast = dist.AllreduceOptions(), dist.BroadcastOptions()
    bcast.rootRank = 0
    reduce_scatter = torch_dist.ReduceScatterOptions()

    def raw_all_reduce() -> None:
        out.copy_(x)
        pg.allreduce([out], allreduce).wait()

    def topo_p2p() -> object:
        if me % 2 == 0:
            return topo.send(x, names, dst=peer)
        return topo.recv((count,), torch.float32, names, src=peer)

    def topo_p2p_out() -> object:
        if me % 2 == 0:
            return topo.send(x, names, dst=peer)
        return topo.recv((count,), torch.float32, names, src=peer, out=out)

    def raw_p2p() -> None:
        if me % 2 == 0:
            pg.send([x], peer, 0).wait()
        else:
            pg.recv([out], peer, 0).wait()

    # torch 2.13 renamed these two (the old names warn); 2.4 has only the old ones
    gather_single = (
        getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor
    )
    scatter_single = (
        getattr(torch_dist, "reduce_scatter_single", None) or torch_dist.reduce_scatter_tensor
    )

    def torch_all_reduce() -> torch.Tensor:
        y = x.clone()
        torch_dist.all_reduce(y, group=group)
        return y

    def torch_all_gather() -> torch.Tensor:
        y = x.new_empty(n * count)
        gather_single(y, x, group=group)
        return y

    def torch_reduce_scatter() -> torch.Tensor:
        y = x.new_empty(count // n)
        scatter_single(y, x, group=group)
        return y

    def torch_broadcast() -> torch.Tensor:
        y = x.clone() if me == 0 else torch.empty_like(x)
        torch_dist.broadcast(y, src=ranks[0], group=group)
        return y

    def torch_all_to_all() -> torch.Tensor:
        y = torch.empty_like(x)
        torch_dist.all_to_all_single(y, x, group=group)
        return y

    def torch_p2p() -> object:
        if me % 2 == 0:
            return torch_dist.send(x, ranks[peer], group=group)
        y = torch.empty(count)
        torch_dist.recv(y, ranks[peer], group=group)
        return y

    table: dict[str, dict[str, Any]] = {
        "all_reduce": {"topo": lambda: topo.all_reduce(x, names),
                       "topo out=": lambda: topo.all_reduce(x, names, out=out),
                       "raw": raw_all_reduce, "torch": torch_all_reduce},
        "all_gather": {"topo": lambda: topo.all_gather(x, names),
                       "topo out=": lambda: topo.all_gather(x, names, out=gathered),
                       "raw": lambda: pg.allgather([list(gathered.view(n, count).unbind(0))],
                                                   [x]).wait(),
                       "torch": torch_all_gather},
        "reduce_scatter": {"topo": lambda: topo.reduce_scatter(x, names),
                           "topo out=": lambda: topo.reduce_scatter(x, names, out=part),
                           "raw": lambda: pg._reduce_scatter_base(part, x, reduce_scatter).wait(),
                           "torch": torch_reduce_scatter},
        "broadcast": {"topo": lambda: topo.broadcast(x, names),
                      # in place, as the raw call (every rank's x holds the same ones)
                      "topo out=": lambda: topo.broadcast(x, names, out=x),
                      "raw": lambda: pg.broadcast([x], bcast).wait(),  # the same buffer
                      "torch": torch_broadcast},
        "all_to_all": {"topo": lambda: topo.all_to_all(x, names),
                       "raw": lambda: pg.alltoall_base(out, x, [], [],
                                                       dist.AllToAllOptions()).wait(),
                       "torch": torch_all_to_all},
        "send/recv": {"topo": topo_p2p, "topo out=": topo_p2p_out, "raw": raw_p2p,
                      "torch": torch_p2p},
        "all_gatherv": {"topo": lambda: topo.all_gatherv(mine, names, sizes=sizes)},
    }  # fmt: skip
    result: dict[str, dict[str, list[float]]] = {}
    small = nbytes < (1 << 20)
    # Warm every implementation up: a gloo process group's first few hundred small messages
    # between two ranks are slower (4 B send/recv: about 2.6 ms per call in the first 100,
    # 0.2 ms from the third 100 on), and topo's send/recv runs on its own pair group, new
    # here, while the raw call's group is warm from the collectives before.
    warm = 300 if small else 3
    for collective, calls in table.items():
        for fn in calls.values():
            for _ in range(warm):
                fn()
        pg.barrier(dist.BarrierOptions()).wait()
        if small:
            result[collective] = _calls_interleaved(calls, reps)
        else:
            result[collective] = _calls_alternating(calls, reps, pg)
    return result


def _calls_interleaved(calls: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Each implementation's call times over ``rounds`` rounds of one call of each (the order
    rotating round by round; every rank calls the same sequence)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    orders = list(itertools.permutations(calls))
    clock = time.perf_counter
    for rep in range(rounds):
        for which in orders[rep % len(orders)]:
            fn = calls[which]
            start = clock()
            fn()
            times[which].append(clock() - start)
    return times


def balanced_sequence(names: Sequence[str], each: int) -> list[str]:
    """A sequence of calls of ``names`` with at least ``each`` calls of every name, in which
    every name follows every other name equally often, once the sequence's last name is
    called (untimed) before it: an Eulerian circuit through every ordered pair of distinct
    names, repeated. A large call leaves the machine changed for the next one (freed memory,
    cold caches), so a comparison of a few calls must not let one implementation follow
    another more often than the rest (the first few permutations of all orders do).

    Example::

        balanced_sequence("abc", 2)   # ['a', 'c', 'b', 'c', 'a', 'b']: then 'b' -> 'a' again
    """
    n = len(names)
    if n == 1:
        return [names[0]] * each
    unused = {a: [b for b in range(n) if b != a] for a in range(n)}  # the edges left
    stack, circuit = [0], []
    while stack:  # Hierholzer's algorithm on the complete directed graph
        here = stack[-1]
        if unused[here]:
            stack.append(unused[here].pop())
        else:
            circuit.append(stack.pop())
    cycle = circuit[::-1][:-1]  # n(n-1) calls: each name n-1 times; it ends where it began
    rounds = -(-each // (n - 1))
    return [names[i] for i in cycle * rounds]


def _calls_alternating(calls: dict[str, Any], reps: int, pg: Any) -> dict[str, list[float]]:
    """Each implementation's call times over at least ``reps`` calls of each, in the order of
    :func:`balanced_sequence`, each call started together (a barrier before it)."""
    import topo._dist as dist

    barrier = dist.BarrierOptions()
    times: dict[str, list[float]] = {k: [] for k in calls}
    sequence = balanced_sequence(list(calls), reps)
    calls[sequence[-1]]()  # untimed: the first timed call follows it, as in every later round
    for which in sequence:
        fn = calls[which]
        pg.barrier(barrier).wait()
        start = time.perf_counter()
        fn()
        times[which].append(time.perf_counter() - start)
    return times


def _cell(value: float | None, unit: float) -> str:
    return f"{value * unit:.1f}" if value is not None else "n/a"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "n/a"


def gloo_table_report(rounds: int, reps: int) -> None:
    """Section 5: print every collective's table for 4 B (``rounds`` interleaved rounds) and
    64 MiB (``reps`` calls of each) on 4 ranks, and for 4 B on 2 ranks (one core each here:
    latency, not the scheduler of 4 processes on 2 cores, sets the figure)."""
    print(f"(load average before: {_load()})")
    for ranks, nbytes, unit, name, count in (
        (4, 4, 1e6, "us", rounds),
        (2, 4, 1e6, "us", rounds),
        (4, 64 << 20, 1e3, "ms", reps),
    ):
        mesh = topo.DeviceMesh(dp=ranks // 2, tp=2)
        res = topo.spawn(gloo_every_collective, mesh, nbytes, count, timeout=1800)
        how = (
            f"median of {count} calls of each, interleaved call by call"
            if nbytes < (1 << 20)
            else f"median of {count} calls of each, in a balanced order"
        )
        print(f"\n{nbytes} bytes per rank, {ranks} ranks ({how}; slowest rank per call; raw = the "
              f"same ProcessGroupGloo, preallocated outputs; torch = torch.distributed on "
              f"that group, allocating; load average after: {_load()})")  # fmt: skip
        print(f"| collective | topo {name} | topo out= {name} | raw {name} | torch {name} | "
              f"topo/raw | out=/raw | torch/raw | topo/torch |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for collective in res[0]:
            med = {
                k: statistics.median(_slowest([r[collective] for r in res], k))
                for k in res[0][collective]
            }
            t, o, r, c = med.get("topo"), med.get("topo out="), med.get("raw"), med.get("torch")
            print(f"| {collective} | {_cell(t, unit)} | {_cell(o, unit)} | {_cell(r, unit)} | "
                  f"{_cell(c, unit)} | {_ratio(t, r)} | {_ratio(o, r)} | {_ratio(c, r)} | "
                  f"{_ratio(t, c)} |")  # fmt: skip


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


# ------------------------------------------------------------------------------ parent


def _slowest(per_rank: list[dict[str, list[float]]], key: str) -> list[float]:
    return [max(r[key][i] for r in per_rank) for i in range(len(per_rank[0][key]))]


def _ratio_line(label: str, per_rank: list[dict[str, list[float]]], unit: float, name: str) -> str:
    topo_t, raw_t = _slowest(per_rank, "topo"), _slowest(per_rank, "raw")
    tm, rm = statistics.median(topo_t), statistics.median(raw_t)
    tb, rb = min(topo_t), min(raw_t)
    return (
        f"{label:<34} topo {tm * unit:9.1f} {name} (best {tb * unit:8.1f})   raw {rm * unit:9.1f} "
        f"{name} (best {rb * unit:8.1f})   topo/raw median {tm / rm:.3f}, best {tb / rb:.3f}"
    )


def block_ratios(topo_t: list[float], raw_t: list[float]) -> str:
    """The median of the per-block ratios topo/raw (each block's topo run against the raw run
    next to it), with the quartiles of those ratios: how noisy the machine was.

    Example::

        block_ratios([1.1, 1.0, 1.2], [1.0, 1.0, 1.0])   # 'median 1.100 (quartiles ...)'
    """
    ratios = sorted(t / r for t, r in zip(topo_t, raw_t, strict=True))
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
    else:
        q1, q3 = ratios[0], ratios[-1]
    return (
        f"median {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f}, range "
        f"{ratios[0]:.3f}-{ratios[-1]:.3f}, {len(ratios)} blocks)"
    )


def small_all_reduce_report(blocks: int = 40, per_block: int = 100) -> None:
    """Section 1: print topo/raw for a 4-byte all_reduce on 2 and 4 ranks."""
    for mesh in (topo.DeviceMesh(tp=2), topo.DeviceMesh(dp=2, tp=2)):
        res = topo.spawn(small_all_reduce, mesh, blocks, per_block, timeout=600)
        print(_ratio_line(f"{mesh} ({mesh.size} ranks)", res, 1e6, "us"))
        topo_t, raw_t = _slowest(res, "topo"), _slowest(res, "raw")
        inplace_t = _slowest(res, "raw in-place")
        print(f"{'':<34} topo/raw per block: {block_ratios(topo_t, raw_t)}")
        print(
            f"{'':<34} (raw = allreduce of a clone, like topo's out-of-place call; the raw "
            f"in-place allreduce: {statistics.median(inplace_t) * 1e6:.1f} us, topo/in-place "
            f"{block_ratios(topo_t, inplace_t).split(' (')[0]})"
        )
    one = host_cost_one_rank(max(blocks // 2, 10), 2000)
    print(
        f"{'1 rank, in-process (host only)':<34} topo comm {statistics.median(one['topo']) * 1e6:9.2f}"
        f" us   raw {statistics.median(one['raw']) * 1e6:9.2f} us   topo/raw per block: "
        f"{block_ratios(one['topo'], one['raw'])}"
    )


def main() -> None:
    print(
        f"# topo runtime benchmark: torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; times are the slowest rank's"
    )
    if "--gloo" in sys.argv[1:]:
        print("\n## 5. every collective on gloo: topo vs the raw call on the same process group")
        gloo_table_report(rounds=_option("--rounds", 600), reps=_option("--reps", 12))
        return
    print("\n## 1. all_reduce of a 4-byte CPU tensor: host time per call (median over blocks)")
    small_all_reduce_report()
    if "--small" in sys.argv[1:]:
        return

    res = topo.spawn(layer_overhead, topo.DeviceMesh(tp=2), 20000, timeout=300)
    print("topo's own work per call, no communication (best of 5 x 20000 calls, rank 0):")
    for label, seconds in res[0].items():
        print(f"  {label:<32} {seconds * 1e6:7.2f} us")
    overhead = res[0]["topo.all_reduce (stub comm)"] - res[0]["stub comm called directly"]
    print(f"  => topo layer {overhead * 1e6:.2f} us + out-of-place copy "
          f"{res[0]['x.clone() of 4 bytes'] * 1e6:.2f} us per call")  # fmt: skip

    print("\n## 2. all_reduce of 64 MiB in place (out=x): time per call and algbw")
    nbytes = 64 * 2**20
    for mesh in (topo.DeviceMesh(tp=2), topo.DeviceMesh(dp=2, tp=2)):
        res = topo.spawn(large_all_reduce, mesh, 6, nbytes, timeout=600)
        print(_ratio_line(f"{mesh} ({mesh.size} ranks)", res, 1e3, "ms"))
        topo_t = statistics.median([max(r["topo"][i] for r in res) for i in range(6)])
        raw_t = statistics.median([max(r["raw"][i] for r in res) for i in range(6)])
        print(
            f"{'':<34} algbw topo {nbytes / topo_t / 1e9:.3f} GB/s, raw {nbytes / raw_t / 1e9:.3f} "
            f"GB/s, topo/raw algbw {raw_t / topo_t:.3f}"
        )

    print("\n## 3. activate dp=2 x tp=2 + one all_reduce per axis vs torch init_device_mesh (gloo)")
    res = topo.spawn(activation_vs_init_device_mesh, topo.DeviceMesh(dp=2, tp=2), 5, timeout=300)
    print(_ratio_line("4 ranks, 5 alternating reps", [
        {"topo": r["topo"], "raw": r["torch"]} for r in res], 1e3, "ms"))  # fmt: skip
    print(f"{'':<34} (raw = torch init_process_group + init_device_mesh + destroy)")

    print("\n## 4. store operations per rank (min-max over ranks)")
    for mesh in (topo.DeviceMesh(dp=2, tp=2), topo.DeviceMesh(dp=4, tp=2)):
        res = topo.spawn(store_ops, mesh, timeout=300)
        cells = []
        for key in res[0]:
            values = [r[key] for r in res]
            cells.append(f"{key} {min(values)}-{max(values)}")
        print(f"{f'{mesh} ({mesh.size} ranks)':<34} " + ", ".join(cells))
    print("(tp has 2 ranks in both meshes; dp has 2 and 4: a group's rendezvous grows with the")
    print(" group, not the world)")

    print("\n## 5. every collective on gloo: topo vs the raw call on the same process group")
    gloo_table_report(rounds=_option("--rounds", 600), reps=_option("--reps", 12))


def _option(flag: str, default: int) -> int:
    """The int after ``flag`` on the command line, or ``default``."""
    args = sys.argv[1:]
    return int(args[args.index(flag) + 1]) if flag in args else default


def _main_guard() -> Any:
    return main()


if __name__ == "__main__":
    _main_guard()
