"""NCCL communicator for CUDA tensors, through ``cupy.cuda.nccl``.

One ``NcclCommunicator`` per group, created on the group's first CUDA collective: the group's
first rank makes the unique id and topo's coordinator (torch's TCPStore, never cupyx's own
store) carries it to the others; every member then initializes under its CUDA device. Every
operation is enqueued on torch's current stream, so it is ordered with the user's kernels and
can be captured in a CUDA graph. cupy is imported only here, lazily: ``import topo`` never
needs it, and any cupy build (cupy-cuda12x, cupy-cuda13x) works.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from topo.communicators.base import ReduceOp
from topo.communicators.cuda_stream import raw_stream
from topo.communicators.nccl_setup import (
    UNIQUE_ID_BYTES,
    check_one_gpu_per_rank,
    cupy_major,
    decode_unique_id,
    encode_unique_id,
    gpu_identity,
    install_hint,
    load_nccl,
    nccl_version,
    unique_id_argument,
)
from topo.communicators.nccl_types import NCCL_DTYPES, NCCL_OPS, nccl_dtype
from topo.communicators.recorder import FlightRecorder
from topo.errors import (
    BackendUnavailableError,
    CommunicationError,
    CommunicationTimeout,
    TopoValueError,
)

if TYPE_CHECKING:
    from topo.coordinator import Coordinator

__all__ = [
    "UNIQUE_ID_BYTES",
    "NcclCommunicator",
    "check_one_gpu_per_rank",
    "cupy_major",
    "decode_unique_id",
    "encode_unique_id",
    "gpu_identity",
    "install_hint",
    "load_nccl",
    "nccl_version",
    "unique_id_argument",
]


class NcclCommunicator:
    """A ``cupy.cuda.nccl.NcclCommunicator`` over one group's ranks, for CUDA tensors.

    Example::

        comm = NcclCommunicator.create(coordinator, scope, ranks=(0, 1), index=0,
                                       device=torch.device("cuda", 0), label="axis 'tp'")
        y = comm.all_reduce(torch.ones(4, device="cuda:0"), "sum")
    """

    def __init__(
        self,
        nccl: ModuleType,
        comm: Any,
        ranks: tuple[int, ...],
        index: int,
        device: torch.device,
        label: str,
        timeout: timedelta = timedelta(seconds=300),
    ) -> None:
        self._nccl = nccl
        self._comm: Any = comm
        self.ranks = ranks
        #: Number of ranks in the group (an attribute: it is read on every call).
        self.size = len(ranks)
        self.index = index
        self.device = device
        self.label = label
        self.timeout = timeout
        self._native_avg = int(nccl.get_version()) >= 21000
        self._codes: dict[tuple[torch.dtype, str], tuple[int, int, bool]] = {}
        self._device_index = device.index if device.index is not None else 0
        #: The raw handle of torch's current stream on this device, an int (no Stream object:
        #: the cheap path torch's own collectives use; a partial: no Python frame per call).
        self._stream: Callable[[], int] = functools.partial(raw_stream, self._device_index)
        self._async_error: str | None = None
        self._watchdog: tuple[threading.Thread, threading.Event] | None = None
        #: This communicator's calls (see topo/communicators/recorder.py).
        self.flight = FlightRecorder()

    @classmethod
    def create(
        cls,
        coordinator: Coordinator,
        scope: str,
        ranks: tuple[int, ...],
        index: int,
        device: torch.device,
        label: str,
        timeout: timedelta = timedelta(seconds=300),
    ) -> NcclCommunicator:
        """Create the group's communicator: all of ``ranks`` must call this together.

        Example::

            comm = NcclCommunicator.create(ctx.coordinator, scope, (0, 1), 0, device, label)
        """
        nccl = load_nccl()
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"NCCL collectives for {label} require a CUDA GPU, but torch sees none "
                f"(torch.cuda.is_available() is False); use CPU tensors (gloo) instead"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TopoValueError(
                f"{label}: device {device} requires a GPU index below "
                f"torch.cuda.device_count() = {torch.cuda.device_count()}; pass "
                f"activate(device=...) or set LOCAL_RANK / CUDA_VISIBLE_DEVICES"
            )
        own_id = encode_unique_id(nccl.get_unique_id()) if index == 0 else None
        data = coordinator.broadcast(own_id, src=ranks[0], ranks=ranks)
        unique_id = unique_id_argument(data, label)
        # Every member's GPU, gathered (this is also the barrier before init): NCCL refuses two
        # ranks of one communicator on one GPU of one host, so say so before calling it.
        gpus = coordinator.all_gather_json(gpu_identity(device), ranks=ranks)
        check_one_gpu_per_rank(gpus, ranks, device, label)
        try:
            with torch.cuda.device(device):
                comm = nccl.NcclCommunicator(len(ranks), unique_id, index)
        except (TypeError, ValueError, OverflowError):
            raise  # cupy refused an argument: a bug in topo's call, not a runtime failure
        except Exception as error:  # cupy raises NcclError / CUDARuntimeError
            raise CommunicationError(
                f"creating the NCCL communicator for {label} on {device} failed "
                f"({type(error).__name__}: {error}); with several ranks on one GPU set a "
                f"distinct NCCL_HOSTID per rank (topo.spawn(..., share_gpu=True) does), and "
                f"see NCCL_DEBUG=INFO"
            ) from None
        return cls(nccl, comm, ranks, index, device, label, timeout)

    # ---------------------------------------------------------------- plumbing

    def _check(self, x: torch.Tensor, what: str) -> None:
        if x.device != self.device:
            raise TopoValueError(
                f"{what} on {self.label} requires tensors on this rank's NCCL device "
                f"{self.device}, but got one on {x.device}; move it with "
                f"x.to('{self.device}') or activate with device='{x.device}'"
            )

    def _live(self) -> Any:
        comm = self._comm
        if comm is None:
            why = f" ({self._async_error})" if self._async_error else ""
            raise CommunicationError(
                f"{self.label}: collectives require an open communicator, but this NCCL "
                f"communicator is closed (its context ended or it was aborted after an "
                f"error{why}); call collectives inside the `with mesh.activate():` block"
            )
        return comm

    def _failed(self, what: str, error: BaseException) -> CommunicationError:
        return CommunicationError(f"{what} on {self.label} failed in NCCL: {error}")

    def _grouped(self, what: str, calls: Callable[[Any, int], None]) -> None:
        """Run ``calls(comm, stream)`` between ``groupStart``/``groupEnd`` (point-to-point)."""
        comm, stream = self._live(), self._stream()
        nccl = self._nccl
        try:
            nccl.groupStart()
            try:
                calls(comm, stream)
            finally:
                nccl.groupEnd()
        except nccl.NcclError as error:
            raise self._failed(what, error) from None

    @staticmethod
    def _moved(x: torch.Tensor) -> tuple[int, int]:
        """``(count, ncclDataType_t)`` to move ``x`` unreduced: its elements, or its bytes for
        dtypes NCCL has no type for (8-bit floats, complex, bool, ...)."""
        code, scale = _MOVED[x.dtype]
        return x.numel() * scale, code

    def _reduce_codes(self, x: torch.Tensor, op: ReduceOp) -> tuple[int, int, bool]:
        """``(dtype code, op code, native)`` for reducing ``x``; ``native`` is False where
        NCCL has no ``avg`` (< 2.10): sum, then divide. Remembered per (dtype, op)."""
        key = (x.dtype, op)
        codes = self._codes.get(key)
        if codes is None:
            codes = self._codes[key] = self._find_reduce_codes(x, op)
        return codes

    def _find_reduce_codes(self, x: torch.Tensor, op: ReduceOp) -> tuple[int, int, bool]:
        code = _CODES.get(x.dtype)
        if code is None:
            code = nccl_dtype(x.dtype, True)  # raises: NCCL cannot reduce this dtype
        if op != "avg" or self._native_avg:
            return code, _OPS[op], True
        return code, _OPS["sum"], False

    # ------------------------------------------------------------- collectives
    # The hot path: no context manager, no Stream object, a dict lookup per code, pointers
    # computed instead of views made; every check that can be made once was made at creation.
    # Besides the protocol, the communicator serves the collectives' fast paths (``*_into``
    # write into the caller's tensor; ``*_dim0`` take and give chunks laid along dim 0).

    def all_reduce_into(
        self, x: torch.Tensor, op: ReduceOp, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`all_reduce` written into ``out`` (contiguous, ``x``'s shape and dtype; may be
        ``x`` itself), or into a new tensor without ``out``: that is :meth:`all_reduce` (one
        method, so the allocating call costs no second Python frame)."""
        if out is None:
            out = torch.empty_like(x)
        dtype = x.dtype
        self.flight.record("all_reduce", x.shape, dtype)
        if x.device != self.device:
            self._check(x, "all_reduce")
        comm = self._comm or self._live()
        codes = self._codes.get((dtype, op))  # _reduce_codes, inlined
        code, nccl_op, native = codes if codes is not None else self._reduce_codes(x, op)
        try:
            comm.allReduce(x.data_ptr(), out.data_ptr(), x.numel(), code, nccl_op, self._stream())
        except self._nccl.NcclError as error:
            raise self._failed("all_reduce", error) from None
        if not native:
            out /= self.size
        return out

    all_reduce = all_reduce_into

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather_into(x, x.new_empty(self.size, *x.shape))

    def all_gather_into(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`all_gather` written into ``out``: contiguous, ``size * x.numel()`` elements
        of ``x``'s dtype, index ``i``'s ``x`` in block ``i`` (any shape with that layout).
        Without ``out``, into a new ``(size * x.shape[0], ...)``: that is
        :meth:`all_gather_dim0`, every rank's ``x`` concatenated along dim 0."""
        shape, dtype = x.shape, x.dtype
        if out is None:  # sizes as separate ints: torch parses them faster than a tuple
            rows = self.size * shape[0]
            out = x.new_empty(rows) if len(shape) == 1 else x.new_empty(rows, *shape[1:])
        self.flight.record("all_gather", shape, dtype)
        if x.device != self.device:
            self._check(x, "all_gather")
        comm = self._comm or self._live()
        code, scale = _MOVED[dtype]  # _moved, inlined
        count = x.numel() * scale
        try:
            comm.allGather(x.data_ptr(), out.data_ptr(), count, code, self._stream())
        except self._nccl.NcclError as error:
            raise self._failed("all_gather", error) from None
        return out

    all_gather_dim0 = all_gather_into

    def reduce_scatter(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        return self.reduce_scatter_into(x, op, x.new_empty(x.shape[1:]))

    def reduce_scatter_into(
        self, x: torch.Tensor, op: ReduceOp, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`reduce_scatter` written into ``out`` (contiguous, ``x.numel() // size``
        elements); block ``i`` of ``x``'s memory goes to index ``i``. Without ``out``, ``x``
        is ``(size * k, ...)`` and the result a new ``(k, ...)``, the reduction of every rank's
        block ``index`` of ``k`` rows: that is :meth:`reduce_scatter_dim0`."""
        shape, dtype = x.shape, x.dtype
        if out is None:  # a flat bucket (the common case) gets the fastest allocation: one int
            rows = shape[0] // self.size
            out = x.new_empty(rows) if len(shape) == 1 else x.new_empty(rows, *shape[1:])
        self.flight.record("reduce_scatter", shape, dtype)
        if x.device != self.device:
            self._check(x, "reduce_scatter")
        comm = self._comm or self._live()
        codes = self._codes.get((dtype, op))  # _reduce_codes, inlined
        code, nccl_op, native = codes if codes is not None else self._reduce_codes(x, op)
        try:
            comm.reduceScatter(
                x.data_ptr(), out.data_ptr(), out.numel(), code, nccl_op, self._stream()
            )
        except self._nccl.NcclError as error:
            raise self._failed("reduce_scatter", error) from None
        if not native:
            out /= self.size
        return out

    reduce_scatter_dim0 = reduce_scatter_into

    def broadcast(self, x: torch.Tensor, src: int, out: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        self.flight.record("broadcast", x.shape, dtype)
        if x.device != self.device:
            self._check(x, "broadcast")
        comm = self._comm or self._live()
        y = torch.empty_like(x) if out is None else out  # out: contiguous, x's shape (or x)
        code, scale = _MOVED[dtype]  # _moved, inlined
        count = x.numel() * scale
        try:
            comm.broadcast(x.data_ptr(), y.data_ptr(), count, code, src, self._stream())
        except self._nccl.NcclError as error:
            raise self._failed("broadcast", error) from None
        return y

    broadcast_into = broadcast

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        self.flight.record("gather", x.shape, x.dtype)
        self._check(x, "gather")
        count, code = self._moved(x)
        if self.index != dst:
            self._grouped("gather", lambda c, s: c.send(x.data_ptr(), count, code, dst, s))
            return None
        out = x.new_empty(self.size, *x.shape)
        base, step = out.data_ptr(), x.nbytes

        def receive(comm: Any, stream: int) -> None:
            for peer in range(self.size):
                if peer != dst:
                    comm.recv(base + peer * step, count, code, peer, stream)

        self._grouped("gather", receive)
        out[dst].copy_(x)
        return out

    def scatter(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self.flight.record("scatter", x.shape, x.dtype)
        self._check(x, "scatter")
        out = x.new_empty(x.shape[1:])
        count, code = self._moved(out)
        base, step = x.data_ptr(), out.nbytes

        def move(comm: Any, stream: int) -> None:
            if self.index == src:
                for peer in range(self.size):
                    if peer != src:
                        comm.send(base + peer * step, count, code, peer, stream)
            else:
                comm.recv(out.data_ptr(), count, code, src, stream)

        self._grouped("scatter", move)
        if self.index == src:
            out.copy_(x[src])
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_to_all_dim0(x)

    def all_to_all_dim0(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of ``(size * k, ...)`` (or stacked ``(size, ...)``): block ``j`` of the result
        is index ``j``'s block ``index``; the result has ``x``'s shape."""
        self.flight.record("all_to_all", x.shape, x.dtype)
        if x.device != self.device:
            self._check(x, "all_to_all")
        out = torch.empty_like(x)
        n = self.size
        count, code = self._moved(x)
        count //= n
        step = x.nbytes // n
        sent, received = x.data_ptr(), out.data_ptr()

        def move(comm: Any, stream: int) -> None:
            for peer in range(n):
                comm.send(sent + peer * step, count, code, peer, stream)
                comm.recv(received + peer * step, count, code, peer, stream)

        self._grouped("all_to_all", move)
        return out

    def all_gatherv_dim0(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every rank's ``x`` (index ``i`` has ``sizes[i]`` rows) concatenated along dim 0, in
        one group of sends and receives (this rank's part too: NCCL copies to itself)."""
        shape, dtype = x.shape, x.dtype
        self.flight.record("all_gatherv", shape, dtype)
        if x.device != self.device:
            self._check(x, "all_gatherv")
        if len(shape) == 1:  # sizes as separate ints: torch parses them faster than a tuple
            out, row_elements = x.new_empty(sum(sizes)), 1
        else:
            out, row_elements = x.new_empty(sum(sizes), *shape[1:]), math.prod(shape[1:])
        code, scale = _MOVED[dtype]
        per_row, row_bytes = row_elements * scale, row_elements * dtype.itemsize
        mine = sizes[self.index] * per_row
        sent, received = x.data_ptr(), out.data_ptr()
        comm, stream = self._comm or self._live(), self._stream()
        nccl = self._nccl
        try:  # _grouped's body, inlined (no closure on the hot path)
            nccl.groupStart()
            try:
                offset = 0
                for peer, rows in enumerate(sizes):
                    if mine:
                        comm.send(sent, mine, code, peer, stream)
                    if rows:
                        comm.recv(received + offset, rows * per_row, code, peer, stream)
                    offset += rows * row_bytes
            finally:
                nccl.groupEnd()
        except nccl.NcclError as error:
            raise self._failed("all_gatherv", error) from None
        return out

    def all_to_allv_dim0(
        self, x: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int]
    ) -> torch.Tensor:
        """``x`` laid along dim 0, ``send_sizes[j]`` rows for index ``j``; the result stacks
        the ``recv_sizes[i]`` rows from each index ``i``: one group of sends and receives
        (this rank's own block too: NCCL copies to itself); empty blocks move nothing."""
        self.flight.record("all_to_allv", x.shape, x.dtype)
        if x.device != self.device:
            self._check(x, "all_to_allv")
        out = x.new_empty((sum(recv_sizes), *x.shape[1:]))
        row_elements = math.prod(x.shape[1:])
        if row_elements == 0:
            return out  # rows of no elements: nothing to move (the same row shape everywhere)
        code, scale = _MOVED[x.dtype]
        per_row, row_bytes = row_elements * scale, row_elements * x.element_size()
        sent, received = x.data_ptr(), out.data_ptr()

        def move(comm: Any, stream: int) -> None:
            send_at = recv_at = 0
            for peer, (rows_out, rows_in) in enumerate(zip(send_sizes, recv_sizes, strict=True)):
                if rows_out:
                    comm.send(sent + send_at, rows_out * per_row, code, peer, stream)
                if rows_in:
                    comm.recv(received + recv_at, rows_in * per_row, code, peer, stream)
                send_at += rows_out * row_bytes
                recv_at += rows_in * row_bytes

        self._grouped("all_to_allv", move)
        return out

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        self.flight.record("send/recv")
        device = self.device
        for _, t in sends:  # every check before the group starts: none launches half
            if t.device != device:
                self._check(t, "send/recv")
        for _, t in recvs:
            if t.device != device:
                self._check(t, "send/recv")
        comm, stream = self._comm or self._live(), self._stream()
        nccl = self._nccl
        try:  # _grouped's body and _moved, inlined: this is the hot path of pipeline stages
            nccl.groupStart()
            try:
                for peer, t in sends:
                    code, scale = _MOVED[t.dtype]
                    comm.send(t.data_ptr(), t.numel() * scale, code, peer, stream)
                for peer, buf in recvs:
                    code, scale = _MOVED[buf.dtype]
                    comm.recv(buf.data_ptr(), buf.numel() * scale, code, peer, stream)
            finally:
                nccl.groupEnd()
        except nccl.NcclError as error:
            raise self._failed("send/recv", error) from None

    def barrier(self) -> None:
        flag = torch.zeros(1, device=self.device)
        self.all_reduce(flag, "sum")
        self.synchronize("barrier")

    def synchronize(self, what: str = "synchronize") -> None:
        """Wait for the current stream, at most the activation's timeout; on expiry (a peer
        never joined a collective) or an asynchronous NCCL error, abort the communicator and
        raise instead of hanging.

        Example::

            comm.synchronize()
        """
        stream = torch.cuda.current_stream(self.device)
        deadline = time.monotonic() + self.timeout.total_seconds()
        pause = 1e-5
        while not stream.query():
            comm = self._live()
            try:
                comm.check_async_error()
            except self._nccl.NcclError as error:
                self.close(abort=True)
                raise self._failed(what, error) from None
            if time.monotonic() > deadline:
                self.close(abort=True)
                raise CommunicationTimeout(
                    f"{what} on {self.label} timed out after {self.timeout.total_seconds():g} s "
                    f"(global ranks {list(self.ranks)}): a peer did not join a collective; the "
                    f"NCCL communicator was aborted"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    # ---------------------------------------------------------------- watchdog

    def start_watchdog(self, interval: float = 0.1) -> None:
        """Poll NCCL's asynchronous error state (``ncclCommGetAsyncError``) every
        ``interval`` seconds on a daemon thread, as ProcessGroupNCCL's watchdog does: on an
        error (a peer died, a network failure) abort the communicator, so that the collectives
        queued behind it return instead of hanging, and the next call raises
        :class:`~topo.errors.CommunicationError` naming this group and the NCCL error.

        Example::

            comm.start_watchdog(interval=0.05)
        """
        if self._watchdog is not None:
            return
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(interval):
                comm = self._comm
                if comm is None:
                    return
                try:
                    comm.check_async_error()
                except self._nccl.NcclError as error:
                    self._async_error = (
                        f"the watchdog found an asynchronous NCCL error on {self.label}, global "
                        f"ranks {list(self.ranks)}: {error}"
                    )
                    self.close(abort=True)
                    return
                except Exception:  # a comm torn down under us: nothing left to watch
                    return

        thread = threading.Thread(
            target=watch, name=f"topo-nccl-watchdog {self.label}", daemon=True
        )
        self._watchdog = (thread, stop)
        thread.start()

    @property
    def async_error(self) -> str | None:
        """What the watchdog found, if it aborted this communicator.

        Example::

            if comm.async_error:
                log.error(comm.async_error)
        """
        return self._async_error

    def close(self, abort: bool = False) -> None:
        if self._watchdog is not None and threading.current_thread() is not self._watchdog[0]:
            self._watchdog[1].set()
        if self._comm is None:
            return
        if not abort:
            with contextlib.suppress(CommunicationError):
                self.synchronize("closing")  # aborts (and empties self._comm) on a hang
        comm, self._comm = self._comm, None
        if comm is None:
            return
        with contextlib.suppress(Exception), torch.cuda.device(self.device):
            if abort:
                comm.abort()
            else:
                comm.destroy()


_CODES = dict(NCCL_DTYPES)
_OPS = dict(NCCL_OPS)
_UINT8 = NCCL_DTYPES[torch.uint8]


class _MovedAs(dict[torch.dtype, tuple[int, int]]):
    """dtype -> ``(ncclDataType_t, units per element)`` to move a tensor unreduced: its own
    NCCL type, one unit per element; or, for dtypes NCCL has no type for (8-bit floats,
    complex, bool, ...), ``ncclUint8`` and its element size in bytes. Filled on first use of
    each dtype, then one dict lookup per call."""

    def __missing__(self, dtype: torch.dtype) -> tuple[int, int]:
        code = _CODES.get(dtype)
        moved = (code, 1) if code is not None else (_UINT8, dtype.itemsize)
        self[dtype] = moved
        return moved


_MOVED = _MovedAs()
