"""Host time per call of topo's NCCL path against raw cupy NCCL and torch's ProcessGroupNCCL,
CUDA-graph replay, and a latency side-by-side with ProcessGroupNCCL. Needs one GPU and cupy.

Run: ``python benchmarks/nccl_overhead.py`` (well under a minute on one GPU). Three parts:

1. **One-rank group, in this process** (as before): the NCCL communicator's ``all_reduce``
   vs raw cupy ``NcclCommunicator.allReduce`` vs ``ProcessGroupNCCL.allreduce``, and the
   replay of 100 captured calls of each in a CUDA graph. On one rank NCCL moves no data, so
   these are pure host cost. (``topo.all_reduce`` on a size-1 axis returns a copy without
   NCCL, so the communicator is timed directly there.)
2. **The main figure: 2 ranks sharing the GPU** (``topo.spawn(..., share_gpu=True)``): host
   µs per call of every free function — ``topo.all_reduce``, ``topo.all_gather`` (dim 0 and
   dim 1), ``topo.reduce_scatter``, ``topo.broadcast``, ``topo.all_to_all``,
   ``topo.send``/``topo.recv`` and ``topo.all_gatherv`` (allocating, and with ``out=`` where
   it has one) — on a size-2 axis, vs raw cupy on preallocated buffers and, for the
   allocating calls, raw cupy allocating its output the same way (``raw + alloc``; a second 2-rank
   ``NcclCommunicator`` made in the same processes, its unique id sent through topo's
   coordinator as raw bytes; what a user of raw cupy writes for the same result, e.g. the
   transpose after an all-gather along dim 1) and vs ``ProcessGroupNCCL`` (built in the same
   processes on a ``PrefixStore`` of the coordinator's store). The calls are those of
   ``benchmarks/_nccl_calls.py``. Each figure is the enqueue time of a block of calls; a
   ``torch.cuda.synchronize()`` between blocks keeps the GPU queue from filling; blocks of
   the implementations take every order in turn; the figure is the median over blocks of the
   slowest rank.
3. **Latency side-by-side, 2 ranks** (``--sweep``, which ``scripts/gpu-check`` passes):
   ``topo.all_reduce`` / ``topo.all_gather`` vs ``ProcessGroupNCCL`` from 4 B to 64 MiB,
   each timed to completion (synchronize), median of repeats, and the ratio.

``--fake`` needs no GPU: the same call table on 2 CPU ranks, where topo's NCCL communicator
wraps a cupy communicator whose calls do nothing and the CUDA stream is a stub, so each
figure is topo's own Python work per call above the raw call (the cost this benchmark exists
to drive down, measurable on any machine); ``topo − (raw + alloc)`` leaves out the output's
allocation, which an out-of-place call needs whoever makes it. ``--fake-threads`` runs the ranks as threads of
one process that take turns (``topo.simulate``), so they never compete for a core, and
prints each rank's best block (the cost of a call when nothing interrupts it: the figure to
compare across commits on a small, busy machine).

``--json PATH`` also writes every figure as JSON (``scripts/gpu_check.py`` turns it into the
tables of docs/gpu.md). The argument parsing and table formatting need no GPU and are tested
in tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nccl_calls import COLLECTIVES, IMPLEMENTATIONS

#: 4 B … 64 MiB in steps of 4×.
SWEEP_SIZES = tuple(4 * 4**i for i in range(13))


# ----------------------------------------------------------------- CPU-only: args, tables


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line.

    Example::

        args = parse_args(["--sweep", "--json", "out.json"])
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--sweep", action="store_true", help="add the 4 B - 64 MiB side-by-side")
    parser.add_argument(
        "--fake", action="store_true",
        help="no GPU: topo's Python work per call over a no-op cupy and a stub stream",
    )  # fmt: skip
    parser.add_argument(
        "--fake-threads", action="store_true",
        help="--fake with the 2 ranks as threads of this process taking turns; the best "
        "block per rank (the figure to compare across commits on a small, busy machine)",
    )  # fmt: skip
    parser.add_argument("--blocks", type=int, default=18, help="blocks per implementation")
    parser.add_argument("--calls", type=int, default=200, help="calls per block")
    parser.add_argument("--elements", type=int, default=16, help="float32 elements per call")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds for each 2-rank part (a spawn)"
    )
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.calls < 1 or args.elements < 1:
        parser.error("--blocks, --calls and --elements must be at least 1")
    return args


def format_size(nbytes: int) -> str:
    """``4`` → ``'4 B'``, ``65536`` → ``'64 KiB'``.

    Example::

        format_size(64 << 20)   # '64 MiB'
    """
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (numbers right-aligned).

    Example::

        markdown_table(["a", "b"], [[1, 2.5]])
    """

    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def overhead_table(two_rank: dict[str, dict[str, float]]) -> str:
    """Part 2 as a markdown table: µs per call per implementation (given in seconds) and the
    ratios to raw cupy and ProcessGroupNCCL.

    Example::

        overhead_table({"all_reduce": {"topo": 7e-6, "raw cupy": 6.5e-6, "ProcessGroupNCCL": 12e-6}})
    """
    rows = []
    for name, figures in two_rank.items():
        t, o, r, a, p = (figures.get(k) for k in IMPLEMENTATIONS)
        rows.append([
            f"topo.{name}",
            *(f"{v * 1e6:.2f}" if v is not None else "n/a" for v in (t, o, r, a, p)),
            _ratio(t, r), _ratio(o, r), _ratio(t, a), _ratio(t, p),
        ])  # fmt: skip
    header = ["collective", "topo µs", "topo out= µs", "raw cupy µs", "raw + alloc µs",
              "ProcessGroupNCCL µs", "topo/raw", "out=/raw", "topo/(raw+alloc)",
              "topo/PGNCCL"]  # fmt: skip
    return markdown_table(header, rows)


def fake_table(fake: dict[str, dict[str, float]]) -> str:
    """``--fake`` as a markdown table: µs per call of topo (and with ``out=``) and of the raw
    no-op call, and topo's own work above it.

    Example::

        fake_table({"all_reduce": {"topo": 4e-6, "topo out=": 3e-6, "raw cupy": 1e-6}})
    """
    rows = []
    for name, figures in fake.items():
        t, o, r, a = (figures.get(k) for k in IMPLEMENTATIONS[:4])

        def us(v: float | None) -> str:
            return f"{v * 1e6:.2f}" if v is not None else "n/a"

        rows.append([
            f"topo.{name}", us(t), us(o), us(r), us(a), us(t - r if t and r else None),
            us(o - r if o and r else None), us(t - a if t and a else None),
        ])  # fmt: skip
    header = ["collective", "topo µs", "topo out= µs", "raw (no-op) µs", "raw + alloc µs",
              "topo − raw µs", "out= − raw µs", "topo − (raw + alloc) µs"]  # fmt: skip
    return markdown_table(header, rows)


def one_rank_table(one_rank: dict[str, float]) -> str:
    """Part 1 (one-rank group, graph replay) as a markdown table.

    Example::

        one_rank_table({"raw cupy NcclCommunicator.allReduce": 6.5e-6})
    """
    return markdown_table(["one-rank group, host time per call", "µs"],
                          [[label, f"{s * 1e6:.2f}"] for label, s in one_rank.items()])  # fmt: skip


def sweep_table(sweep: dict[str, dict[str, dict[str, float]]]) -> str:
    """Part 3 as a markdown table: latency (µs) of topo and ProcessGroupNCCL per size.

    ``sweep[collective][str(nbytes)][implementation]`` holds seconds.

    Example::

        sweep_table({"all_reduce": {"4": {"topo": 2e-5, "ProcessGroupNCCL": 2e-5}}})
    """
    rows = []
    for name, by_size in sweep.items():
        for size, figures in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            t, p = figures.get("topo"), figures.get("ProcessGroupNCCL")
            rows.append([
                name, format_size(int(size)), f"{t * 1e6:.1f}" if t else "n/a",
                f"{p * 1e6:.1f}" if p else "n/a", _ratio(t, p),
            ])  # fmt: skip
    return markdown_table(
        ["collective", "bytes per rank", "topo µs", "ProcessGroupNCCL µs", "topo/PGNCCL"], rows
    )


def print_report(results: dict[str, Any]) -> None:
    """Print the figures as the benchmark always has (plain lines and ratios).

    Example::

        print_report({"one_rank": {...}, "two_rank": {...}})
    """
    print(results.get("header", "# nccl_overhead"))
    one = results.get("one_rank", {})
    if one:
        print("\n## 1. one-rank group, host time per call")
        for label, seconds in one.items():
            print(f"{label:<48} {seconds * 1e6:9.2f} us")
        t = one["topo NCCL communicator all_reduce"]
        print(f"topo / raw cupy            {t / one['raw cupy NcclCommunicator.allReduce']:.3f}")
        print(f"topo / ProcessGroupNCCL    {t / one['torch ProcessGroupNCCL allreduce']:.3f}")
        print(
            f"graph replay topo / raw    {one['graph replay of 100 topo all_reduces'] / one['graph replay of 100 raw allReduces']:.3f}"
        )
    two = results.get("two_rank", {})
    if two:
        print("\n## 2. 2 ranks sharing the GPU: host us per call of the free functions "
              "(median of blocks, slowest rank)")  # fmt: skip
        print(overhead_table(two))
    fake = results.get("fake", {})
    if fake:
        how = results.get("fake_statistic", "median of blocks, slowest rank")
        print("\n## topo's Python work per call: 2 CPU ranks, a no-op cupy communicator and a "
              f"stub stream ({how})")  # fmt: skip
        print(fake_table(fake))
    sweep = results.get("sweep", {})
    if sweep:
        print(
            "\n## 3. latency, 2 ranks sharing the GPU (socket transport), topo vs ProcessGroupNCCL"
        )
        print(sweep_table(sweep))


# ----------------------------------------------------------------------------- on the GPU


def _per_call(fn: Callable[[], object], calls: int = 2000, reps: int = 7) -> float:
    import torch

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


def one_rank() -> dict[str, float]:
    """Part 1, in this process: a one-rank mesh on cuda:0."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from cupy.cuda import nccl

    import topo

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
        torch.cuda.synchronize()
        raw.destroy()
    return figures


class _Peers:
    """On one rank of the 2-rank spawn: the three implementations of each collective on the
    same inputs, with their outputs preallocated where the raw API takes them."""

    def __init__(self, elements: int) -> None:
        import torch
        import torch.distributed as dist
        from cupy.cuda import nccl

        import topo
        from topo.communicators.nccl import encode_unique_id, unique_id_argument

        ctx = topo.current()
        self.ctx, self.nccl, self.torch, self.elements = ctx, nccl, torch, elements
        rank, ranks = ctx.axis_index("tp"), ctx.group("tp")
        self.device = ctx.device
        self.x = torch.ones(elements, device=self.device)
        self.stacked = torch.ones(2 * elements, device=self.device)
        self.out = torch.empty_like(self.x)
        self.gathered = torch.empty(2 * elements, device=self.device)
        data = ctx.coordinator.broadcast(
            encode_unique_id(nccl.get_unique_id()) if rank == 0 else None, src=ranks[0], ranks=ranks
        )
        with torch.cuda.device(self.device):
            self.raw = nccl.NcclCommunicator(2, unique_id_argument(data), rank)
        store = dist.PrefixStore(ctx.coordinator.key("bench-pg-nccl"), ctx.coordinator.store)
        opts = dist.ProcessGroupNCCL.Options()  # type: ignore[attr-defined]
        self.pg: Any = dist.ProcessGroupNCCL(store, rank, 2, opts)  # type: ignore[attr-defined]
        self.pg.allreduce([self.x.clone()]).wait()  # the PG's communicator is made lazily
        torch.cuda.synchronize()

    def table(self) -> dict[str, dict[str, Callable[[], object]]]:
        from _nccl_calls import call_table

        torch = self.torch
        index = self.device.index or 0
        raw_stream: Callable[[int], int] = getattr(
            torch._C, "_cuda_getCurrentRawStream",
            lambda i: torch.cuda.current_stream(i).cuda_stream,
        )  # fmt: skip
        me = self.ctx.axis_index("tp")
        return call_table(self.raw, self.nccl, self.pg, self.device, me,
                          lambda: raw_stream(index), self.elements)  # fmt: skip

    def close(self) -> None:
        self.torch.cuda.synchronize()
        self.raw.destroy()
        if hasattr(self.pg, "shutdown"):
            self.pg.shutdown()


def _time_blocks(
    table: dict[str, dict[str, Callable[[], object]]],
    blocks: int,
    calls: int,
    sync: Callable[[], None],
    barrier: Callable[[], None],
) -> dict[str, dict[str, list[float]]]:
    """Per collective and implementation, the time per call of each block (blocks of the
    implementations take every order in turn; ``sync()`` after every block)."""
    out: dict[str, dict[str, list[float]]] = {}
    for collective, fns in table.items():
        for fn in fns.values():  # warm-up: allocator, first-call paths
            for _ in range(20):
                fn()
        sync()
        barrier()
        times: dict[str, list[float]] = {k: [] for k in fns}
        orders = list(itertools.permutations(fns))  # each position for each, in turn
        for block in range(blocks):
            for which in orders[block % len(orders)]:
                fn = fns[which]
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[which].append((time.perf_counter() - start) / calls)
                sync()
        out[collective] = times
    return out


def two_rank_overhead(blocks: int, calls: int, elements: int) -> dict[str, dict[str, list[float]]]:
    """Part 2 on each rank: every collective's call table (benchmarks/_nccl_calls.py) timed."""
    import torch

    peers = _Peers(elements)
    try:
        return _time_blocks(
            peers.table(), blocks, calls, torch.cuda.synchronize, lambda: None
        )
    finally:
        peers.close()


def fake_overhead(
    blocks: int, calls: int, elements: int, turn: Any = None
) -> dict[str, dict[str, list[float]]]:
    """``--fake`` on each of 2 CPU ranks: topo's NCCL communicator over a no-op cupy
    communicator with a stub stream, in this activation's place of the gloo one, so the free
    functions run their whole path down to a cupy call that does nothing. ``turn`` (a lock,
    ``--fake-threads``: the ranks are threads of one process) makes the ranks time their
    calls one after the other instead of together (a no-op cupy needs no peer)."""
    import torch
    from _nccl_calls import NoopComm, NoopNccl, call_table

    import topo
    from topo.communicators.nccl import NcclCommunicator

    ctx = topo.current()
    names, me = ("tp",), ctx.axis_index("tp")
    ranks = ctx.group("tp")
    cpu = torch.device("cpu")
    for pair in (None, (0, 1)):
        comm = NcclCommunicator(NoopNccl, NoopComm(), ranks, me, cpu, "axis 'tp' (no-op cupy)")
        comm._stream = lambda: 0  # the stub stream handle
        ctx._communicators[(names, "cpu", pair)] = comm  # type: ignore[assignment]
    table = call_table(NoopComm(), NoopNccl, None, cpu, me, lambda: 0, elements)
    if turn is not None:  # no group: its creation would still run while the first rank times
        try:
            with turn:
                return _time_blocks(table, blocks, calls, lambda: None, lambda: None)
        finally:
            _forget_fakes(ctx, names)
    gloo = ctx._create(names, "cpu", None)  # a real group, to start each collective together
    try:
        return _time_blocks(table, blocks, calls, lambda: None, gloo.barrier)
    finally:
        gloo.close()
        _forget_fakes(ctx, names)


def _forget_fakes(ctx: Any, names: tuple[str, ...]) -> None:
    """Take the no-op communicators out of ``ctx`` (nothing to close: no-op cupy)."""
    for pair in (None, (0, 1)):
        del ctx._communicators[(names, "cpu", pair)]


def two_rank_sweep(sizes: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """Part 3 on each rank: completed-call latency of topo and ProcessGroupNCCL per size."""
    import torch

    import topo

    peers = _Peers(1)
    pg, device = peers.pg, peers.device
    result: dict[str, dict[str, dict[str, float]]] = {"all_reduce": {}, "all_gather": {}}
    try:
        for nbytes in sizes:
            x = torch.ones(max(nbytes // 4, 1), device=device)
            gathered = torch.empty(2 * x.numel(), device=device)
            iters = max(3, min(50, (256 << 20) // max(nbytes, 1) // 8))
            fns = {
                "all_reduce": {
                    "topo": lambda x=x: topo.all_reduce(x, axis="tp"),
                    "ProcessGroupNCCL": lambda x=x: pg.allreduce([x]),
                },
                "all_gather": {
                    "topo": lambda x=x: topo.all_gather(x, axis="tp"),
                    "ProcessGroupNCCL": lambda x=x, g=gathered: pg._allgather_base(g, x),
                },
            }
            for collective, impls in fns.items():
                times: dict[str, list[float]] = {k: [] for k in impls}
                for fn in impls.values():
                    fn()
                torch.cuda.synchronize()
                for rep in range(5):
                    for which in impls if rep % 2 == 0 else reversed(list(impls)):
                        start = time.perf_counter()
                        for _ in range(iters):
                            impls[which]()
                        torch.cuda.synchronize()
                        times[which].append((time.perf_counter() - start) / iters)
                result[collective][str(nbytes)] = {
                    k: statistics.median(v) for k, v in times.items()
                }
    finally:
        peers.close()
    return result


def _slowest_best(per_rank: list[dict[str, Any]], collective: str, which: str) -> float:
    """The slowest rank's fastest block: the cost of a call when nothing interrupts it."""
    return max(min(r[collective][which]) for r in per_rank)


def _slowest_median(per_rank: list[dict[str, Any]], collective: str, which: str) -> float:
    blocks = len(per_rank[0][collective][which])
    return statistics.median(max(r[collective][which][i] for r in per_rank) for i in range(blocks))


def header() -> str:
    """Versions line: torch, CUDA, NCCL, cupy, GPU name."""
    import cupy
    import torch
    from cupy.cuda import nccl

    code = int(nccl.get_version())
    return (
        f"# torch {torch.__version__} (CUDA {torch.version.cuda}), NCCL {code // 10000}."
        f"{code // 100 % 100}.{code % 100}, cupy {cupy.__version__}, "
        f"{torch.cuda.get_device_name()}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the parts in turn; with ``--json`` the file is rewritten after each part, so a
    later part's failure keeps the earlier figures."""
    args = parse_args(argv)
    import topo

    fake = args.fake or args.fake_threads
    results: dict[str, Any] = {"header": "# --fake: no GPU, a no-op cupy" if fake else header()}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    mesh = topo.DeviceMesh(tp=2)
    if fake:
        statistic = _slowest_median
        if args.fake_threads:  # one process, the ranks in turn: no core shared between them
            per_rank = topo.simulate(mesh, fake_overhead, args.blocks, args.calls,
                                     args.elements, threading.Lock(), timeout=args.timeout)  # fmt: skip
            statistic = _slowest_best
            results["fake_statistic"] = "best block, slowest rank: the ranks in turn"
        else:
            per_rank = topo.spawn(fake_overhead, mesh, args.blocks, args.calls, args.elements,
                                  timeout=args.timeout)  # fmt: skip
        results["fake"] = {
            c: {w: statistic(per_rank, c, w) for w in per_rank[0][c]} for c in COLLECTIVES
        }
        save()
        print_report(results)
        return results
    results["one_rank"] = one_rank()
    save()
    per_rank = topo.spawn(
        two_rank_overhead, mesh, args.blocks, args.calls, args.elements,
        share_gpu=True, timeout=args.timeout,
    )  # fmt: skip
    results["two_rank"] = {
        c: {w: _slowest_median(per_rank, c, w) for w in per_rank[0][c]} for c in COLLECTIVES
    }
    results["two_rank_elements"] = args.elements
    save()
    if args.sweep:
        swept = topo.spawn(two_rank_sweep, mesh, SWEEP_SIZES, share_gpu=True, timeout=args.timeout)
        results["sweep"] = {
            c: {s: {w: max(r[c][s][w] for r in swept) for w in by_size[s]}
                for s in by_size} for c, by_size in swept[0].items()
        }  # fmt: skip
        save()
    print_report(results)
    return results


if __name__ == "__main__":
    main()
