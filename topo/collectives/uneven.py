"""Uneven collectives: all_gatherv, reduce_scatterv and all_to_allv (each rank's size along
``dim`` differs).

Both run on any communicator of the protocol (gloo for CPU, NCCL for CUDA) as *padded*
collectives: every rank's part is padded to the longest one, one equal-sized collective runs,
and the padding is cut off again. ``all_gatherv`` can instead move no padding: one broadcast
per rank (``method="broadcast"``) or one batch of point-to-point sends and receives
(``method="p2p"``: a single NCCL group, or concurrent gloo sends); ``"auto"`` picks ``"p2p"``
when padding would add more than a quarter to the bytes moved.

``all_to_allv`` sends ``send_sizes[j]`` rows to index ``j`` (the dispatch and combine of an
expert-parallel MoE layer): the communicator's own uneven all-to-all where it has one (gloo's
split sizes, one NCCL group of sends and receives), else one batch of point-to-point
exchanges (``topo/communicators/alltoallv.py``).

All three are differentiable (each other's adjoints: all_gatherv ↔ reduce_scatterv, and
all_to_allv with the sizes swapped) and compile, through the ops of ``topo/ops/uneven.py``
and ``topo/ops/all_to_allv.py``, when every size is given.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import torch

from topo._checks import as_int
from topo.active import find_context
from topo.collectives._common import check_dim, check_reduce, device_type, locate, route
from topo.communicators.alltoallv import all_to_allv_dim0
from topo.communicators.base import Communicator, ReduceOp, plain
from topo.errors import CollectiveMismatchError, TopoTypeError, TopoValueError
from topo.mesh import Axis
from topo.ops._library import _is_compiling, call, group_of, needs_op

__all__ = ["all_gatherv", "all_to_allv", "reduce_scatterv"]

GatherMethod = Literal["auto", "padded", "broadcast", "p2p"]
_METHODS = ("auto", "padded", "broadcast", "p2p")


def all_gatherv(
    x: torch.Tensor,
    axis: Axis,
    dim: int = 0,
    sizes: Sequence[int] | None = None,
    method: GatherMethod = "auto",
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` when the ranks' sizes along ``dim`` differ.

    The other dimensions and the dtype must match. ``sizes`` lists every index's
    ``x.shape[dim]`` (in axis-index order); with ``sizes=None`` the ranks exchange them first
    (one small extra collective that also checks that shapes and dtypes agree). ``method``:
    ``"padded"`` (one all_gather of parts padded to the longest), ``"broadcast"`` (one
    broadcast per rank, no padding), ``"p2p"`` (one grouped batch of sends and receives, no
    padding) or ``"auto"`` (padded unless padding adds more than a quarter, then p2p).
    Differentiable: the backward is a reduce_scatterv of the cotangent with the same sizes.

    Example::

        with DeviceMesh(tp=2).activate():
            i = topo.axis_index("tp")
            y = topo.all_gatherv(torch.full((i + 1,), i), axis="tp")
            # tensor([0, 1, 1]) on both ranks
    """
    found = route(x, axis, "all_gatherv")
    if found is None:
        return _all_gatherv_op(x, axis, dim, sizes, method)
    comm, n = found
    shape = x.shape
    # check_dim's common case inlined (a non-negative int dim): no call
    d = dim if type(dim) is int and 0 <= dim < len(shape) else check_dim(x, dim, "all_gatherv")
    if method not in _METHODS:
        _check_method(method)  # raises
    if comm is None:  # a group of one
        if sizes is not None:
            _check_sizes(sizes, 1, axis, "all_gatherv")
        return x.clone(memory_format=torch.contiguous_format)
    if sizes is None:
        counts = exchange_sizes(comm, x, d, axis, "all_gatherv")
    else:
        counts = _check_sizes(sizes, n, axis, "all_gatherv")
        if counts[comm.index] != shape[d]:
            raise TopoValueError(
                f"topo.all_gatherv sizes[{comm.index}] requires this rank's x.shape[{d}] "
                f"({shape[d]}), but got {counts[comm.index]}; pass sizes=None to exchange them"
            )
    return gatherv(comm, x, d, counts, method)


def _check_method(method: object) -> None:
    if method not in _METHODS:
        raise TopoValueError(
            f"topo.all_gatherv method requires one of {', '.join(map(repr, _METHODS))}, but got "
            f"{method!r}"
        )


def _all_gatherv_op(
    x: torch.Tensor, axis: Axis, dim: int, sizes: Sequence[int] | None, method: GatherMethod
) -> torch.Tensor:
    """all_gatherv through ``torch.ops.topo.all_gatherv``: autograd and torch.compile."""
    key, n, index = group_of(axis, "all_gatherv")
    device = device_type(x, "all_gatherv")
    d = check_dim(x, dim, "all_gatherv")
    _check_method(method)
    if sizes is None:
        _refuse_exchange_while_compiling("all_gatherv", "sizes")
        if n == 1:
            counts = [x.shape[d]]
        else:
            ctx, names, _ = find_context(axis, "all_gatherv")
            counts = exchange_sizes(ctx.communicator(names, device), x, d, axis, "all_gatherv")
    else:
        counts = _check_sizes(sizes, n, axis, "all_gatherv")
        if counts[index] != x.shape[d]:
            raise TopoValueError(
                f"topo.all_gatherv sizes[{index}] requires this rank's x.shape[{d}] "
                f"({x.shape[d]}), but got {counts[index]}; pass sizes=None to exchange them"
            )
    return call("all_gatherv", x, key, n, counts, d, method)


def _refuse_exchange_while_compiling(operation: str, name: str) -> None:
    if _is_compiling():
        raise TopoValueError(
            f"topo.{operation} {name} requires a list of ints under torch.compile (the exchange "
            f"of sizes is a collective whose values decide the result's shape, which a graph "
            f"cannot trace), but got None; pass {name}, exchanged before the compiled region"
        )


def reduce_scatterv(
    x: torch.Tensor,
    axis: Axis,
    sizes: Sequence[int],
    dim: int = 0,
    op: ReduceOp = "sum",
) -> torch.Tensor:
    """Reduce every rank's ``x`` element-wise, then split it along ``dim`` into parts of
    ``sizes`` (in axis-index order): index ``i`` gets the ``sizes[i]`` rows of part ``i``.

    Every rank passes the same shape with ``x.shape[dim] == sum(sizes)``. Differentiable for
    ``sum`` and ``avg``: the backward is an all_gatherv of the cotangent (÷ n for ``avg``).

    Example::

        with DeviceMesh(tp=2).activate():
            y = topo.reduce_scatterv(torch.ones(3), axis="tp", sizes=[1, 2])
            # index 0: tensor([2.]); index 1: tensor([2., 2.])
    """
    if needs_op(x):
        key, n, index = group_of(axis, "reduce_scatterv")
    else:
        ctx, names, n = find_context(axis, "reduce_scatterv")
    device = device_type(x, "reduce_scatterv")
    d = check_dim(x, dim, "reduce_scatterv")
    reduce_op = check_reduce(x, op, "reduce_scatterv", device)
    counts = _check_sizes(sizes, n, axis, "reduce_scatterv")
    if sum(counts) != x.shape[d]:
        raise TopoValueError(
            f"topo.reduce_scatterv sizes requires sum(sizes) == x.shape[{d}] ({x.shape[d]}), but "
            f"got sum({counts}) = {sum(counts)}; the sizes must split dimension {d} exactly"
        )
    if needs_op(x):
        return call("reduce_scatterv", x, key, n, counts, counts[index], d, reduce_op)
    if n == 1:
        return x.clone(memory_format=torch.contiguous_format)
    comm = ctx.communicator(names, device)
    return scatterv(comm, x, d, counts, reduce_op)


def all_to_allv(
    x: torch.Tensor,
    axis: Axis,
    send_sizes: Sequence[int],
    recv_sizes: Sequence[int] | None = None,
    dim: int = 0,
) -> torch.Tensor:
    """Send ``send_sizes[j]`` rows of ``x`` (along ``dim``, in order) to index ``j``; return
    the rows every index sent to this rank, concatenated along ``dim`` in index order.

    ``x.shape[dim] == sum(send_sizes)``; the other dimensions and the dtype match on every
    rank. ``recv_sizes[i]`` is the number of rows index ``i`` sends here (index ``i``'s
    ``send_sizes[this index]``); with ``recv_sizes=None`` the ranks exchange their sizes
    first (one small all_gather that also checks dtypes and the other dimensions). Sizes may
    be 0. Differentiable: the backward is the all_to_allv of the cotangent with the sizes
    swapped. Under torch.compile pass ``recv_sizes``.

    Example::

        with DeviceMesh(ep=2).activate():
            i = topo.axis_index("ep")
            x = torch.arange(3) + 10 * i             # index 0: [0, 1, 2]; 1: [10, 11, 12]
            y = topo.all_to_allv(x, "ep", send_sizes=[1, 2] if i == 0 else [2, 1])
            # index 0: tensor([0, 10, 11]); index 1: tensor([1, 2, 12])
    """
    if needs_op(x):
        return _all_to_allv_op(x, axis, send_sizes, recv_sizes, dim)
    ctx, names, n, device = locate(x, axis, "all_to_allv")
    d = check_dim(x, dim, "all_to_allv")
    sends, recvs = _check_all_to_allv_sizes(x, d, send_sizes, recv_sizes, n, axis)
    if n == 1:
        _check_own_block(sends, recvs or sends, 0)
        return x.clone(memory_format=torch.contiguous_format)
    if recvs is not None and not ctx.check:  # check mode: every rank raises, named pairwise
        _check_own_block(sends, recvs, ctx.axis_index(names))
    comm = ctx.communicator(names, device)
    if recvs is None:
        recvs = _exchange_recv_sizes(comm, x, d, sends, axis)
    return alltoallv(comm, x, d, sends, recvs)


def _all_to_allv_op(
    x: torch.Tensor,
    axis: Axis,
    send_sizes: Sequence[int],
    recv_sizes: Sequence[int] | None,
    dim: int,
) -> torch.Tensor:
    """all_to_allv through ``torch.ops.topo.all_to_allv``: autograd and torch.compile."""
    key, n, index = group_of(axis, "all_to_allv")
    device = device_type(x, "all_to_allv")
    d = check_dim(x, dim, "all_to_allv")
    sends, recvs = _check_all_to_allv_sizes(x, d, send_sizes, recv_sizes, n, axis)
    if recvs is None:
        _refuse_exchange_while_compiling("all_to_allv", "recv_sizes")
        if n == 1:
            recvs = sends
        else:
            ctx, names, _ = find_context(axis, "all_to_allv")
            recvs = _exchange_recv_sizes(ctx.communicator(names, device), x, d, sends, axis)
    _check_own_block(sends, recvs, index)
    return call("all_to_allv", x, key, n, sends, recvs, d)


def _check_all_to_allv_sizes(
    x: torch.Tensor,
    dim: int,
    send_sizes: object,
    recv_sizes: object,
    n: int,
    axis: Axis,
) -> tuple[list[int], list[int] | None]:
    sends = _check_sizes(send_sizes, n, axis, "all_to_allv", "send_sizes")
    if sum(sends) != x.shape[dim]:
        raise TopoValueError(
            f"topo.all_to_allv send_sizes requires sum(send_sizes) == x.shape[{dim}] "
            f"({x.shape[dim]}), but got sum({sends}) = {sum(sends)}; send_sizes[j] is the "
            f"number of rows along dim {dim} that go to index j, so they must split dimension "
            f"{dim} exactly"
        )
    if recv_sizes is None:
        return sends, None
    return sends, _check_sizes(recv_sizes, n, axis, "all_to_allv", "recv_sizes")


def _check_own_block(sends: list[int], recvs: list[int], me: int) -> None:
    """The rows this rank sends itself must be the rows it expects from itself."""
    if recvs[me] != sends[me]:
        raise TopoValueError(
            f"topo.all_to_allv recv_sizes[{me}] requires this rank's send_sizes[{me}] "
            f"({sends[me]}: the rows it sends itself), but got {recvs[me]}; pass "
            f"recv_sizes=None to exchange them"
        )


# ----------------------------------------------------------------------- the implementation


def _check_sizes(
    sizes: object, n: int, axis: Axis, operation: str, name: str = "sizes"
) -> list[int]:
    if (type(sizes) is list or type(sizes) is tuple) and len(sizes) == n:
        for s in sizes:  # the common case, first: plain ints (a loop: no generator to make)
            if type(s) is not int or s < 0:
                break
        else:
            return list(sizes)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        hint = f"; pass {name}.tolist()" if isinstance(sizes, torch.Tensor) else ""
        raise TopoTypeError(
            f"topo.{operation} {name} requires a sequence of {n} ints (one per index of axis "
            f"{axis!r}), but got {type(sizes).__name__}{hint}"
        )
    if len(sizes) != n:
        exchange = {"all_gatherv": "sizes", "all_to_allv": "recv_sizes"}.get(operation)
        raise TopoValueError(
            f"topo.{operation} {name} requires one size per rank of axis {axis!r} ({n}), "
            f"but got {len(sizes)} sizes"
            + (f"; pass {exchange}=None to exchange them" if name == exchange else "")
        )
    return [as_int(s, f"topo.{operation} {name}[{i}]", minimum=0) for i, s in enumerate(sizes)]


def _signature(x: torch.Tensor, dim: int) -> int:
    """A checksum of everything but ``x.shape[dim]`` that must agree across ranks."""
    rest = [s for i, s in enumerate(x.shape) if i != dim]
    return zlib.crc32(f"{x.dtype}|{x.dim()}|{dim}|{rest}".encode())


def exchange_sizes(
    comm: Communicator, x: torch.Tensor, dim: int, axis: Axis, operation: str
) -> list[int]:
    """Every index's ``x.shape[dim]``, exchanged over ``comm``; a
    :class:`~topo.CollectiveMismatchError` on every rank if dtypes or other dims differ.

    Example::

        sizes = exchange_sizes(comm, x, 0, "tp", "all_gatherv")   # [3, 5]
    """
    return [row[0] for row in _gather_checked(comm, [x.shape[dim]], x, dim, axis, operation)]


def _gather_checked(
    comm: Communicator, values: list[int], x: torch.Tensor, dim: int, axis: Axis, operation: str
) -> list[list[int]]:
    """Every index's ``values`` (one all_gather, with :func:`_signature` appended and checked:
    a :class:`~topo.CollectiveMismatchError` on every rank if dtypes or other dims differ)."""
    mine = torch.tensor([*values, _signature(x, dim)], dtype=torch.int64, device=x.device)
    table = comm.all_gather(mine).cpu().tolist()
    reference = table[comm.index][-1]
    for i, row in enumerate(table):
        if row[-1] != reference:
            raise CollectiveMismatchError(
                f"topo.{operation} requires every rank of axis {axis!r} to pass x with the same "
                f"dtype and the same sizes outside dim {dim}, but index {i} differs from index "
                f"{comm.index} (this rank: {x.dtype}, shape {tuple(x.shape)}) on {comm.label}"
            )
    return [[int(v) for v in row[:-1]] for row in table]


def _exchange_recv_sizes(
    comm: Communicator, x: torch.Tensor, dim: int, sends: list[int], axis: Axis
) -> list[int]:
    """Every index's ``send_sizes[this index]``: the rows each sends here (one all_gather)."""
    table = _gather_checked(comm, sends, x, dim, axis, "all_to_allv")
    return [row[comm.index] for row in table]


def gatherv(
    comm: Communicator, x: torch.Tensor, dim: int, sizes: list[int], method: GatherMethod
) -> torch.Tensor:
    """The uneven all-gather over ``comm`` with known ``sizes`` (``x`` on this communicator's
    device).

    Example::

        y = gatherv(comm, x, 0, [1, 2], "padded")
    """
    if method == "auto":
        # gloo measurement (benchmarks/transport.py): p2p beats padding already at 1.6x bytes
        method = "p2p" if 4 * len(sizes) * max(sizes) > 5 * sum(sizes) else "padded"
    if method == "p2p" and dim == 0:
        try:  # an attribute, not getattr(..., None): 0.1 µs less per call
            fast = comm.all_gatherv_dim0  # type: ignore[attr-defined]
        except AttributeError:
            pass
        else:
            return fast(x if x.is_contiguous() else x.contiguous(), sizes)  # type: ignore[no-any-return]
    longest, total = max(sizes), sum(sizes)
    rows = x if dim == 0 else x.movedim(dim, 0)
    rest = tuple(rows.shape[1:])
    if method == "p2p":
        me = comm.index
        mine = plain(rows)
        out = rows.new_empty((total, *rest))
        sends, recvs, start = [], [], 0
        for i, count in enumerate(sizes):
            if i == me:
                if count:
                    out.narrow(0, start, count).copy_(mine)
            else:
                if count:
                    recvs.append((i, out.narrow(0, start, count)))
                if mine.numel():
                    sends.append((i, mine))
            start += count
        if sends or recvs:
            comm.exchange(sends, recvs)
        if dim == 0:
            return out
    elif method == "broadcast":
        parts = []
        for i, count in enumerate(sizes):
            if count == 0:
                continue
            part = plain(rows) if i == comm.index else rows.new_empty((count, *rest))
            parts.append(comm.broadcast(part, i))
        out = torch.cat(parts) if parts else rows.new_empty((0, *rest))
    else:
        padded = rows.new_zeros((longest, *rest))
        padded[: sizes[comm.index]] = rows
        stacked = comm.all_gather(padded)  # (n, longest, *rest)
        out = torch.cat([stacked[i, :count] for i, count in enumerate(sizes)])
    return out.movedim(0, dim).contiguous()


def scatterv(
    comm: Communicator, x: torch.Tensor, dim: int, sizes: list[int], op: ReduceOp
) -> torch.Tensor:
    """The uneven reduce-scatter over ``comm``: parts padded to the longest, one equal-sized
    reduce_scatter, the padding cut off (padding never reaches a result row).

    Example::

        y = scatterv(comm, x, 0, [1, 2], "sum")
    """
    n, longest = len(sizes), max(sizes)
    rows = x.movedim(dim, 0)
    rest = tuple(rows.shape[1:])
    stacked = rows.new_zeros((n, longest, *rest))
    start = 0
    for i, count in enumerate(sizes):
        stacked[i, :count] = rows[start : start + count]
        start += count
    reduced = comm.reduce_scatter(stacked, op)  # (longest, *rest)
    return reduced[: sizes[comm.index]].movedim(0, dim).contiguous()


def alltoallv(
    comm: Communicator, x: torch.Tensor, dim: int, send_sizes: list[int], recv_sizes: list[int]
) -> torch.Tensor:
    """The uneven all-to-all over ``comm`` with checked sizes, along ``dim`` (``x`` on this
    communicator's device): rows moved to dim 0, exchanged, moved back.

    Example::

        y = alltoallv(comm, x, 1, [2, 1], [2, 3])
    """
    rows = x if dim == 0 else x.movedim(dim, 0)
    out = all_to_allv_dim0(
        comm, plain(rows), send_sizes, recv_sizes
    )
    return out if dim == 0 else out.movedim(0, dim).contiguous()
