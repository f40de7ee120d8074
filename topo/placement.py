"""Where a mesh's ranks land on nodes (:class:`Placement`), and mesh specs from text
(:func:`parse_mesh`): pure arithmetic on a :class:`~topo.mesh.DeviceMesh`, no torch, no I/O.

Example::

    >>> parse_mesh("dp=2,pp=2,tp=4").placement(ranks_per_node=8).inter_node_axes
    ('dp',)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import attrs

from topo._checks import as_int
from topo.errors import TopoTypeError, TopoValueError
from topo.mesh import DeviceMesh

__all__ = ["Placement", "parse_mesh"]


@attrs.frozen(init=False, repr=False)
class Placement:
    """Where a mesh's ranks land when each node holds ``ranks_per_node`` consecutive ranks.

    Example::

        >>> DeviceMesh(dp=2, pp=2, tp=4).placement(ranks_per_node=8).intra_node_axes
        ('tp', 'pp')
    """

    mesh: DeviceMesh
    ranks_per_node: int
    num_nodes: int
    intra_node_axes: tuple[str, ...]
    """Axes whose every group lies inside one node (fastest axis first)."""
    inter_node_axes: tuple[str, ...]
    """Axes with at least one group that spans several nodes (fastest axis first)."""

    def __init__(self, mesh: DeviceMesh, ranks_per_node: int) -> None:
        rpn = as_int(ranks_per_node, "ranks_per_node")
        if rpn < 1:
            raise TopoValueError(f"ranks_per_node requires a positive int, but got {rpn}")
        if mesh.size % rpn and rpn < mesh.size:
            raise TopoValueError(
                f"ranks_per_node requires a divisor of the mesh size (or a node that holds the "
                f"whole mesh): {mesh} has {mesh.size} ranks, which {rpn} ranks per node do not "
                f"divide; choose one of {_divisors(mesh.size)} or at least {mesh.size}"
            )
        intra: list[str] = []
        inter: list[str] = []
        for name in reversed(mesh.axis_names):
            n = mesh.axis_size(name)
            block = n * mesh.stride(name)
            # A group of this axis spans [base, base + (n-1)*stride]; it stays inside a node for
            # every base exactly when the axis is trivial, one node holds the whole mesh, or the
            # block of this axis and the faster ones tiles a node.
            if n == 1 or rpn >= mesh.size or rpn % block == 0:
                intra.append(name)
            else:
                inter.append(name)
        self.__attrs_init__(  # type: ignore[attr-defined]
            mesh, rpn, max(1, math.ceil(mesh.size / rpn)), tuple(intra), tuple(inter)
        )

    def node_of(self, rank: int) -> int:
        """The node index of ``rank`` (``rank // ranks_per_node``).

        Example::

            >>> DeviceMesh(dp=2, tp=4).placement(4).node_of(5)
            1
        """
        return self.mesh._check_rank(rank) // self.ranks_per_node

    def spans_nodes(self, axis: str) -> bool:
        """True when some group along ``axis`` has ranks on more than one node.

        Example::

            >>> DeviceMesh(dp=2, tp=4).placement(4).spans_nodes("dp")
            True
        """
        self.mesh._axis_position(axis)
        return axis in self.inter_node_axes

    def __repr__(self) -> str:
        return (
            f"Placement(mesh={self.mesh!r}, ranks_per_node={self.ranks_per_node}, "
            f"num_nodes={self.num_nodes}, intra_node_axes={self.intra_node_axes}, "
            f"inter_node_axes={self.inter_node_axes})"
        )


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def parse_mesh(spec: str | Iterable[str]) -> DeviceMesh:
    """Parse ``"dp=2,pp=2,tp=2"`` (or the words ``["dp=2", "pp=2", "tp=2"]``) into a mesh.

    Example::

        >>> parse_mesh("dp=2,tp=4")
        DeviceMesh(dp=2, tp=4)
    """
    words = None
    if isinstance(spec, str):
        words = spec.replace(",", " ").split()
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, bytearray)):
        words = list(spec)
    if words is None or not all(isinstance(w, str) for w in words):
        raise TopoTypeError(
            f"a mesh spec requires a str like 'dp=2,tp=4' or a list of words like "
            f"['dp=2', 'tp=4'], but got {type(spec).__name__} {spec!r}"
        )
    words = [w for word in words for w in word.split(",") if w]
    if not words:
        raise TopoValueError(
            "a mesh spec requires at least one NAME=SIZE, like dp=2 tp=4, but got none"
        )
    names: list[str] = []
    sizes: list[int] = []
    for word in words:
        name, sep, size = word.partition("=")
        if not sep or re.fullmatch(r"\s*-?[0-9]+\s*", size) is None:
            raise TopoValueError(
                f"a mesh spec requires NAME=SIZE words like dp=2, but got {word!r}"
            )
        names.append(name.strip())
        sizes.append(int(size))
    return DeviceMesh.from_shape(sizes, names)
