"""Gloo communicator for CPU tensors: a stateless ``ProcessGroupGloo`` per group.

The process group is built directly on a ``PrefixStore`` of its own, never through
``torch.distributed.init_process_group``, so topo leaves torch's default group alone and only
the ranks of the group take part in its rendezvous.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

import topo._dist as dist
from topo.communicators.base import ReduceOp
from topo.communicators.buffers import BufferPool
from topo.communicators.dtypes import GLOO_REDUCE_DTYPES, TORCH_REDUCE_OPS
from topo.communicators.handoff import HandedTensors
from topo.communicators.recorder import FlightRecorder
from topo.communicators.rollcall import RollCall
from topo.errors import CommunicationError, CommunicationTimeout, TopoError, TopoValueError

__all__ = ["GLOO_REDUCE_DTYPES", "GlooCommunicator", "shared_devices"]


def _gloo_devices(local: bool) -> list[object]:
    gloo = dist.ProcessGroupGloo
    interfaces = os.environ.get("GLOO_SOCKET_IFNAME")
    if interfaces:
        return [gloo.create_device(interface=name) for name in interfaces.split(",") if name]
    if local:
        return [gloo.create_device(hostname="127.0.0.1")]
    return [gloo.create_default_device()]


def shared_devices(shared: dict[Any, Any], local: bool) -> list[object]:
    """The gloo network devices of one activation's communicators, made on first use and kept
    in ``shared`` (the activation's :attr:`~topo.coordinator.Coordinator.shared`, emptied when
    it closes). A device is a listening socket and an event-loop thread; every process group
    of the activation can run its connections over the same one. In one process, 3 process
    groups took 0.5 ms of CPU to create over a shared device against 1.0 ms with one each,
    and 10 ms to destroy against 30–40 (a device's loop thread winds down on a 10 ms tick).

    Example::

        comm = GlooCommunicator(store, ranks, index, timeout, local, label,
                                devices=shared_devices(coordinator.shared, local))
    """
    key = ("gloo devices", local, os.environ.get("GLOO_SOCKET_IFNAME"))
    devices: list[object] | None = shared.get(key)
    if devices is None:
        devices = shared[key] = _gloo_devices(local)
    return devices


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or for dtypes gloo cannot move (complex, 8-bit floats, …) a byte view of
    it with a trailing dimension of ``itemsize`` bytes."""
    if x.dtype in GLOO_REDUCE_DTYPES:
        return x
    return x.unsqueeze(-1).view(torch.uint8)


class GlooCommunicator:
    """A gloo process group over one group's ranks, for CPU tensors.

    Example::

        comm = GlooCommunicator(prefix_store, ranks=(0, 1), index=0, timeout=timedelta(seconds=60),
                                local=True, label="axis 'tp' group (0, 1)")
        comm.all_reduce(torch.ones(2), "sum")
    """

    def __init__(
        self,
        store: dist.Store,
        ranks: tuple[int, ...],
        index: int,
        timeout: timedelta,
        local: bool,
        label: str,
        roll_call: RollCall | None = None,
        devices: list[object] | None = None,
    ) -> None:
        self.ranks = ranks
        #: Number of ranks in the group (an attribute: it is read on every call).
        self.size = len(ranks)
        self.roll_call = roll_call
        self.index = index
        self.label = label
        self.timeout = timeout
        options: Any = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = timeout
        #: The gloo devices its process group runs over: the activation's shared ones
        #: (:func:`shared_devices`), or this group's own.
        self.devices = devices if devices is not None else _gloo_devices(local)
        options._devices = self.devices
        try:
            # typed Any: torch's stubs do not declare the Backend collective methods
            self._pg: Any = dist.ProcessGroupGloo(store, index, len(ranks), options)
        except (RuntimeError, ValueError, MemoryError, OverflowError) as error:
            # ValueError/MemoryError: garbage in a peer's address record (gloo parses it)
            raise self._error("creating the gloo communicator", error, roll_call=False) from None
        self._reduce_options: dict[str, dist.AllreduceOptions] = {}
        for name, op in TORCH_REDUCE_OPS.items():
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            self._reduce_options[name] = opts
        self._barrier_options = dist.BarrierOptions()
        self._all_to_all_options = dist.AllToAllOptions()
        self._broadcast_options = [dist.BroadcastOptions() for _ in ranks]
        for root, broadcast in enumerate(self._broadcast_options):
            broadcast.rootRank = root
        self.buffers = BufferPool()
        self.handed = HandedTensors()  # see topo/communicators/handoff.py: no GIL deadlock
        #: This communicator's calls (see topo/communicators/recorder.py).
        self.flight = FlightRecorder()

    @property
    def pg(self) -> Any:
        """The underlying torch process group (raises once closed)."""
        if self._pg is None:
            raise CommunicationError(
                f"{self.label}: collectives require an open communicator, but this gloo "
                f"communicator is closed (its mesh context has ended); call collectives inside "
                f"the `with mesh.activate():` block"
            )
        return self._pg

    def _error(
        self, operation: str, error: BaseException, roll_call: bool = True
    ) -> TopoError:
        """topo's error for a failed gloo call; after a failed collective the survivors hold a
        roll call first, so the message names the ranks that are gone."""
        forged = self.roll_call.store.alarm() if self.roll_call is not None else None
        if forged is not None:  # a forged store value (refused here or by a peer) is the cause
            return forged
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        absent = ""
        if roll_call and self.roll_call is not None:
            absent = self.roll_call.report(self.flight)
        seq = f" #{self.flight.calls}" if roll_call else ""
        culprits = list(self.roll_call.culprits) if roll_call and self.roll_call else []
        found: CommunicationError
        if "timed out" in text.lower() or "timeout" in text.lower():
            found = CommunicationTimeout(
                f"{operation}{seq} on {self.label} timed out after "
                f"{self.timeout.total_seconds():g} s (global ranks {list(self.ranks)}): a peer did "
                f"not arrive or died{absent}; check that every rank of the group calls the same "
                f"collectives in the same order [gloo: {text}]"
            )
        else:
            found = CommunicationError(
                f"{operation}{seq} on {self.label} failed (global ranks {list(self.ranks)})"
                f"{absent}; a peer may have died or called a different collective: check the "
                f"other ranks' errors [gloo: {text}]"
            )
        found.culprits = culprits
        return found

    def _run(
        self,
        operation: str,
        tensors: Sequence[torch.Tensor],
        x: torch.Tensor | None,
        start: Callable[..., dist.Work],
        *args: Any,
    ) -> None:
        """Start one gloo operation, ``start(*args)``, that hands gloo ``tensors`` (``x`` is
        the caller's input, for the flight record) and wait for it; any failure (also one gloo
        raises while starting, as after an earlier timeout) becomes a
        :class:`CommunicationError`. The tensors stay alive until gloo's worker thread has let
        go of them (:class:`~topo.communicators.handoff.HandedTensors`).

        It takes a bound method and its arguments, not a closure, and the use counts go
        through ``map``, not comprehensions: around a gloo call, after the worker thread has
        run, each Python line costs several times what it costs in a tight loop. On a one-rank
        group of 4-byte tensors (median µs per call) this took broadcast from 72 to 45 and
        all_to_all from 63 to 52; the raw calls take 30-33.

        Example::

            self._run("broadcast", [y], y, pg.broadcast, [y], options)
        """
        if x is None:
            self.flight.record(operation)
        else:
            self.flight.record(operation, x.shape, x.dtype)
        before = self.handed.counts(tensors)
        try:
            start(*args).wait()
        except RuntimeError as error:
            raise self._error(operation, error) from None
        self.handed.keep(tensors, before)

    def _run_one(
        self, operation: str, y: torch.Tensor, start: Callable[..., dist.Work], options: Any
    ) -> None:
        """:meth:`_run` for one tensor that gloo reads and writes in place (all_reduce and
        broadcast), ``start([y], options)``: no lists to count and zip. On a one-rank group
        of 4-byte tensors it took the in-place broadcast from 31 to 27 µs (median per call;
        the raw call: 28).

        Example::

            self._run_one("broadcast", y, pg.broadcast, options)
        """
        self.flight.record(operation, y.shape, y.dtype)
        before = y._use_count()  # type: ignore[attr-defined]  # handoff.use_count, inlined
        try:
            start([y], options).wait()
        except RuntimeError as error:
            raise self._error(operation, error) from None
        self.handed.keep_one(y, before)

    # ------------------------------------------------------------- collectives

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        # The small-message hot path: no closure, no property, one dict lookup.
        return self._all_reduce(self.buffers.clone(x), op)

    def all_reduce_into(self, x: torch.Tensor, op: ReduceOp, out: torch.Tensor) -> torch.Tensor:
        """:meth:`all_reduce` written into ``out`` (contiguous, ``x``'s shape and dtype; may be
        ``x`` itself): no allocation, the caller's memory goes to gloo directly."""
        if out is not x:
            out.copy_(x)
        return self._all_reduce(out, op)

    def _all_reduce(self, y: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """Reduce ``y`` in place over the group."""
        pg = self._pg if self._pg is not None else self.pg  # closed: raises, nothing recorded
        self._run_one("all_reduce", y, pg.allreduce, self._reduce_options[op])
        if op == "avg":
            y /= self.size
        return y

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather_into(x, self.buffers.empty((self.size, *x.shape), x.dtype))

    def all_gather_dim0(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along dim 0: ``(size * x.shape[0], ...)``."""
        shape = (self.size * x.shape[0], *x.shape[1:])
        return self.all_gather_into(x, self.buffers.empty(shape, x.dtype))

    def all_gather_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`all_gather` written into ``out``: contiguous, ``(size, *x.shape)`` or any
        shape with that layout (``(size * x.shape[0], ...)``)."""
        stacked = out if out.dim() == x.dim() + 1 else out.view(self.size, *x.shape)
        src, chunks = _as_bytes(x), list(_as_bytes(stacked).unbind(0))
        self._run("all_gather", [src, *chunks], x, self.pg.allgather, [chunks], [src])
        return out

    def reduce_scatter(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        received = self._all_to_all(x, "reduce_scatter")
        if op in ("sum", "avg"):
            y = received.sum(0, dtype=x.dtype)
            return y / self.size if op == "avg" else y
        if op == "prod":
            return received.prod(0, dtype=x.dtype)
        return received.amax(0) if op == "max" else received.amin(0)

    def reduce_scatter_dim0(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """``x`` of ``(size * k, ...)``: the reduction of every rank's block ``index``."""
        return self.reduce_scatter(x.view(self.size, x.shape[0] // self.size, *x.shape[1:]), op)

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        y = self.buffers.clone(x) if self.index == src else self.buffers.empty_like(x)
        return self.broadcast_into(y, src, y)  # on the source, y already holds x

    def broadcast_into(self, x: torch.Tensor, src: int, out: torch.Tensor) -> torch.Tensor:
        """:meth:`broadcast` written into ``out`` (contiguous, ``x``'s shape and dtype; may be
        ``x`` itself): no allocation, gloo moves the caller's memory."""
        if not 0 <= src < self.size:  # checked: the list would take -1 as the last
            raise TopoValueError(
                f"broadcast on {self.label} requires a source index 0 <= src < {self.size}, "
                f"but got {src}; pass the root's index within the group, not a global rank"
            )
        options = self._broadcast_options[src]
        if self.index == src and out is not x:
            out.copy_(x)
        pg = self._pg if self._pg is not None else self.pg  # closed: raises, nothing recorded
        if out.dtype in GLOO_REDUCE_DTYPES:
            self._run_one("broadcast", out, pg.broadcast, options)
        else:  # a byte view gloo can move; the flight record names out's own dtype
            moved = _as_bytes(out)
            self._run("broadcast", (moved,), out, pg.broadcast, [moved], options)
        return out

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        opts = dist.GatherOptions()
        opts.rootRank = dst
        src = _as_bytes(x)
        if self.index != dst:
            self._run("gather", [src], x, self.pg.gather, [], [src], opts)
            return None
        out = self.buffers.empty((self.size, *x.shape), x.dtype)
        chunks = list(_as_bytes(out).unbind(0))
        self._run("gather", [src, *chunks], x, self.pg.gather, [chunks], [src], opts)
        return out

    def scatter(self, x: torch.Tensor, src: int) -> torch.Tensor:
        out = self.buffers.empty(x.shape[1:], x.dtype)
        opts = dist.ScatterOptions()
        opts.rootRank = src
        chunks = list(_as_bytes(x).unbind(0)) if self.index == src else []
        moved = _as_bytes(out)
        inputs = [chunks] if self.index == src else []
        tensors = [moved, *chunks]
        self._run("scatter", tensors, out, self.pg.scatter, [moved], inputs, opts)
        return out

    def all_to_all_dim0(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of ``(size * k, ...)``: block ``j`` of the result is index ``j``'s block
        ``index`` (gloo's all-to-all splits dim 0 itself)."""
        return self.all_to_all(x)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_to_all(x, "all_to_all")

    def _all_to_all(self, x: torch.Tensor, operation: str) -> torch.Tensor:
        out = self.buffers.empty_like(x)
        dst, src = _as_bytes(out), _as_bytes(x)
        options = self._all_to_all_options
        self._run(operation, (dst, src), x, self.pg.alltoall_base, dst, src, [], [], options)
        return out

    def all_to_allv_dim0(
        self, x: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int]
    ) -> torch.Tensor:
        """``x`` laid along dim 0, ``send_sizes[j]`` rows for index ``j``; the result stacks
        the ``recv_sizes[i]`` rows from each index ``i`` (gloo's all-to-all with split sizes)."""
        out = self.buffers.empty((sum(recv_sizes), *x.shape[1:]), x.dtype)
        if out.dim() > 1 and out.shape[1:].numel() == 0:
            return out  # rows of no elements: nothing to move (the same row shape everywhere)
        dst, src = _as_bytes(out), _as_bytes(x)
        splits_in, splits_out = list(send_sizes), list(recv_sizes)
        start, options = self.pg.alltoall_base, self._all_to_all_options
        self._run("all_to_allv", (dst, src), x, start, dst, src, splits_out, splits_in, options)
        return out

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        pg = self._pg if self._pg is not None else self.pg  # closed: raises, nothing recorded
        self.flight.record("send/recv")
        if len(sends) + len(recvs) == 1:  # one tensor, the pipeline stage's hot path
            self._one_way(pg, *(sends[0] if sends else recvs[0]), bool(sends))
            return
        into = [(peer, _as_bytes(buf)) for peer, buf in recvs]
        out = [(peer, _as_bytes(t)) for peer, t in sends]
        tensors = [t for _, t in into + out]
        before = self.handed.counts(tensors)
        try:
            works = [pg.recv([buf], peer, 0) for peer, buf in into]
            works += [pg.send([t], peer, 0) for peer, t in out]
            for work in works:
                work.wait()
        except RuntimeError as error:
            raise self._error("send/recv", error) from None
        del works  # each Work refers to its tensors
        self.handed.keep(tensors, before)

    def _one_way(self, pg: Any, peer: int, tensor: torch.Tensor, send: bool) -> None:
        """:meth:`exchange` of one tensor: one send or one receive, no lists."""
        t = _as_bytes(tensor)
        before = t._use_count()  # type: ignore[attr-defined]  # handoff.use_count, inlined
        try:
            work = pg.send([t], peer, 0) if send else pg.recv([t], peer, 0)
            work.wait()
        except RuntimeError as error:
            raise self._error("send/recv", error) from None
        del work  # it refers to t
        self.handed.keep_one(t, before)

    def barrier(self) -> None:
        self._run("barrier", (), None, self.pg.barrier, self._barrier_options)

    def close(self, abort: bool = False) -> None:
        self.buffers.clear()
        self.handed.sweep()  # the rest go with this object, after the workers let go
        pg, self._pg = self._pg, None
        if pg is not None and abort and hasattr(pg, "abort"):
            with contextlib.suppress(RuntimeError):
                pg.abort()
