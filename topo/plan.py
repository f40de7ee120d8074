"""``topo plan``: a mesh's groups, one rank's view and node placement, as data or text.

:func:`plan_dict` builds a JSON-able dict and :func:`format_plan` renders it as text; only the
command itself (:func:`add_arguments` declares its options, :func:`run` runs it) prints. Output is bounded whatever the world size: each axis lists at most
``max_groups`` groups of at most ``max_ranks`` ranks, and the node table appears only for
meshes of at most :data:`NODE_TABLE_LIMIT` ranks. The work is bounded too: group heads are
computed arithmetically (O(#axes + shown ranks)), never by enumerating groups.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from topo.cli import add_mesh_argument
from topo.errors import TopoTypeError, TopoValueError
from topo.mesh import DeviceMesh
from topo.placement import Placement, parse_mesh

__all__ = [
    "DEFAULT_INTRA_NODE",
    "MAX_GROUPS",
    "MAX_RANKS",
    "NODE_TABLE_LIMIT",
    "add_arguments",
    "format_json",
    "format_plan",
    "intra_node_axes",
    "plan_dict",
    "plan_text",
    "run",
]

#: Axes that should stay inside a node when ``intra_node`` is not given (those in the mesh).
DEFAULT_INTRA_NODE: tuple[str, ...] = ("tp",)
#: Groups listed per axis before "… (N groups in all)".
MAX_GROUPS = 4
#: Ranks listed per group before "… (K ranks)".
MAX_RANKS = 8
#: Largest mesh for which the node → ranks table is listed.
NODE_TABLE_LIMIT = 64


def intra_node_axes(mesh: DeviceMesh, intra_node: Sequence[str] | None = None) -> list[str]:
    """The axes that should stay inside a node, validated, in the order given.

    ``None`` means :data:`DEFAULT_INTRA_NODE` restricted to the mesh's axes; an explicitly
    named axis that the mesh lacks is a ``ValueError`` listing the valid axes.

    Example::

        >>> intra_node_axes(DeviceMesh(dp=2, pp=2))
        []
    """
    if intra_node is None:
        return [a for a in DEFAULT_INTRA_NODE if a in mesh.axis_names]
    if isinstance(intra_node, str):
        raise TopoTypeError(
            f"intra_node requires a sequence of axis names, like ['tp'], but got the "
            f"str {intra_node!r}"
        )
    names: list[str] = []
    for axis in intra_node:
        if axis not in mesh.axis_names:
            valid = ", ".join(repr(a) for a in mesh.axis_names)
            raise TopoValueError(
                f"intra_node got unknown axis {axis!r}: mesh {mesh} has axes {valid}"
            )
        if axis not in names:
            names.append(axis)
    return names


def _group_first(mesh: DeviceMesh, axis: str, k: int) -> int:
    """First rank of group ``k`` along ``axis``, in the order of ``mesh.groups(axis)``."""
    first = 0
    for name, size in zip(reversed(mesh.axis_names), reversed(mesh.axis_sizes), strict=True):
        if name != axis:  # the other axes, row-major with the last one fastest
            first += (k % size) * mesh.stride(name)
            k //= size
    return first


def _head(mesh: DeviceMesh, axis: str, first: int, max_ranks: int) -> list[int]:
    stride = mesh.stride(axis)
    return [first + i * stride for i in range(min(mesh.axis_size(axis), max_ranks))]


def _spec(names: Sequence[str], sizes: Sequence[int]) -> str:
    return " ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))


def _span_warning(mesh: DeviceMesh, placement: Placement, axis: str, keep: list[str]) -> str:
    """Why ``axis`` spans nodes and what would keep it inside one; every fix offered works."""
    n, stride, rpn = mesh.axis_size(axis), mesh.stride(axis), placement.ranks_per_node
    block = n * stride  # a group stays in a node for every base iff rpn is a multiple of this
    fixes: list[str] = []
    if rpn % n == 0:  # n divides rpn, so some axis order keeps the axis inside a node
        order = [a for a in mesh.axis_names if a not in keep] + [
            a for a in mesh.axis_names if a in keep
        ]
        reordered = DeviceMesh.from_shape([mesh.axis_size(a) for a in order], order)
        if not reordered.placement(rpn).spans_nodes(axis):
            fixes.append(f"reorder the axes as `{_spec(order, reordered.axis_sizes)}`")
        else:
            together = math.prod(mesh.axis_size(a) for a in keep)
            fixes.append(
                f"put {axis} innermost (last; {', '.join(keep)} together have "
                f"{together} ranks, which do not fit in one node)"
            )
    else:
        fixes.append(f"use a {axis} size that divides {rpn} (no axis order keeps {n} in a node)")
    if block < mesh.size:
        fixes.append(f"use --ranks-per-node that is a multiple of {block} and divides {mesh.size}")
    else:
        fixes.append(f"use --ranks-per-node {mesh.size} (one node)")
    return (
        f"axis {axis!r} spans nodes with {rpn} ranks per node ({axis} groups have {n} ranks "
        f"with stride {stride}); " + " or ".join(fixes)
    )


def _rank_section(
    mesh: DeviceMesh, rank: int, placement: Placement | None, max_ranks: int
) -> dict[str, Any]:
    axes: dict[str, Any] = {}
    for axis in mesh.axis_names:
        first = mesh.first(axis, rank)
        axes[axis] = {
            "index": mesh.axis_index(axis, rank),
            "size": mesh.axis_size(axis),
            "group": _head(mesh, axis, first, max_ranks),
            "group_truncated": mesh.axis_size(axis) > max_ranks,
            "prev": mesh.neighbor(axis, rank, -1, wrap=False),
            "next": mesh.neighbor(axis, rank, 1, wrap=False),
            "ring_prev": mesh.neighbor(axis, rank, -1),
            "ring_next": mesh.neighbor(axis, rank, 1),
            "first": first,
            "last": mesh.last(axis, rank),
        }
    return {
        "rank": rank,
        "coords": mesh.coords(rank),
        "node": None if placement is None else placement.node_of(rank),
        "local_rank": None if placement is None else rank % placement.ranks_per_node,
        "axes": axes,
    }


def _placement_section(
    mesh: DeviceMesh, placement: Placement, keep: list[str]
) -> tuple[dict[str, Any], list[str]]:
    rpn = placement.ranks_per_node
    nodes = None
    if mesh.size <= NODE_TABLE_LIMIT:
        nodes = [list(range(i, min(i + rpn, mesh.size))) for i in range(0, mesh.size, rpn)]
    section = {
        "ranks_per_node": rpn,
        "num_nodes": placement.num_nodes,
        "intra_node_axes": list(placement.intra_node_axes),
        "inter_node_axes": list(placement.inter_node_axes),
        "nodes": nodes,
    }
    warnings = [_span_warning(mesh, placement, a, keep) for a in keep if placement.spans_nodes(a)]
    return section, warnings


def plan_dict(
    mesh: DeviceMesh,
    rank: int | None = None,
    ranks_per_node: int | None = None,
    intra_node: Sequence[str] | None = None,
    *,
    max_groups: int = MAX_GROUPS,
    max_ranks: int = MAX_RANKS,
) -> dict[str, Any]:
    """The plan as a JSON-able dict: mesh, axes (groups), rank, placement and warnings.

    ``rank`` adds that rank's coordinates, groups and neighbours; ``ranks_per_node`` adds the
    node placement and a warning for each ``intra_node`` axis whose groups span nodes.
    Invalid input raises ``ValueError``/``TypeError`` with topo's messages.

    Example::

        >>> plan_dict(DeviceMesh(dp=2, tp=2))["axes"]["dp"]["groups"]
        [[0, 2], [1, 3]]
    """
    keep = intra_node_axes(mesh, intra_node)
    if rank is not None:
        mesh.coords(rank)  # ValueError/TypeError for a rank outside the mesh
    placement = None if ranks_per_node is None else mesh.placement(ranks_per_node)
    axes: dict[str, Any] = {}
    for axis in mesh.axis_names:
        size, count = mesh.axis_size(axis), mesh.num_groups(axis)
        shown = min(count, max_groups)
        axes[axis] = {
            "size": size,
            "stride": mesh.stride(axis),
            "num_groups": count,
            "groups": [
                _head(mesh, axis, _group_first(mesh, axis, k), max_ranks) for k in range(shown)
            ],
            "truncated": shown < count or size > max_ranks,
        }
    section, warnings = (
        (None, []) if placement is None else _placement_section(mesh, placement, keep)
    )
    return {
        "mesh": dict(mesh.shape),
        "size": mesh.size,
        "axes": axes,
        "rank": None if rank is None else _rank_section(mesh, rank, placement, max_ranks),
        "placement": section,
        "intra_node": keep,
        "warnings": warnings,
    }


def _fmt_group(ranks: list[int], size: int) -> str:
    more = f", … ({size} ranks)" if size > len(ranks) else ""
    return "[" + ", ".join(map(str, ranks)) + more + "]"


def _fmt_opt(rank: int | None) -> str:
    return "-" if rank is None else str(rank)


def format_plan(plan: dict[str, Any]) -> str:
    """Render a :func:`plan_dict` result as text (no trailing newline).

    Example::

        >>> print(format_plan(plan_dict(DeviceMesh(dp=2, tp=2))))
        mesh dp(2) * tp(2) = 4 ranks
        dp (size 2, stride 2, 2 groups): [0, 2] [1, 3]
        tp (size 2, stride 1, 2 groups): [0, 1] [2, 3]
    """
    spec = " * ".join(f"{n}({s})" for n, s in plan["mesh"].items())
    lines = [f"mesh {spec} = {plan['size']} ranks"]
    for axis, info in plan["axes"].items():
        groups = " ".join(_fmt_group(g, info["size"]) for g in info["groups"])
        if len(info["groups"]) < info["num_groups"]:
            groups += f" … ({info['num_groups']} groups in all)"
        lines.append(
            f"{axis} (size {info['size']}, stride {info['stride']}, "
            f"{info['num_groups']} groups): {groups}"
        )
    if plan["rank"] is not None:
        r = plan["rank"]
        coords = ", ".join(f"{a}={i}" for a, i in r["coords"].items())
        lines.append(f"rank {r['rank']}: {coords}")
        for axis, a in r["axes"].items():
            lines.append(
                f"  {axis}: index {a['index']} of {a['size']}, group "
                f"{_fmt_group(a['group'], a['size'])}; prev {_fmt_opt(a['prev'])}, "
                f"next {_fmt_opt(a['next'])}; ring prev {a['ring_prev']}, "
                f"ring next {a['ring_next']}; first {a['first']}, last {a['last']}"
            )
    p = plan["placement"]
    if p is not None:
        lines.append(f"placement: {p['ranks_per_node']} ranks per node, {p['num_nodes']} nodes")
        lines.append(f"  intra-node axes: {', '.join(p['intra_node_axes']) or '-'}")
        lines.append(f"  inter-node axes: {', '.join(p['inter_node_axes']) or '-'}")
        for node, ranks in enumerate(p["nodes"] or []):
            span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
            lines.append(f"  node {node}: {span}")
        if plan["rank"] is not None:
            r = plan["rank"]
            lines.append(
                f"  rank {r['rank']} is on node {r['node']} (local rank {r['local_rank']})"
            )
    lines.extend(f"warning: {w}" for w in plan["warnings"])
    return "\n".join(lines)


def format_json(plan: dict[str, Any]) -> str:
    """Render a :func:`plan_dict` result as indented JSON, each list of ranks or names on one line.

    Example::

        >>> '"groups": [[0, 1]]' in format_json(plan_dict(DeviceMesh(tp=2)))
        False
        >>> "[0, 1]" in format_json(plan_dict(DeviceMesh(tp=2)))
        True
    """
    text = json.dumps(plan, indent=2, ensure_ascii=False)
    return _FLAT_LIST.sub(lambda m: json.dumps(json.loads(m.group()), ensure_ascii=False), text)


_FLAT_LIST = re.compile(r'\[(?:\s*(?:-?\d+|null|"\w*"),?)+\s*\]')


def plan_text(
    mesh: DeviceMesh,
    rank: int | None = None,
    ranks_per_node: int | None = None,
    intra_node: Sequence[str] | None = None,
) -> str:
    """The plan as text: ``format_plan(plan_dict(...))``.

    Example::

        >>> print(plan_text(DeviceMesh(pp=2, tp=2), ranks_per_node=2).splitlines()[3])
        placement: 2 ranks per node, 2 nodes
    """
    return format_plan(plan_dict(mesh, rank, ranks_per_node, intra_node))


# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``topo plan``'s options.

    Example::

        add_arguments(argparse.ArgumentParser())
    """
    add_mesh_argument(
        parser, "mesh axes outermost first, e.g. 'dp=2 pp=2 tp=2' or 'dp=2,pp=2,tp=2'"
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


def run(args: argparse.Namespace) -> int:
    """Run ``topo plan`` from parsed arguments: print the plan; returns the exit status.

    Example::

        run(parser.parse_args(["dp=2", "tp=2", "--rank", "3"]))
    """
    mesh = parse_mesh(args.spec)
    intra = (
        None
        if args.intra_node is None
        else [a.strip() for a in args.intra_node.split(",") if a.strip()]
    )
    plan = plan_dict(mesh, args.rank, args.ranks_per_node, intra)
    print(format_json(plan) if args.json else format_plan(plan))
    return 0
