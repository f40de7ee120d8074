"""One-to-all: broadcast and scatter."""

from __future__ import annotations

import torch

from topo.collectives._common import (
    check_dim,
    check_index,
    device_type,
    into_same_shape,
    result_into,
    route,
    stack_chunks,
)
from topo.mesh import Axis
from topo.ops._library import call, group_of

__all__ = ["broadcast", "scatter"]


def broadcast(
    x: torch.Tensor, axis: Axis, src: int = 0, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Every rank of ``axis`` gets index ``src``'s ``x`` (``src`` is an index within the axis).

    Every rank passes a tensor of the same shape and dtype; only ``src``'s values are used.
    With ``out`` (``x``'s shape, dtype and device; ``out=x`` broadcasts in place, as
    ``torch.distributed.broadcast`` does) the result is written there and ``out`` is returned.
    Differentiable: ``src``'s ``x`` gets the sum of every rank's cotangent, the others zeros.

    Example::

        with DeviceMesh(dp=2, tp=2).activate():
            w = topo.broadcast(weights, axis="dp", src=0)
            topo.broadcast(param, axis="dp", src=0, out=param)   # in place
    """
    found = route(x, axis, "broadcast")
    if found is None:
        key, n, _ = group_of(axis, "broadcast")
        device_type(x, "broadcast")
        root = check_index(src, n, "broadcast", "src", axis)
        return result_into(call("broadcast", x, key, n, root), out, x, "broadcast")
    comm, n = found
    # check_index's common case inlined (an int index within the axis): no call
    if type(src) is int and 0 <= src < n:
        root = src
    else:
        root = check_index(src, n, "broadcast", "src", axis)
    if out is not None:
        return into_same_shape(comm, x, out, "broadcast", root)
    if comm is None:  # a group of one
        return x.clone(memory_format=torch.contiguous_format)
    return comm.broadcast(x.contiguous(), root)


def scatter(x: torch.Tensor, axis: Axis, src: int = 0, dim: int = 0) -> torch.Tensor:
    """Split index ``src``'s ``x`` into ``n`` chunks along ``dim``; index ``i`` gets chunk ``i``.

    Every rank passes a tensor of the same shape and dtype; only ``src``'s values are used.
    ``x.shape[dim]`` must be divisible by the axis size. Differentiable: ``src``'s ``x`` gets
    every index's cotangent gathered back in place, the others zeros.

    Example::

        with DeviceMesh(tp=2).activate():
            y = topo.scatter(torch.arange(4), axis="tp", src=1)
            # index 0: tensor([0, 1]); index 1: tensor([2, 3])
    """
    found = route(x, axis, "scatter")
    if found is None:
        key, n, _ = group_of(axis, "scatter")
        device_type(x, "scatter")
        d = check_dim(x, dim, "scatter")
        root = check_index(src, n, "scatter", "src", axis)
        if x.shape[d] % n:
            stack_chunks(x, d, n, "scatter", axis)  # raises the divisibility error
        result: torch.Tensor = call("scatter", x, key, n, root, d)
        return result
    comm, n = found
    d = check_dim(x, dim, "scatter")
    root = check_index(src, n, "scatter", "src", axis)
    stacked = stack_chunks(x, d, n, "scatter", axis)
    if comm is None:  # a group of one
        return stacked[0].clone()
    return comm.scatter(stacked, root)
