"""``topo bench``: time topo's collectives against the raw torch ProcessGroup calls.

Sweeps message sizes for each collective on each benchmarked axis and prints an
nccl-tests-style table: size, count, dtype, op, time (µs), algbw and busbw (GB/s), #wrong
(elements that differ from the reference, summed over ranks) and the ratio of topo's time to
the raw ``ProcessGroupGloo`` call on the same group, measured in the same run.

It runs on a local mesh through :func:`topo.spawn` (default ``dp=2,tp=2``: 4 CPU processes),
or, when torchrun/Slurm/mpirun variables are present, as one rank of that launch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from topo.errors import TopoValueError
from topo.mesh import DeviceMesh, parse_mesh

__all__ = ["BenchConfig", "add_arguments", "aggregate", "format_table", "run", "run_rank"]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")

#: nccl-tests' bus-bandwidth factors.
BUS_FACTORS: Mapping[str, Callable[[int], float]] = MappingProxyType(
    {
        "all_reduce": lambda n: 2 * (n - 1) / n,
        "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n,
        "all_to_all": lambda n: (n - 1) / n,
        "broadcast": lambda n: 1.0,
    }
)

_UNITS = MappingProxyType({"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
          "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3})  # fmt: skip


def parse_size(text: str) -> int:
    """Parse ``"8"``, ``"64K"``, ``"64MiB"`` into bytes.

    Example::

        >>> parse_size("64M")
        67108864
    """
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise TopoValueError(
            f"a size requires a number with an optional unit (B, K, M, G, KiB, MiB, GiB), "
            f"like 64M, but got {text!r}"
        )
    return int(match.group(1)) * _UNITS[unit]


def format_size(size: int) -> str:
    """Bytes as a short human string.

    Example::

        >>> format_size(65536)
        '64 KiB'
    """
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


@attrs.frozen
class BenchConfig:
    """What one ``topo bench`` run measures; the same value on every rank.

    Example::

        BenchConfig(axes=(("tp",),), collectives=("all_reduce",), sizes=(8, 1024))
    """

    axes: tuple[tuple[str, ...], ...]
    collectives: tuple[str, ...] = COLLECTIVES
    sizes: tuple[int, ...] = tuple(8 * 2**k for k in range(24))
    dtype: str = "float32"
    op: str = "sum"
    seconds: float = 0.05
    reps: int = 3
    warmup: int = 2
    max_iters: int = 1000
    raw: bool = True
    progress: bool = True


# ----------------------------------------------------------------------------- per rank


def run_rank(config: BenchConfig) -> list[dict[str, Any]]:
    """Run the sweep on this rank inside an active mesh; returns this rank's measurements.

    Example::

        with mesh.activate():
            rows = run_rank(BenchConfig(axes=(("tp",),)))
    """
    import torch

    from topo.context import current

    ctx = current()
    dtype = getattr(torch, config.dtype)
    rows: list[dict[str, Any]] = []
    total = len(config.axes) * len(config.collectives) * len(config.sizes)
    step = 0
    for names in config.axes:
        n = ctx.axis_size(names)
        raw = _RawGroup(ctx, names) if config.raw and n > 1 else None
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


class _RawGroup:
    """The same group as a raw ``ProcessGroupGloo`` built with torch's API alone."""

    def __init__(self, ctx: Any, names: tuple[str, ...]) -> None:
        from datetime import timedelta

        import topo._dist as dist
        from topo.communicators.gloo import _gloo_devices

        group_id = ctx.mesh.group_index(names, ctx.rank)
        store = dist.PrefixStore(
            ctx.coordinator.key("bench-raw", ".".join(names), group_id),
            ctx.coordinator.store,
        )
        options: Any = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = timedelta(seconds=ctx.timeout.total_seconds())
        options._devices = _gloo_devices(ctx.world.is_local)
        self.index = ctx.axis_index(names)
        self.size = ctx.axis_size(names)
        self.pg: Any = dist.ProcessGroupGloo(store, self.index, self.size, options)
        self.dist = dist

    def call(self, collective: str, x: Any, out: Any, op: str) -> None:
        import torch.distributed as torch_dist

        dist = self.dist
        if collective == "all_reduce":
            opts = dist.AllreduceOptions()
            opts.reduceOp = _torch_op(op)
            self.pg.allreduce([x], opts).wait()
        elif collective == "all_gather":
            self.pg.allgather([list(out.unbind(0))], [x]).wait()
        elif collective == "reduce_scatter":
            opts = torch_dist.ReduceScatterOptions()
            opts.reduceOp = _torch_op(op)
            self.pg._reduce_scatter_base(out, x, opts).wait()
        elif collective == "all_to_all":
            self.pg.alltoall_base(out, x, [], [], dist.AllToAllOptions()).wait()
        else:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.pg.broadcast([x], opts).wait()


def _torch_op(op: str) -> Any:
    from topo.communicators.gloo import TORCH_REDUCE_OPS

    return TORCH_REDUCE_OPS[op]


def _inputs(collective: str, size: int, n: int, itemsize: int) -> int | None:
    """Element count of each rank's input for a row of ``size`` bytes (None: too small)."""
    count = size // itemsize
    if collective == "all_gather":
        count //= n
    elif collective in ("reduce_scatter", "all_to_all"):
        count -= count % n
    return count if count > 0 else None


def _pattern(index: int, count: int, dtype: Any, offset: int = 0) -> Any:
    """Rank ``index``'s input: small integers, exact in every dtype for sums of 8 ranks."""
    import torch

    return ((torch.arange(offset, offset + count) % 7) + index + 1).to(dtype)


def _reduce(parts: list[Any], op: str, dtype: Any) -> Any:
    import torch

    stacked = torch.stack(parts)
    if op == "sum":
        return stacked.sum(0).to(dtype)
    if op == "prod":
        return stacked.prod(0).to(dtype)
    return (stacked.amax(0) if op == "max" else stacked.amin(0)).to(dtype)


def _reference(collective: str, n: int, me: int, count: int, dtype: Any, op: str) -> Any:
    import torch

    if collective == "all_reduce":
        return _reduce([_pattern(i, count, torch.float64) for i in range(n)], op, dtype)
    if collective == "all_gather":
        return torch.cat([_pattern(i, count, dtype) for i in range(n)])
    chunk = count // n
    if collective == "reduce_scatter":
        parts = [_pattern(i, chunk, torch.float64, me * chunk) for i in range(n)]
        return _reduce(parts, op, dtype)
    if collective == "all_to_all":
        return torch.cat([_pattern(i, chunk, dtype, me * chunk) for i in range(n)])
    return _pattern(0, count, dtype)


def _measure(
    ctx: Any,
    names: tuple[str, ...],
    n: int,
    collective: str,
    size: int,
    dtype: Any,
    config: BenchConfig,
    raw: _RawGroup | None,
) -> dict[str, Any] | None:
    import torch

    import topo.collectives as tc

    count = _inputs(collective, size, n, dtype.itemsize)
    if count is None:
        return None
    me = ctx.axis_index(names)
    x = _pattern(me, count, dtype)
    op = config.op
    if collective == "all_reduce":

        def call() -> Any:
            return tc.all_reduce(x, names, op=op)  # type: ignore[arg-type]
    elif collective == "all_gather":

        def call() -> Any:
            return tc.all_gather(x, names)
    elif collective == "reduce_scatter":

        def call() -> Any:
            return tc.reduce_scatter(x, names, op=op)  # type: ignore[arg-type]
    elif collective == "all_to_all":

        def call() -> Any:
            return tc.all_to_all(x, names)
    else:

        def call() -> Any:
            return tc.broadcast(x, names, src=0)

    expected = _reference(collective, n, me, count, dtype, op)
    for _ in range(config.warmup):
        result = call()
    first_wrong = _wrong(result, expected)
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
    iters = _agree_iters(ctx, names, call, config)
    best = best_raw = math.inf
    for _ in range(config.reps):
        best = min(best, _time(call, iters, ctx, names))
        if raw_call is not None:
            best_raw = min(best_raw, _time(raw_call, iters, ctx, names))
    # A row's #wrong: the worse of the checks after warm-up and after the timed blocks.
    wrong = max(first_wrong, _wrong(call(), expected))
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
        "wrong": wrong,
    }


def _wrong(result: Any, expected: Any) -> int:
    if result.shape != expected.shape:
        return int(expected.numel())
    return int((result != expected).sum().item())


def _agree_iters(
    ctx: Any, names: tuple[str, ...], call: Callable[[], Any], config: BenchConfig
) -> int:
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


# ------------------------------------------------------------------------- aggregation


def aggregate(per_rank: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Combine every rank's rows: time = the slowest rank's, #wrong = the sum; add bandwidths.

    Example::

        rows = aggregate(topo.spawn(_bench_rank, mesh, config))
    """
    rows: list[dict[str, Any]] = []
    for measured in zip(*per_rank, strict=True):
        row = dict(measured[0])
        row["time_us"] = max(m["time_us"] for m in measured)
        raws = [m["raw_time_us"] for m in measured]
        row["raw_time_us"] = None if None in raws else max(raws)
        row["wrong"] = sum(m["wrong"] for m in measured)
        seconds = row["time_us"] / 1e6
        row["algbw"] = row["size"] / seconds / 1e9
        row["busbw"] = row["algbw"] * BUS_FACTORS[row["collective"]](row["ranks"])
        row["ratio"] = None if row["raw_time_us"] is None else row["time_us"] / row["raw_time_us"]
        rows.append(row)
    return rows


_COLUMNS = (
    ("size", "{:>12}", "size(B)"),
    ("count", "{:>11}", "count"),
    ("dtype", "{:>8}", "type"),
    ("op", "{:>5}", "redop"),
    ("time_us", "{:>11.1f}", "time(us)"),
    ("algbw", "{:>8.3f}", "algbw"),
    ("busbw", "{:>8.3f}", "busbw"),
    ("wrong", "{:>7}", "#wrong"),
    ("raw_time_us", "{:>11.1f}", "raw(us)"),
    ("ratio", "{:>7.3f}", "topo/raw"),
)


def format_table(rows: Sequence[dict[str, Any]], header: str = "") -> str:
    """The nccl-tests-style table, one block per collective and axis.

    Example::

        print(format_table(aggregate(per_rank)))
    """
    out = io.StringIO()
    if header:
        out.write(header + "\n")
    block = None
    for row in rows:
        key = (row["collective"], row["axis"])
        if key != block:
            block = key
            out.write(
                f"\n# {row['collective']} over axis {row['axis']} ({row['ranks']} ranks per "
                f"group); algbw/busbw in GB/s\n"
            )
            heads = [f"{title:>{len(fmt.format(0) if 'f' not in fmt else fmt.format(0.0))}}"
                     for _, fmt, title in _COLUMNS]  # fmt: skip
            out.write("#" + " ".join(heads)[1:] + "\n")
        cells = []
        for name, fmt, _ in _COLUMNS:
            value = row.get(name)
            width = len(fmt.format(0.0 if "f" in fmt else 0))
            cells.append(f"{'-':>{width}}" if value is None else fmt.format(value))
        out.write(" ".join(cells) + "\n")
    wrong = sum(r["wrong"] for r in rows)
    ratios = [r["ratio"] for r in rows if r.get("ratio") is not None]
    out.write(f"\n# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}\n")
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        out.write(f"# topo/raw time ratio  : geometric mean {geo:.3f} over {len(ratios)} rows\n")
    return out.getvalue()


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV with a header line.

    Example::

        print(to_csv(aggregate(per_rank)))
    """
    out = io.StringIO()
    fields = ["collective", "axis", "ranks", *[c[0] for c in _COLUMNS], "iters"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Save busbw against size, one line per collective and axis, to ``path`` (PNG).

    Example::

        plot(aggregate(per_rank), "bench.png")
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TopoValueError(
            "topo bench --plot requires matplotlib, which is not installed; "
            "pip install 'topo[plot]' (or matplotlib)"
        ) from None
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        series.setdefault(f"{row['collective']} ({row['axis']})", []).append(
            (row["size"], row["busbw"])
        )
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("topo bench")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``topo bench``'s options.

    Example::

        add_arguments(argparse.ArgumentParser())
    """
    parser.add_argument(
        "spec",
        nargs="*",
        metavar="NAME=SIZE",
        help="local mesh, outermost axis first (default dp=2 tp=2); under "
        "torchrun/srun/mpirun it must match the world size (default: one axis 'world')",
    )
    parser.add_argument(
        "--axis",
        action="append",
        metavar="AXES",
        help="axis to benchmark; a comma list is one flattened axis (repeatable; "
        "default: each axis of size > 1)",
    )
    parser.add_argument(
        "--collectives",
        default=",".join(COLLECTIVES),
        help=f"comma list from {', '.join(COLLECTIVES)} (default: all)",
    )
    parser.add_argument("-b", "--min-bytes", default="8", help="smallest size (default 8)")
    parser.add_argument("-e", "--max-bytes", default="64M", help="largest size (default 64M)")
    parser.add_argument("-f", "--factor", type=int, default=2, help="size step factor (default 2)")
    parser.add_argument("-d", "--dtype", default="float32", help="element type (default float32)")
    parser.add_argument(
        "-o", "--op", default="sum", choices=["sum", "max", "min", "prod"], help="reduction"
    )
    parser.add_argument(
        "--seconds", type=float, default=0.05, help="target seconds per timed block (0.05)"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed blocks per row; best kept (3)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw ProcessGroup baseline")
    parser.add_argument("--timeout", type=float, default=1800.0, help="whole-run limit, s")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print rows as JSON")
    output.add_argument("--csv", action="store_true", help="print rows as CSV")
    parser.add_argument("--plot", metavar="FILE.png", help="save busbw vs size to FILE.png")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def _config_from_args(args: argparse.Namespace, mesh: DeviceMesh) -> BenchConfig:
    import torch

    collectives = tuple(c.strip() for c in args.collectives.split(",") if c.strip())
    unknown = [c for c in collectives if c not in COLLECTIVES]
    if unknown or not collectives:
        raise TopoValueError(
            f"--collectives requires names from {', '.join(COLLECTIVES)}, but got "
            f"{args.collectives!r}"
        )
    from topo.communicators.gloo import GLOO_REDUCE_DTYPES

    if getattr(torch, args.dtype, None) not in GLOO_REDUCE_DTYPES:
        valid = ", ".join(sorted(str(d).removeprefix("torch.") for d in GLOO_REDUCE_DTYPES))
        raise TopoValueError(f"--dtype requires one of {valid}, but got {args.dtype!r}")
    low, high = parse_size(args.min_bytes), parse_size(args.max_bytes)
    if not 0 < low <= high or args.factor < 2:
        raise TopoValueError(
            f"sizes require 0 < --min-bytes <= --max-bytes and --factor >= 2, but got "
            f"{low}, {high} and {args.factor}"
        )
    sizes = []
    size = low
    while size <= high:
        sizes.append(size)
        size *= args.factor
    if args.axis:
        axes = tuple(mesh.normalize_axis(tuple(a.split(","))) for a in args.axis)
    else:
        axes = tuple((name,) for name, s in mesh.shape.items() if s > 1)
    if not axes:
        raise TopoValueError(f"topo bench requires an axis of size > 1, but mesh {mesh} has none")
    if args.seconds <= 0 or args.reps < 1:
        raise TopoValueError(
            f"--seconds requires > 0 and --reps >= 1, but got {args.seconds} and {args.reps}"
        )
    return BenchConfig(
        axes=axes,
        collectives=collectives,
        sizes=tuple(sizes),
        dtype=args.dtype,
        op=args.op,
        seconds=args.seconds,
        reps=args.reps,
        raw=not args.no_raw,
        progress=not args.quiet,
    )


def _launched() -> bool:
    return any(v in os.environ for v in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"))


def run(args: argparse.Namespace) -> int:
    """Run ``topo bench`` from parsed arguments; returns the exit status (1 if #wrong > 0).

    Example::

        run(parser.parse_args(["dp=2", "tp=2", "-e", "1M"]))
    """
    import platform

    import torch

    from topo.launch import spawn
    from topo.world import World

    if _launched():
        world = World.from_env()
        mesh = parse_mesh(args.spec) if args.spec else DeviceMesh(world=world.world_size)
        config = _config_from_args(args, mesh)
        with mesh.activate(world) as ctx:
            mine = run_rank(config)
            per_rank = ctx.coordinator.all_gather_object(mine)
        if world.rank != 0:
            return 0
        where = f"{world.world_size} ranks launched by the environment"
    else:
        mesh = parse_mesh(args.spec) if args.spec else DeviceMesh(dp=2, tp=2)
        config = _config_from_args(args, mesh)
        per_rank = spawn(_bench_rank, mesh, config, timeout=args.timeout)
        where = f"{mesh.size} local processes (topo.spawn)"
    rows = aggregate(per_rank)
    header = (
        f"# topo bench: mesh {mesh} on {where}; gloo on CPU; torch {torch.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs\n"
        f"# time: slowest rank, best of {config.reps} blocks; raw = the same ProcessGroupGloo "
        f"call without topo"
    )
    if args.json:
        print(json.dumps({"mesh": dict(mesh.shape), "rows": rows}, indent=1))
    elif args.csv:
        print(to_csv(rows), end="")
    else:
        print(format_table(rows, header), end="")
    if args.plot:
        plot(rows, args.plot)
        print(f"# plot saved to {args.plot}", file=sys.stderr)
    return 1 if any(r["wrong"] for r in rows) else 0


def _bench_rank(config: BenchConfig) -> list[dict[str, Any]]:
    return run_rank(config)
