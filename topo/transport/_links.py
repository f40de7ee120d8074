"""The MessageQueue's links: attaching the writer's shared memory, and the authenticated
socket between writer and reader (a mutual HMAC challenge over a per-queue secret).

Example::

    conns, missing = accept_readers(server, secret, {1, 2}, time.monotonic() + 30)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import os
import secrets
import select
import socket
import time

__all__ = ["HANDSHAKE_SECONDS", "accept_readers", "client_handshake"]

_MAGIC = b"TMQ1"


def local_address(master_addr: str, local: bool) -> str:
    """This host's address on the world's network: loopback for a single-node world, else
    the interface that routes to MASTER_ADDR."""
    if local:
        return "127.0.0.1"
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master_addr, 9))  # no packet is sent for a UDP connect
        address: str = probe.getsockname()[0]
        return address
    return socket.gethostbyname(socket.gethostname())


class Attached:
    """A reader's mapping of the writer's segment, made without Python's resource tracker
    (which would otherwise unlink or warn about a segment the writer owns)."""

    def __init__(self, name: str) -> None:
        import _posixshmem  # type: ignore[import-not-found]  # the module multiprocessing.shared_memory itself uses

        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.buf: memoryview | None = memoryview(self._map)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
            self._map.close()


def attach(name: str) -> Attached | None:
    try:
        return Attached(name)
    except (OSError, ValueError, ImportError):
        return None


#: Seconds a connecting peer has to complete the handshake before it is dropped unheard.
HANDSHAKE_SECONDS = 5.0


def accept_readers(
    server: socket.socket, secret: bytes, waiting: set[int], deadline: float
) -> tuple[dict[int, socket.socket], set[int]]:
    """The writer's side of the mutual HMAC challenge, for every reader at once: accept
    connections until each index in ``waiting`` has proved itself or ``deadline`` (monotonic)
    passes. Handshakes run side by side (``select``), each bounded by
    :data:`HANDSHAKE_SECONDS`: a silent or wrong peer is dropped unheard and never blocks a
    reader behind it. Returns the proven connections by reader index, and the indices that
    never proved themselves.

    Example::

        conns, missing = accept_readers(server, secret, {1, 2, 3}, time.monotonic() + 30)
    """
    waiting = set(waiting)
    proven: dict[int, socket.socket] = {}
    pending: dict[socket.socket, _Handshake] = {}
    server.setblocking(False)
    try:
        while waiting:
            now = time.monotonic()
            if now >= deadline:
                break
            for conn in [c for c, h in pending.items() if h.deadline <= now]:
                _drop(pending, conn)  # silent too long: unheard
            wake = min([deadline, *(h.deadline for h in pending.values())])
            readable, _, _ = select.select([server, *pending], [], [], max(wake - now, 0.0))
            for conn in readable:
                if conn is server:
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        peer, _ = server.accept()
                        peer.setblocking(False)
                        pending[peer] = _Handshake(now + HANDSHAKE_SECONDS)
                    continue
                index = pending[conn].step(conn, secret, waiting)
                if index is None:
                    continue
                if index < 0:
                    _drop(pending, conn)
                    continue
                del pending[conn]
                conn.setblocking(True)
                proven[index] = conn
                waiting.discard(index)
    finally:
        for conn in list(pending):
            _drop(pending, conn)
    return proven, waiting


def _drop(pending: dict[socket.socket, _Handshake], conn: socket.socket) -> None:
    pending.pop(conn, None)
    with contextlib.suppress(OSError):
        conn.close()


class _Handshake:
    """One connecting peer's progress through the challenge (non-blocking reads)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.data = bytearray()
        self.index: int | None = None
        self.nonces: tuple[bytes, bytes] | None = None

    def step(self, conn: socket.socket, secret: bytes, waiting: set[int]) -> int | None:
        """Read what arrived; the proven index, -1 to drop the peer, or None for not yet."""
        try:
            chunk = conn.recv(64)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return -1
        if not chunk:
            return -1
        self.data += chunk
        hello = len(_MAGIC) + 4 + 16
        if self.nonces is None:
            if len(self.data) < hello:
                return None
            if self.data[:4] != _MAGIC:
                return -1
            self.index = int.from_bytes(self.data[4:8], "little")
            nonce_r, nonce_w = bytes(self.data[8:hello]), secrets.token_bytes(16)
            del self.data[:hello]
            self.nonces = (nonce_r, nonce_w)
            try:
                conn.sendall(nonce_w + _mac(secret, b"w", nonce_r, nonce_w))
            except OSError:
                return -1
        if len(self.data) < 32:
            return None
        nonce_r, nonce_w = self.nonces
        assert self.index is not None
        expected = _mac(secret, b"r", nonce_w, nonce_r, self.index.to_bytes(4, "little"))
        if self.index not in waiting or not hmac.compare_digest(bytes(self.data[:32]), expected):
            return -1
        return self.index


def client_handshake(conn: socket.socket, index: int, secret: bytes) -> bool:
    """The reader's side: True once the peer proved it holds ``secret`` (and got our proof).

    Example::

        if not client_handshake(conn, 2, secret): conn.close()
    """
    nonce_r = secrets.token_bytes(16)
    conn.sendall(_MAGIC + index.to_bytes(4, "little") + nonce_r)
    reply = recv_exact(conn, 48)
    nonce_w = reply[:16]
    if not hmac.compare_digest(reply[16:], _mac(secret, b"w", nonce_r, nonce_w)):
        return False
    conn.sendall(_mac(secret, b"r", nonce_w, nonce_r, index.to_bytes(4, "little")))
    return True


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def recv_exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed by the peer")
        out += chunk
    return bytes(out)
