"""Activation: turn a mesh spec into this process's live context.

``mesh.activate()`` joins the world's rendezvous and yields a :class:`MeshContext`. The
context knows this rank's coordinates and creates communicators lazily, one per axis (or axis
tuple) and device kind, only for the groups this rank belongs to. Active contexts live in a
``contextvars.ContextVar``: activations nest (the innermost context that has an axis wins),
each thread has its own, and leaving the block destroys the context's communicators.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch

import topo._dist as dist
from topo._checks import as_timedelta
from topo.communicators.base import Communicator
from topo.coordinator import Coordinator
from topo.errors import CommunicationError, NoActiveMeshError, TopoTypeError, TopoValueError
from topo.mesh import Axis, DeviceMesh
from topo.world import World

__all__ = ["MeshContext", "activate", "active_contexts", "current"]

#: Default bound on every wait of an activation (TOPO_TIMEOUT overrides, in seconds).
DEFAULT_TIMEOUT = timedelta(seconds=300)

_ACTIVE: contextvars.ContextVar[tuple[MeshContext, ...]] = contextvars.ContextVar(
    "topo_active_meshes", default=()
)


def _as_timedelta(timeout: object) -> timedelta:
    if timeout is not None:
        return as_timedelta(timeout, "activate timeout")
    env = os.environ.get("TOPO_TIMEOUT")
    if not env:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(env)
    except ValueError:
        raise TopoValueError(
            f"TOPO_TIMEOUT requires a number of seconds, but got {env!r}; set it like "
            f"TOPO_TIMEOUT=300 or unset it"
        ) from None
    return as_timedelta(seconds, "TOPO_TIMEOUT")


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
    ) -> None:
        self.mesh = mesh
        self.world = world
        self.coordinator = coordinator
        self.timeout = timeout
        self.rank = world.rank
        self.coords = mesh.coords(world.rank)
        self._device = device
        self._communicators: dict[tuple[Any, ...], Communicator] = {}
        self._closed = False
        # Per-activation state of higher floors (interop) and their teardown, run at close.
        self._extensions: dict[str, Any] = {}
        self._on_close: list[Callable[[bool], None]] = []
        # axis argument -> (axis names in mesh order, group size); filled lazily.
        self._axes: dict[Any, tuple[tuple[str, ...], int]] = {
            name: ((name,), size) for name, size in mesh.shape.items()
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else "active"
        return f"<MeshContext {self.mesh!r} rank {self.rank} ({state})>"

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
        try:
            return all(name in self.mesh.shape for name in names)
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
        return self.mesh.axis_index(axis, self.rank)

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

    def communicator(self, names: tuple[str, ...], device_type: str) -> Communicator:
        """The communicator of this rank's group along ``names`` for ``device_type``
        (``"cpu"`` → gloo, ``"cuda"`` → NCCL), created on first use by every rank of the group.

        Example::

            comm = ctx.communicator(("tp",), "cpu")
        """
        key = (names, device_type)
        comm = self._communicators.get(key)
        if comm is None:
            comm = self._create(names, device_type, None)
            self._communicators[key] = comm
        return comm

    def pair_communicator(
        self, names: tuple[str, ...], peer: int, device_type: str
    ) -> Communicator:
        """A two-rank communicator between this rank and index ``peer`` of its group along
        ``names`` (for send/recv, which the rest of the group does not join). Index 0 of it is
        the lower of the two axis indices.

        Example::

            comm = ctx.pair_communicator(("pp",), 1, "cpu")
        """
        me = self.mesh.axis_index(names, self.rank)
        pair = (min(me, peer), max(me, peer))
        key = (names, device_type, pair)
        comm = self._communicators.get(key)
        if comm is None:
            comm = self._create(names, device_type, pair)
            self._communicators[key] = comm
        return comm

    def _create(
        self, names: tuple[str, ...], device_type: str, pair: tuple[int, int] | None
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
        scope = self.coordinator.key(
            "comm", device_type, ".".join(names), mesh.group_index(names, rank)
        )
        if pair is not None:
            ranks = (ranks[pair[0]], ranks[pair[1]])
            index = pair.index(index)
            label = f"axis {axis_label!r} pair {ranks}"
            scope = f"{scope}/pair{pair[0]}-{pair[1]}"
        if device_type == "cpu":
            from topo.communicators.gloo import GlooCommunicator

            store = dist.PrefixStore(scope, self.coordinator.store)
            return _with_arrival(
                store,
                index,
                ranks,
                label,
                lambda: GlooCommunicator(
                    store, ranks, index, self.timeout, self.world.is_local, label
                ),
            )
        if device_type == "cuda":
            from topo.communicators.nccl import NcclCommunicator

            return NcclCommunicator.create(
                self.coordinator, scope, ranks, index, self.device, label
            )
        raise TopoValueError(
            f"collectives require a tensor on a 'cpu' (gloo) or 'cuda' (NCCL) device, but got "
            f"device type {device_type!r}; move the tensor with .cpu() or .cuda()"
        )

    def close(self, abort: bool = False) -> None:
        """Destroy the communicators; on a clean exit first wait for every rank and delete
        this activation's store keys. Called when the ``with`` block ends.

        Example::

            ctx.close()
        """
        if self._closed:
            return
        self._closed = True
        try:
            if not abort:
                self.coordinator.close()
        except BaseException:
            abort = True  # a peer is gone: never wait on it while closing the communicators
            raise
        finally:
            for callback in reversed(self._on_close):
                callback(abort)
            self._on_close.clear()
            for comm in self._communicators.values():
                comm.close(abort=abort)
            self._communicators.clear()

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
        missing = [r for i, r in enumerate(ranks) if not store.check([f"arrived/{i}"])]
        if missing:
            raise type(error)(
                f"creating the communicator for {label} failed: rank(s) {missing} never "
                f"arrived; they must call the same collective on this axis ({error})"
            ) from None
        raise


def active_contexts() -> tuple[MeshContext, ...]:
    """The active contexts of this thread, outermost first.

    Example::

        with mesh.activate():
            assert len(topo.active_contexts()) == 1
    """
    return _ACTIVE.get()


def current() -> MeshContext:
    """The innermost active context of this thread.

    Example::

        with mesh.activate():
            ctx = topo.current()
    """
    stack = _ACTIVE.get()
    if not stack:
        raise NoActiveMeshError(
            "topo.current requires an active mesh, but none is active in this thread; use "
            "`with mesh.activate():` (or run the code under topo.spawn)"
        )
    return stack[-1]


def find_context(axis: Axis, operation: str) -> tuple[MeshContext, tuple[str, ...], int]:
    """The innermost context whose mesh has ``axis``, with the axis names and group size.

    Example::

        ctx, names, n = find_context("tp", "all_reduce")   # names == ("tp",)
    """
    stack = _ACTIVE.get()
    for ctx in reversed(stack):
        try:
            names, size = ctx._axes[axis]
            return ctx, names, size
        except (KeyError, TypeError):
            if ctx.has_axis(axis):
                names, size = ctx.resolve(axis)
                return ctx, names, size
    if not stack:
        raise NoActiveMeshError(
            f"topo.{operation} requires an active mesh, but none is active in this thread; use "
            f"`with mesh.activate():` around the call (or run it under topo.spawn)"
        )
    if not isinstance(axis, (str, tuple, list)):
        raise TopoTypeError(
            f"topo.{operation} axis requires an axis name or a tuple of names, but got "
            f"{type(axis).__name__} {axis!r}"
        )
    if len(stack) == 1:
        stack[0].mesh.normalize_axis(axis)  # raises the mesh's own error naming valid axes
    valid = sorted({name for ctx in stack for name in ctx.mesh.axis_names})
    raise TopoValueError(
        f"topo.{operation} got axis {axis!r}, which no active mesh has; valid axes are "
        f"{', '.join(repr(v) for v in valid)} (active: {', '.join(repr(c.mesh) for c in stack)})"
    )


@contextmanager
def activate(
    mesh: DeviceMesh,
    world: World | None = None,
    *,
    timeout: float | timedelta | None = None,
    store: dist.Store | None = None,
    name: str | None = None,
    device: torch.device | str | int | None = None,
) -> Iterator[MeshContext]:
    """Activate ``mesh`` for this process: join the rendezvous and yield a :class:`MeshContext`.

    ``world`` defaults to :meth:`World.from_env` (torchrun, Slurm, mpirun). ``timeout`` bounds
    every wait (seconds or timedelta; default 300 s or ``TOPO_TIMEOUT``). ``store`` attaches to
    an existing ``torch.distributed`` store instead of the world's TCPStore. ``name`` separates
    concurrent activations of identical meshes on one store. ``device`` is the CUDA device for
    NCCL collectives (default ``cuda:{local_rank}``).

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
    namespace = (
        f"topo/{name}" if name else "topo/" + ".".join(f"{n}{s}" for n, s in mesh.shape.items())
    )
    coordinator = Coordinator.join(
        world, timeout=wait, store=store, namespace=namespace, label=f"activating {mesh!r}"
    )
    coordinator.label = repr(mesh)  # later waits name the mesh, not the activation
    ctx = MeshContext(mesh, world, coordinator, wait, cuda_device)
    token = _ACTIVE.set((*_ACTIVE.get(), ctx))
    failed = True
    try:
        yield ctx
        failed = False
    finally:
        _ACTIVE.reset(token)
        ctx.close(abort=failed)


def _as_cuda_device(device: torch.device | str | int | None) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TopoTypeError(
            f"activate device requires a torch.device, a str like 'cuda:0' or an int, but got "
            f"{type(device).__name__} {device!r}"
        )
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise TopoValueError(
            f"activate device requires a CUDA device (CPU tensors always use gloo), but got "
            f"{dev}; pass device='cuda:0' or leave it out"
        )
    return dev if dev.index is not None else None
