"""The communicator protocol: one object per (group, device kind), device-neutral.

A communicator moves dense, contiguous tensors among the ranks of one group, and their memory
holds their values: no lazy conjugate or negative bit (:func:`plain`). The collectives layer
resolves the axis, validates arguments, makes inputs plain and lays chunks along dimension 0
before it calls a communicator, so an implementation only sees the simple forms below. Every
method is out-of-place: it never writes into its input and returns new tensors.
A vendor adds a device kind by implementing this protocol (see ``gloo.py`` and ``nccl.py``).

A communicator may also serve the collectives' fast paths, which they look up with
``getattr`` and use when present (contiguous tensors, as always):

- ``all_reduce_into(x, op, out)``: the reduction written into ``out`` (``x``'s shape; may be
  ``x``); returns ``out``;
- ``all_gather_into(x, out)``: into ``out`` of ``size * x.numel()`` elements laid out as
  ``(size, *x.shape)`` (that shape, or ``(size * x.shape[0], ...)``); returns ``out``;
- ``all_gather_dim0(x)``: every rank's ``x`` concatenated along dim 0;
- ``reduce_scatter_dim0(x, op)`` / ``reduce_scatter_into(x, op, out)``: ``x`` of
  ``(size * k, ...)``, block ``i`` of ``k`` rows for index ``i``; returns (or fills) ``(k, ...)``;
- ``all_to_all_dim0(x)``: ``x`` of ``(size * k, ...)``; block ``j`` of the result came from
  index ``j``;
- ``all_gatherv_dim0(x, sizes)``: every rank's ``x`` (``sizes[i]`` rows from index ``i``)
  concatenated along dim 0;
- ``all_to_allv_dim0(x, send_sizes, recv_sizes)``: rows ``send_sizes[j]`` of ``x`` to index
  ``j``; the result stacks the ``recv_sizes[i]`` rows from each index ``i`` in index order
  (without it, ``topo/communicators/alltoallv.py`` runs one batch of ``exchange``).

They save the reshapes and copies of the general path; without them the collectives use the
protocol below. An ``*_into`` method writes ``out``'s memory and nothing else: the collective
that called it moves ``out``'s version counter for autograd afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = ["REDUCE_OPS", "Communicator", "ReduceOp", "plain"]

ReduceOp = Literal["sum", "avg", "max", "min", "prod"]
REDUCE_OPS: tuple[ReduceOp, ...] = ("sum", "avg", "max", "min", "prod")


def plain(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a communicator takes it: contiguous, without a lazy conjugate or negative bit.

    A backend moves a tensor's memory. A ``conj()`` view's memory holds the unconjugated
    values (and the ``.imag`` of one holds the values negated), so those bits are resolved
    first. ``x`` itself where it is plain already (the common case: two bit checks, no copy);
    otherwise one copy, which ``contiguous()`` makes with both bits resolved.

    Example::

        comm.all_gather(plain(z.conj()))   # moves conj(z)'s values, not z's
    """
    if x.is_contiguous():
        if x.is_conj() or x.is_neg():
            return x.resolve_conj().resolve_neg()
        return x
    return x.contiguous()


@runtime_checkable
class Communicator(Protocol):
    """What topo needs from a device's communication library, for one group.

    ``ranks`` are the group's global ranks in axis-index order; ``index`` is this process's
    position in them. ``x`` is always :func:`plain` (contiguous, its memory holds its values);
    a "stacked" tensor has the group size as its first dimension (chunk ``i`` belongs to, or
    came from, index ``i``).

    Example::

        comm.all_reduce(torch.ones(4), "sum")   # tensor([n, n, n, n]) for a group of n
    """

    ranks: tuple[int, ...]
    index: int
    label: str

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        ...

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """Element-wise reduction of every rank's ``x``."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked ``(size, *x.shape)``: chunk ``i`` is index ``i``'s ``x``."""
        ...

    def reduce_scatter(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """``x`` stacked ``(size, *s)``; returns ``(*s)``, the reduction of every rank's chunk
        ``index``."""
        ...

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Index ``src``'s ``x`` on every rank (others' ``x`` give only shape and dtype)."""
        ...

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        """Stacked ``(size, *x.shape)`` on index ``dst``; ``None`` elsewhere."""
        ...

    def scatter(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """``x`` stacked ``(size, *s)`` (its values used on ``src`` only); returns chunk
        ``index`` of ``src``'s ``x``."""
        ...

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` stacked ``(size, *s)``; returns stacked ``(size, *s)`` where chunk ``j`` is
        index ``j``'s chunk ``index``."""
        ...

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        """Point-to-point: send each ``(peer, tensor)`` and receive into each ``(peer, buffer)``
        in one batch (no ordering deadlock between the two lists)."""
        ...

    def barrier(self) -> None:
        """Block until every rank of the group arrives."""
        ...

    def close(self, abort: bool = False) -> None:
        """Release the group's resources; ``abort=True`` on error paths (never blocks)."""
        ...
