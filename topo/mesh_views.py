"""Derived meshes: other views of the same ranks — a sub-mesh, merged or split axes, and named
derived axes.

Every view but :meth:`~MeshViews.submesh` keeps each rank's number, so a view of an active
mesh can share its rendezvous and its communicators (``ctx.view(...)``). Like the mesh itself,
a view is a value: pure arithmetic, no process, no torch.

Example::

    >>> mesh = DeviceMesh(dp=4, tp=2)
    >>> mesh.unflatten("dp", dp_replicate=2, dp_shard=2)
    DeviceMesh(dp_replicate=2, dp_shard=2, tp=2)
    >>> DeviceMesh(pp=2, dp=2, tp=2).with_axes(ep=("dp", "tp")).group("ep", 5)
    (4, 5, 6, 7)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from topo._checks import as_axis_name, as_int
from topo.errors import TopoTypeError, TopoValueError

if TYPE_CHECKING:
    from topo.mesh import DeviceMesh

__all__ = ["MeshViews"]


class MeshViews:
    """The derived-mesh methods of :class:`~topo.DeviceMesh` (a mixin: it has no state).

    Example::

        >>> DeviceMesh(dp=2, pp=2, tp=2).submesh("tp", "dp")
        DeviceMesh(dp=2, tp=2)
    """

    __slots__ = ()

    def submesh(self, *axes: str) -> DeviceMesh:
        """The mesh of some axes alone, in mesh order (its derived axes over those axes kept).

        Rank ``i`` of the sub-mesh is index ``i`` of :meth:`group` over the same axes, so
        ``mesh.group(axes, r)[i]`` is the global rank of sub-mesh rank ``i`` in ``r``'s copy.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).submesh("tp", "dp")
            DeviceMesh(dp=2, tp=2)
        """
        mesh = _as_mesh(self)
        names = mesh.normalize_axis(axes)
        sizes = [mesh.shape[n] for n in names]
        return _rebuild(sizes, names, _surviving(mesh, set(names)))

    def flatten(self, axes: Sequence[str], name: str) -> DeviceMesh:
        """Merge adjacent ``axes`` into one axis called ``name``; every rank keeps its number
        (derived axes over the merged ones are dropped; ``name`` itself is their union).

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).flatten(("pp", "tp"), "mp")
            DeviceMesh(dp=2, mp=4)
        """
        mesh = _as_mesh(self)
        positions = mesh._positions_of(axes)
        if positions != tuple(range(positions[0], positions[-1] + 1)):
            raise TopoValueError(
                f"flatten requires adjacent axes so that ranks keep their numbers, but got "
                f"{tuple(axes)} in mesh {mesh}; use group({tuple(axes)}, rank) to treat "
                f"non-adjacent axes as one, or with_axes(name={tuple(axes)}) to name them"
            )
        as_axis_name(name, "flatten name")
        merged = {mesh.axis_names[p] for p in positions}
        names = list(mesh.axis_names)
        sizes = list(mesh.axis_sizes)
        size = math.prod(sizes[p] for p in positions)
        del names[positions[0] : positions[-1] + 1], sizes[positions[0] : positions[-1] + 1]
        names.insert(positions[0], name)
        sizes.insert(positions[0], size)
        kept = set(mesh.axis_names) - merged
        return _rebuild(sizes, names, _surviving(mesh, kept), taken=name)

    def unflatten(self, axis: str, /, **sizes: int) -> DeviceMesh:
        """Split ``axis`` into new axes (outermost first) whose sizes multiply to its size;
        every rank keeps its number, so the new axes together are the old one
        (``group((a, b), r) == old.group(axis, r)``). torchtitan's ``dp`` → ``dp_replicate`` ×
        ``dp_shard`` is ``unflatten("dp", dp_replicate=2, dp_shard=4)``. Derived axes over
        ``axis`` now name the new axes.

        Example::

            >>> DeviceMesh(dp=4, tp=2).unflatten("dp", rep=2, shard=2)
            DeviceMesh(rep=2, shard=2, tp=2)
        """
        mesh = _as_mesh(self)
        position = mesh._axis_position(axis)
        if not sizes:
            raise TopoValueError(
                f"unflatten requires the new axes and their sizes, like unflatten({axis!r}, "
                f"a=2, b={max(1, mesh.axis_sizes[position] // 2)}), but got none"
            )
        checked = {n: as_int(s, f"unflatten size of {n!r}", minimum=1) for n, s in sizes.items()}
        total = math.prod(checked.values())
        if total != mesh.axis_sizes[position]:
            parts = " * ".join(f"{n}({s})" for n, s in checked.items())
            raise TopoValueError(
                f"unflatten requires sizes whose product is {axis}'s size "
                f"{mesh.axis_sizes[position]}, but got {parts} = {total}; change the sizes"
            )
        clash = [n for n in checked if n in mesh.shape and n != axis]
        if clash:
            raise TopoValueError(
                f"unflatten requires new axis names, but {clash[0]!r} is already an axis of "
                f"{mesh}; pick another name"
            )
        names = [*mesh.axis_names[:position], *checked, *mesh.axis_names[position + 1 :]]
        values = [*mesh.axis_sizes[:position], *checked.values()]
        values += mesh.axis_sizes[position + 1 :]
        derived = {
            alias: tuple(n for a in over for n in ((*checked,) if a == axis else (a,)))
            for alias, over in mesh.derived_axes.items()
            if alias not in checked
        }
        return _rebuild(values, names, derived)

    def with_axes(self, /, **derived: Sequence[str] | str) -> DeviceMesh:
        """This mesh with named derived axes: each name stands for a tuple of axes (one
        flattened axis, row-major in mesh order, as a tuple axis argument), usable everywhere
        an axis name is — ``group("ep", r)``, ``topo.all_to_all(x, axis="ep")`` — and sharing
        its communicator with the tuple. Ranks keep their numbers.

        Example::

            >>> mesh = DeviceMesh(dp=2, tp=2).with_axes(ep=("dp", "tp"))
            >>> mesh.group("ep", 1), mesh.axis_size("ep")
            ((0, 1, 2, 3), 4)
        """
        mesh = _as_mesh(self)
        if not derived:
            raise TopoValueError(
                "with_axes requires at least one derived axis, like with_axes(ep=('dp', 'tp')), "
                "but got none"
            )
        table = dict(mesh.derived_axes)
        for name, over in derived.items():
            as_axis_name(name, "with_axes name")
            if name in mesh.shape:
                raise TopoValueError(
                    f"with_axes requires a name that is not an axis of {mesh}, but got {name!r}; "
                    f"pick another name"
                )
            if not isinstance(over, (str, tuple, list)):
                raise TopoTypeError(
                    f"with_axes {name}= requires an axis name or a tuple of names from "
                    f"{mesh._valid_axes()}, but got {type(over).__name__} {over!r}"
                )
            table[name] = mesh.normalize_axis(over)  # other derived axes expand too
        return _rebuild(mesh.axis_sizes, mesh.axis_names, table)


def _as_mesh(view: MeshViews) -> DeviceMesh:
    return cast("DeviceMesh", view)


def _surviving(mesh: DeviceMesh, kept: set[str]) -> dict[str, tuple[str, ...]]:
    """The derived axes of ``mesh`` all of whose axes are in ``kept``."""
    return {a: over for a, over in mesh.derived_axes.items() if set(over) <= kept}


def _rebuild(
    sizes: Sequence[int],
    names: Sequence[str],
    derived: Mapping[str, tuple[str, ...]],
    taken: str | None = None,
) -> DeviceMesh:
    from topo.mesh import DeviceMesh

    base = DeviceMesh.from_shape(sizes, names)
    kept = {
        a: base.normalize_axis(over)
        for a, over in derived.items()
        if a != taken and a not in base.shape
    }
    return DeviceMesh._make(sizes, names, kept) if kept else base


def rebuild(sizes: Sequence[int], names: Sequence[str], derived: Any) -> DeviceMesh:
    """Unpickle a mesh (``DeviceMesh.__reduce__``): its axes and derived axes.

    Example::

        >>> rebuild((2, 2), ("dp", "tp"), (("ep", ("dp", "tp")),))
        DeviceMesh(dp=2, tp=2).with_axes(ep=('dp', 'tp'))
    """
    return _rebuild(sizes, names, dict(derived))
