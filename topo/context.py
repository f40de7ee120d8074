"""Activation: turn a mesh spec into this process's live context.

``mesh.activate()`` joins the world's rendezvous and yields a :class:`MeshContext`. The
context knows this rank's coordinates and creates communicators lazily, one per axis (or axis
tuple) and device kind, only for the groups this rank belongs to. Active contexts live in a
``contextvars.ContextVar``: activations nest (the innermost context that has an axis wins),
each thread has its own, and leaving the block destroys the context's communicators.

How collectives find the active context — the stack, the lookup by axis, the group keys that
find an activation again from another thread — is in ``topo.active``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch

import topo._dist as dist
from topo._checks import as_host
from topo._options import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT  # the default, re-exported
from topo._options import (
    _as_check,
    _as_cuda_device,
    _as_timedelta,
    _as_watchdog,
    _torch_default_store,
)
from topo.active import _ACTIVE, register
from topo.communicators.base import Communicator
from topo.communicators.registry import Backend, GroupSpec, describe, resolve_backends
from topo.communicators.rollcall import publish_flights
from topo.coordinator import Coordinator, group_id
from topo.errors import CommunicationError, TopoError, TopoTypeError, TopoValueError
from topo.mesh import Axis, DeviceMesh
from topo.secret import load_secret, warn_without_secret
from topo.store import check_store_address
from topo.world import World

if TYPE_CHECKING:  # check mode's module loads on its first use, not on every start
    from topo.communicators.checked import CheckChannel

__all__ = ["MeshContext", "activate"]

T = TypeVar("T")


class MeshContext:
    """This rank's view of an active mesh: coordinates, groups and lazy communicators.

    Obtained from ``with mesh.activate() as ctx``; collectives find it by axis name.

    Example::

        with DeviceMesh(dp=2, tp=2).activate() as ctx:
            ctx.rank, ctx.coords        # (3, {'dp': 1, 'tp': 1}) on rank 3
            ctx.group("tp")             # (2, 3)
    """

    def __init__(
        self,
        mesh: DeviceMesh,
        world: World,
        coordinator: Coordinator,
        timeout: timedelta,
        device: torch.device | None,
        *,
        backends: Mapping[str, Backend | None] | None = None,
        check: bool = False,
        store: dist.Store | None = None,
    ) -> None:
        self.mesh = mesh
        self.world = world
        #: This activation's number in the process (1, 2, ...): group keys carry it.
        self.id = register(self)
        self.coordinator = coordinator
        self.timeout = timeout
        self.rank = world.rank
        self.coords = mesh.coords(world.rank)
        self._device = device
        self._communicators: dict[tuple[Any, ...], Communicator] = {}
        self._closed = False
        #: device type → backend (``activate(backends=...)`` over the defaults).
        self.backends = resolve_backends(None) if backends is None else backends
        #: check mode: compare every collective's arguments across the group first.
        self.check = check
        #: seconds between polls of a backend's asynchronous errors (NCCL), or None: off.
        self.watchdog: float | None = None
        self._root_store = coordinator.store if store is None else store
        self._check_channels: dict[tuple[Any, ...], CheckChannel] = {}
        # Per-activation state of higher floors (interop) and their teardown, run at close.
        self._extensions: dict[str, Any] = {}
        self._on_close: list[Callable[[bool], None]] = []
        # axis argument -> this rank's index along it; filled lazily.
        self._indices: dict[Any, int] = {}
        #: (device type, dtype, op) triples a reduction has accepted (collectives/_common.py).
        self._reducible: set[tuple[str, torch.dtype, object]] = set()
        #: The collectives' routes, filled on first use: (axis argument, device type[, dtype,
        #: op]) -> (communicator or None for a group of one, group size) (collectives/_common)
        #: and (axis argument, device type, peer index) -> send/recv's pair communicator (p2p).
        self._routes: dict[tuple[Any, ...], tuple[Communicator | None, int]] = {}
        self._pair_routes: dict[tuple[Any, str | None, int], Communicator] = {}
        # axis argument -> (axis names in mesh order, group size); filled lazily.
        self._axes: dict[Any, tuple[tuple[str, ...], int]] = {
            name: ((name,), size) for name, size in mesh.shape.items()
        }
        for name, over in mesh.derived_axes.items():
            self._axes[name] = (over, mesh.axis_size(over))
        #: Every communicator of this activation and its views, by (group ranks, device type,
        #: pair?): a view whose group coincides with one of the parent's shares it.
        self._shared: dict[tuple[Any, ...], Communicator] = {}
        #: The activation a view (:meth:`view`) belongs to; None for an activation itself.
        self._root: MeshContext | None = None
        self._views: list[MeshContext] = []

    def __repr__(self) -> str:
        state = "closed" if self._closed else "active"
        return f"<MeshContext #{self.id} {self.mesh!r} rank {self.rank} ({state})>"

    @property
    def closed(self) -> bool:
        """Whether this activation has ended (its communicators are destroyed).

        Example::

            with mesh.activate() as ctx:
                ...
            assert ctx.closed
        """
        return self._closed

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` with this activation active on the calling thread: the
        way to use collectives from a thread you start (a new thread has no active mesh).
        Only one thread at a time may use a group's communicator.

        Example::

            with mesh.activate() as ctx:
                t = threading.Thread(target=ctx.run, args=(topo.all_reduce, x, "tp"))
                t.start(); t.join()
        """
        if self._closed:
            raise TopoValueError(
                f"MeshContext.run requires an open activation, but {self!r} is closed; call it "
                f"inside `with mesh.activate() as ctx:`"
            )
        token = _ACTIVE.set((*_ACTIVE.get(), self))
        try:
            return fn(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    def view(self, mesh: DeviceMesh) -> AbstractContextManager[MeshContext]:
        """Activate ``mesh`` — another mesh over this activation's ranks, such as
        ``ctx.mesh.unflatten("dp", rep=2, shard=2)`` — without a second rendezvous: it shares
        this activation's store and every communicator whose group coincides (see
        ``topo/view.py``). A context manager; the view is active inside the block.

        Example::

            with mesh.activate() as ctx, ctx.view(ctx.mesh.with_axes(ep=("dp", "tp"))):
                y = topo.all_to_all(x, axis="ep")
        """
        from topo.view import open_view

        return open_view(self, mesh)

    # ----------------------------------------------------------------- rank math

    def resolve(self, axis: Axis) -> tuple[tuple[str, ...], int]:
        """``axis`` as names in mesh order and the group size (cached per axis argument).

        Example::

            ctx.resolve(("tp", "dp"))   # (('dp', 'tp'), 4)
        """
        try:
            return self._axes[axis]
        except (KeyError, TypeError):
            pass
        names = self.mesh.normalize_axis(axis)
        info = (names, self.mesh.axis_size(names))
        if isinstance(axis, (str, tuple)):
            self._axes[axis] = info
        return info

    def has_axis(self, axis: Axis) -> bool:
        """Whether every name in ``axis`` is an axis of this mesh.

        Example::

            ctx.has_axis(("dp", "tp"))   # True for DeviceMesh(dp=2, tp=2)
        """
        names = (axis,) if isinstance(axis, str) else axis
        derived = self.mesh.derived_axes
        try:
            return all(name in self.mesh.shape or name in derived for name in names)
        except TypeError:
            return False

    def group(self, axis: Axis) -> tuple[int, ...]:
        """Global ranks of this rank's group along ``axis``.

        Example::

            ctx.group("pp")   # (1, 3) on rank 3 of DeviceMesh(pp=2, tp=2)
        """
        return self.mesh.group(axis, self.rank)

    def axis_index(self, axis: Axis) -> int:
        """This rank's index along ``axis``.

        Example::

            ctx.axis_index("tp")
        """
        try:
            return self._indices[axis]
        except (KeyError, TypeError):
            pass
        index = self.mesh.axis_index(axis, self.rank)
        if isinstance(axis, (str, tuple)):
            self._indices[axis] = index
        return index

    def axis_size(self, axis: Axis) -> int:
        """Size of ``axis`` (product of sizes for a tuple).

        Example::

            ctx.axis_size(("dp", "tp"))
        """
        return self.resolve(axis)[1]

    @property
    def device(self) -> torch.device:
        """The CUDA device of this rank: the one given at activation, else ``cuda:{local_rank}``
        (``cuda:0`` when the process sees a single GPU, as with one GPU per task).

        Example::

            x = torch.ones(4, device=ctx.device)
        """
        if self._device is not None:
            return self._device
        if torch.cuda.is_available() and torch.cuda.device_count() == 1:
            return torch.device("cuda", 0)
        return torch.device("cuda", self.world.local_rank)

    @property
    def store_ops(self) -> int:
        """Store operations this rank has made since activation (rendezvous cost).

        Example::

            ctx.store_ops   # 4 right after activating, whatever the world size
        """
        return self.coordinator.store.ops

    # -------------------------------------------------------------- communicators

    def backend(self, device_type: str) -> Backend:
        """The backend this activation uses for tensors of ``device_type``.

        Example::

            ctx.backend("cpu").name   # 'gloo' (or 'threads' under topo.simulate)
        """
        backend = self.backends.get(device_type)
        if backend is None:
            raise TopoValueError(
                f"collectives on {device_type!r} tensors require a backend, but this activation "
                f"of {self.mesh!r} has none for {device_type!r} (it serves "
                f"{describe(self.backends)}); move the tensor with .cpu(), or map one with "
                f"activate(backends={{{device_type!r}: ...}}) (topo.simulate runs CPU tensors "
                f"only: test CUDA code with topo.spawn)"
            )
        return backend

    def communicator(self, names: tuple[str, ...], device_type: str) -> Communicator:
        """The communicator of this rank's group along ``names`` for ``device_type``
        (the activation's backend for it: by default ``"cpu"`` → gloo, ``"cuda"`` → NCCL),
        created on first use by every rank of the group.

        Example::

            comm = ctx.communicator(("tp",), "cpu")
        """
        comm = self._communicators.get((names, device_type, None))
        return comm if comm is not None else self._cached(names, device_type, None)

    def pair_communicator(
        self, names: tuple[str, ...], peer: int, device_type: str
    ) -> Communicator:
        """A two-rank communicator between this rank and index ``peer`` of its group along
        ``names`` (for send/recv, which the rest of the group does not join). Index 0 of it is
        the lower of the two axis indices.

        Example::

            comm = ctx.pair_communicator(("pp",), 1, "cpu")
        """
        me = self.axis_index(names)
        pair = (me, peer) if me < peer else (peer, me)
        comm = self._communicators.get((names, device_type, pair))
        return comm if comm is not None else self._cached(names, device_type, pair)

    def _cached(
        self, names: tuple[str, ...], device_type: str, pair: tuple[int, int] | None
    ) -> Communicator:
        ranks = self.mesh.group(names, self.rank)
        if pair is not None:
            ranks = (ranks[pair[0]], ranks[pair[1]])
        key = (ranks, device_type, pair is not None)
        comm = self._shared.get(key)
        if comm is None:  # no view of this activation has this group yet
            comm = self._create(names, device_type, pair)
            self._shared[key] = comm
        self._communicators[(names, device_type, pair)] = comm
        return comm

    def _create(
        self,
        names: tuple[str, ...],
        device_type: str,
        pair: tuple[int, int] | None,
        raw: bool = False,
    ) -> Communicator:
        if self._closed:
            raise CommunicationError(
                f"{self!r} is closed: collectives require an active context; call them "
                f"inside the `with mesh.activate():` block"
            )
        mesh, rank = self.mesh, self.rank
        ranks = mesh.group(names, rank)
        index = mesh.axis_index(names, rank)
        axis_label = names[0] if len(names) == 1 else names
        label = f"axis {axis_label!r} group {ranks}"
        if pair is not None:
            ranks = (ranks[pair[0]], ranks[pair[1]])
            index = pair.index(index)
            label = f"axis {axis_label!r} pair {ranks}"
        # named by its ranks, not its axis: every view of the activation finds the same keys
        kind = "pair" if pair is not None else "group"
        scope = self.coordinator.key(
            "comm", device_type, kind, group_id(ranks, self.world.world_size)
        )
        backend = self.backend(device_type)
        if self.check and not raw:
            from topo.communicators.checked import CheckedCommunicator

            channel = self._check_channel(names, pair)
            if device_type == "cpu":
                inner = channel.comm
            else:
                inner = self._create(names, device_type, pair, raw=True)
            return CheckedCommunicator(inner, channel, device_type)
        store = dist.PrefixStore(scope, self.coordinator.store)
        group = GroupSpec(
            backend=backend.name,
            ranks=ranks,
            index=index,
            label=label,
            store=store,
            root_store=self._root_store,
            scope=scope,
            timeout=self.timeout,
            device=self.device if device_type == "cuda" else torch.device(device_type),
            world=self.world,
            coordinator=self.coordinator,
        )
        comm = _with_arrival(store, index, ranks, label, lambda: backend.factory(group))
        flight = getattr(comm, "flight", None)  # its calls, for the roll call after a failure
        if flight is not None:
            self.coordinator.flights[scope] = (label, flight)
        start_watchdog = getattr(comm, "start_watchdog", None)  # backends with async errors
        if self.watchdog is not None and start_watchdog is not None:
            start_watchdog(self.watchdog)
        return comm

    def _check_channel(self, names: tuple[str, ...], pair: tuple[int, int] | None) -> CheckChannel:
        """Check mode: the group's unwrapped CPU communicator that carries the records (one
        per group of ranks that communicate, as the store scope of ``_create``: shared with
        the activation's views, and by the axes whose group or pair has the same ranks)."""
        ranks = self.mesh.group(names, self.rank)
        if pair is not None:
            ranks = (ranks[pair[0]], ranks[pair[1]])
        key = (ranks, pair is not None)
        channel = self._check_channels.get(key)
        if channel is None:
            from topo.communicators.checked import CheckChannel

            axis = names[0] if len(names) == 1 else ",".join(names)
            channel = CheckChannel(lambda: self._create(names, "cpu", pair, True), axis)
            self._check_channels[key] = channel
        return channel

    def close(self, abort: bool = False) -> None:
        """Destroy the communicators; on a clean exit first wait for every rank and delete
        this activation's store keys. Called when the ``with`` block ends.

        Example::

            ctx.close()
        """
        if self._closed:
            return
        self._closed = True
        if self._root is not None:  # a view: its communicators are the activation's
            for callback in reversed(self._on_close):
                callback(abort)
            self._on_close.clear()
            return
        for view in self._views:
            view.close(abort)
        # where this rank went, for a peer still waiting on it (after a failed collective its
        # roll call already said which call failed: that stays)
        if self.coordinator.flights and not (abort and self.coordinator.store.roll_calls):
            where = "leaving its activation after an error" if abort else "closing its activation"
            publish_flights(self.coordinator.store, self.coordinator.prefix, self.rank,
                            self.coordinator.flights, where)  # fmt: skip
        try:
            if not abort:
                self.coordinator.close()
            else:
                self.coordinator.linger_after_failure()
        except BaseException:
            abort = True  # a peer is gone: never wait on it while closing the communicators
            raise
        finally:
            for callback in reversed(self._on_close):
                callback(abort)
            self._on_close.clear()
            # Check mode wraps communicators (and keeps unwrapped CPU ones): close each once.
            unwrapped = [getattr(c, "inner", c) for c in self._shared.values()]
            unwrapped += [ch._comm for ch in self._check_channels.values() if ch._comm]
            for comm in {id(c): c for c in unwrapped}.values():
                comm.close(abort=abort)
            self.coordinator.shared.clear()  # after the communicators that share it
            self._routes.clear()
            self._pair_routes.clear()
            self._communicators.clear()
            self._shared.clear()
            self._check_channels.clear()

    # ------------------------------------------------- torch interop (topo/interop.py)

    def torch_group(self, axis: Axis, *, device_type: str | None = None) -> Any:
        """This rank's group along ``axis`` as a ``torch.distributed.ProcessGroup``; see
        :func:`topo.torch_group` (interop is imported here, not at module level: floor 6).

        Example::

            torch.distributed.all_reduce(t, group=ctx.torch_group("tp"))
        """
        from topo.interop import torch_group

        return torch_group(axis, device_type=device_type, ctx=self)

    def torch_mesh(self, axes: Any = None, *, device_type: str | None = None) -> Any:
        """This mesh as a ``torch.distributed.device_mesh.DeviceMesh`` with topo's axis
        names; see :func:`topo.torch_mesh`.

        Example::

            fully_shard(model, mesh=ctx.torch_mesh()["dp"])
        """
        from topo.interop import torch_mesh

        return torch_mesh(axes, device_type=device_type, ctx=self)


def _with_arrival(
    store: dist.Store,
    index: int,
    ranks: tuple[int, ...],
    label: str,
    create: Any,
) -> Communicator:
    """Mark this rank's arrival under the group's prefix, then create; a timeout names the
    ranks whose arrival mark is missing."""
    store.set(f"arrived/{index}", "1")
    try:
        comm: Communicator = create()
        return comm
    except CommunicationError as error:
        try:
            missing = [r for i, r in enumerate(ranks) if not store.check([f"arrived/{i}"])]
        except (RuntimeError, TopoError):  # the store is gone too: report the first error
            raise error from None
        if missing:
            raise type(error)(
                f"creating the communicator for {label} failed: rank(s) {missing} never "
                f"arrived; they must call the same collective on this axis ({error})"
            ) from None
        raise


@contextmanager
def activate(
    mesh: DeviceMesh,
    world: World | None = None,
    *,
    timeout: float | timedelta | None = None,
    store: dist.Store | None = None,
    name: str | None = None,
    device: torch.device | str | int | None = None,
    secret: bytes | str | None = None,
    bind: str | None = None,
    backends: Mapping[str, str | None] | None = None,
    check: bool | None = None,
    watchdog: float | bool | None = None,
) -> Iterator[MeshContext]:
    """Activate ``mesh`` for this process: join the rendezvous and yield a :class:`MeshContext`.

    ``world`` defaults to :meth:`World.from_env` (torchrun, Slurm, mpirun). ``timeout`` bounds
    every wait (seconds or timedelta; default 300 s or ``TOPO_TIMEOUT``). ``store`` attaches to
    an existing ``torch.distributed`` store instead of the world's TCPStore (default: the store
    of torch's default process group when the user's ``init_process_group`` made one for the
    same ranks, else the world's TCPStore). ``name`` separates concurrent activations of identical meshes on one store. ``device`` is the CUDA device for
    NCCL collectives (default ``cuda:{local_rank}``). ``backends`` maps device types to
    registered backend names over the defaults ``{"cpu": "gloo", "cuda": "nccl"}`` (``None``
    turns a device type off; see ``topo.communicators.register``). ``check=True`` (default:
    ``TOPO_CHECK=1`` in the environment) compares every collective's operation, shape, dtype,
    device type, reduce op and root across the group first and raises
    :class:`topo.CollectiveMismatchError` on every rank on a mismatch (one extra small
    all-gather per collective). ``secret`` (default ``TOPO_SECRET``) tags the control
    messages in the store with an HMAC, refused without it (see docs/security.md). ``bind`` is the address rank 0's store listens on: default MASTER_ADDR
    (loopback for a local world); ``"0.0.0.0"`` listens on every interface — anyone who can
    reach the port can then disrupt the job, so use it only on a trusted network.
    ``watchdog`` (``True`` for every 0.1 s, or seconds) polls NCCL's asynchronous errors on a
    daemon thread per communicator and aborts the communicator on one, as ProcessGroupNCCL's
    watchdog does, so the next collective raises :class:`topo.CommunicationError` naming the
    group instead of hanging.

    Example::

        with topo.DeviceMesh(dp=2, tp=2).activate() as ctx:
            y = topo.all_reduce(x, axis="tp")
    """
    if not isinstance(mesh, DeviceMesh):
        raise TopoTypeError(f"activate requires a DeviceMesh, but got {type(mesh).__name__}")
    if world is None:
        world = World.from_env()
    elif not isinstance(world, World):
        raise TopoTypeError(f"activate world requires a topo.World, but got {type(world).__name__}")
    if mesh.size != world.world_size:
        raise TopoValueError(
            f"mesh {mesh} = {mesh.size} does not match world size {world.world_size}; set "
            f"WORLD_SIZE={mesh.size} (launch {mesh.size} processes) or change the mesh"
        )
    wait = _as_timedelta(timeout)
    cuda_device = _as_cuda_device(device)
    table = resolve_backends(backends)
    checking = _as_check(check)
    polling = _as_watchdog(watchdog)
    namespace = (
        f"topo/{name}" if name else "topo/" + ".".join(f"{n}{s}" for n, s in mesh.shape.items())
    )
    if store is None:
        store = _torch_default_store(world)
    elif not isinstance(store, dist.Store):
        raise TopoTypeError(
            f"activate store requires a torch.distributed.Store (a TCPStore, FileStore, "
            f"PrefixStore, ...), but got {type(store).__name__}; leave it out to use the "
            f"world's MASTER_ADDR:MASTER_PORT"
        )
    sealing = load_secret(secret, world)
    if bind is not None:
        bind = as_host(bind, "activate bind")
    check_store_address(world, bind, given_store=store is not None)
    if sealing is None and store is None and not world.is_single_node:
        warn_without_secret(world)
    coordinator = Coordinator.join(
        world,
        timeout=wait,
        store=store,
        namespace=namespace,
        label=f"activating {mesh!r}",
        secret=sealing,
        bind=bind,
    )
    coordinator.label = repr(mesh)  # later waits name the mesh, not the activation
    ctx = MeshContext(
        mesh, world, coordinator, wait, cuda_device, backends=table, check=checking, store=store
    )
    ctx.watchdog = polling
    token = _ACTIVE.set((*_ACTIVE.get(), ctx))
    failed = True
    try:
        yield ctx
        failed = False
    finally:
        _ACTIVE.reset(token)
        ctx.close(abort=failed)
