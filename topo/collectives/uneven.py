"""Uneven collectives: all_gatherv and reduce_scatterv (each rank's size along ``dim`` differs).

Both run on any communicator of the protocol (gloo for CPU, NCCL for CUDA) as *padded*
collectives: every rank's part is padded to the longest one, one equal-sized collective runs,
and the padding is cut off again. ``all_gatherv`` can instead move no padding: one broadcast
per rank (``method="broadcast"``) or one batch of point-to-point sends and receives
(``method="p2p"``: a single NCCL group, or concurrent gloo sends); ``"auto"`` picks ``"p2p"``
when padding would add more than a quarter to the bytes moved.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import torch

from topo._checks import as_int
from topo.active import find_context
from topo.collectives._common import check_dim, check_reduce, device_type
from topo.communicators.base import Communicator, ReduceOp
from topo.errors import CollectiveMismatchError, TopoTypeError, TopoValueError
from topo.mesh import Axis

__all__ = ["all_gatherv", "reduce_scatterv"]

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

    Example::

        with DeviceMesh(tp=2).activate():
            i = topo.axis_index("tp")
            y = topo.all_gatherv(torch.full((i + 1,), i), axis="tp")
            # tensor([0, 1, 1]) on both ranks
    """
    ctx, names, n = find_context(axis, "all_gatherv")
    device = device_type(x, "all_gatherv")
    d = check_dim(x, dim, "all_gatherv")
    if method not in _METHODS:
        raise TopoValueError(
            f"topo.all_gatherv method requires one of {', '.join(map(repr, _METHODS))}, but got "
            f"{method!r}"
        )
    if n == 1:
        if sizes is not None:
            _check_sizes(sizes, 1, axis, "all_gatherv")
        return x.clone(memory_format=torch.contiguous_format)
    comm = ctx.communicator(names, device)
    if sizes is None:
        counts = exchange_sizes(comm, x, d, axis, "all_gatherv")
    else:
        counts = _check_sizes(sizes, n, axis, "all_gatherv")
        if counts[comm.index] != x.shape[d]:
            raise TopoValueError(
                f"topo.all_gatherv sizes[{comm.index}] requires this rank's x.shape[{d}] "
                f"({x.shape[d]}), but got {counts[comm.index]}; pass sizes=None to exchange them"
            )
    return gatherv(comm, x, d, counts, method)


def reduce_scatterv(
    x: torch.Tensor,
    axis: Axis,
    sizes: Sequence[int],
    dim: int = 0,
    op: ReduceOp = "sum",
) -> torch.Tensor:
    """Reduce every rank's ``x`` element-wise, then split it along ``dim`` into parts of
    ``sizes`` (in axis-index order): index ``i`` gets the ``sizes[i]`` rows of part ``i``.

    Every rank passes the same shape with ``x.shape[dim] == sum(sizes)``.

    Example::

        with DeviceMesh(tp=2).activate():
            y = topo.reduce_scatterv(torch.ones(3), axis="tp", sizes=[1, 2])
            # index 0: tensor([2.]); index 1: tensor([2., 2.])
    """
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
    if n == 1:
        return x.clone(memory_format=torch.contiguous_format)
    comm = ctx.communicator(names, device)
    return scatterv(comm, x, d, counts, reduce_op)


# ----------------------------------------------------------------------- the implementation


def _check_sizes(sizes: object, n: int, axis: Axis, operation: str) -> list[int]:
    if (
        isinstance(sizes, (list, tuple))
        and len(sizes) == n
        and all(type(s) is int and s >= 0 for s in sizes)
    ):
        return list(sizes)  # the common case, first: plain ints
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TopoTypeError(
            f"topo.{operation} sizes requires a sequence of {n} ints (one per index of axis "
            f"{axis!r}), but got {type(sizes).__name__}"
        )
    if len(sizes) != n:
        raise TopoValueError(
            f"topo.{operation} sizes requires one size per rank of axis {axis!r} ({n}), but got "
            f"{len(sizes)} sizes"
            + ("; pass sizes=None to exchange them" if operation == "all_gatherv" else "")
        )
    return [as_int(s, f"topo.{operation} sizes[{i}]", minimum=0) for i, s in enumerate(sizes)]


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
    mine = torch.tensor([x.shape[dim], _signature(x, dim)], dtype=torch.int64)
    if x.is_cuda:
        mine = mine.to(x.device)
    table = comm.all_gather(mine).cpu().tolist()
    reference = table[comm.index][1]
    for i, (_, signature) in enumerate(table):
        if signature != reference:
            raise CollectiveMismatchError(
                f"topo.{operation} requires every rank of axis {axis!r} to pass x with the same "
                f"dtype and the same sizes outside dim {dim}, but index {i} differs from index "
                f"{comm.index} (this rank: {x.dtype}, shape {tuple(x.shape)}) on {comm.label}"
            )
    return [int(row[0]) for row in table]


def gatherv(
    comm: Communicator, x: torch.Tensor, dim: int, sizes: list[int], method: GatherMethod
) -> torch.Tensor:
    """The uneven all-gather over ``comm`` with known ``sizes`` (``x`` on this communicator's
    device).

    Example::

        y = gatherv(comm, x, 0, [1, 2], "padded")
    """
    n, longest, total = len(sizes), max(sizes), sum(sizes)
    rows = x if dim == 0 else x.movedim(dim, 0)
    rest = tuple(rows.shape[1:])
    if method == "auto":
        # gloo measurement (benchmarks/transport.py): p2p beats padding already at 1.6x bytes
        method = "p2p" if 4 * n * longest > 5 * total else "padded"
    if method == "p2p" and dim == 0:
        fast = getattr(comm, "all_gatherv_dim0", None)
        if fast is not None:
            return fast(x if x.is_contiguous() else x.contiguous(), sizes)  # type: ignore[no-any-return]
    if method == "p2p":
        me = comm.index
        mine = rows if rows.is_contiguous() else rows.contiguous()
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
            part = rows.contiguous() if i == comm.index else rows.new_empty((count, *rest))
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
