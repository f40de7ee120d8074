"""The ``topo`` command line: ``topo plan`` and ``topo bench`` (see :data:`COMMANDS`).

Importing this module is cheap (no torch): subcommands import what they need when they run.

Example::

    $ topo plan dp=2 pp=2 tp=2 --rank 5 --ranks-per-node 4
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

__all__ = ["COMMANDS", "Command", "add_mesh_argument", "main"]


class Command(NamedTuple):
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it.

    ``run`` returns the exit status; a ``ValueError`` or ``TypeError`` it raises becomes one
    line ``topo NAME: error: MESSAGE`` on stderr and exit status 2.

    Example::

        Command("plan", "show a mesh's groups", plan.add_arguments, plan.run)
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``PROG: error: MESSAGE``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_mesh_argument(parser: argparse.ArgumentParser, help: str, optional: bool = False) -> None:
    """Declare the positional mesh spec, ``NAME=SIZE`` words outermost axis first (read with
    :func:`topo.parse_mesh`); ``optional`` lets it be left out.

    Example::

        add_mesh_argument(parser, "mesh axes outermost first, e.g. 'dp=2 tp=2'")
    """
    parser.add_argument("spec", nargs="*" if optional else "+", metavar="NAME=SIZE", help=help)


def _subcommand(
    module: str,
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``add_arguments`` and ``run`` of the subcommand ``module``, imported when called."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        status: int = importlib.import_module(module).run(args)
        return status

    return add_arguments, run


#: The subcommands, in help order. A subcommand module provides add_arguments(parser) and
#: run(args) -> int (as topo.plan and topo.bench do), is imported only when its command is
#: parsed or run, and imports torch inside run (not at module level) so that `topo plan`
#: stays fast.
COMMANDS: tuple[Command, ...] = (
    Command(
        "plan",
        "show a mesh's groups, a rank's neighbours and node placement",
        *_subcommand("topo.plan"),
    ),
    Command(
        "bench",
        "time every collective over a size sweep against raw torch ProcessGroup calls "
        "(nccl-tests format)",
        *_subcommand("topo.bench"),
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
