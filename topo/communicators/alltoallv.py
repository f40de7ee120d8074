"""The uneven all-to-all at the communicator level, for any backend, and its pairwise check.

``x`` is laid along dim 0 (contiguous): rows ``send_sizes[j]`` go to index ``j``, and the
result stacks, in index order, the ``recv_sizes[i]`` rows each index ``i`` sent. A backend
may serve it itself as the fast path ``all_to_allv_dim0(x, send_sizes, recv_sizes)`` (gloo:
one native all-to-all with split sizes; NCCL: one group of sends and receives; threads: one
exchange slot); :func:`all_to_allv_dim0` uses that where it exists, and otherwise one batch of
the protocol's point-to-point ``exchange``. :func:`sizes_mismatch` words the pairwise rule
every rank's sizes must follow (index ``i``'s ``send_sizes[j]`` is index ``j``'s
``recv_sizes[i]``) for check mode and the threads backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

import torch

from topo.communicators.base import Communicator

__all__ = ["all_to_allv_dim0", "sizes_mismatch"]


def all_to_allv_dim0(
    comm: Communicator, x: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int]
) -> torch.Tensor:
    """The uneven all-to-all of a contiguous ``x`` laid along dim 0 over ``comm`` (sizes
    already checked): the communicator's fast path where it has one, else one batch of
    sends and receives through ``comm.exchange``.

    Example::

        y = all_to_allv_dim0(comm, torch.arange(3.0), [1, 2], [1, 0])   # index 0 of 2
    """
    fast = getattr(comm, "all_to_allv_dim0", None)
    if fast is not None:
        return fast(x, send_sizes, recv_sizes)  # type: ignore[no-any-return]
    return by_exchange(comm, x, send_sizes, recv_sizes)


def by_exchange(
    comm: Communicator, x: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int]
) -> torch.Tensor:
    """:func:`all_to_allv_dim0` through the protocol's ``exchange`` only (a backend without
    the fast path); this rank's own block is copied locally, and empty blocks move nothing.

    Example::

        y = by_exchange(comm, x, [2, 1], [2, 3])
    """
    me = comm.index
    out = x.new_empty((sum(recv_sizes), *x.shape[1:]))
    if math.prod(x.shape[1:]) == 0:
        return out  # rows of no elements: nothing to move (every rank has the same row shape)
    send_starts = [0, *accumulate(send_sizes)]
    recv_starts = [0, *accumulate(recv_sizes)]
    sends, recvs = [], []
    for peer in range(len(send_sizes)):
        part = x.narrow(0, send_starts[peer], send_sizes[peer])
        into = out.narrow(0, recv_starts[peer], recv_sizes[peer])
        if peer == me:
            into.copy_(part)
            continue
        if send_sizes[peer]:
            sends.append((peer, part))
        if recv_sizes[peer]:
            recvs.append((peer, into))
    if sends or recvs:
        comm.exchange(sends, recvs)
    return out


def sizes_mismatch(
    operation: str,
    label: str,
    ranks: Sequence[int],
    send_table: Sequence[Sequence[int]],
    recv_table: Sequence[Sequence[int]],
) -> str | None:
    """``None`` when every pair agrees (``send_table[i][j] == recv_table[j][i]``: index ``i``
    sends index ``j`` as many rows as ``j`` expects from ``i``); else a message naming the
    first few disagreeing pairs by global rank and how to fix them.

    Example::

        sizes_mismatch("all_to_allv", "axis 'ep' group (0, 1)", (0, 1),
                       [[1, 2], [3, 4]], [[1, 3], [2, 5]])
        # "... rank 1 sends rank 1 ... " for the pair (1, 1): 4 sent, 5 expected
    """
    n = len(ranks)
    wrong = [(i, j) for i in range(n) for j in range(n) if send_table[i][j] != recv_table[j][i]]
    if not wrong:
        return None
    shown = "; ".join(
        f"rank {ranks[i]} sends rank {ranks[j]} {send_table[i][j]} rows, but rank {ranks[j]} "
        f"expects {recv_table[j][i]}"
        for i, j in wrong[:4]
    )
    more = f" (and {len(wrong) - 4} more pairs)" if len(wrong) > 4 else ""
    return (
        f"{operation} on {label}: the ranks' sizes disagree: {shown}{more}. Each index i's "
        f"send_sizes[j] must equal index j's recv_sizes[i]; pass recv_sizes=None to exchange "
        f"them"
    )
