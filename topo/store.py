"""The rendezvous store: where it listens, how long a call to it may take, what it may carry.

Three rules keep the store safe and every wait on it bounded:

- **Listen only where MASTER_ADDR says.** The host binds a socket itself to MASTER_ADDR's
  address (loopback for a local world and for ``topo.spawn``) and hands it to ``TCPStore``
  (``master_listen_fd``), so the store is never reachable on other interfaces unless the user
  asks for ``bind="0.0.0.0"``.
- **Every call bounded.** :class:`BoundedStore` runs each store call on a worker thread and
  gives up after the call's own timeout plus a margin: a store host that is stopped (SIGSTOP)
  or a silent program holding the port ends in :class:`~topo.errors.RendezvousTimeout` naming
  the address, never in a hang.
- **Nothing executable.** Values are bytes or JSON; with a shared secret (``TOPO_SECRET`` or
  ``activate(secret=...)``) control messages carry an HMAC-SHA256 tag bound to their key and
  are refused (:class:`~topo.errors.AuthenticationError`) when it does not match.

Example::

    sock = listen_socket("127.0.0.1", 0)
    store = host_store("127.0.0.1", sock, timedelta(seconds=30))
"""

from __future__ import annotations

import contextlib
import errno
import json
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import topo._dist as dist
from topo.errors import (
    AuthenticationError,
    PortInUseError,
    RendezvousTimeout,
    StoreLostError,
    TopoValueError,
)
from topo.secret import Sealer
from topo.world import World

__all__ = [
    "WILDCARDS",
    "BoundedStore",
    "check_store_address",
    "connect_store",
    "host_store",
    "listen_socket",
]

T = TypeVar("T")

#: Extra seconds a store call may take beyond its own timeout before the store counts as
#: unresponsive (a loaded machine answers late, a stopped one never).
MARGIN_SECONDS = 5.0

#: How long a store worker thread waits for work before it ends (it restarts on demand).
IDLE_SECONDS = 2.0


def listen_socket(addr: str, port: int) -> socket.socket:
    """A TCP socket bound to ``addr:port`` (``port`` 0: the kernel picks) and listening.

    ``addr`` ``"0.0.0.0"`` / ``"::"`` listens on every interface (reachable from the network);
    anything else only on that address's interface.

    Example::

        sock = listen_socket("127.0.0.1", 0)
        sock.getsockname()[1]   # the port
    """
    try:
        infos = socket.getaddrinfo(
            _host(addr), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise TopoValueError(
            f"the rendezvous store requires an address it can listen on, but {addr!r} does not "
            f"resolve ({error}); set MASTER_ADDR to rank 0's address"
        ) from None
    family, kind, proto, _, sockaddr = sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"the rendezvous store requires a free port at {addr}:{port}, but another "
                f"program holds it ({error.strerror}); pick a free MASTER_PORT (or 0 with "
                f"topo.spawn)"
            ) from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise TopoValueError(
                f"the rendezvous store requires MASTER_ADDR to be an address of rank 0's "
                f"machine, but {addr!r} ({sockaddr[0]}) is not one here ({error.strerror}); set "
                f"MASTER_ADDR to this machine's address, or bind='0.0.0.0' to listen everywhere"
            ) from None
        raise
    return sock


def _host(addr: str) -> str | bytes:
    """``addr`` as ``socket.getaddrinfo`` takes it fastest: bytes for an ASCII name or address
    (a ``str`` goes through the ``idna`` codec, whose first use imports ``encodings.idna`` and
    ``stringprep``, ~1 ms of every rank's start), a ``str`` for an internationalised name."""
    return addr.encode("ascii") if addr.isascii() else addr


#: The stores this process hosts, by port: a second activation on the same port (nested, or
#: ``mesh.activate()`` inside ``topo.spawn``) shares the live server, as ``TCPStore``'s own
#: multi-tenant mode does. Weak: a store no activation holds any more is gone.
_HOSTED: weakref.WeakValueDictionary[int, dist.TCPStore] = weakref.WeakValueDictionary()


def host_store(addr: str, sock: socket.socket, timeout: timedelta) -> dist.TCPStore:
    """Host a multi-tenant ``TCPStore`` on the listening ``sock`` (which it takes over).

    Example::

        store = host_store("127.0.0.1", listen_socket("127.0.0.1", 0), timedelta(seconds=30))
    """
    port = sock.getsockname()[1]
    fd = sock.detach()
    kwargs: dict[str, Any] = {"wait_for_workers": False, "multi_tenant": True}
    try:
        store = dist.TCPStore(addr, port, None, True, timeout, master_listen_fd=fd, **kwargs)
    except (RuntimeError, ValueError):
        # Older torch: the libuv server cannot adopt a socket; the classic one can.
        store = dist.TCPStore(
            addr, port, None, True, timeout, master_listen_fd=fd, use_libuv=False, **kwargs
        )
    _HOSTED[port] = store
    return store


def connect_store(
    addr: str, port: int, timeout: timedelta, *, host: bool, bind: str | None, rank: int
) -> dist.Store:
    """Host the store (``host=True``: listen on ``bind`` or ``addr``) or reach it, within
    ``timeout`` — a silent program on the port ends in an error naming the address.

    Example::

        store = connect_store("127.0.0.1", 29500, timedelta(seconds=30), host=True, bind=None,
                              rank=0)
    """
    if host:
        hosted = _HOSTED.get(port) if port else None
        if hosted is not None:
            return hosted
        sock = listen_socket(bind or addr, port)
        return host_store(addr, sock, timeout)
    deadline = time.monotonic() + timeout.total_seconds()
    _wait_until_listening(addr, port, deadline)

    def reach() -> dist.Store:
        return dist.TCPStore(addr, port, None, False, timeout, wait_for_workers=False)

    try:
        return _bounded(reach, deadline, f"rank {rank} reaching the rendezvous store")
    except RendezvousTimeout:
        raise RendezvousTimeout(
            f"rank {rank} could not reach the rendezvous store at {addr}:{port} within "
            f"{timeout.total_seconds():g} s: something accepted the connection but never "
            f"answered as a store (another program on MASTER_PORT?) or rank 0's store is hung; "
            f"check MASTER_ADDR/MASTER_PORT and that rank 0 is running"
        ) from None
    except (RuntimeError, OSError) as error:
        raise RendezvousTimeout(
            f"rank {rank} could not reach the rendezvous store at {addr}:{port} within "
            f"{timeout.total_seconds():g} s ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); is rank 0 running, and are "
            f"MASTER_ADDR/MASTER_PORT the same on every rank?"
        ) from None


def _wait_until_listening(addr: str, port: int, deadline: float) -> None:
    """Poll ``addr:port`` every few milliseconds until something listens there (or the
    deadline passes: then ``TCPStore`` reports it): ``TCPStore``'s own connect retries back
    off for up to a second, which a rank started before rank 0 would otherwise wait out."""
    pause = 0.005
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((_host(addr), port), timeout=1.0):  # type: ignore[arg-type]  # bytes: see _host
                return
        except OSError:
            time.sleep(pause)
            pause = min(pause * 1.5, 0.05)


class _Worker:
    """A daemon thread that runs store calls (a call stuck in C++ never blocks exit). It ends
    after :data:`IDLE_SECONDS` without work and starts again on the next call, so an
    activation that is over leaves no thread behind."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], _Result]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    def _run(self) -> None:
        while True:
            try:
                fn, result = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._running = False
                        return
                continue
            try:
                result.value = fn()
            except BaseException as error:
                result.error = error
            result.done.set()

    def submit(self, fn: Callable[[], Any]) -> _Result:
        result = _Result()
        with self._lock:
            self._jobs.put((fn, result))
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="topo-store", daemon=True).start()
        return result


class _Result:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


def _bounded(fn: Callable[[], T], deadline: float, what: str, worker: _Worker | None = None) -> T:
    """``fn()`` on a worker thread; :class:`RendezvousTimeout` if it has not returned by
    ``deadline`` + :data:`MARGIN_SECONDS`."""
    result = (worker or _Worker()).submit(fn)
    if not result.done.wait(max(deadline - time.monotonic(), 0.0) + MARGIN_SECONDS):
        raise RendezvousTimeout(f"{what}: the store did not answer")
    if result.error is not None:
        raise result.error
    value: T = result.value
    return value


class BoundedStore(dist.Store):
    """A store wrapper that bounds every call, counts operations and remembers its keys.

    topo routes its rendezvous traffic (its own and gloo's) through one of these: an
    activation can report how many store operations it cost, delete what it wrote, and never
    wait on an unresponsive store longer than its timeout plus :data:`MARGIN_SECONDS` —
    then it raises :class:`~topo.errors.StoreLostError` naming the store's address.

    Example::

        store = BoundedStore(tcp_store, timedelta(seconds=60), where="127.0.0.1:29500 (rank 0)")
        store.set("k", b"v")
        store.ops  # 1
    """

    def __init__(
        self,
        inner: dist.Store,
        timeout: timedelta,
        where: str = "the store",
        sealer: Sealer | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.limit = timeout
        self.where = where
        self.ops = 0
        self.written: set[str] = set()
        #: roll calls held after failed collectives (the store's host then lingers).
        self.roll_calls = 0
        #: Seals every value written and checks every value read (gloo's address records
        #: and the NCCL id included) when the job has a secret; passes values through if not.
        self.sealer = sealer or Sealer(None)
        #: Where a rank that refused a forged value says so, for its peers (set by the
        #: coordinator once the activation's prefix is known).
        self.alarm_key: str | None = None
        #: The alarm key of the activation's opening (before its generation is known), which
        #: :meth:`alarm` looks at too.
        self.opening_alarm_key: str | None = None
        #: The first forged value this rank refused, if any.
        self.forgery: AuthenticationError | None = None
        self._worker = _Worker()
        self._native_multi_get = hasattr(inner, "multi_get")

    @property
    def sealed(self) -> bool:
        """Whether values are authenticated (the job has a secret).

        Example::

            if store.sealed: ...
        """
        return self.sealer.secret is not None

    def _seal(self, key: str, value: Any) -> Any:
        if self.sealer.secret is None:
            return value
        data = value.encode() if isinstance(value, str) else bytes(value)
        return self.sealer.seal(key, data)

    def _open(self, key: str, blob: bytes) -> bytes:
        if self.sealer.secret is None:
            return blob
        try:
            return self.sealer.open(key, blob)
        except AuthenticationError as error:
            self._raise_alarm(key, error)
            raise

    def _raise_alarm(self, key: str, error: AuthenticationError) -> None:
        """Remember the forgery and tell the peers (best effort, sealed), so that their waits
        end with the same :class:`~topo.errors.AuthenticationError`."""
        if self.forgery is None:
            self.forgery = error
        alarm = self.alarm_key
        if alarm is None or key.startswith(alarm):
            return
        sealed = self.sealer.seal(alarm, json.dumps({"key": key}).encode())
        with contextlib.suppress(Exception):
            self._call("set", lambda: self.inner.set(alarm, sealed), timedelta(seconds=2.0))  # type: ignore[arg-type]
        self._acknowledge()

    #: This rank's number in the world, for its acknowledgement of an alarm (set with
    #: ``alarm_key``).
    rank: int | None = None

    def _acknowledge(self) -> None:
        """Tell the store's host that this rank has read the alarm (it may then go)."""
        if self.alarm_key is None or self.rank is None:
            return
        with contextlib.suppress(Exception):
            self.set_within(f"{self.alarm_key}/ack/{self.rank}", b"1", 2.0)

    def alarm(self) -> AuthenticationError | None:
        """The forgery this rank or a peer refused in this activation, if any (a quick,
        bounded look at the alarm key).

        Example::

            if (forged := store.alarm()) is not None:
                raise forged
        """
        if self.forgery is not None:
            return self.forgery
        if not self.sealed:
            return None
        keys = [k for k in (self.alarm_key, self.opening_alarm_key) if k is not None]
        found = None
        for key in dict.fromkeys(keys):
            try:
                if not self.check_within([key], 2.0):
                    continue
                found = json.loads(self.sealer.open(key, self.get_within_raw(key, 2.0)))["key"]
                break
            except AuthenticationError as error:
                self._acknowledge()
                return error
            except Exception:
                continue
        if found is None:
            return None
        self._acknowledge()
        return AuthenticationError(
            f"a peer refused the value at store key {found!r}: it requires a valid HMAC tag "
            f"under the job's secret, but another process rewrote it (someone without the secret "
            f"writes to this job's store at {self.where}); every rank stops — keep MASTER_ADDR "
            f"on a private network"
        )

    def _call(self, name: str, fn: Callable[[], T], wait: timedelta | None = None) -> T:
        self.ops += 1
        limit = (wait or self.limit).total_seconds()
        try:
            return _bounded(fn, time.monotonic() + limit, name, self._worker)
        except RendezvousTimeout:
            raise StoreLostError(
                f"the rendezvous store at {self.where} stopped answering: a store {name} got no reply "
                f"within {limit + MARGIN_SECONDS:g} s; its host (rank 0 unless the store was "
                f"passed in) may be stopped (SIGSTOP), hung or cut off — look at rank 0"
            ) from None

    def set_within(self, key: str, value: Any, seconds: float) -> None:
        """``set`` that gives up (``StoreLostError``) after ``seconds`` plus the margin
        instead of the activation's timeout: for the quick calls of an error path.

        Example::

            store.set_within("k", b"1", 2.0)
        """
        self.written.add(key)
        sealed = self._seal(key, value)
        self._call("set", lambda: self.inner.set(key, sealed), timedelta(seconds=seconds))

    def check_within(self, keys: list[str], seconds: float) -> bool:
        """``check`` bounded by ``seconds`` plus the margin (see :meth:`set_within`).

        Example::

            store.check_within(["k"], 2.0)
        """
        found: bool = self._call(
            "check", lambda: self.inner.check(keys), timedelta(seconds=seconds)
        )
        return found

    def get_within(self, key: str, seconds: float) -> bytes:
        """``get`` bounded by ``seconds`` plus the margin (see :meth:`set_within`).

        Example::

            store.get_within("k", 2.0)
        """
        return self._open(key, self.get_within_raw(key, seconds))

    def get_within_raw(self, key: str, seconds: float) -> bytes:
        """:meth:`get_within` without checking the seal (for the alarm key itself)."""
        value: bytes = self._call("get", lambda: self.inner.get(key), timedelta(seconds=seconds))
        return value

    def set(self, key: str, value: Any) -> None:
        self.written.add(key)
        sealed = self._seal(key, value)
        self._call("set", lambda: self.inner.set(key, sealed))

    def get(self, key: str) -> bytes:
        value: bytes = self._call("get", lambda: self.inner.get(key))
        return self._open(key, value)

    def add(self, key: str, value: int) -> int:
        count: int = self._call("add", lambda: self.inner.add(key, value))
        return count

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        if self.sealed:
            raise AuthenticationError(
                f"compare_set on store key {key!r} requires an unsealed store, but this job's "
                f"store authenticates every value (TOPO_SECRET is set): a sealed value cannot be "
                f"compared by the server; use set/get"
            )
        self.written.add(key)
        value: bytes = self._call(
            "compare_set", lambda: self.inner.compare_set(key, expected, desired)
        )
        return value

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self._call("wait", lambda: self.inner.wait(keys))
        else:
            self._call("wait", lambda: self.inner.wait(keys, timeout), timeout)

    def check(self, keys: list[str]) -> bool:
        found: bool = self._call("check", lambda: self.inner.check(keys))
        return found

    def delete_key(self, key: str) -> bool:
        self.written.discard(key)
        deleted: bool = self._call("delete_key", lambda: self.inner.delete_key(key))
        return deleted

    def num_keys(self) -> int:
        count: int = self._call("num_keys", lambda: self.inner.num_keys())
        self.ops -= 1  # bookkeeping, not rendezvous traffic
        return count

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        if not self._native_multi_get:
            return [self.get(k) for k in keys]
        values: list[bytes] = self._call("multi_get", lambda: self.inner.multi_get(keys))
        return [self._open(k, v) for k, v in zip(keys, values, strict=True)]


# Kept importable under its old name: it is the same wrapper.
CountingStore = BoundedStore


#: Addresses that mean "every interface" to a listening socket.
WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", "*"})


def check_store_address(world: World, bind: str | None, given_store: bool = False) -> None:
    """Refuse a wildcard ``MASTER_ADDR`` (``0.0.0.0``, ``::``) unless ``bind`` asks for it:
    rank 0's store would listen on every interface, reachable by anyone on any network.

    Example::

        check_store_address(World.from_env(), bind=None)
    """
    if given_store or bind is not None or world.master_addr not in WILDCARDS:
        return
    raise TopoValueError(
        f"MASTER_ADDR requires rank 0's address (the other ranks connect to it, and rank 0's "
        f"store listens only there), but got the wildcard {world.master_addr!r}, which would "
        f"make the store listen on every interface; set MASTER_ADDR to rank 0's address on the "
        f"cluster's private network, or pass bind={world.master_addr!r} to listen everywhere "
        f"on purpose (only on a trusted network)"
    )
