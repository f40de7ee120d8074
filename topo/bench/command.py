"""``topo bench`` from parsed arguments: run the sweep, then print the report.

It runs on a local mesh through :func:`topo.spawn` (default ``dp=2,tp=2``: 4 CPU processes),
or, when torchrun/Slurm/mpirun variables are present, as one rank of that launch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from topo.bench.config import FULL, BenchConfig, config_from_args, format_size, parse_size
from topo.bench.measure import run_rank
from topo.bench.report import aggregate, format_table, plot, to_csv
from topo.mesh import DeviceMesh
from topo.placement import parse_mesh

__all__ = ["run"]


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
        config = config_from_args(args, mesh)
        with mesh.activate(world) as ctx:
            mine = run_rank(config)
            per_rank = ctx.coordinator.all_gather_json(mine)
        if world.rank != 0:
            return 0
        where = f"{world.world_size} ranks launched by the environment"
    else:
        mesh = parse_mesh(args.spec) if args.spec else DeviceMesh(dp=2, tp=2)
        config = config_from_args(args, mesh)
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
        quick = not args.full and (args.min_bytes, args.max_bytes, args.factor) == (None,) * 3
        footer = (
            f"# the full sweep ({format_size(parse_size(FULL[0]))} to "
            f"{format_size(parse_size(FULL[1]))} by {FULL[2]}x: 24 sizes per collective and "
            f"axis, a few minutes on 2 cores): topo bench --full"
            if quick
            else ""
        )
        print(format_table(rows, header, footer), end="")
    if args.plot:
        plot(rows, args.plot)
        print(f"# plot saved to {args.plot}", file=sys.stderr)
    return 1 if any(r["wrong"] for r in rows) else 0


def _bench_rank(config: BenchConfig) -> list[dict[str, Any]]:
    return run_rank(config)
