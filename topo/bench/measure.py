"""``topo bench``'s measurements on one rank: the sweep, the timed blocks, the raw baseline.

Each row times topo's collective and the same ``ProcessGroupGloo`` call without topo in the
same run; blocks start together on the group (a barrier), the iteration count is the same on
every rank, and the best of ``reps`` blocks is kept.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from topo.bench.config import BenchConfig, format_size
from topo.bench.reference import input_count, pattern, reference, wrong

__all__ = ["RawGroup", "run_rank"]


def run_rank(config: BenchConfig) -> list[dict[str, Any]]:
    """Run the sweep on this rank inside an active mesh; returns this rank's measurements.

    Example::

        with mesh.activate():
            rows = run_rank(BenchConfig(axes=(("tp",),)))
    """
    import torch

    from topo.active import current

    ctx = current()
    dtype = getattr(torch, config.dtype)
    rows: list[dict[str, Any]] = []
    total = len(config.axes) * len(config.collectives) * len(config.sizes)
    step = 0
    for names in config.axes:
        n = ctx.axis_size(names)
        raw = RawGroup(ctx, names) if config.raw and n > 1 else None
        for collective in config.collectives:
            for size in config.sizes:
                step += 1
                row = _measure(ctx, names, n, collective, size, dtype, config, raw)
                if row is not None:
                    rows.append(row)
                if config.progress and ctx.rank == 0:
                    print(
                        f"\rtopo bench: {step}/{total} {collective} {'.'.join(names)} "
                        f"{format_size(size)}        ",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
    if config.progress and ctx.rank == 0:
        print(file=sys.stderr)
    return rows


class RawGroup:
    """This rank's group along ``names`` as a raw ``ProcessGroupGloo`` of its own (``pg``),
    built as topo's gloo communicator builds one, for calls that bypass topo.

    Example::

        with mesh.activate() as ctx:
            raw = RawGroup(ctx, ("tp",))
            raw.pg.allreduce([x], raw.dist.AllreduceOptions()).wait()
    """

    def __init__(self, ctx: Any, names: tuple[str, ...]) -> None:
        import topo._dist as dist
        from topo.communicators.gloo import GlooCommunicator

        group_id = ctx.mesh.group_index(names, ctx.rank)
        store = dist.PrefixStore(
            ctx.coordinator.key("bench-raw", ".".join(names), group_id),
            ctx.coordinator.store,
        )
        self.index = ctx.axis_index(names)
        self.size = ctx.axis_size(names)
        self._communicator = GlooCommunicator(
            store,
            ctx.mesh.group(names, ctx.rank),
            self.index,
            ctx.timeout,
            ctx.world.is_local,
            f"topo bench's raw group along {'.'.join(names)}",
        )
        self.pg: Any = self._communicator.pg
        self.dist = dist

    def call(self, collective: str, x: Any, out: Any, op: str) -> None:
        """The raw ``ProcessGroupGloo`` call for ``collective`` (``x`` in, ``out`` out)."""
        import torch.distributed as torch_dist

        from topo.communicators.dtypes import TORCH_REDUCE_OPS

        dist = self.dist
        if collective == "all_reduce":
            opts = dist.AllreduceOptions()
            opts.reduceOp = TORCH_REDUCE_OPS[op]
            self.pg.allreduce([x], opts).wait()
        elif collective == "all_gather":
            self.pg.allgather([list(out.unbind(0))], [x]).wait()
        elif collective == "reduce_scatter":
            opts = torch_dist.ReduceScatterOptions()
            opts.reduceOp = TORCH_REDUCE_OPS[op]
            self.pg._reduce_scatter_base(out, x, opts).wait()
        elif collective == "all_to_all":
            self.pg.alltoall_base(out, x, [], [], dist.AllToAllOptions()).wait()
        else:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.pg.broadcast([x], opts).wait()


def _topo_call(collective: str, x: Any, names: tuple[str, ...], op: Any) -> Callable[[], Any]:
    """topo's call for ``collective`` on ``x``, as a function of no arguments."""
    import topo.collectives as tc

    calls: dict[str, Callable[[], Any]] = {
        "all_reduce": lambda: tc.all_reduce(x, names, op=op),
        "all_gather": lambda: tc.all_gather(x, names),
        "reduce_scatter": lambda: tc.reduce_scatter(x, names, op=op),
        "all_to_all": lambda: tc.all_to_all(x, names),
        "broadcast": lambda: tc.broadcast(x, names, src=0),
    }
    return calls[collective]


def _measure(
    ctx: Any,
    names: tuple[str, ...],
    n: int,
    collective: str,
    size: int,
    dtype: Any,
    config: BenchConfig,
    raw: RawGroup | None,
) -> dict[str, Any] | None:
    import torch

    count = input_count(collective, size, n, dtype.itemsize)
    if count is None:
        return None
    me = ctx.axis_index(names)
    x = pattern(me, count, dtype)
    op = config.op
    call = _topo_call(collective, x, names, op)
    expected = reference(collective, n, me, count, dtype, op)
    for _ in range(config.warmup):
        result = call()
    first_wrong = wrong(result, expected)
    raw_call = None
    if raw is not None:
        raw_x = x.clone()
        out_shape = {"all_gather": (n, count), "reduce_scatter": (count // n,)}.get(
            collective, (count,)
        )
        raw_out = torch.empty(out_shape, dtype=dtype)

        def raw_call() -> None:
            raw.call(collective, raw_x, raw_out, op)

        for _ in range(config.warmup):
            raw_call()
    iters = _agree_iters(names, call, config)
    best = best_raw = math.inf
    for _ in range(config.reps):
        best = min(best, _time(call, iters, ctx, names))
        if raw_call is not None:
            best_raw = min(best_raw, _time(raw_call, iters, ctx, names))
    # A row's #wrong: the worse of the checks after warm-up and after the timed blocks.
    worst = max(first_wrong, wrong(call(), expected))
    return {
        "collective": collective,
        "axis": ".".join(names),
        "ranks": n,
        "size": count * dtype.itemsize * (n if collective == "all_gather" else 1),
        # as nccl-tests: elements per rank and peer for reduce_scatter and all_to_all
        "count": count // n if collective in ("reduce_scatter", "all_to_all") else count,
        "dtype": config.dtype,
        "op": op if collective in ("all_reduce", "reduce_scatter") else "none",
        "iters": iters,
        "time_us": best * 1e6,
        "raw_time_us": best_raw * 1e6 if raw_call is not None else None,
        "wrong": worst,
    }


def _agree_iters(names: tuple[str, ...], call: Callable[[], Any], config: BenchConfig) -> int:
    """Iterations per timed block, the same on every rank of the group."""
    import torch

    import topo.collectives as tc

    start = time.perf_counter()
    call()
    elapsed = time.perf_counter() - start
    slowest = tc.all_reduce(torch.tensor([elapsed], dtype=torch.float64), names, op="max")
    per_call = max(float(slowest.item()), 1e-7)
    return max(2, min(config.max_iters, int(config.seconds / per_call)))


def _time(fn: Callable[[], Any], iters: int, ctx: Any, names: tuple[str, ...]) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls, started together on the group."""
    ctx.communicator(names, "cpu").barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters
