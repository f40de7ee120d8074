"""The ``threads`` backend: every rank is a thread of this process (for :func:`topo.simulate`).

One :class:`ThreadHub` serves one simulation. It is a ``torch.distributed`` store (so the
coordinator's rendezvous, barriers and joins work unchanged, in memory) and it holds the
exchange slots of every group: a collective is the ``seq``-th operation of its group, each
rank puts its tensor into slot ``seq``, the last one to arrive computes every rank's result
and wakes the others. Point-to-point messages go through per-(sender, receiver) mailboxes.

Results are deterministic and equal gloo's: non-reducing collectives move the same values;
integer reductions are exact whatever the order; float ``sum``/``avg``/``prod`` use gloo's
own order. On CPU, torch's ``ProcessGroupGloo`` runs gloo's ring all-reduce (measured with
torch 2.13 for 2–8 local ranks: every element bit-identical, float32/float64/float16/bfloat16,
1 to 2.5 M elements): the buffer is cut into ``S = roundup(max(ceil(bytes / 1 MiB), 2n), n)``
segments of ``ceil(bytes / S)`` bytes (rounded up to the element size), ``S / n`` consecutive
segments form chunk ``c``, and chunk ``c`` is accumulated around the ring starting at rank
``c - 1``: ``x[c-1]``, then ``x[c-2] + acc``, …, ``x[c] + acc`` (indices mod ``n``), each
step rounded in the tensor's dtype. :func:`ring_reduce` does exactly that. ``reduce_scatter``
uses the same torch reduction as topo's gloo communicator (an all-to-all, then
``sum(0, dtype=x.dtype)``), so it matches too. ``max``/``min`` are order-free (NaN aside).

Every wait is bounded by the activation's timeout and names the ranks that did not arrive;
:meth:`ThreadHub.abort` wakes every waiting rank with :class:`topo.SimulationAborted`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

import topo._dist as dist
from topo.communicators.alltoallv import sizes_mismatch
from topo.communicators.base import ReduceOp
from topo.communicators.checked import mismatch_message
from topo.communicators.registry import GroupSpec
from topo.errors import (
    BackendUnavailableError,
    CollectiveMismatchError,
    CommunicationError,
    CommunicationTimeout,
    SimulationAborted,
)

__all__ = ["ThreadHub", "ThreadsCommunicator", "ring_reduce"]

_MAX_SEGMENT_BYTES = 1 << 20  # gloo's AllreduceOptions::kMaxSegmentSize


def ring_reduce(values: Sequence[torch.Tensor], op: ReduceOp) -> torch.Tensor:
    """Reduce equal-shaped tensors ``values[i]`` (rank ``i``'s) in gloo's ring order.

    Example::

        ring_reduce([torch.ones(3), torch.ones(3)], "sum")   # tensor([2., 2., 2.])
    """
    first = values[0]
    n = len(values)
    if op in ("max", "min"):
        out = first.clone()
        for v in values[1:]:
            out = torch.maximum(out, v) if op == "max" else torch.minimum(out, v)
        return out
    numel = first.numel()
    if numel == 0 or n == 1:
        out = first.clone()
    else:
        flat = [v.reshape(-1) for v in values]
        size = first.element_size()
        total = numel * size
        max_segment = size * max(1, _MAX_SEGMENT_BYTES // size)
        segments = max(-(-total // max_segment), 2 * n)
        segments = -(-segments // n) * n
        per_segment = -(-total // segments)
        segment_bytes = -(-per_segment // size) * size
        per_chunk = (segments // n) * segment_bytes // size
        result = torch.empty_like(flat[0])
        combine = torch.mul if op == "prod" else torch.add
        for c in range(n):
            lo, hi = min(c * per_chunk, numel), min((c + 1) * per_chunk, numel)
            if lo == hi:
                continue
            acc = flat[(c - 1) % n][lo:hi]
            for k in range(2, n + 1):
                acc = combine(flat[(c - k) % n][lo:hi], acc)
            result[lo:hi] = acc
        out = result.reshape(first.shape)
    if op == "avg":
        out = out / n  # gloo's communicator sums, then divides in the dtype
    return out


#: The error torch's stores raise on a wait timeout (``DistStoreError``, a RuntimeError).
_STORE_ERROR: type[RuntimeError] = getattr(torch.distributed, "DistStoreError", RuntimeError)


class _Slot:
    """One collective of one group: what each index brought, and the results."""

    __slots__ = ("arrived", "error", "outputs", "read", "records", "values")

    def __init__(self, n: int) -> None:
        self.values: list[Any] = [None] * n
        self.records: list[dict[str, object] | None] = [None] * n
        self.arrived = 0
        self.read = 0
        self.outputs: list[Any] | None = None
        self.error: tuple[type[BaseException], str] | None = None


class _Group:
    def __init__(self) -> None:
        self.slots: dict[int, _Slot] = {}
        self.mailboxes: dict[tuple[int, int], deque[torch.Tensor]] = {}


class ThreadHub(dist.Store):
    """The shared state of one simulation: an in-memory store plus every group's slots.

    ``rank_of_thread`` maps each rank thread to its global rank; ``waiting`` says what each
    rank waits on right now (for timeout reports).

    Example::

        hub = ThreadHub()
        with mesh.activate(world, store=hub, backends={"cpu": "threads"}):
            ...
    """

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()
        self.abort_reason: str | None = None
        self.waiting: dict[int, str] = {}
        self.local = threading.local()
        self._data: dict[str, bytes] = {}
        self._groups: dict[str, _Group] = {}
        self._timeout = timedelta(seconds=300)

    # --------------------------------------------------------------- shared helpers

    def abort(self, reason: str) -> None:
        """Wake every waiting rank with :class:`topo.SimulationAborted` (and every later wait).

        Example::

            hub.abort("rank 1 raised ValueError")
        """
        with self.cond:
            if self.abort_reason is None:
                self.abort_reason = reason
            self.cond.notify_all()

    def wait_until(self, ready: Callable[[], bool], seconds: float, what: str) -> bool:
        """Wait (holding ``cond``) until ``ready()``; False at the deadline. Raises
        :class:`topo.SimulationAborted` once the hub is aborted."""
        rank = getattr(self.local, "rank", -1)
        deadline = time.monotonic() + seconds
        self.waiting[rank] = what
        try:
            while True:
                if ready():  # first: a wait that is already over is no victim of an abort
                    return True
                if self.abort_reason is not None:
                    raise SimulationAborted(
                        f"rank {rank} stopped waiting for {what}: {self.abort_reason}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        finally:
            self.waiting.pop(rank, None)

    def group(self, scope: str) -> _Group:
        with self.cond:
            group = self._groups.get(scope)
            if group is None:
                group = self._groups[scope] = _Group()
            return group

    # ------------------------------------------------------------------ the store

    def set(self, key: str, value: Any) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        with self.cond:
            self._data[key] = data
            self.cond.notify_all()

    def get(self, key: str) -> bytes:
        with self.cond:
            self._wait_keys([key], self._timeout)
            return self._data[key]

    def add(self, key: str, value: int) -> int:
        with self.cond:
            total = int(self._data.get(key, b"0")) + int(value)
            self._data[key] = str(total).encode()
            self.cond.notify_all()
            return total

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        as_bytes = [v.encode() if isinstance(v, str) else bytes(v) for v in (expected, desired)]
        with self.cond:
            current = self._data.get(key)
            if (current is None and as_bytes[0] == b"") or current == as_bytes[0]:
                self._data[key] = current = as_bytes[1]
                self.cond.notify_all()
            return as_bytes[0] if current is None else current

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        with self.cond:
            self._wait_keys(keys, self._timeout if timeout is None else timeout)

    def _wait_keys(self, keys: list[str], timeout: timedelta) -> None:
        shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
        if not self.wait_until(
            lambda: all(k in self._data for k in keys),
            timeout.total_seconds(),
            f"the rendezvous store (key(s) {shown})",
        ):
            # What torch's own stores raise (a RuntimeError): the coordinator turns it into a
            # RendezvousTimeout naming the ranks that did not arrive.
            raise _STORE_ERROR(f"Wait timeout after {timeout.total_seconds():g} s for {shown}")

    def check(self, keys: list[str]) -> bool:
        with self.cond:
            return all(k in self._data for k in keys)

    def delete_key(self, key: str) -> bool:
        with self.cond:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self.cond:
            return len(self._data)

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    def multi_get(self, keys: list[str]) -> list[bytes]:
        with self.cond:
            self._wait_keys(keys, self._timeout)
            return [self._data[k] for k in keys]


class ThreadsCommunicator:
    """One group's communicator in a simulation (see the module docstring).

    Example::

        comm = ThreadsCommunicator(hub, "scope/tp/0", ranks=(0, 1), index=0,
                                   timeout=timedelta(seconds=60), label="axis 'tp' group (0, 1)")
    """

    def __init__(
        self,
        hub: ThreadHub,
        scope: str,
        ranks: tuple[int, ...],
        index: int,
        timeout: timedelta,
        label: str,
    ) -> None:
        self.hub = hub
        self.ranks = ranks
        self.index = index
        self.label = label
        self.timeout = timeout
        self._group = hub.group(scope)
        self._seq = 0
        self._closed = False

    @classmethod
    def create(cls, group: GroupSpec) -> ThreadsCommunicator:
        """The registry's factory: ``group.root_store`` must be the simulation's hub.

        Example::

            comm = ThreadsCommunicator.create(group_spec)
        """
        hub = group.root_store
        if not isinstance(hub, ThreadHub):
            raise BackendUnavailableError(
                f"the 'threads' backend requires ranks that are threads of one process sharing "
                f"a ThreadHub store (as topo.simulate sets up), but {group.label} was activated "
                f"on a {type(hub).__name__}; run the function under topo.simulate, or use "
                f"backends={{'cpu': 'gloo'}}"
            )
        return cls(hub, group.scope, group.ranks, group.index, group.timeout, group.label)

    @property
    def size(self) -> int:
        return len(self.ranks)

    # ---------------------------------------------------------------- machinery

    def _run(
        self,
        operation: str,
        value: Any,
        record: dict[str, object],
        outputs: Callable[[list[Any]], list[Any]],
    ) -> Any:
        """Take part in this group's next collective: bring ``value``; the last rank to
        arrive checks every rank's ``record`` and computes every rank's output."""
        if self._closed:
            raise CommunicationError(
                f"{self.label}: collectives require an open communicator, but this one is "
                f"closed (its mesh context has ended)"
            )
        n, me, hub = self.size, self.index, self.hub
        seq = self._seq
        self._seq += 1
        with hub.cond:
            slot = self._group.slots.get(seq)
            if slot is None:
                slot = self._group.slots[seq] = _Slot(n)
            slot.values[me] = value
            slot.records[me] = {"operation": operation, **record}
            slot.arrived += 1
            if slot.arrived == n:
                self._finish(slot, operation, outputs)
                hub.cond.notify_all()
            elif not hub.wait_until(
                lambda: slot.arrived == n,
                self.timeout.total_seconds(),
                f"{operation} on {self.label} (rank(s) {self._missing(slot)} had not arrived)",
            ):
                raise CommunicationTimeout(
                    f"{operation} on {self.label} timed out after "
                    f"{self.timeout.total_seconds():g} s on rank {self.ranks[me]}: rank(s) "
                    f"{self._missing(slot)} of {list(self.ranks)} did not arrive; every rank of "
                    f"the group must call the same collectives in the same order (look for a "
                    f"rank that skipped this call or hangs)"
                )
            slot.read += 1
            if slot.read == n:
                del self._group.slots[seq]
        if slot.error is not None:
            kind, message = slot.error
            raise kind(message)
        assert slot.outputs is not None
        return slot.outputs[me]

    def _missing(self, slot: _Slot) -> list[int]:
        return [r for r, rec in zip(self.ranks, slot.records, strict=True) if rec is None]

    def _finish(
        self, slot: _Slot, operation: str, outputs: Callable[[list[Any]], list[Any]]
    ) -> None:
        records = [r or {} for r in slot.records]
        message = mismatch_message(operation, self.label, self.ranks, records)
        if message is not None:
            slot.error = (CollectiveMismatchError, message)
            return
        try:
            slot.outputs = outputs(slot.values)
        except CollectiveMismatchError as error:  # found while combining (all_to_allv sizes)
            slot.error = (CollectiveMismatchError, str(error))
        except Exception as error:  # a torch error while combining: every rank reports it
            slot.error = (
                CommunicationError,
                f"{operation} on {self.label} failed while combining the ranks' tensors "
                f"({type(error).__name__}: {error})",
            )

    @staticmethod
    def _record(x: torch.Tensor, **extra: object) -> dict[str, object]:
        return {"shape": tuple(x.shape), "dtype": str(x.dtype).removeprefix("torch."), **extra}

    # ------------------------------------------------------------- collectives

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        def outputs(values: list[torch.Tensor]) -> list[torch.Tensor]:
            y = ring_reduce(values, op)
            return [y, *(y.clone() for _ in values[1:])]

        out: torch.Tensor = self._run(
            "all_reduce", x, self._record(x, **{"reduce op": op}), outputs
        )
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        def outputs(values: list[torch.Tensor]) -> list[torch.Tensor]:
            y = torch.stack(values)
            return [y, *(y.clone() for _ in values[1:])]

        out: torch.Tensor = self._run("all_gather", x, self._record(x), outputs)
        return out

    def reduce_scatter(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        n = self.size

        def outputs(values: list[torch.Tensor]) -> list[torch.Tensor]:
            results = []
            for i in range(n):
                # What gloo's communicator does after its all-to-all, on the same layout.
                received = torch.stack([v[i] for v in values])
                if op in ("sum", "avg"):
                    y = received.sum(0, dtype=x.dtype)
                    results.append(y / n if op == "avg" else y)
                elif op == "prod":
                    results.append(received.prod(0, dtype=x.dtype))
                else:
                    results.append(received.amax(0) if op == "max" else received.amin(0))
            return results

        out: torch.Tensor = self._run(
            "reduce_scatter", x, self._record(x, **{"reduce op": op}), outputs
        )
        return out

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        def outputs(values: list[torch.Tensor]) -> list[torch.Tensor]:
            return [values[src].clone() for _ in values]

        out: torch.Tensor = self._run("broadcast", x, self._record(x, root=src), outputs)
        return out

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        def outputs(values: list[torch.Tensor]) -> list[torch.Tensor | None]:
            result: list[torch.Tensor | None] = [None] * len(values)
            result[dst] = torch.stack(values)
            return result

        out: torch.Tensor | None = self._run("gather", x, self._record(x, root=dst), outputs)
        return out

    def scatter(self, x: torch.Tensor, src: int) -> torch.Tensor:
        def outputs(values: list[torch.Tensor]) -> list[torch.Tensor]:
            return [values[src][i].clone() for i in range(len(values))]

        out: torch.Tensor = self._run("scatter", x, self._record(x, root=src), outputs)
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        def outputs(values: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.stack([v[i] for v in values]) for i in range(len(values))]

        out: torch.Tensor = self._run("all_to_all", x, self._record(x), outputs)
        return out

    def all_to_allv_dim0(
        self, x: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int]
    ) -> torch.Tensor:
        """The uneven all-to-all (see ``topo/communicators/alltoallv.py``); sizes that
        disagree between two ranks are a :class:`topo.CollectiveMismatchError` on every rank
        of the group (gloo would abort)."""
        ranks, label = self.ranks, self.label

        def outputs(values: list[tuple[torch.Tensor, list[int], list[int]]]) -> list[torch.Tensor]:
            sends, recvs = [v[1] for v in values], [v[2] for v in values]
            message = sizes_mismatch("all_to_allv", label, ranks, sends, recvs)
            if message is not None:
                raise CollectiveMismatchError(message)
            parts = [torch.split(v[0], s) for v, s in zip(values, sends, strict=True)]
            return [torch.cat([p[j] for p in parts]) for j in range(len(values))]

        record: dict[str, object] = {
            "row shape": tuple(x.shape[1:]),
            "dtype": str(x.dtype).removeprefix("torch."),
        }
        value = (x, list(send_sizes), list(recv_sizes))
        out: torch.Tensor = self._run("all_to_allv", value, record, outputs)
        return out

    def barrier(self) -> None:
        self._run("barrier", None, {}, lambda values: [None] * len(values))

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        """Sends never block (a copy goes into the receiver's mailbox); each receive waits for
        the next message from its peer and checks its shape and dtype."""
        hub, me = self.hub, self.index
        copies = [(peer, t.clone()) for peer, t in sends]
        with hub.cond:
            if hub.abort_reason is not None:
                raise SimulationAborted(f"send on {self.label}: {hub.abort_reason}")
            for peer, t in copies:
                self._group.mailboxes.setdefault((me, peer), deque()).append(t)
            hub.cond.notify_all()
        for peer, buffer in recvs:
            with hub.cond:
                box = self._group.mailboxes.setdefault((peer, me), deque())
                if not hub.wait_until(
                    lambda box=box: bool(box),  # type: ignore[misc]
                    self.timeout.total_seconds(),
                    f"a message from rank {self.ranks[peer]} on {self.label}",
                ):
                    raise CommunicationTimeout(
                        f"recv on {self.label} timed out after {self.timeout.total_seconds():g} "
                        f"s on rank {self.ranks[me]}: rank(s) [{self.ranks[peer]}] did not "
                        f"arrive (sent nothing); it must call the matching send (or the same "
                        f"ppermute/shift)"
                    )
                message = box.popleft()
            if message.shape != buffer.shape or message.dtype != buffer.dtype:
                raise CollectiveMismatchError(
                    f"recv on {self.label}: rank {self.ranks[peer]} sent shape "
                    f"{tuple(message.shape)} dtype {message.dtype}, but rank {self.ranks[me]} "
                    f"expects shape {tuple(buffer.shape)} dtype {buffer.dtype}; pass the "
                    f"sender's shape and dtype to recv"
                )
            buffer.copy_(message)

    def close(self, abort: bool = False) -> None:
        self._closed = True
