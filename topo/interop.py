"""Interop with torch's own parallel APIs: topo groups as ``ProcessGroup``\\ s, topo meshes as
torch ``DeviceMesh``\\ es (for DTensor and FSDP2), and back.

``ctx.torch_group(axis)`` wraps the communicator topo already has for this rank's group along
``axis`` in a ``torch.distributed.ProcessGroup`` and registers it with torch (so
``dist.all_reduce(t, group=pg)``, ``dist.get_rank(pg)`` and the functional collectives, which
look groups up by name, accept it). ``ctx.torch_mesh(axes)`` builds a torch ``DeviceMesh`` from
those groups. Everything registered is unregistered when the activation ends.

For CPU tensors the group's backend *is* topo's gloo process group (no wrapper, no copy). For
CUDA tensors the group is a Python ``ProcessGroup`` subclass that forwards each collective to
topo's communicator for the tensor's device (NCCL through cupy for CUDA).

torch's ``get_rank(group)`` and ``DeviceMesh`` translate through the *default* group's rank,
so while a torch group or mesh of an activation is in use topo makes sure a default group with
topo's global rank exists: it keeps a user's own default group when its rank and size match
topo's world, otherwise it installs topo's world group for the life of the activation and
puts the previous one (or none) back when the activation ends.

The torch internals used here (``distributed_c10d._world``'s maps, ``_register_process_group``,
``ProcessGroup._register_backend``) are private; every version difference (torch 2.4 … 2.13)
is handled in this module only.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as tdist
from torch.distributed import distributed_c10d as c10d

import topo._dist as dist
from topo.active import current, find_context
from topo.communicators.base import plain
from topo.communicators.gloo import GlooCommunicator
from topo.context import MeshContext
from topo.errors import BackendUnavailableError, NoActiveMeshError, TopoTypeError, TopoValueError
from topo.mesh import Axis

if TYPE_CHECKING:
    from topo.communicators.base import Communicator, ReduceOp

__all__ = ["TopoProcessGroup", "torch_group", "torch_mesh", "torch_store"]

_DEVICE_TYPES = ("cpu", "cuda")
_ProcessGroup: Any = tdist.ProcessGroup
_GLOO: Any = _ProcessGroup.BackendType.GLOO


# ------------------------------------------------------------------ public functions


def torch_group(
    axis: Axis, *, device_type: str | None = None, ctx: MeshContext | None = None
) -> Any:
    """A ``torch.distributed.ProcessGroup`` over this rank's group along ``axis`` (a name or a
    tuple of names), backed by topo's communicator: ``dist.get_rank(pg)`` is this rank's axis
    index and torch's global ranks are topo's. Every rank of the group must call it (the first
    call per axis creates the communicator). Unregistered when the activation ends.

    ``device_type`` ``"cpu"`` (the default without CUDA) gives a group whose backend is topo's
    gloo process group itself; ``"cuda"`` gives a wrapper that sends CUDA tensors through topo's
    NCCL communicator. ``ctx`` defaults to the innermost active mesh that has ``axis``.

    Example::

        with topo.DeviceMesh(dp=2, tp=2).activate() as ctx:
            pg = ctx.torch_group("tp")
            torch.distributed.all_reduce(t, group=pg)
            torch.distributed.get_rank(pg)        # == ctx.axis_index("tp")
    """
    if ctx is None:
        ctx = find_context(axis, "torch_group")[0]
    return _state(ctx, "torch_group").group(axis, _device_type(device_type, "torch_group"))


def torch_mesh(
    axes: Axis | Sequence[Axis] | None = None,
    *,
    device_type: str | None = None,
    ctx: MeshContext | None = None,
) -> Any:
    """A ``torch.distributed.device_mesh.DeviceMesh`` over this rank's part of the mesh, built
    from :func:`torch_group`\\ s, with topo's axis names as ``mesh_dim_names``: hand it to
    ``distribute_tensor``, DTensor ops or ``fully_shard``.

    ``axes`` defaults to every axis of the mesh, one torch dimension each; give a subset (in any
    order) for a smaller mesh, and a tuple of names for one flattened dimension (named with
    ``_``: ``("dp", "cp")`` → ``"dp_cp"``). The same arguments give the same mesh object.

    Example::

        with topo.DeviceMesh(dp=2, tp=2).activate() as ctx:
            mesh = ctx.torch_mesh()                 # mesh_dim_names == ("dp", "tp")
            fully_shard(model, mesh=mesh["dp"])
            w = distribute_tensor(w, mesh, [Replicate(), Shard(0)])
    """
    if ctx is None:
        if axes is None or isinstance(axes, str):
            ctx = current() if axes is None else find_context(axes, "torch_mesh")[0]
        else:
            wanted = tuple(n for a in axes for n in ((a,) if isinstance(a, str) else a))
            ctx = find_context(wanted, "torch_mesh")[0]
    return _state(ctx, "torch_mesh").mesh(axes, _device_type(device_type, "torch_mesh"))


def torch_store() -> dist.Store:
    """The store of torch's default process group, for activating a topo mesh on top of a torch
    job that already called ``init_process_group``: ``mesh.activate(store=topo.torch_store())``
    rendezvouses through it instead of hosting a second TCPStore.

    Example::

        torch.distributed.init_process_group("gloo")      # under torchrun
        with topo.DeviceMesh(dp=2, tp=2).activate(store=topo.torch_store()) as ctx:
            ...
    """
    if not tdist.is_initialized():
        raise NoActiveMeshError(
            "topo.torch_store requires torch's default process group, but "
            "torch.distributed.init_process_group has not been called; call it first, or "
            "activate without store= (topo then hosts its own store)"
        )
    store: dist.Store = c10d._get_default_store()
    return store


# ------------------------------------------------------------------ per-activation state


def _device_type(device_type: str | None, operation: str) -> str:
    if device_type is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in _DEVICE_TYPES:
        raise TopoValueError(
            f"topo.{operation} device_type requires one of {', '.join(map(repr, _DEVICE_TYPES))}"
            f", but got {device_type!r}"
        )
    return device_type


def _state(ctx: MeshContext, operation: str) -> _TorchState:
    if not isinstance(ctx, MeshContext):
        raise TopoTypeError(
            f"topo.{operation} ctx requires a MeshContext (from `with mesh.activate() as ctx`), "
            f"but got {type(ctx).__name__}"
        )
    if ctx._closed:
        raise NoActiveMeshError(
            f"topo.{operation} requires an active mesh, but {ctx!r} has ended; call it inside "
            f"the `with mesh.activate():` block (torch groups and meshes live as long as it)"
        )
    state = ctx._extensions.get("torch")
    if state is None:
        state = _TorchState(ctx)
        ctx._extensions["torch"] = state
        ctx._on_close.append(state.close)
    return cast(_TorchState, state)


class _TorchState:
    """The torch groups and meshes of one activation, and the default group it installed."""

    def __init__(self, ctx: MeshContext) -> None:
        self.ctx = ctx
        self.groups: dict[tuple[tuple[str, ...], str], Any] = {}
        self.meshes: dict[tuple[Any, ...], Any] = {}
        self.installed: Any = None  # the default group this activation installed
        self.previous: Any = None  # the default group before it
        self.closed = False

    def group(self, axis: Axis, device_type: str) -> Any:
        names, _ = self.ctx.resolve(axis)  # unknown axis: the mesh's error lists valid ones
        self._ensure_default(device_type)
        return self._group(names, device_type)

    def _group(self, names: tuple[str, ...], device_type: str) -> Any:
        key = (names, device_type)
        pg = self.groups.get(key)
        if pg is None:
            pg = _make_group(self.ctx, names, device_type)
            self.groups[key] = pg
        return pg

    def _ensure_default(self, device_type: str) -> None:
        if self.installed is not None:
            return
        world = self.ctx.world
        default = c10d._world.default_pg
        if default is not None and (default.rank(), default.size()) == (
            world.rank,
            world.world_size,
        ):
            return  # the user's own default group speaks topo's global ranks: keep it
        pg = self._group(self.ctx.mesh.axis_names, device_type)
        self.previous, self.installed = default, pg
        _set_default_group(pg)

    def mesh(self, axes: Axis | Sequence[Axis] | None, device_type: str) -> Any:
        dims = self._dims(axes)
        key = (dims, device_type)
        found = self.meshes.get(key)
        if found is not None:
            return found
        groups = [self.group(names, device_type) for names in dims]
        mesh = self.ctx.mesh
        sizes = [mesh.axis_size(names) for names in dims]
        layout = [_rank_at(self.ctx, dims, index) for index in itertools.product(*map(range, sizes))]
        ranks = torch.tensor(layout, dtype=torch.int).reshape(sizes)
        dim_names = tuple("_".join(names) for names in dims)
        built = _device_mesh(groups, device_type, ranks, dim_names)
        self.meshes[key] = built
        return built

    def _dims(self, axes: Axis | Sequence[Axis] | None) -> tuple[tuple[str, ...], ...]:
        mesh = self.ctx.mesh
        if axes is None:
            return tuple((name,) for name in mesh.axis_names)
        if isinstance(axes, str):
            return (self.ctx.resolve(axes)[0],)
        if not isinstance(axes, (tuple, list)) or not axes:
            raise TopoTypeError(
                f"topo.torch_mesh axes requires None, an axis name or a non-empty sequence of "
                f"names (or tuples of names); got {type(axes).__name__} {axes!r}; valid axes are "
                f"{', '.join(map(repr, mesh.axis_names))}"
            )
        dims = tuple(self.ctx.resolve(tuple(a) if isinstance(a, list) else a)[0] for a in axes)
        flat = [name for names in dims for name in names]
        if len(flat) != len(set(flat)):
            raise TopoValueError(
                f"topo.torch_mesh axes requires each axis at most once, but got {axes!r}; "
                f"valid axes are {', '.join(map(repr, mesh.axis_names))}"
            )
        return dims

    def close(self, abort: bool = False) -> None:
        """Unregister every group and mesh; put the previous default group back."""
        if self.closed:
            return
        self.closed = True
        if self.installed is not None and c10d._world.default_pg is self.installed:
            _set_default_group(self.previous)
        for pg in self.groups.values():
            _unregister(pg)
        self.groups.clear()
        self.meshes.clear()
        self.installed = self.previous = None


def _rank_at(ctx: MeshContext, dims: tuple[tuple[str, ...], ...], index: tuple[int, ...]) -> int:
    """The global rank at multi-index ``index`` of the torch mesh over ``dims`` (other axes at
    this rank's coordinates; a flattened dimension varies its axes row-major, as topo does)."""
    mesh = ctx.mesh
    coords = dict(ctx.coords)
    for names, k in zip(dims, index, strict=True):
        for name in reversed(names):
            size = mesh.shape[name]
            coords[name] = k % size
            k //= size
    return mesh.rank_of(**coords)


# ------------------------------------------------------------------ torch version shims


def _group_name(ctx: MeshContext, names: tuple[str, ...], device_type: str) -> str:
    base = "topo:" + ctx.coordinator.key(
        "torch", device_type, ".".join(names), ctx.mesh.group_index(names, ctx.rank)
    )
    taken = set(c10d._world.pg_names.values())
    name = base
    for n in itertools.count(1):
        if name not in taken:
            break
        name = f"{base}#{n}"
    return name


def _new_process_group(cls: Any, store: dist.Store | None, rank: int, size: int) -> Any:
    """``ProcessGroup(store, rank, size)`` (torch ≥ 2.6) or ``(store, rank, size, options)``."""
    try:
        return cls(store, rank, size) if store is not None else cls(rank, size)
    except TypeError:
        options = _ProcessGroup.Options(backend="gloo")  # torch < 2.6 needs base options
        options._timeout = timedelta(minutes=30)
        return cls(store, rank, size, options)


def _make_group(ctx: MeshContext, names: tuple[str, ...], device_type: str) -> Any:
    gloo = ctx.communicator(names, "cpu")  # a rendezvous of the group's ranks on first use
    if not isinstance(gloo, GlooCommunicator):
        raise BackendUnavailableError(
            f"topo.torch_group requires topo's gloo communicator for CPU tensors, but "
            f"{gloo.label} uses {type(gloo).__name__}; torch groups need a torch backend"
        )
    name = _group_name(ctx, names, device_type)
    store = dist.PrefixStore(name + "/", ctx.coordinator.store)
    if device_type == "cpu":
        pg = _new_process_group(_ProcessGroup, store, gloo.index, gloo.size)
    else:
        pg = TopoProcessGroup(gloo.index, gloo.size, _lookup(ctx, names))
    pg._set_default_backend(_GLOO)
    pg._register_backend(torch.device("cpu"), _GLOO, gloo.pg)
    if hasattr(pg, "_set_group_name"):
        pg._set_group_name(name)
    if hasattr(pg, "_set_group_desc"):
        pg._set_group_desc(f"topo {gloo.label}")
    backend = "gloo" if device_type == "cpu" else "topo"
    _register(pg, name, gloo.ranks, store, backend)
    return pg


def _register(pg: Any, name: str, ranks: tuple[int, ...], store: dist.Store, backend: str) -> None:
    world: Any = c10d._world
    world.pg_map[pg] = (backend, store)
    world.pg_names[pg] = name
    world.pg_group_ranks[pg] = {rank: index for index, rank in enumerate(ranks)}
    if hasattr(world, "pg_backend_config"):
        world.pg_backend_config[pg] = f"cpu:gloo,cuda:{backend}" if backend != "gloo" else "cpu:gloo"
    tag = f"ptd:{name}"
    world.tags_to_pg.setdefault("", []).append(pg)
    world.tags_to_pg.setdefault(tag, []).append(pg)
    world.pg_to_tag[pg] = tag
    register: Callable[[str, Any], None] | None = getattr(c10d, "_register_process_group", None)
    if register is not None:  # resolves the group by name for the functional collectives
        register(name, pg)


def _unregister(pg: Any) -> None:
    world: Any = c10d._world
    name = world.pg_names.pop(pg, None)
    world.pg_map.pop(pg, None)
    world.pg_group_ranks.pop(pg, None)
    if hasattr(world, "pg_backend_config"):
        world.pg_backend_config.pop(pg, None)
    world.pg_coalesce_state.pop(pg, None)
    tag = world.pg_to_tag.pop(pg, None)
    for key in ("", tag):
        members = world.tags_to_pg.get(key) if key is not None else None
        if members is not None:
            while pg in members:
                members.remove(pg)
            if not members and key:
                del world.tags_to_pg[key]
    unregister: Callable[[str], None] | None = getattr(c10d, "_unregister_process_group", None)
    if name is not None and unregister is not None:
        with contextlib.suppress(RuntimeError, KeyError):  # torch without the by-name registry
            unregister(name)


def _set_default_group(pg: Any) -> None:
    update: Callable[[Any], None] | None = getattr(c10d, "_update_default_pg", None)
    if update is not None:
        update(pg)  # also sets the C++ global rank used by torch's logging
    else:
        c10d._world.default_pg = pg


def _device_mesh(groups: list[Any], device_type: str, ranks: torch.Tensor, names: Any) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    from_group = getattr(DeviceMesh, "from_group", None)
    if from_group is None:
        raise BackendUnavailableError(
            f"topo.torch_mesh requires torch.distributed.device_mesh.DeviceMesh.from_group "
            f"(torch >= 2.4), but this torch {torch.__version__} has none; upgrade torch or use "
            f"topo.torch_group for plain ProcessGroups"
        )
    if len(groups) == 1:  # the ranks come from the group itself (every torch version)
        return from_group(groups[0], device_type, mesh_dim_names=names)
    return from_group(groups, device_type, mesh=ranks, mesh_dim_names=names)


# ------------------------------------------------------------------ the CUDA wrapper


def _lookup(ctx: MeshContext, names: tuple[str, ...]) -> Callable[[str], Communicator]:
    return lambda device_type: ctx.communicator(names, device_type)


def _done(result: Any) -> Any:
    """A completed torch ``Work`` (topo's communicators finish, or enqueue on the current
    stream, before they return)."""
    future: Any = torch.futures.Future()
    future.set_result(result)
    create: Any = getattr(torch._C._distributed_c10d, "_create_work_from_future")  # noqa: B009
    return create(future)


_REDUCE_OPS: dict[Any, ReduceOp] = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.PRODUCT: "prod",
}


def _reduce_op(opts: Any) -> ReduceOp:
    op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
    for torch_op, name in _REDUCE_OPS.items():
        if op == torch_op:
            return name
    raise TopoValueError(
        f"a topo ProcessGroup supports the reduce ops SUM, AVG, MAX, MIN and PRODUCT, but got "
        f"{op!r}; use one of those (or a plain gloo group for CPU tensors)"
    )


class TopoProcessGroup(_ProcessGroup):  # type: ignore[misc]
    """A ``ProcessGroup`` that forwards each collective to topo's communicator for the
    tensor's device (NCCL through cupy for CUDA tensors, gloo for CPU ones): what
    ``torch_group(axis, device_type="cuda")`` returns. torch's in-place collectives are served
    by topo's out-of-place ones plus a copy into the caller's tensors; every returned ``Work``
    is already complete (NCCL work is enqueued on the current stream, as torch's is).

    Example::

        pg = ctx.torch_group("tp", device_type="cuda")
        torch.distributed.all_reduce(torch.ones(4, device="cuda"), group=pg)
    """

    def __init__(self, rank: int, size: int, lookup: Callable[[str], Communicator]) -> None:
        super().__init__(rank, size)
        self._lookup = lookup

    def getBackendName(self) -> str:
        return "topo"

    def _comm(self, tensor: torch.Tensor) -> Communicator:
        return self._lookup(tensor.device.type)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        op = _reduce_op(opts)
        for t in tensors:
            t.copy_(self._comm(t).all_reduce(plain(t), op))
        return _done(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        """Served here for the reason :meth:`allgather_into_tensor_coalesced` gives."""
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        src = int(getattr(opts, "rootRank", 0))
        for t in tensors:
            t.copy_(self._comm(t).broadcast(plain(t), src))
        return _done(tensors)

    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for outs, x in zip(outputs, inputs, strict=True):
            gathered = self._comm(x).all_gather(plain(x))
            for out, chunk in zip(outs, gathered.unbind(0), strict=True):
                out.copy_(chunk)
        return _done(outputs)

    def _allgather_base(self, output: torch.Tensor, x: torch.Tensor, opts: Any = None) -> Any:
        output.copy_(self._comm(x).all_gather(plain(x)).reshape(output.shape))
        return _done([output])

    all_gather_single = _allgather_base

    def allgather_into_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        """Served here rather than by torch's C++ default: torch's functional collectives call
        it from C++ with the GIL held, and the default would enqueue on the gloo group
        directly (a deadlock with gloo's worker thread: docs/interop.md, "A deadlock with
        torch's functional collectives") or on a CUDA backend topo has not got."""
        for output, x in zip(outputs, inputs, strict=True):
            self._allgather_base(output, x, opts)
        return _done(outputs)

    all_gather_single_coalesced = allgather_into_tensor_coalesced  # the name in torch >= 2.12

    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        op = _reduce_op(opts)
        for out, chunks in zip(outputs, inputs, strict=True):
            out.copy_(self._comm(out).reduce_scatter(torch.stack(chunks), op))
        return _done(outputs)

    def _reduce_scatter_base(
        self, output: torch.Tensor, x: torch.Tensor, opts: Any = None
    ) -> Any:
        stacked = plain(x).reshape(self.size(), *output.shape)
        output.copy_(self._comm(x).reduce_scatter(stacked, _reduce_op(opts)))
        return _done([output])

    reduce_scatter_single = _reduce_scatter_base

    def reduce_scatter_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        """Served here for the reason :meth:`allgather_into_tensor_coalesced` gives."""
        for output, x in zip(outputs, inputs, strict=True):
            self._reduce_scatter_base(output, x, opts)
        return _done(outputs)

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced  # torch >= 2.12 name

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        """An all-reduce of which only the root keeps the result (others' tensors unchanged)."""
        op, dst = _reduce_op(opts), int(getattr(opts, "rootRank", 0))
        for t in tensors:
            reduced = self._comm(t).all_reduce(plain(t), op)
            if self.rank() == dst:
                t.copy_(reduced)
        return _done(tensors)

    def gather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        dst = int(getattr(opts, "rootRank", 0))
        for index, x in enumerate(inputs):
            gathered = self._comm(x).gather(plain(x), dst)
            if gathered is not None:
                for out, chunk in zip(outputs[index], gathered.unbind(0), strict=True):
                    out.copy_(chunk)
        return _done(outputs)

    def scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        src = int(getattr(opts, "rootRank", 0))
        for index, out in enumerate(outputs):
            # topo's scatter takes the full (size, ...) shape on every rank; only the root's
            # values are read, so the others hand a view of their output
            chunks = torch.stack(inputs[index]) if inputs else out.expand(self.size(), *out.shape)
            out.copy_(self._comm(out).scatter(chunks, src))
        return _done(outputs)

    def alltoall_base(
        self,
        output: torch.Tensor,
        x: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        opts: Any = None,
    ) -> Any:
        n = self.size()
        for splits in (output_splits, input_splits):
            if splits and len(set(splits)) != 1:
                raise TopoValueError(
                    f"a topo ProcessGroup's all_to_all_single requires equal splits (or none), "
                    f"but got {list(splits)}; pad to equal sizes or use a gloo group"
                )
        received = self._comm(x).all_to_all(plain(x).reshape(n, -1))
        output.copy_(received.reshape(output.shape))
        return _done([output])

    all_to_all_single = alltoall_base

    def barrier(self, opts: Any = None) -> Any:
        self._lookup("cpu").barrier()
        return _done([])
