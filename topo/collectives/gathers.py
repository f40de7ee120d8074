"""Gathers: all_gather, gather and all_to_all."""

from __future__ import annotations

import torch

from topo.collectives._common import (
    bump_versions,
    check_dim,
    check_index,
    check_out,
    concat_chunks,
    device_type,
    direct_out,
    result_into,
    route,
    stack_chunks,
)
from topo.errors import NotDifferentiableError
from topo.mesh import Axis
from topo.ops._library import call, group_of

__all__ = ["all_gather", "all_to_all", "gather"]


def all_gather(
    x: torch.Tensor, axis: Axis, dim: int = 0, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in axis-index order, on every rank.

    Every rank passes the same shape; the result has ``n`` times ``x.shape[dim]`` there.
    With ``out`` (the result's shape, ``x``'s dtype and device) the result is written there
    and returned. Differentiable: the backward is a reduce_scatter of the cotangent.

    Example::

        with DeviceMesh(tp=2).activate():
            y = topo.all_gather(torch.tensor([topo.axis_index("tp")]), axis="tp")
            # tensor([0, 1]) on both ranks
    """
    found = route(x, axis, "all_gather")
    if found is None:
        return _all_gather_op(x, axis, dim, out)
    comm, n = found
    shape = x.shape
    # check_dim's common case inlined (a non-negative int dim): no call
    d = dim if type(dim) is int and 0 <= dim < len(shape) else check_dim(x, dim, "all_gather")
    if out is not None:
        if len(shape) == 1:  # the result's shape, built without a list in the 1-d case
            expected: tuple[int, ...] = (shape[0] * n,)
        else:
            sizes = list(shape)
            sizes[d] *= n
            expected = tuple(sizes)
        if d == 0:  # whether the communicator may write into out (not a lazy conj/neg view)
            direct = direct_out(out, x, expected, "all_gather")
        else:  # the chunks are interleaved: concat_chunks copies them into out
            check_out(out, x, expected, "all_gather")
            direct = False
        if comm is None:  # a group of one
            return out.copy_(x)
        if direct:
            try:
                into = comm.all_gather_into  # type: ignore[attr-defined]
            except AttributeError:
                pass
            else:
                into(x if x.is_contiguous() else x.contiguous(), out)
                bump_versions((out,))  # written behind autograd's back
                return out
        stacked = comm.all_gather(x.contiguous())  # (n, *x.shape): one copy into out
        return concat_chunks(stacked, d, out)
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    if d == 0:  # the result's layout directly, no reshape, where the communicator has it
        try:  # an attribute, not getattr(..., None): 0.1 µs less per call
            dim0 = comm.all_gather_dim0  # type: ignore[attr-defined]
        except AttributeError:
            pass
        else:
            return dim0(x if x.is_contiguous() else x.contiguous())  # type: ignore[no-any-return]
    return concat_chunks(comm.all_gather(x.contiguous()), d)


def _all_gather_op(
    x: torch.Tensor, axis: Axis, dim: int, out: torch.Tensor | None
) -> torch.Tensor:
    """all_gather through ``torch.ops.topo.all_gather``: autograd and torch.compile."""
    key, n, _ = group_of(axis, "all_gather")
    device_type(x, "all_gather")
    d = check_dim(x, dim, "all_gather")
    return result_into(call("all_gather", x, key, n, d), out, x, "all_gather")


def gather(x: torch.Tensor, axis: Axis, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
    """Like :func:`all_gather`, but only index ``dst`` of the axis gets the result.

    Returns the concatenation on ``dst`` and ``None`` on the other ranks. Differentiable on
    ``dst`` (its ``x`` gets its own slice of the cotangent); off ``dst``, where there is no
    result to differentiate, an ``x`` that requires grad raises
    :class:`~topo.errors.NotDifferentiableError` (after taking part in the gather) — use
    :func:`all_gather` or ``x.detach()`` there.

    Example::

        with DeviceMesh(pp=4).activate():
            y = topo.gather(torch.ones(2), axis="pp", dst=3)   # shape (8,) on index 3 only
    """
    found = route(x, axis, "gather")
    if found is None:
        return _gather_op(x, axis, dst, dim)
    comm, n = found
    d = check_dim(x, dim, "gather")
    root = check_index(dst, n, "gather", "dst", axis)
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    stacked = comm.gather(x.contiguous(), root)
    return None if stacked is None else concat_chunks(stacked, d)


def _gather_op(x: torch.Tensor, axis: Axis, dst: int, dim: int) -> torch.Tensor | None:
    key, n, index = group_of(axis, "gather")
    device_type(x, "gather")
    d = check_dim(x, dim, "gather")
    root = check_index(dst, n, "gather", "dst", axis)
    y: torch.Tensor = call("gather", x, key, n, root, d)
    if index == root:
        return y
    if x.requires_grad and torch.is_grad_enabled():
        raise NotDifferentiableError(
            f"topo.gather requires an x that needs no gradient off dst (index {root} of axis "
            f"{axis!r}), because only dst gets a result to differentiate, but this rank (index "
            f"{index}) passed an x that requires grad; pass x.detach() here, or use "
            f"topo.all_gather, whose backward reaches every rank"
        )
    return None


def all_to_all(
    x: torch.Tensor, axis: Axis, split_dim: int = 0, concat_dim: int = 0
) -> torch.Tensor:
    """Split ``x`` into ``n`` chunks along ``split_dim``, send chunk ``j`` to index ``j``, and
    concatenate the chunks received (in index order) along ``concat_dim``.

    Differentiable: the backward is the all_to_all with the two dims swapped.

    Example::

        with DeviceMesh(ep=2).activate():
            # index i holds [10*i, 10*i + 1]; afterwards index j holds [j, 10 + j]
            y = topo.all_to_all(torch.tensor([0, 1]) + 10 * topo.axis_index("ep"), axis="ep")
    """
    found = route(x, axis, "all_to_all")
    if found is None:
        key, n, _ = group_of(axis, "all_to_all")
        device_type(x, "all_to_all")
        sd = check_dim(x, split_dim, "all_to_all", "split_dim")
        cd = check_dim(x, concat_dim, "all_to_all", "concat_dim")
        if x.shape[sd] % n:
            stack_chunks(x, sd, n, "all_to_all", axis)  # raises the divisibility error
        result: torch.Tensor = call("all_to_all", x, key, n, sd, cd)
        return result
    comm, n = found
    sd = check_dim(x, split_dim, "all_to_all", "split_dim")
    cd = check_dim(x, concat_dim, "all_to_all", "concat_dim")
    if sd == 0 and cd == 0 and comm is not None:
        dim0 = getattr(comm, "all_to_all_dim0", None)
        if dim0 is not None and x.shape[0] % n == 0:  # chunks already laid along dim 0
            return dim0(x if x.is_contiguous() else x.contiguous())  # type: ignore[no-any-return]
    stacked = stack_chunks(x, sd, n, "all_to_all", axis)
    # In a group of one a contiguous x's chunks are a view of x: copy them.
    stacked = stacked.clone() if comm is None else comm.all_to_all(stacked)
    # stacked[j] is the chunk received from index j (x's layout, split_dim shrunk by n).
    return concat_chunks(stacked, cd)
