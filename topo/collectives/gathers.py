"""Gathers: all_gather, gather and all_to_all."""

from __future__ import annotations

import torch

from topo.collectives._common import (
    check_dim,
    check_index,
    concat_chunks,
    device_type,
    stack_chunks,
)
from topo.context import find_context
from topo.mesh import Axis

__all__ = ["all_gather", "all_to_all", "gather"]


def all_gather(x: torch.Tensor, axis: Axis, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in axis-index order, on every rank.

    Every rank passes the same shape; the result has ``n`` times ``x.shape[dim]`` there.

    Example::

        with DeviceMesh(tp=2).activate():
            y = topo.all_gather(torch.tensor([topo.axis_index("tp")]), axis="tp")
            # tensor([0, 1]) on both ranks
    """
    ctx, names, n = find_context(axis, "all_gather")
    device = device_type(x, "all_gather")
    d = check_dim(x, dim, "all_gather")
    if n == 1:
        return x.clone(memory_format=torch.contiguous_format)
    stacked = ctx.communicator(names, device).all_gather(x.contiguous())
    return concat_chunks(stacked, d)


def gather(x: torch.Tensor, axis: Axis, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
    """Like :func:`all_gather`, but only index ``dst`` of the axis gets the result.

    Returns the concatenation on ``dst`` and ``None`` on the other ranks.

    Example::

        with DeviceMesh(pp=4).activate():
            y = topo.gather(torch.ones(2), axis="pp", dst=3)   # shape (8,) on index 3 only
    """
    ctx, names, n = find_context(axis, "gather")
    device = device_type(x, "gather")
    d = check_dim(x, dim, "gather")
    root = check_index(dst, n, "gather", "dst", axis)
    if n == 1:
        return x.clone(memory_format=torch.contiguous_format)
    stacked = ctx.communicator(names, device).gather(x.contiguous(), root)
    return None if stacked is None else concat_chunks(stacked, d)


def all_to_all(
    x: torch.Tensor, axis: Axis, split_dim: int = 0, concat_dim: int = 0
) -> torch.Tensor:
    """Split ``x`` into ``n`` chunks along ``split_dim``, send chunk ``j`` to index ``j``, and
    concatenate the chunks received (in index order) along ``concat_dim``.

    Example::

        with DeviceMesh(ep=2).activate():
            # index i holds [10*i, 10*i + 1]; afterwards index j holds [j, 10 + j]
            y = topo.all_to_all(torch.tensor([0, 1]) + 10 * topo.axis_index("ep"), axis="ep")
    """
    ctx, names, n = find_context(axis, "all_to_all")
    device = device_type(x, "all_to_all")
    sd = check_dim(x, split_dim, "all_to_all", "split_dim")
    cd = check_dim(x, concat_dim, "all_to_all", "concat_dim")
    stacked = stack_chunks(x, sd, n, "all_to_all", axis)
    # With n == 1 a contiguous x's chunks are a view of x: copy them.
    stacked = ctx.communicator(names, device).all_to_all(stacked) if n > 1 else stacked.clone()
    # stacked[j] is the chunk received from index j (x's layout, split_dim shrunk by n).
    return concat_chunks(stacked, cd)
