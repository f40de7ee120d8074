"""The ``topo`` command line: ``topo plan`` and ``topo bench`` (see :data:`COMMANDS`).

Importing this module is cheap (no torch): subcommands import what they need when they run.

Example::

    $ topo plan dp=2 pp=2 tp=2 --rank 5 --ranks-per-node 4
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

__all__ = ["COMMANDS", "Command", "main"]


class Command(NamedTuple):
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it.

    ``run`` returns the exit status; a ``ValueError`` or ``TypeError`` it raises becomes one
    line ``topo NAME: error: MESSAGE`` on stderr and exit status 2.

    Example::

        Command("plan", "show a mesh's groups", _add_plan_arguments, _run_plan)
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``PROG: error: MESSAGE``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------- topo plan


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec",
        nargs="+",
        metavar="NAME=SIZE",
        help="mesh axes outermost first, e.g. 'dp=2 pp=2 tp=2' or 'dp=2,pp=2,tp=2'",
    )
    parser.add_argument(
        "--rank",
        type=int,
        metavar="R",
        help="also show rank R's coordinates, groups and neighbours",
    )
    parser.add_argument(
        "--ranks-per-node",
        type=int,
        metavar="N",
        help="also show node placement with N consecutive ranks per node",
    )
    parser.add_argument(
        "--intra-node",
        metavar="AXES",
        help="comma-separated axes that should stay inside a node (default: tp, if present)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _run_plan(args: argparse.Namespace) -> int:
    from topo.mesh import parse_mesh
    from topo.plan import format_json, format_plan, plan_dict

    mesh = parse_mesh(args.spec)
    intra = (
        None
        if args.intra_node is None
        else [a.strip() for a in args.intra_node.split(",") if a.strip()]
    )
    plan = plan_dict(mesh, args.rank, args.ranks_per_node, intra)
    print(format_json(plan) if args.json else format_plan(plan))
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from topo import bench

    bench.add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from topo import bench

    return bench.run(args)


#: The subcommands, in help order. A subcommand module provides add_arguments(parser) and
#: run(args) -> int, and imports torch inside run (not at module level) so that `topo plan`
#: stays fast.
COMMANDS: tuple[Command, ...] = (
    Command(
        "plan",
        "show a mesh's groups, a rank's neighbours and node placement",
        _add_plan_arguments,
        _run_plan,
    ),
    Command(
        "bench",
        "time every collective over a size sweep against raw torch ProcessGroup calls "
        "(nccl-tests format)",
        _add_bench_arguments,
        _run_bench,
    ),
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("topo")
    except PackageNotFoundError:
        return "0+unknown"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="topo", description="Device-mesh topology for distributed deep learning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run, _prog=p.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``topo`` command line on ``argv`` (default ``sys.argv[1:]``); return the status.

    Example::

        >>> main(["plan", "dp=2", "tp=2"])  # doctest: +SKIP
        mesh dp(2) * tp(2) = 4 ranks
        ...
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status: int = args._run(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `topo plan ... | head`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        print(f"{args._prog}: error: {message}", file=sys.stderr)
        return 2
    return status
