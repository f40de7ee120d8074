"""The MessageQueue's links: attaching the writer's shared memory, and the authenticated
socket between writer and reader (a mutual HMAC challenge over a per-queue secret).

Example::

    if server_handshake(conn, secret, {1, 2}, timeout=5.0) is None:
        conn.close()   # not one of the job's readers: nothing else is read from it
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import os
import secrets
import socket

__all__ = ["client_handshake", "server_handshake"]

_MAGIC = b"TMQ1"


def node_id() -> str:
    """This machine's identity (host name and boot id): readers with the writer's id try its
    shared memory; a failed attach falls back to the socket."""
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{socket.gethostname()}/{boot}"


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


def server_handshake(
    conn: socket.socket, secret: bytes, waiting: set[int], timeout: float
) -> int | None:
    """The writer's side of the mutual HMAC challenge: the reader index the peer proved it is
    (one of ``waiting``), or None (then nothing else is read from it).

    Example::

        index = server_handshake(conn, secret, {1, 2, 3}, timeout=5.0)
    """
    try:
        conn.settimeout(timeout)
        hello = recv_exact(conn, len(_MAGIC) + 4 + 16)
        if hello[:4] != _MAGIC:
            return None
        index = int.from_bytes(hello[4:8], "little")
        nonce_r, nonce_w = hello[8:], secrets.token_bytes(16)
        conn.sendall(nonce_w + _mac(secret, b"w", nonce_r, nonce_w))
        proof = recv_exact(conn, 32)
    except OSError:
        return None
    expected = _mac(secret, b"r", nonce_w, nonce_r, index.to_bytes(4, "little"))
    if index not in waiting or not hmac.compare_digest(proof, expected):
        return None
    return index


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
