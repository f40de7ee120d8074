"""The calls benchmarks/nccl_overhead.py times, per collective: topo's free function (allocating,
and with ``out=`` where it has one), the raw cupy ``NcclCommunicator`` call on preallocated
buffers and with its output allocated in the call as topo's allocating call does (``raw cupy +
alloc``: what a user of raw cupy writes for an out-of-place collective), and torch's
``ProcessGroupNCCL`` — the same call table on a GPU and, without one, over
a no-op fake cupy communicator with a stub CUDA stream (topo's own Python work above the raw
call).

Every call is made on index ``me`` of a 2-rank axis ``"tp"``; both ranks build the table with
the same buffers' shapes and call the same functions in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import topo

#: Every collective of the table, in order.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather dim 1",
    "reduce_scatter",
    "broadcast",
    "all_to_all",
    "send/recv",
    "all_gatherv",
)
IMPLEMENTATIONS = ("topo", "topo out=", "raw cupy", "raw cupy + alloc", "ProcessGroupNCCL")


class NoopNccl:
    """A ``cupy.cuda.nccl`` whose communicator calls do nothing: what is left of a call to it is
    the Python work around the call."""

    NCCL_FLOAT32, NCCL_SUM = 7, 0

    class NcclError(RuntimeError):
        pass

    @staticmethod
    def get_version() -> int:
        return 22703

    @staticmethod
    def groupStart() -> None:
        pass

    @staticmethod
    def groupEnd() -> None:
        pass


class NoopComm:
    """A ``cupy.cuda.nccl.NcclCommunicator`` of 2 ranks that moves nothing."""

    def allReduce(self, *args: int) -> None:
        pass

    def allGather(self, *args: int) -> None:
        pass

    def reduceScatter(self, *args: int) -> None:
        pass

    def broadcast(self, *args: int) -> None:
        pass

    def send(self, *args: int) -> None:
        pass

    def recv(self, *args: int) -> None:
        pass


def call_table(
    raw: Any,
    nccl: Any,
    pg: Any,
    device: torch.device,
    me: int,
    stream: Callable[[], int],
    elements: int = 16,
) -> dict[str, dict[str, Callable[[], object]]]:
    """``{collective: {implementation: call}}`` on this rank (index ``me`` of axis "tp").

    ``raw`` is a 2-rank cupy communicator (or :class:`NoopComm`), ``nccl`` its module, ``pg`` a
    2-rank ProcessGroupNCCL or None, ``stream()`` the raw handle of the current stream.

    Example::

        table = call_table(NoopComm(), NoopNccl, None, torch.device("cpu"), 0, lambda: 0)
        table["all_reduce"]["topo"]()
    """
    n = elements
    f32, add = nccl.NCCL_FLOAT32, nccl.NCCL_SUM
    other = 1 - me

    def empty(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, device=device)

    x, out, gathered, stacked = empty(n), empty(n), empty(2 * n), empty(2 * n)
    square = empty(4, n // 4)
    square_gathered, square_out = empty(2, 4, n // 4), empty(4, 2 * (n // 4))
    pairs, pairs_out = empty(2, n // 2), empty(2, n // 2)
    sizes = [n, n // 2]
    mine = empty(sizes[me])
    uneven_out = empty(sum(sizes))

    def raw_gather_dim1() -> None:
        raw.allGather(square.data_ptr(), square_gathered.data_ptr(), n, f32, stream())
        square_out.copy_(square_gathered.movedim(0, 1).reshape(4, 2 * (n // 4)))

    def raw_all_to_all() -> None:
        s = stream()
        nccl.groupStart()
        for peer in (0, 1):
            raw.send(pairs[peer].data_ptr(), n // 2, f32, peer, s)
            raw.recv(pairs_out[peer].data_ptr(), n // 2, f32, peer, s)
        nccl.groupEnd()

    def raw_p2p() -> None:
        nccl.groupStart()
        if me == 0:
            raw.send(x.data_ptr(), n, f32, other, stream())
        else:
            raw.recv(out.data_ptr(), n, f32, other, stream())
        nccl.groupEnd()

    starts = [0, sizes[0]]
    theirs_slot = uneven_out[starts[other] : starts[other] + sizes[other]]
    my_slot = uneven_out[starts[me] : starts[me] + sizes[me]]

    def raw_gatherv() -> None:
        s = stream()
        nccl.groupStart()
        raw.send(mine.data_ptr(), sizes[me], f32, other, s)
        raw.recv(theirs_slot.data_ptr(), sizes[other], f32, other, s)
        nccl.groupEnd()
        my_slot.copy_(mine)

    def raw_gatherv_alloc() -> torch.Tensor:
        s, result = stream(), mine.new_empty(sum(sizes))
        nccl.groupStart()
        raw.send(mine.data_ptr(), sizes[me], f32, other, s)
        raw.recv(result[starts[other] :].data_ptr(), sizes[other], f32, other, s)
        nccl.groupEnd()
        result[starts[me] : starts[me] + sizes[me]].copy_(mine)
        return result

    def raw_all_to_all_alloc() -> torch.Tensor:
        s, received = stream(), torch.empty_like(pairs)
        nccl.groupStart()
        for peer in (0, 1):
            raw.send(pairs[peer].data_ptr(), n // 2, f32, peer, s)
            raw.recv(received[peer].data_ptr(), n // 2, f32, peer, s)
        nccl.groupEnd()
        return received

    def raw_p2p_alloc() -> torch.Tensor | None:
        nccl.groupStart()
        if me == 0:
            raw.send(x.data_ptr(), n, f32, other, stream())
            received = None
        else:
            received = x.new_empty(n)
            raw.recv(received.data_ptr(), n, f32, other, stream())
        nccl.groupEnd()
        return received

    def raw_all_reduce_alloc() -> torch.Tensor:
        y = torch.empty_like(x)
        raw.allReduce(x.data_ptr(), y.data_ptr(), n, f32, add, stream())
        return y

    def raw_all_gather_alloc() -> torch.Tensor:
        y = x.new_empty(2 * n)
        raw.allGather(x.data_ptr(), y.data_ptr(), n, f32, stream())
        return y

    def raw_reduce_scatter_alloc() -> torch.Tensor:
        y = stacked.new_empty(n)
        raw.reduceScatter(stacked.data_ptr(), y.data_ptr(), n, f32, add, stream())
        return y

    def raw_broadcast_alloc() -> torch.Tensor:
        y = torch.empty_like(x)
        raw.broadcast(x.data_ptr(), y.data_ptr(), n, f32, 0, stream())
        return y

    def topo_p2p() -> object:
        if me == 0:
            topo.send(x, axis="tp", dst=1)
            return None
        return topo.recv((n,), torch.float32, axis="tp", src=0, device=device)

    def topo_p2p_out() -> object:
        if me == 0:
            topo.send(x, axis="tp", dst=1)
            return None
        return topo.recv((n,), torch.float32, axis="tp", src=0, device=device, out=out)

    table: dict[str, dict[str, Callable[[], object]]] = {
        "all_reduce": {
            "topo": lambda: topo.all_reduce(x, axis="tp"),
            "topo out=": lambda: topo.all_reduce(x, axis="tp", out=out),
            "raw cupy": lambda: raw.allReduce(x.data_ptr(), out.data_ptr(), n, f32, add, stream()),
            "raw cupy + alloc": raw_all_reduce_alloc,
        },
        "all_gather": {
            "topo": lambda: topo.all_gather(x, axis="tp"),
            "topo out=": lambda: topo.all_gather(x, axis="tp", out=gathered),
            "raw cupy": lambda: raw.allGather(x.data_ptr(), gathered.data_ptr(), n, f32, stream()),
            "raw cupy + alloc": raw_all_gather_alloc,
        },
        "all_gather dim 1": {
            "topo": lambda: topo.all_gather(square, axis="tp", dim=1),
            "topo out=": lambda: topo.all_gather(square, axis="tp", dim=1, out=square_out),
            "raw cupy": raw_gather_dim1,
        },
        "reduce_scatter": {
            "topo": lambda: topo.reduce_scatter(stacked, axis="tp"),
            "topo out=": lambda: topo.reduce_scatter(stacked, axis="tp", out=out),
            "raw cupy": lambda: raw.reduceScatter(
                stacked.data_ptr(), out.data_ptr(), n, f32, add, stream()
            ),
            "raw cupy + alloc": raw_reduce_scatter_alloc,
        },
        "broadcast": {
            "topo": lambda: topo.broadcast(x, axis="tp", src=0),
            "topo out=": lambda: topo.broadcast(x, axis="tp", src=0, out=out),
            "raw cupy": lambda: raw.broadcast(x.data_ptr(), out.data_ptr(), n, f32, 0, stream()),
            "raw cupy + alloc": raw_broadcast_alloc,
        },
        "all_to_all": {
            "topo": lambda: topo.all_to_all(pairs, axis="tp"),
            "raw cupy": raw_all_to_all,
            "raw cupy + alloc": raw_all_to_all_alloc,
        },
        "send/recv": {
            "topo": topo_p2p,
            "topo out=": topo_p2p_out,
            "raw cupy": raw_p2p,
            "raw cupy + alloc": raw_p2p_alloc,
        },
        "all_gatherv": {
            "topo": lambda: topo.all_gatherv(mine, axis="tp", sizes=sizes, method="p2p"),
            "raw cupy": raw_gatherv,
            "raw cupy + alloc": raw_gatherv_alloc,
        },
    }
    if pg is not None:
        import torch.distributed as dist

        bcast = dist.BroadcastOptions()
        bcast.rootRank = 0
        table["all_reduce"]["ProcessGroupNCCL"] = lambda: pg.allreduce([x])
        table["all_gather"]["ProcessGroupNCCL"] = lambda: pg._allgather_base(gathered, x)
        table["reduce_scatter"]["ProcessGroupNCCL"] = lambda: pg._reduce_scatter_base(out, stacked)
        table["broadcast"]["ProcessGroupNCCL"] = lambda: pg.broadcast([x], bcast)
        table["all_to_all"]["ProcessGroupNCCL"] = lambda: pg.alltoall_base(
            pairs_out, pairs, [], [], dist.AllToAllOptions()
        )
        table["send/recv"]["ProcessGroupNCCL"] = (
            (lambda: pg.send([x], other, 0)) if me == 0 else (lambda: pg.recv([out], other, 0))
        )
    return table
