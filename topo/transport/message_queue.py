"""MessageQueue: one writer rank broadcasts small messages to the other ranks of an axis.

Readers on the writer's node read a ring buffer in shared memory (no network, no syscall per
message); readers on other nodes (or all readers with ``transport="socket"``) get the bytes
over a TCP connection to the writer. Every wait is bounded by ``timeout``: a reader that stops
reading makes the writer's ``enqueue`` raise :class:`~topo.CommunicationTimeout` naming it.

Shared memory never outlives the queue: the writer unlinks the segment's name as soon as the
readers have attached (during the constructor), so the memory is freed by the kernel when the
last process unmaps it, however the processes end (``kill -9`` included). Before that moment
Python's resource tracker removes a segment whose creator died.

Security: the socket binds only to this host's address on the world's network (loopback for a
single-node world), and both ends prove knowledge of a per-queue secret (HMAC) that travelled
over the job's own CPU communicator before any message is read. :meth:`enqueue` pickles and
:meth:`dequeue` unpickles, so only the job's own peers can put data into a reader;
:meth:`enqueue_bytes` / :meth:`dequeue_bytes` move plain bytes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import struct
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Literal

import torch

from topo._checks import as_bool, as_int, as_seconds
from topo.active import find_context
from topo.codec import decode, encode
from topo.collectives._common import check_index
from topo.errors import CommunicationError, CommunicationTimeout, TopoTypeError, TopoValueError
from topo.mesh import Axis
from topo.process_identity import node_id
from topo.transport import _wire
from topo.transport._links import (
    Attached,
    accept_readers,
    attach,
    client_handshake,
    local_address,
    recv_exact,
)

__all__ = ["MessageQueue"]

_WRITER, _SHM, _SOCKET = 0, 1, 2
_SLOT_HEADER = 32  # seq, length, more, padding (int64 each)
_READER_BYTES = 16  # per reader: last sequence number read, "asleep on its wake-up socket"
_Q = struct.Struct("<q")
_FRAME = struct.Struct("<q")


#: Bounds on the ring: a queue is for small control messages (a longer one spans slots).
MAX_SLOTS = 1 << 16
MAX_SLOT_BYTES = 1 << 30

_FENCE = threading.Lock()


def _fence() -> None:
    """A full memory barrier (a mutex acquire/release), so that shared-memory stores are seen
    in program order on weakly ordered CPUs too (as vLLM's shm broadcaster does)."""
    with _FENCE:
        pass


#: A waiting shm reader polls this long before it sleeps on its wake-up socket.
_SPIN_SECONDS = 5e-4


class _Backoff:
    """Polling pauses: yield for the first millisecond, then sleep up to 0.5 ms."""

    def __init__(self, timeout: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.pause = 0.0

    def wait(self) -> bool:
        """Pause once; False once the deadline has passed."""
        now = time.monotonic()
        if now > self.deadline:
            return False
        if now - self.start < 1e-3:
            time.sleep(0)
        else:
            self.pause = min(max(self.pause * 2, 2e-5), 5e-4)
            time.sleep(self.pause)
        return True


class MessageQueue:
    """One writer (index ``writer`` of ``axis``) and every other rank of the axis as a reader.

    All ranks of the axis group construct it together. ``slots`` messages of up to
    ``slot_bytes`` fit in the ring before the writer waits for the slowest reader; a longer
    message spans several slots. ``timeout`` (seconds, default: the context's) bounds every
    wait. ``transport="socket"`` makes every reader use the socket path (for tests).

    Example::

        with DeviceMesh(tp=4).activate():
            with topo.MessageQueue("tp", writer=0) as mq:
                if topo.axis_index("tp") == 0:
                    mq.enqueue({"step": 1, "tokens": [5, 7]})
                else:
                    msg = mq.dequeue(timeout=10)
    """

    def __init__(
        self,
        axis: Axis,
        writer: int = 0,
        *,
        slots: int = 8,
        slot_bytes: int = 1 << 16,
        timeout: float | None = None,
        transport: Literal["auto", "socket"] = "auto",
        allow_pickle: bool = False,
    ) -> None:
        ctx, names, n = find_context(axis, "MessageQueue")
        #: Whether enqueue pickles what the safe encoding cannot carry and dequeue unpickles
        #: (every rank must agree; only on a network you trust).
        self.allow_pickle = as_bool(allow_pickle, "topo.MessageQueue allow_pickle")
        self.axis = axis
        self.writer = check_index(writer, n, "MessageQueue", "writer", axis)
        self.slots = as_int(slots, "topo.MessageQueue slots", minimum=1, maximum=MAX_SLOTS)
        self.slot_bytes = as_int(
            slot_bytes, "topo.MessageQueue slot_bytes", minimum=1, maximum=MAX_SLOT_BYTES
        )
        self.timeout = (
            ctx.timeout.total_seconds()
            if timeout is None
            else as_seconds(timeout, "topo.MessageQueue timeout")
        )
        if transport not in ("auto", "socket"):
            raise TopoValueError(
                f"topo.MessageQueue transport requires 'auto' or 'socket', but got {transport!r}"
            )
        self.ranks = ctx.group(names)
        self.index = ctx.axis_index(names)
        self.is_writer = self.index == self.writer
        self._n = n
        self._seq = 0
        self._shm: shared_memory.SharedMemory | Attached | None = None
        self._server: socket.socket | None = None
        self._sockets: dict[int, socket.socket] = {}  # writer: reader index -> connection
        self._wakeups: dict[int, socket.socket] = {}  # writer: shm reader index -> wake-up
        self._wake_alive = True  # shm reader: the writer's wake-up socket is still open
        self._conn: socket.socket | None = None  # socket reader: connection to the writer
        self._closed = False
        self._unlinked = False
        self.shm_readers: tuple[int, ...] = ()
        self.socket_readers: tuple[int, ...] = ()
        if n == 1:
            return
        comm = ctx.communicator(names, "cpu")
        try:
            self._setup(comm, ctx.world.master_addr, ctx.world.is_local, transport)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------- setup

    def _setup(self, comm: Any, master_addr: str, local: bool, transport: str) -> None:
        secret = secrets.token_bytes(32)
        info: dict[str, Any] = {}
        problem: BaseException | None = None
        if self.is_writer:
            try:
                info = self._open_writer(secret, master_addr, local, transport)
            except (OSError, ValueError, OverflowError, TopoValueError) as error:
                problem = error  # told to the readers first: they must not wait for it
                info = {"error": f"{type(error).__name__}: {error}"}
        info = _wire.loads(
            _wire.broadcast_bytes(comm, _wire.dumps(info) if self.is_writer else None, self.writer),
            "topo.MessageQueue",
        )
        if problem is not None:
            if isinstance(problem, TopoValueError):
                raise problem
            raise CommunicationError(
                f"topo.MessageQueue on axis {self.axis!r}: the writer could not set up the "
                f"queue ({info['error']})"
            ) from None
        if "error" in info:
            raise CommunicationError(
                f"topo.MessageQueue on axis {self.axis!r}: the writer (index {self.writer}, rank "
                f"{self.ranks[self.writer]}) could not set up the queue ({info['error']})"
            )
        secret = bytes.fromhex(info["secret"])
        choice = _WRITER
        if not self.is_writer:
            choice = _SOCKET
            if info["transport"] == "auto" and info["node"] == node_id():
                self._shm = attach(info["shm"])
                if self._shm is not None:
                    choice = _SHM
        # Every reader has attached (or chosen the socket) once this all_gather returns.
        mine = torch.tensor([choice], dtype=torch.int64, device="cpu")
        choices = comm.all_gather(mine).flatten().tolist()
        self.shm_readers = tuple(i for i, c in enumerate(choices) if c == _SHM)
        self.socket_readers = tuple(i for i, c in enumerate(choices) if c == _SOCKET)
        if self.is_writer:
            assert isinstance(self._shm, shared_memory.SharedMemory)
            self._shm.unlink()  # the name goes now; the memory stays mapped until close
            self._unlinked = True
            if not self.shm_readers:
                self._shm.close()
                self._shm = None
            self._accept(secret)
        else:  # socket readers get their messages over it, shm readers their wake-ups
            self._connect(info["host"], int(info["port"]), secret)

    def _open_writer(
        self, secret: bytes, master_addr: str, local: bool, transport: str
    ) -> dict[str, Any]:
        """The writer's shared-memory ring and listening socket; what the readers need."""
        size = _READER_BYTES * self._n + self.slots * (_SLOT_HEADER + self.slot_bytes)
        free = _shm_free()
        if free is not None and size > free:
            raise TopoValueError(
                f"topo.MessageQueue requires {size} bytes of shared memory for {self.slots} slots "
                f"of {self.slot_bytes} bytes, but /dev/shm has {free} free; lower slots or "
                f"slot_bytes (a longer message spans several slots)"
            )
        name = f"topo_mq_{secrets.token_hex(8)}"
        try:
            segment = shared_memory.SharedMemory(name=name, create=True, size=size)
        except BaseException:
            _unlink(name)  # a failed create can leave the name behind
            raise
        self._shm = segment
        _buffer(segment)[:size] = bytes(size)
        host = local_address(master_addr, local)
        self._server = socket.create_server((host, 0), backlog=max(self._n, 16))
        return {
            "shm": segment.name, "node": node_id(), "host": host,
            "port": self._server.getsockname()[1], "secret": secret.hex(),
            "transport": transport,
        }  # fmt: skip

    def _accept(self, secret: bytes) -> None:
        assert self._server is not None
        server, self._server = self._server, None
        with server:
            waiting = set(self.socket_readers) | set(self.shm_readers)
            conns, missing = accept_readers(
                server, secret, waiting, time.monotonic() + self.timeout
            )
        for index, conn in conns.items():
            conn.settimeout(self.timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if index in self.shm_readers:
                conn.setblocking(False)  # wake-ups never block the writer
                self._wakeups[index] = conn
            else:
                self._sockets[index] = conn
        if missing:
            raise CommunicationTimeout(self._never_connected(sorted(missing)))

    def _never_connected(self, missing: list[int]) -> str:
        who = ", ".join(f"index {i} (rank {self.ranks[i]})" for i in missing)
        return (
            f"topo.MessageQueue on axis {self.axis!r}: reader(s) {who} did not connect to the "
            f"writer's socket within {self.timeout:g} s; check that every rank of the axis "
            f"constructs the queue and that the writer's address is reachable"
        )

    def _connect(self, host: str, port: int, secret: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn = socket.create_connection((host, port), timeout=self.timeout)
                break
            except OSError as error:
                if time.monotonic() > deadline:
                    raise CommunicationError(
                        f"topo.MessageQueue reader index {self.index} could not connect to the "
                        f"writer (index {self.writer}, rank {self.ranks[self.writer]}) at "
                        f"{host}:{port}: {error}"
                    ) from None
                time.sleep(0.01)
        try:
            if not client_handshake(conn, self.index, secret):
                raise CommunicationError(
                    f"topo.MessageQueue reader index {self.index}: the peer at {host}:{port} "
                    f"could not prove it is the queue's writer; nothing was read from it"
                )
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as error:
            conn.close()
            raise CommunicationError(
                f"topo.MessageQueue reader index {self.index}: the handshake with the writer "
                f"(index {self.writer}, rank {self.ranks[self.writer]}) at {host}:{port} failed "
                f"({type(error).__name__}: {error}); the writer may have given up (look at its "
                f"error) or something else answered on its port"
            ) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # ---------------------------------------------------------------------- messages

    def enqueue(self, obj: Any) -> None:
        """Writer only: send ``obj`` to every reader, in topo's safe encoding (plain values,
        bytes and tensors; pickled only with ``allow_pickle=True``).

        Example::

            mq.enqueue({"cmd": "step", "n": 3})
        """
        self._check("enqueue", writer=True)
        self.enqueue_bytes(encode(obj, "MessageQueue.enqueue", self.allow_pickle))

    def dequeue(self, timeout: float | None = None) -> Any:
        """Reader only: the next object the writer enqueued (waits at most ``timeout`` s).
        Nothing is unpickled unless the queue was made with ``allow_pickle=True``.

        Example::

            msg = mq.dequeue(timeout=5)
        """
        return decode(self.dequeue_bytes(timeout), "MessageQueue.dequeue", self.allow_pickle)

    def enqueue_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Writer only: send ``data`` (bytes-like) to every reader as it is.

        Example::

            mq.enqueue_bytes(b"step")
        """
        self._check("enqueue", writer=True)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TopoTypeError(
                f"topo.MessageQueue.enqueue_bytes requires bytes (or a bytearray/memoryview), "
                f"but got {type(data).__name__}; encode text first (s.encode()) or use enqueue"
            )
        view = memoryview(data).cast("B")
        if self.shm_readers:
            start = 0
            while True:
                chunk = view[start : start + self.slot_bytes]
                start += len(chunk)
                self._write_slot(chunk, more=start < len(view))
                if start >= len(view):
                    break
        for index, conn in self._sockets.items():
            try:
                conn.sendall(_FRAME.pack(len(view)) + bytes(view))
            except TimeoutError:
                raise CommunicationTimeout(
                    f"topo.MessageQueue.enqueue on axis {self.axis!r} timed out after "
                    f"{self.timeout:g} s: reader index {index} (rank {self.ranks[index]}) does "
                    f"not read its socket; every reader must call dequeue"
                ) from None
            except OSError as error:
                raise CommunicationError(
                    f"topo.MessageQueue.enqueue on axis {self.axis!r}: reader index {index} (rank "
                    f"{self.ranks[index]}) is gone ({error})"
                ) from None

    def dequeue_bytes(self, timeout: float | None = None) -> bytes:
        """Reader only: the next bytes the writer enqueued (waits at most ``timeout`` s).

        Example::

            data = mq.dequeue_bytes(timeout=5)
        """
        self._check("dequeue", writer=False)
        wait = (
            self.timeout
            if timeout is None
            else as_seconds(timeout, "topo.MessageQueue.dequeue timeout")
        )
        if self._conn is not None and self._shm is None:
            self._conn.settimeout(wait)
            try:
                (length,) = _FRAME.unpack(recv_exact(self._conn, _FRAME.size))
                return recv_exact(self._conn, length)
            except TimeoutError:
                raise CommunicationTimeout(self._no_message(wait)) from None
            except OSError as error:
                raise CommunicationError(
                    f"topo.MessageQueue.dequeue on axis {self.axis!r}: the writer (rank "
                    f"{self.ranks[self.writer]}) is gone ({error})"
                ) from None
        parts = []
        while True:
            chunk, more = self._read_slot(wait)
            parts.append(chunk)
            if not more:
                return b"".join(parts)

    def _no_message(self, wait: float) -> str:
        return (
            f"topo.MessageQueue.dequeue on axis {self.axis!r} (reader index {self.index}) got no "
            f"message within {wait:g} s from the writer (index {self.writer}, rank "
            f"{self.ranks[self.writer]})"
        )

    def _check(self, operation: str, writer: bool) -> None:
        if self._closed:
            raise CommunicationError(
                f"topo.MessageQueue.{operation} requires an open queue, but it is closed"
            )
        if writer != self.is_writer:
            role = "the writer" if writer else "a reader"
            raise TopoValueError(
                f"topo.MessageQueue.{operation} must be called by {role}, but this rank is index "
                f"{self.index} of axis {self.axis!r} and the writer is index {self.writer}"
            )

    def _slot_offset(self, seq: int) -> int:
        return _READER_BYTES * self._n + ((seq - 1) % self.slots) * (_SLOT_HEADER + self.slot_bytes)

    def _write_slot(self, chunk: memoryview, more: bool) -> None:
        assert self._shm is not None
        buf, seq = _buffer(self._shm), self._seq + 1
        backoff = _Backoff(self.timeout)
        need = seq - self.slots  # every reader must have read the slot's previous message
        while True:
            lagging = [
                i for i in self.shm_readers if _Q.unpack_from(buf, _READER_BYTES * i)[0] < need
            ]
            if not lagging:
                break
            if not backoff.wait():
                who = ", ".join(
                    f"index {i} (rank {self.ranks[i]}, read {_Q.unpack_from(buf, _READER_BYTES * i)[0]} of "
                    f"{self._seq} chunks)"
                    for i in lagging
                )
                raise CommunicationTimeout(
                    f"topo.MessageQueue.enqueue on axis {self.axis!r} timed out after "
                    f"{self.timeout:g} s: the ring of {self.slots} slots is full because "
                    f"reader(s) {who} did not read; every reader must call dequeue"
                )
        _fence()  # the readers' acknowledgements before overwriting the slot
        at = self._slot_offset(seq)
        buf[at + _SLOT_HEADER : at + _SLOT_HEADER + len(chunk)] = chunk
        _Q.pack_into(buf, at + 8, len(chunk))
        _Q.pack_into(buf, at + 16, int(more))
        _fence()  # the data before the sequence number, on any CPU
        _Q.pack_into(buf, at, seq)  # publish last
        self._seq = seq
        _fence()  # the publish before reading the readers' "asleep" flags
        for index, conn in self._wakeups.items():
            if _Q.unpack_from(buf, _READER_BYTES * index + 8)[0]:
                with contextlib.suppress(BlockingIOError, OSError):
                    conn.send(b"w")  # a full socket already holds wake-ups

    def _read_slot(self, wait: float) -> tuple[bytes, bool]:
        assert self._shm is not None
        buf, seq = _buffer(self._shm), self._seq + 1
        at = self._slot_offset(seq)
        backoff = _Backoff(wait)
        while _Q.unpack_from(buf, at)[0] != seq:
            if time.monotonic() - backoff.start > _SPIN_SECONDS and self._sleep(
                buf, at, seq, backoff
            ):
                continue
            if not backoff.wait():
                raise CommunicationTimeout(self._no_message(wait))
        _fence()  # read the data only after seeing the sequence number
        (length,) = _Q.unpack_from(buf, at + 8)
        (more,) = _Q.unpack_from(buf, at + 16)
        data = bytes(buf[at + _SLOT_HEADER : at + _SLOT_HEADER + length])
        _fence()  # done reading before the writer may reuse the slot
        _Q.pack_into(buf, _READER_BYTES * self.index, seq)  # acknowledge
        self._seq = seq
        return data, bool(more)

    def _sleep(self, buf: memoryview, at: int, seq: int, backoff: _Backoff) -> bool:
        """Block on the wake-up socket until the writer publishes (or the deadline); False
        when there is no wake-up socket (then the caller polls)."""
        conn = self._conn
        if conn is None or not self._wake_alive:
            return False
        flag = _READER_BYTES * self.index + 8
        _Q.pack_into(buf, flag, 1)
        _fence()  # the flag before the re-check: the writer either sees it or we see seq
        try:
            if _Q.unpack_from(buf, at)[0] != seq:
                left = backoff.deadline - time.monotonic()
                if left <= 0:
                    return False
                readable, _, _ = select.select([conn], [], [], left)
                if readable:
                    conn.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        if not conn.recv(4096):
                            self._wake_alive = False  # the writer closed: poll what is left
        finally:
            _Q.pack_into(buf, flag, 0)
        return True

    # ---------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Release the shared memory and sockets (idempotent; never blocks).

        Example::

            mq.close()
        """
        self._closed = True
        for conn in [*self._sockets.values(), *self._wakeups.values(), self._conn, self._server]:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
        self._sockets.clear()
        self._wakeups.clear()
        self._conn = self._server = None
        shm, self._shm = self._shm, None
        if shm is not None:
            if isinstance(shm, shared_memory.SharedMemory) and not self._unlinked:
                with contextlib.suppress(FileNotFoundError):
                    shm.unlink()
            with contextlib.suppress(BufferError):
                shm.close()

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _shm_free() -> int | None:
    """Bytes free in /dev/shm (None where there is no such file system to ask)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _unlink(name: str) -> None:
    with contextlib.suppress(Exception):
        import _posixshmem  # type: ignore[import-not-found]

        _posixshmem.shm_unlink("/" + name)


def _buffer(shm: shared_memory.SharedMemory | Attached) -> memoryview:
    buf = shm.buf
    assert buf is not None
    return buf
