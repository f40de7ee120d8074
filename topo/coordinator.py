"""Rendezvous and small control messages over a ``torch.distributed`` store.

One :class:`Coordinator` serves one activation. Rank 0 hosts a ``TCPStore`` at the world's
master address and port (several activations in one process share it: the store is
multi-tenant) unless the caller passes a store, or torchrun's agent hosts one. Every activation
draws a fresh key prefix from a join ticket, so re-activating never reads stale keys; a round's
keys are deleted once every rank has passed it (at the next barrier of the same ranks, or when
the activation closes), so keys do not pile up.

Every wait is bounded by the activation's timeout; a timeout names the ranks that did not
arrive.
"""

from __future__ import annotations

import contextlib
import pickle
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import topo._dist as dist
from topo.errors import RendezvousTimeout, StoreLostError, TopoTypeError, TopoValueError
from topo.world import World

__all__ = ["Coordinator"]


class CountingStore(dist.Store):
    """A store wrapper that counts operations and remembers the keys it set.

    topo routes its rendezvous traffic (its own and gloo's) through one of these, so that an
    activation can report how many store operations it cost and delete what it wrote.

    Example::

        counting = CountingStore(store)
        counting.set("k", b"v")
        counting.ops  # 1
    """

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self.inner = inner
        self.ops = 0
        self.written: set[str] = set()

    def set(self, key: str, value: Any) -> None:
        self.ops += 1
        self.written.add(key)
        self.inner.set(key, value)

    def get(self, key: str) -> bytes:
        self.ops += 1
        value: bytes = self.inner.get(key)
        return value

    def add(self, key: str, value: int) -> int:
        self.ops += 1
        return self.inner.add(key, value)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        self.ops += 1
        self.written.add(key)
        return self.inner.compare_set(key, expected, desired)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self.ops += 1
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def check(self, keys: list[str]) -> bool:
        self.ops += 1
        found: bool = self.inner.check(keys)
        return found

    def delete_key(self, key: str) -> bool:
        self.ops += 1
        self.written.discard(key)
        deleted: bool = self.inner.delete_key(key)
        return deleted

    def num_keys(self) -> int:
        count: int = self.inner.num_keys()
        return count

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        if not hasattr(self.inner, "multi_get"):
            return [self.get(k) for k in keys]
        self.ops += 1
        return self.inner.multi_get(keys)  # type: ignore[no-any-return]


def connect_store(world: World, timeout: timedelta) -> dist.Store:
    """Host (rank 0) or reach the world's ``TCPStore`` at ``master_addr:master_port``.

    Example::

        store = connect_store(World(rank=0, world_size=1, master_port=0), timedelta(seconds=5))
    """
    host = world.rank == 0 and not world.store_hosted_externally
    try:
        return dist.TCPStore(
            world.master_addr,
            world.master_port,
            None,
            host,
            timeout,
            wait_for_workers=False,
            multi_tenant=True,
        )
    except (RuntimeError, OSError) as error:
        who = "host" if host else "reach"
        hint = (
            "another program holds that port: pick a free MASTER_PORT"
            if host
            else "is rank 0 running, and are MASTER_ADDR/MASTER_PORT the same on every rank?"
        )
        raise RendezvousTimeout(
            f"rank {world.rank} could not {who} the rendezvous store at "
            f"{world.master_addr}:{world.master_port} within {timeout.total_seconds():g} s "
            f"({type(error).__name__}: {str(error).splitlines()[0]}); {hint}"
        ) from None


class Coordinator:
    """Rendezvous, barrier, byte broadcast and object all-gather for one activation.

    Build one with :meth:`join`; all ranks of the world must call the same methods in the
    same order (SPMD), as with any collective.

    Example::

        coord = Coordinator.join(World.from_env(), timeout=timedelta(seconds=60))
        if coord.is_local_master:
            prepare_node_cache()
        coord.barrier()
    """

    def __init__(
        self, store: CountingStore, world: World, prefix: str, timeout: timedelta, label: str
    ) -> None:
        self.store = store
        self.world = world
        self.prefix = prefix
        self.timeout = timeout
        self.label = label
        self._rounds: dict[str, int] = {}
        # Keys of finished barrier rounds, per member set: deleted once this rank passes the
        # next barrier of the same members (then every member has passed the earlier round).
        self._pending_deletes: dict[str, list[str]] = {}
        self._base_store: dist.Store | None = None

    # ------------------------------------------------------------------ joining

    @classmethod
    def join(
        cls,
        world: World,
        *,
        timeout: timedelta,
        store: dist.Store | None = None,
        namespace: str = "topo",
        label: str = "activation",
    ) -> Coordinator:
        """Connect to the store and wait until every rank of ``world`` has joined.

        ``namespace`` separates activations that share a store at the same time (two
        meshes at once); re-joining the same namespace later draws a new key prefix.

        Example::

            coord = Coordinator.join(world, timeout=timedelta(seconds=30), namespace="topo/dp2.tp2")
        """
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            left = timedelta(seconds=max(deadline - time.monotonic(), 0.001))
            base = store if store is not None else connect_store(world, left)
            counting = CountingStore(base)
            try:
                with _guard(f"rank {world.rank} joining for {label}"):
                    ticket = counting.add(f"{namespace}/join", 1)
                generation = (ticket - 1) // world.world_size
                coordinator = cls(counting, world, f"{namespace}/{generation}", timeout, label)
                coordinator._base_store = base  # keeps a hosted TCPStore alive with it
                coordinator.barrier("join")
                return coordinator
            except StoreLostError:
                # Right after a previous activation rank 0's old store may still be shutting
                # down: a peer that reached it reconnects to rank 0's new one.
                retry = store is None and world.rank != 0 and time.monotonic() < deadline
                if not retry:
                    raise
                time.sleep(0.05)

    # ------------------------------------------------------------------ queries

    @property
    def rank(self) -> int:
        """This process's global rank.

        Example::

            coord.rank   # 3 on the fourth process
        """
        return self.world.rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the world.

        Example::

            coord.world_size   # 8 under torchrun --nproc-per-node=8
        """
        return self.world.world_size

    @property
    def is_master(self) -> bool:
        """True on global rank 0.

        Example::

            if coord.is_master:
                save_checkpoint()
        """
        return self.world.rank == 0

    @property
    def is_local_master(self) -> bool:
        """True on local rank 0 (one process per node).

        Example::

            if coord.is_local_master:
                download_weights()
            coord.barrier()
        """
        return self.world.local_rank == 0

    def key(self, *parts: object) -> str:
        """A store key under this activation's prefix.

        Example::

            coord.key("nccl", "tp", 0)   # 'topo/dp2.tp2/0/nccl/tp/0'
        """
        return "/".join([self.prefix, *map(str, parts)])

    def _next_round(self, scope: str) -> int:
        n = self._rounds.get(scope, 0)
        self._rounds[scope] = n + 1
        return n

    # --------------------------------------------------------------- operations

    def barrier(self, name: str = "barrier", ranks: Sequence[int] | None = None) -> str:
        """Block until every rank (or every rank in ``ranks``) arrives; returns the round's key.

        On timeout raises :class:`RendezvousTimeout` naming the ranks that did not arrive.

        Example::

            coord.barrier()
        """
        members = self._members(ranks, "barrier")
        with _guard(f"{self.label}: barrier {name!r} on rank {self.rank}"):
            return self._barrier(name, members)

    def _barrier(self, name: str, members: tuple[int, ...]) -> str:
        members_id = _ranks_id(members, self.world_size)
        scope = f"barrier/{name}/{members_id}"
        base = self.key(scope, self._next_round(scope))
        self.store.set(f"{base}/arrived/{self.rank}", b"1")
        if self.store.add(f"{base}/count", 1) == len(members):
            self.store.set(f"{base}/done", b"1")
        else:
            self._wait([f"{base}/done"], f"barrier {name!r}", members, f"{base}/arrived")
        # Every member has now passed the earlier rounds of these members: their keys can go.
        for key in self._pending_deletes.pop(members_id, []):
            self.store.delete_key(key)
        pending = [f"{base}/arrived/{self.rank}"]
        if f"{base}/done" in self.store.written:
            pending += [f"{base}/done", f"{base}/count"]
        self._pending_deletes[members_id] = pending
        return base

    def _members(self, ranks: Sequence[int] | None, what: str) -> tuple[int, ...]:
        if ranks is None:
            return tuple(range(self.world_size))
        members = tuple(ranks)
        if (
            not members
            or list(members) != sorted(set(members))
            or not 0 <= members[0] <= members[-1] < self.world_size
        ):
            raise TopoValueError(
                f"{what} ranks requires distinct global ranks in increasing order, each in "
                f"0..{self.world_size - 1}, but got {list(members)}"
            )
        if self.rank not in members:
            raise TopoValueError(
                f"{what} ranks requires this rank ({self.rank}) among them, but got "
                f"{list(members)}; only the members call it"
            )
        return members

    def broadcast(
        self, data: bytes | None, src: int = 0, ranks: Sequence[int] | None = None
    ) -> bytes:
        """Send ``data`` from global rank ``src`` to every rank (or every rank in ``ranks``).

        Example::

            uid = coord.broadcast(make_id() if coord.rank == 0 else None, src=0)
        """
        members = tuple(range(self.world_size)) if ranks is None else tuple(ranks)
        if src not in members:
            raise TopoValueError(f"broadcast src requires a rank among {list(members)}, but got {src}")
        scope = f"bcast/{_ranks_id(members, self.world_size)}"
        base = self.key(scope, self._next_round(scope))
        if self.rank == src:
            if not isinstance(data, bytes):
                raise TopoTypeError(
                    f"broadcast data requires bytes on the source rank {src}, but got "
                    f"{type(data).__name__}"
                )
            self.store.set(f"{base}/data", data)
            return data
        self._wait([f"{base}/data"], "broadcast", (src,), None)
        value = self.store.get(f"{base}/data")
        if self.store.add(f"{base}/read", 1) == len(members) - 1:
            self.store.delete_key(f"{base}/data")
            self.store.delete_key(f"{base}/read")
        return value

    def all_gather_object(self, obj: Any, ranks: Sequence[int] | None = None) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (small objects: it goes via the store).

        Example::

            hosts = coord.all_gather_object(socket.gethostname())
        """
        members = self._members(ranks, "all_gather_object")
        with _guard(f"{self.label}: all_gather_object on rank {self.rank}"):
            return self._all_gather_object(obj, members)

    def _all_gather_object(self, obj: Any, members: tuple[int, ...]) -> list[Any]:
        scope = f"gather/{_ranks_id(members, self.world_size)}"
        base = self.key(scope, self._next_round(scope))
        self.store.set(f"{base}/{self.rank}", pickle.dumps(obj))
        keys = [f"{base}/{r}" for r in members]
        self._wait(keys, "all_gather_object", members, base)
        values = [pickle.loads(v) for v in self.store.multi_get(keys)]
        if self.store.add(f"{base}/read", 1) == len(members):
            for key in [*keys, f"{base}/read"]:
                self.store.delete_key(key)
        return values

    def close(self) -> None:
        """Wait for every rank, delete this activation's keys, and leave rank 0 (the store's
        host) last, so that no rank talks to a store whose host has gone (call on clean exits).

        Example::

            coord.close()
        """
        with _guard(f"{self.label}: closing on rank {self.rank}"):
            self._close()

    def _close(self) -> None:
        close = self._barrier("close", tuple(range(self.world_size)))
        # Every rank has passed every earlier round: its own keys can go, except the close
        # round's, which ranks may still be reading; rank 0 deletes those once all have left.
        keep = {f"{close}/done", f"{close}/count"}
        leftovers = {k for keys in self._pending_deletes.values() for k in keys}
        self._pending_deletes = {}
        for key in sorted((leftovers | self.store.written) - keep):
            self.store.delete_key(key)
        left, everyone_left = self.key("left"), self.key("everyone-left")
        if self.rank != 0:
            if self.store.add(left, 1) == self.world_size - 1:
                self.store.set(everyone_left, "1")
            return
        if self.world_size > 1:
            self._wait([everyone_left], "close", range(1, self.world_size), None)
        for key in (*sorted(keep), left, everyone_left):
            self.store.delete_key(key)

    # ----------------------------------------------------------------- helpers

    def _wait(
        self, keys: list[str], what: str, members: Sequence[int], arrived: str | None
    ) -> None:
        try:
            self.store.wait(keys, self.timeout)
        except RuntimeError as error:
            if _is_connection_loss(error):
                raise
            missing = list(members)
            if arrived is not None:
                with contextlib.suppress(RuntimeError):  # the store itself may be gone
                    missing = [r for r in members if not self.store.check([f"{arrived}/{r}"])]
            raise RendezvousTimeout(
                f"{self.label}: {what} timed out after {self.timeout.total_seconds():g} s on "
                f"rank {self.rank}: rank(s) {_short(missing)} of {_short(list(members))} did not "
                f"arrive; check that they are running and call the same topo operations in "
                f"the same order, or raise the timeout ({str(error).splitlines()[0]})"
            ) from None


def _is_connection_loss(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    return "DistNetworkError" in names or any(
        s in text for s in ("Connection reset", "Broken pipe", "likely closed", "Failed to recv")
    )


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """Turn a broken store connection into :class:`StoreLostError` naming ``what``."""
    try:
        yield
    except StoreLostError:
        raise
    except RuntimeError as error:
        if not _is_connection_loss(error):
            raise
        raise StoreLostError(
            f"{what}: the connection to the rendezvous store broke ({str(error).splitlines()[0]})"
            f"; its host (rank 0, unless the store was passed in or torchrun hosts it) has "
            f"exited or closed it: look for an error on rank 0"
        ) from None


def _ranks_id(members: tuple[int, ...], world_size: int) -> str:
    if len(members) == world_size and members == tuple(range(world_size)):
        return "all"
    if len(members) <= 8:
        return "-".join(map(str, members))
    return f"{members[0]}+{len(members)}+{zlib.crc32(repr(members).encode()):08x}"


def _short(ranks: list[int]) -> str:
    if len(ranks) <= 16:
        return str(ranks)
    return f"[{', '.join(map(str, ranks[:16]))}, … ({len(ranks)} ranks)]"
