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
import hashlib
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import topo._dist as dist
from topo.errors import (
    AuthenticationError,
    RendezvousError,
    StoreLostError,
    TopoTypeError,
    TopoValueError,
)
from topo.generation import is_connection_loss, open_generation, opening_alarm
from topo.process_identity import identity
from topo.secret import Sealer
from topo.store import BoundedStore, connect_store
from topo.verdict import LINGER_SECONDS, end_if_judged, wait_or_verdict
from topo.world import World

__all__ = ["Coordinator"]

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
        self,
        store: BoundedStore,
        world: World,
        prefix: str,
        timeout: timedelta,
        label: str,
        sealer: Sealer | None = None,
    ) -> None:
        self.store = store
        if sealer is not None:  # the store seals and checks every value
            store.sealer = sealer
        #: The job's secret, if any (every value through :attr:`store` is authenticated).
        self.sealer = store.sealer
        self.hosts_store = False
        self.world = world
        self.prefix = prefix
        self.timeout = timeout
        self.label = label
        self._rounds: dict[str, int] = {}
        # Keys of finished barrier rounds, per member set: deleted once this rank passes the
        # next barrier of the same members (then every member has passed the earlier round).
        self._pending_deletes: dict[str, list[str]] = {}
        self._base_store: dist.Store | None = None
        #: Every communicator of the activation: store scope -> (label, flight recorder); the
        #: roll call after a failure publishes them (see topo.communicators.recorder).
        self.flights: dict[str, tuple[str, Any]] = {}
        #: What the activation's communicators share, by key (gloo's network devices, see
        #: topo.communicators.gloo.shared_devices); the context empties it once it has closed
        #: them.
        self.shared: dict[Any, Any] = {}

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
        secret: bytes | None = None,
        bind: str | None = None,
    ) -> Coordinator:
        """Connect to the store and wait until every rank of ``world`` has joined.

        ``namespace`` separates activations that share a store at the same time (two
        meshes at once). Rank 0 opens each activation attempt under a fresh generation, so an
        attempt that failed or timed out never puts later ones out of step. ``secret`` tags
        control messages (HMAC); ``bind`` is the address rank 0's store listens on (default:
        ``world.master_addr``).

        Example::

            coord = Coordinator.join(world, timeout=timedelta(seconds=30), namespace="topo/dp2.tp2")
        """
        deadline = time.monotonic() + timeout.total_seconds()
        hosting = store is None and world.rank == 0 and not world.store_hosted_externally
        host = "torchrun's agent" if world.store_hosted_externally else "rank 0"
        while True:
            left = timedelta(seconds=max(deadline - time.monotonic(), 0.001))
            base = store
            if base is None:
                base = connect_store(
                    world.master_addr, world.master_port, left, host=hosting, bind=bind,
                    rank=world.rank,
                )  # fmt: skip
            where = f"{world.master_addr}:{getattr(base, 'port', world.master_port)} ({host})"
            bounded = BoundedStore(
                base, timeout, where if store is None else "the given store", Sealer(secret)
            )
            try:
                # a forged value read before the generation is known (the open key) raises
                # the alarm here; rank 0 looks at it too
                bounded.alarm_key = bounded.opening_alarm_key = opening_alarm(namespace)
                bounded.rank = world.rank
                with _guard(f"rank {world.rank} joining for {label}"):
                    generation = open_generation(bounded, world, namespace, deadline, label)
                coordinator = cls(bounded, world, f"{namespace}/{generation}", timeout, label)
                bounded.alarm_key = f"{namespace}/{generation}/alarm"
                bounded.rank = world.rank
                coordinator._base_store = base  # keeps a hosted TCPStore alive with it
                coordinator.hosts_store = hosting
                # which process this rank is: a survivor of a failed collective on the same
                # machine looks at it (topo.communicators.rollcall)
                bounded.set(coordinator.key("process", world.rank), json.dumps(identity()).encode())
                try:
                    coordinator.barrier("join")
                except AuthenticationError:
                    coordinator.linger_after_failure()  # the peers must read the alarm too
                    raise
                finally:
                    if world.rank == 0:
                        with contextlib.suppress(Exception):
                            bounded.delete_key(f"{namespace}/open")
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
        members_id = group_id(members, self.world_size)
        scope = f"barrier/{name}/{members_id}"
        base = self.key(scope, self._next_round(scope))
        self.store.set(f"{base}/arrived/{self.rank}", b"1")
        if self.store.sealed:
            self._sealed_barrier(name, base, members)
        elif self.store.add(f"{base}/count", 1) >= len(members):
            # Last to arrive — unless the others already gave up on this round (then it must
            # fail with them, not run on alone).
            end_if_judged(self, f"{base}/failed", f"barrier {name!r}")
            self.store.set(f"{base}/done", b"1")
        else:
            wait_or_verdict(self, [f"{base}/done"], f"barrier {name!r}", members, f"{base}/arrived")
        # Every member has now passed the earlier rounds of these members: their keys can go.
        for key in self._pending_deletes.pop(members_id, []):
            self.store.delete_key(key)
        pending = [f"{base}/arrived/{self.rank}"]
        if f"{base}/done" in self.store.written:
            pending += [f"{base}/done", f"{base}/count"]
        self._pending_deletes[members_id] = pending
        return base

    def _sealed_barrier(self, name: str, base: str, members: tuple[int, ...]) -> None:
        """The barrier with a secret: no counter (anyone who reaches the store can add to one,
        or corrupt it so that the server drops the connection of the next rank that adds).
        The first member waits for every member's sealed arrival mark and checks each, then
        sets a sealed ``done``; the others wait for ``done`` and check its seal."""
        arrivals = [f"{base}/arrived/{r}" for r in members]
        # One verdict key for the collector and the others, and a first waiter to time out
        # wakes both kinds of wait (a woken arrival mark is then never read as an arrival).
        verdict, wake = f"{base}/failed", [*arrivals, f"{base}/done"]
        what, arrived = f"barrier {name!r}", f"{base}/arrived"
        if self.rank == members[0]:
            wait_or_verdict(
                self, arrivals, what, members, arrived, verdict=verdict, wake=wake,
                completer=members[0],
            )  # fmt: skip
            self.store.multi_get(arrivals)  # each must carry the job's seal
            end_if_judged(self, verdict, what)
            self.store.set(f"{base}/done", b"1")
        else:
            wait_or_verdict(
                self, [f"{base}/done"], what, members, arrived, verdict=verdict, wake=wake,
                completer=members[0],
            )  # fmt: skip
            self.store.get(f"{base}/done")  # set by a member, not forged

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

        With a secret the bytes carry an HMAC tag, checked on every receiver.

        Example::

            uid = coord.broadcast(make_id() if coord.rank == 0 else None, src=0)
        """
        members = tuple(range(self.world_size)) if ranks is None else tuple(ranks)
        if src not in members:
            raise TopoValueError(
                f"broadcast src requires a rank among {list(members)}, but got {src}"
            )
        scope = f"bcast/{group_id(members, self.world_size)}"
        base = self.key(scope, self._next_round(scope))
        with _guard(f"{self.label}: broadcast from rank {src} on rank {self.rank}"):
            if self.rank == src:
                if not isinstance(data, bytes):
                    raise TopoTypeError(
                        f"broadcast data requires bytes on the source rank {src}, but got "
                        f"{type(data).__name__}"
                    )
                self.store.set(f"{base}/data", data)
                return data
            wait_or_verdict(self, [f"{base}/data"], "broadcast", (src,), None)
            value = self.store.get(f"{base}/data")
            # The last reader deletes the data; with a secret there is no counter to tell who
            # is last (anyone may corrupt one): the source deletes it when the activation ends.
            if not self.store.sealed and self.store.add(f"{base}/read", 1) == len(members) - 1:
                self.store.delete_key(f"{base}/data")
                self.store.delete_key(f"{base}/read")
            return value

    def all_gather_json(self, value: Any, ranks: Sequence[int] | None = None) -> list[Any]:
        """Every rank's JSON-able ``value``, in rank order (small values: they go via the
        store, as JSON — never pickle — tagged with the secret's HMAC when there is one).

        Example::

            hosts = coord.all_gather_json(socket.gethostname())
        """
        members = self._members(ranks, "all_gather_json")
        try:
            encoded = json.dumps(value, allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            raise TopoTypeError(
                f"all_gather_json requires a JSON-able value (dict, list, str, int, float, "
                f"bool, None), but encoding {type(value).__name__} failed ({error}); convert it "
                f"first"
            ) from None
        with _guard(f"{self.label}: all_gather_json on rank {self.rank}"):
            scope = f"gather/{group_id(members, self.world_size)}"
            base = self.key(scope, self._next_round(scope))
            mine = f"{base}/{self.rank}"
            self.store.set(mine, encoded)
            keys = [f"{base}/{r}" for r in members]
            wait_or_verdict(self, keys, "all_gather_json", members, base)
            blobs = self.store.multi_get(keys)
            values = [_from_json(k, b) for k, b in zip(keys, blobs, strict=True)]
            # (with a secret: each rank deletes its own value when the activation ends)
            if not self.store.sealed and self.store.add(f"{base}/read", 1) == len(members):
                for key in [*keys, f"{base}/read"]:
                    self.store.delete_key(key)
            return values

    def all_gather_object(self, obj: Any, ranks: Sequence[int] | None = None) -> list[Any]:
        """Deprecated: use :meth:`all_gather_json`. Store contents are never unpickled, so
        this now carries JSON values (tuples come back as lists).

        Example::

            hosts = coord.all_gather_json(socket.gethostname())   # instead
        """
        warnings.warn(
            "Coordinator.all_gather_object is deprecated: the store carries JSON only (never "
            "pickle); use Coordinator.all_gather_json",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.all_gather_json(obj, ranks)

    def linger_after_failure(self) -> None:
        """On the store's host, after a collective failed: keep the store up while the other
        survivors hold their roll call (see ``topo.communicators.rollcall``), so that they
        name the ranks that are gone instead of a lost store.

        Example::

            coord.linger_after_failure()   # on an error path, before the process exits
        """
        if not self.hosts_store:
            return
        if self.store.forgery is not None or self.store.alarm() is not None:
            self._linger_for_acknowledgements()
        elif self.store.roll_calls:
            time.sleep(LINGER_SECONDS)

    def _linger_for_acknowledgements(self) -> None:
        """After a forged store value: keep the store up until every other rank has read the
        alarm (each acknowledges it as it ends with the same AuthenticationError), at most the
        activation's timeout plus :data:`LINGER_SECONDS`."""
        end = time.monotonic() + self.timeout.total_seconds() + LINGER_SECONDS
        bases = [f"{self.prefix}/alarm", *filter(None, [self.store.opening_alarm_key])]
        waiting = [r for r in range(self.world_size) if r != self.rank]
        with contextlib.suppress(Exception):
            while waiting and time.monotonic() < end:
                waiting = [
                    r
                    for r in waiting
                    if not any(self.store.check_within([f"{b}/ack/{r}"], 2.0) for b in bases)
                ]
                time.sleep(0.1 if waiting else 0)

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
        # (not "left/<rank>": a survivor's roll call leaves its note there)
        left, everyone_left = self.key("closed"), self.key("everyone-closed")
        if self.store.sealed:  # no counter with a secret: each rank's own mark
            if self.rank != 0:
                self.store.set(f"{left}/{self.rank}", b"1")
                return
            marks = [f"{left}/{r}" for r in range(1, self.world_size)]
            if marks:
                wait_or_verdict(self, marks, "close", range(1, self.world_size), left)
            for key in (*sorted(keep), *marks):
                self.store.delete_key(key)
            return
        if self.rank != 0:
            if self.store.add(left, 1) == self.world_size - 1:
                self.store.set(everyone_left, "1")
            return
        if self.world_size > 1:
            wait_or_verdict(self, [everyone_left], "close", range(1, self.world_size), None)
        for key in (*sorted(keep), left, everyone_left):
            self.store.delete_key(key)


def _from_json(key: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise RendezvousError(
            f"the store key {key!r} requires a JSON value written by topo, but holds "
            f"{len(data)} bytes that are not JSON: something else wrote it (another program on "
            f"the store's port?); refused it — nothing read from the store is unpickled"
        ) from None


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """Turn a broken store connection into :class:`StoreLostError` naming ``what``."""
    try:
        yield
    except StoreLostError:
        raise
    except RuntimeError as error:
        if not is_connection_loss(error):
            raise
        raise StoreLostError(
            f"{what}: the connection to the rendezvous store broke ({str(error).splitlines()[0]})"
            f"; its host (rank 0, unless the store was passed in or torchrun hosts it) has "
            f"exited or closed it: look for an error on rank 0"
        ) from None


def group_id(members: tuple[int, ...], world_size: int) -> str:
    """A short store-key name for a group of ranks: ``"all"``, ``"2-3"``, or for a large group
    its first rank, size and a hash of the list.

    Example::

        group_id((2, 3), 8)   # '2-3'
    """
    if len(members) == world_size and members == tuple(range(world_size)):
        return "all"
    if len(members) <= 8:
        return "-".join(map(str, members))
    digest = hashlib.blake2b(repr(members).encode(), digest_size=8).hexdigest()
    return f"{members[0]}+{len(members)}+{digest}"
