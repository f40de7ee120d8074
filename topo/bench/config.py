"""``topo bench``'s configuration: the command-line options, sizes, and :class:`BenchConfig`.

Nothing here imports torch at module level, so ``topo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
from types import MappingProxyType

import attrs

from topo.cli import add_mesh_argument
from topo.errors import TopoValueError
from topo.mesh import DeviceMesh

__all__ = [
    "COLLECTIVES",
    "BenchConfig",
    "add_arguments",
    "config_from_args",
    "format_size",
    "parse_size",
]

#: The collectives ``topo bench`` measures, in table order.
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")

#: The default sweep (min, max, factor): 8 B, 4 KiB and 2 MiB — every collective, in seconds.
QUICK = ("8", "2M", 512)
#: ``--full``: 8 B to 64 MiB by 2 (24 sizes; minutes on a 2-core machine).
FULL = ("8", "64M", 2)

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``topo bench``'s options.

    Example::

        add_arguments(argparse.ArgumentParser())
    """
    add_mesh_argument(
        parser,
        "local mesh, outermost axis first (default dp=2 tp=2); under "
        "torchrun/srun/mpirun it must match the world size (default: one axis 'world')",
        optional=True,
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
    parser.add_argument(
        "-b", "--min-bytes", default=None, help=f"smallest size (default {QUICK[0]})"
    )
    parser.add_argument("-e", "--max-bytes", default=None, help=f"largest size (default {QUICK[1]})")
    parser.add_argument(
        "-f", "--factor", type=int, default=None, help=f"size step factor (default {QUICK[2]})"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"the full sweep: {FULL[0]} B to {FULL[1]}B by a factor {FULL[2]} (24 sizes; "
        f"-b/-e/-f override it)",
    )
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


def config_from_args(args: argparse.Namespace, mesh: DeviceMesh) -> BenchConfig:
    """Check the parsed options against ``mesh``; one ``TopoValueError`` line per mistake.

    Example::

        config = config_from_args(parser.parse_args(["-e", "1M"]), DeviceMesh(dp=2, tp=2))
    """
    import torch

    from topo.communicators.dtypes import GLOO_REDUCE_DTYPES, dtype_names

    collectives = tuple(c.strip() for c in args.collectives.split(",") if c.strip())
    unknown = [c for c in collectives if c not in COLLECTIVES]
    if unknown or not collectives:
        raise TopoValueError(
            f"--collectives requires names from {', '.join(COLLECTIVES)}, but got "
            f"{args.collectives!r}"
        )
    if getattr(torch, args.dtype, None) not in GLOO_REDUCE_DTYPES:
        raise TopoValueError(
            f"--dtype requires one of {dtype_names(GLOO_REDUCE_DTYPES)}, but got {args.dtype!r}"
        )
    sweep = FULL if getattr(args, "full", False) else QUICK
    low = parse_size(args.min_bytes if args.min_bytes is not None else sweep[0])
    high = parse_size(args.max_bytes if args.max_bytes is not None else sweep[1])
    factor = args.factor if args.factor is not None else sweep[2]
    if not 0 < low <= high or factor < 2:
        raise TopoValueError(
            f"sizes require 0 < --min-bytes <= --max-bytes and --factor >= 2, but got "
            f"{low}, {high} and {factor}"
        )
    sizes = []
    size = low
    while size <= high:
        sizes.append(size)
        size *= factor
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
