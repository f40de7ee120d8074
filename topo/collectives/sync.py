"""Synchronization and axis queries: barrier, axis_index, axis_size."""

from __future__ import annotations

from topo.active import current, find_context
from topo.mesh import Axis

__all__ = ["axis_index", "axis_size", "barrier"]


def barrier(axis: Axis | None = None) -> None:
    """Block until every rank of ``axis`` (default: every rank of the innermost mesh) arrives.

    A rank that never arrives makes the others raise :class:`topo.RendezvousTimeout` naming it
    after the activation's timeout.

    Example::

        with DeviceMesh(dp=2, tp=2).activate():
            topo.barrier()            # all 4 ranks
            topo.barrier(axis="tp")   # this rank's tp group
    """
    if axis is None:
        current().coordinator.barrier("topo.barrier")
        return
    ctx, names, n = find_context(axis, "barrier")
    if n > 1:
        ctx.coordinator.barrier("topo.barrier:" + ".".join(names), ranks=ctx.group(names))


def axis_index(axis: Axis) -> int:
    """This rank's index along ``axis`` (row-major over a tuple, as ``jax.lax.axis_index``).

    Example::

        with DeviceMesh(dp=2, tp=2).activate():
            topo.axis_index("tp")   # 1 on ranks 1 and 3
    """
    ctx, names, _ = find_context(axis, "axis_index")
    return ctx.axis_index(names)


def axis_size(axis: Axis) -> int:
    """The number of ranks along ``axis`` (the product for a tuple).

    Example::

        with DeviceMesh(dp=2, tp=4).activate():
            topo.axis_size(("dp", "tp"))   # 8
    """
    return find_context(axis, "axis_size")[2]
