"""Reductions: all_reduce and reduce_scatter."""

from __future__ import annotations

import torch

from topo.collectives._common import (
    check_dim,
    check_reduce,
    device_type,
    stack_chunks,
)
from topo.communicators.base import ReduceOp
from topo.context import find_context
from topo.mesh import Axis

__all__ = ["all_reduce", "reduce_scatter"]


def all_reduce(x: torch.Tensor, axis: Axis, op: ReduceOp = "sum") -> torch.Tensor:
    """Reduce ``x`` element-wise over the ranks of ``axis``; every rank gets the result.

    ``op`` is one of ``"sum"``, ``"avg"`` (floating dtypes), ``"max"``, ``"min"``,
    ``"prod"``. Returns a new tensor with ``x``'s shape and dtype; ``x`` is not modified.

    Example::

        with DeviceMesh(dp=2, tp=2).activate():
            y = topo.all_reduce(torch.ones(3), axis="tp")   # tensor([2., 2., 2.])
    """
    ctx, names, n = find_context(axis, "all_reduce")
    device = device_type(x, "all_reduce")
    check_reduce(x, op, "all_reduce", ctx.backend(device))
    if n == 1:
        return x.clone()
    comm = ctx.communicator(names, device)
    return comm.all_reduce(x if x.is_contiguous() else x.contiguous(), op)


def reduce_scatter(x: torch.Tensor, axis: Axis, dim: int = 0, op: ReduceOp = "sum") -> torch.Tensor:
    """Reduce ``x`` over ``axis``, then give index ``i`` the ``i``-th chunk along ``dim``.

    ``x.shape[dim]`` must be divisible by the axis size ``n``; the result has
    ``x.shape[dim] // n`` there. The adjoint of :func:`all_gather`.

    Example::

        with DeviceMesh(tp=2).activate():
            y = topo.reduce_scatter(torch.arange(4.0), axis="tp")
            # index 0: tensor([0., 2.]); index 1: tensor([4., 6.])
    """
    ctx, names, n = find_context(axis, "reduce_scatter")
    device = device_type(x, "reduce_scatter")
    check_reduce(x, op, "reduce_scatter", ctx.backend(device))
    d = check_dim(x, dim, "reduce_scatter")
    stacked = stack_chunks(x, d, n, "reduce_scatter", axis)
    if n == 1:
        return stacked[0].clone()
    return ctx.communicator(names, device).reduce_scatter(stacked, op)
