"""The backend table: which communication library serves which device type.

A *backend* is a name, the device type whose tensors it moves (``"cpu"``, ``"cuda"``, …), the
dtypes it can reduce, and a *factory* that builds one :class:`~topo.communicators.base.
Communicator` for one group. ``mesh.activate(backends={"cpu": "gloo", "cuda": "nccl"})`` picks
one backend per device type from this table (those two are the defaults); the collectives and
the context never name a library. Three backends are registered from the start, each importing
its module only when its first communicator is built:

=========== =========== ==========================================================
name        device type what
=========== =========== ==========================================================
``gloo``    ``cpu``     ``ProcessGroupGloo`` over the group's ranks (the default)
``nccl``    ``cuda``    NCCL through cupy (the default)
``threads`` ``cpu``     ranks are threads of one process (:func:`topo.simulate`)
=========== =========== ==========================================================

**The factory protocol.** ``factory(group: GroupSpec) -> Communicator`` is called once per
group and device type on every member of the group, at the same point of the program (the
first collective of that group on that device type), so a factory may rendezvous with its
peers through ``group.store``. It must return an object implementing
:class:`~topo.communicators.base.Communicator` (``ranks``, ``index``, ``label``, ``size`` and
every collective), bound every wait by ``group.timeout`` and raise
:class:`topo.CommunicationError` (or :class:`topo.CommunicationTimeout`) when it fails; topo
then names the ranks that never arrived.

Example::

    from topo.communicators import GroupSpec, register

    def make_mpi(group: GroupSpec) -> MyMpiCommunicator:
        return MyMpiCommunicator(group.ranks, group.index, group.timeout, group.label)

    register("mpi", make_mpi, device_type="cpu", reduce_dtypes={torch.float32, torch.int64})
    with mesh.activate(backends={"cpu": "mpi"}):
        topo.all_reduce(x, axis="tp")          # through MyMpiCommunicator
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

import torch

import topo._dist as dist
from topo.communicators.base import Communicator
from topo.communicators.dtypes import GLOO_REDUCE_DTYPES
from topo.communicators.nccl_types import NCCL_REDUCE_DTYPES
from topo.errors import TopoTypeError, TopoValueError
from topo.world import World

if TYPE_CHECKING:
    from topo.coordinator import Coordinator

__all__ = [
    "DEFAULT_BACKENDS",
    "Backend",
    "GroupSpec",
    "get_backend",
    "register",
    "registered_backends",
    "resolve_backends",
    "unregister",
]

#: The backend of each device type when ``activate`` is given no ``backends=``.
DEFAULT_BACKENDS: Mapping[str, str] = MappingProxyType({"cpu": "gloo", "cuda": "nccl"})


#: GroupSpec's fields, in the order its constructor takes them.
_GROUP_FIELDS = (
    "backend", "ranks", "index", "label", "store", "root_store", "scope", "timeout", "device",
    "world", "coordinator",
)  # fmt: skip


class GroupSpec:
    """Everything a backend factory gets to build the communicator of one group.

    ``ranks`` are the group's global ranks in axis-index order and ``index`` this rank's
    position in them. ``store`` is a ``torch.distributed`` store private to this group (a
    prefix of the activation's store, fresh for every activation) for the factory's own
    rendezvous; ``root_store`` is the activation's store itself. ``timeout`` bounds every wait.
    ``label`` names the group in messages (``"axis 'tp' group (0, 1)"``). ``device`` is the
    device the communicator serves (``cuda:{local_rank}`` or the one given to ``activate`` for
    CUDA; ``torch.device(device_type)`` otherwise). ``scope`` is the group's key prefix in the
    activation's store; ``coordinator`` the activation's :class:`~topo.coordinator.Coordinator`.

    Immutable, compared and hashed by its fields. A plain class rather than a frozen
    dataclass: defining one costs every rank's start about 0.8 ms, this one nothing.

    Example::

        def factory(group: GroupSpec) -> Communicator:
            return GlooCommunicator(group.store, group.ranks, group.index, group.timeout,
                                    group.world.is_local, group.label)
    """

    __slots__ = _GROUP_FIELDS

    backend: str
    ranks: tuple[int, ...]
    index: int
    label: str
    store: dist.Store
    root_store: dist.Store
    scope: str
    timeout: timedelta
    device: torch.device
    world: World
    coordinator: Coordinator

    def __init__(
        self,
        backend: str,
        ranks: tuple[int, ...],
        index: int,
        label: str,
        store: dist.Store,
        root_store: dist.Store,
        scope: str,
        timeout: timedelta,
        device: torch.device,
        world: World,
        coordinator: Coordinator,
    ) -> None:
        values = (
            backend, ranks, index, label, store, root_store, scope, timeout, device, world,
            coordinator,
        )  # fmt: skip
        for name, value in zip(_GROUP_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _GROUP_FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"GroupSpec is immutable: cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"GroupSpec is immutable: cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not GroupSpec:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _GROUP_FIELDS)
        return f"GroupSpec({fields})"


Factory = Callable[[GroupSpec], Communicator]


class Backend(NamedTuple):
    """One row of the backend table (see :func:`register`): an immutable record (a
    ``NamedTuple``, which every rank's start defines 5× faster than a frozen dataclass).

    Example::

        get_backend("gloo").device_type     # 'cpu'
        torch.int64 in get_backend("nccl").reduce_dtypes   # True
    """

    name: str
    device_type: str
    factory: Factory
    reduce_dtypes: frozenset[torch.dtype]
    display_name: str

    def __repr__(self) -> str:
        return f"<backend {self.name!r} for {self.device_type!r} tensors>"


def _gloo(group: GroupSpec) -> Communicator:
    from topo.communicators.gloo import GlooCommunicator, shared_devices
    from topo.communicators.rollcall import RollCall

    roll_call = RollCall(
        group.coordinator.store,
        group.scope,
        group.ranks,
        group.index,
        activation=group.coordinator.prefix,
        label=group.label,
        flights=group.coordinator.flights,
    )
    return GlooCommunicator(
        group.store,
        group.ranks,
        group.index,
        group.timeout,
        group.world.is_local,
        group.label,
        roll_call,
        devices=shared_devices(group.coordinator.shared, group.world.is_local),
    )


def _nccl(group: GroupSpec) -> Communicator:
    from topo.communicators.nccl import NcclCommunicator

    return NcclCommunicator.create(
        group.coordinator,
        group.scope,
        group.ranks,
        group.index,
        group.device,
        group.label,
        group.timeout,
    )


def _threads(group: GroupSpec) -> Communicator:
    from topo.communicators.threads import ThreadsCommunicator

    return ThreadsCommunicator.create(group)


_BUILTIN = ("gloo", "nccl", "threads")

# The one table of the process (registration is rare and guarded by a lock; lookups read a
# consistent dict). Built-in rows are here from the start.
_LOCK = threading.Lock()
_TABLE: dict[str, Backend] = {
    "gloo": Backend("gloo", "cpu", _gloo, GLOO_REDUCE_DTYPES, "gloo"),
    "nccl": Backend("nccl", "cuda", _nccl, NCCL_REDUCE_DTYPES, "NCCL"),
    "threads": Backend("threads", "cpu", _threads, GLOO_REDUCE_DTYPES, "threads"),
}


def register(
    name: str,
    factory: Factory,
    *,
    device_type: str,
    reduce_dtypes: Iterable[torch.dtype] = (),
    display_name: str | None = None,
    replace: bool = False,
) -> Backend:
    """Add backend ``name`` for tensors of ``device_type``, built by ``factory``.

    ``factory(group: GroupSpec) -> Communicator`` follows the protocol in this module's
    docstring. ``reduce_dtypes`` are the dtypes its reductions accept (a reduction of another
    dtype fails early, naming them); other dtypes still move in every non-reducing collective.
    ``replace=True`` overwrites a backend registered earlier (not a built-in one).

    Example::

        topo.communicators.register("mpi", make_mpi, device_type="cpu",
                                    reduce_dtypes={torch.float32})
        with mesh.activate(backends={"cpu": "mpi"}):
            ...
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise TopoTypeError(
            f"register name requires an identifier-like str such as 'mpi', but got "
            f"{type(name).__name__} {name!r}"
        )
    if not callable(factory):
        raise TopoTypeError(
            f"register factory requires a callable factory(group: GroupSpec) -> Communicator, "
            f"but got {type(factory).__name__}"
        )
    if not isinstance(device_type, str):
        raise TopoTypeError(
            f"register device_type requires a str like 'cpu' or 'cuda', but got "
            f"{type(device_type).__name__} {device_type!r}"
        )
    try:
        parsed = torch.device(device_type)
    except RuntimeError:
        raise TopoValueError(
            f"register device_type requires a torch device type like 'cpu', 'cuda' or 'xpu', "
            f"but got {device_type!r}"
        ) from None
    if parsed.index is not None or parsed.type != device_type:
        raise TopoValueError(
            f"register device_type requires a device type without index (like 'cuda'), but "
            f"got {device_type!r}"
        )
    if isinstance(reduce_dtypes, torch.dtype):
        reduce_dtypes = (reduce_dtypes,)
    dtypes = frozenset(reduce_dtypes)
    wrong = [d for d in dtypes if not isinstance(d, torch.dtype)]
    if wrong:
        raise TopoTypeError(
            f"register reduce_dtypes requires torch dtypes like torch.float32, but got {wrong[0]!r}"
        )
    backend = Backend(name, device_type, factory, dtypes, display_name or name)
    with _LOCK:
        if name in _BUILTIN:
            raise TopoValueError(
                f"register cannot replace the built-in backend {name!r}; choose another name"
            )
        if name in _TABLE and not replace:
            raise TopoValueError(
                f"register found backend {name!r} already registered ({_TABLE[name]!r}); pass "
                f"replace=True to overwrite it or choose another name"
            )
        _TABLE[name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove a backend added with :func:`register` (built-in ones stay).

    Example::

        topo.communicators.unregister("mpi")
    """
    with _LOCK:
        if name in _BUILTIN:
            raise TopoValueError(f"unregister cannot remove the built-in backend {name!r}")
        if name not in _TABLE:
            raise TopoValueError(
                f"unregister requires a registered backend name ({_names()}), but got {name!r}"
            )
        del _TABLE[name]


def registered_backends() -> dict[str, Backend]:
    """A copy of the table: name → :class:`Backend`.

    Example::

        sorted(registered_backends())   # ['gloo', 'nccl', 'threads']
    """
    return dict(_TABLE)


def _names() -> str:
    return ", ".join(repr(n) for n in sorted(_TABLE))


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; an unknown name lists the valid ones.

    Example::

        get_backend("gloo").display_name   # 'gloo'
    """
    backend = _TABLE.get(name) if isinstance(name, str) else None
    if backend is None:
        raise TopoValueError(
            f"backend name requires one of the registered backends ({_names()}), but got "
            f"{name!r}; add a backend with topo.communicators.register(name, factory, "
            f"device_type=...)"
        )
    return backend


def resolve_backends(
    backends: Mapping[str, str | None] | None, what: str = "activate backends"
) -> Mapping[str, Backend | None]:
    """The defaults overridden by ``backends`` (device type → backend name, or ``None`` to
    allow no collective on that device type), validated: every device type must be one some
    registered backend serves, and every name a backend serving it.

    Example::

        resolve_backends({"cpu": "threads"})["cpu"].name   # 'threads'
    """
    table = dict(_TABLE)
    served = sorted({b.device_type for b in table.values()})
    out: dict[str, Backend | None] = {d: table[n] for d, n in DEFAULT_BACKENDS.items()}
    if backends is None:
        return MappingProxyType(out)
    if not isinstance(backends, Mapping):
        raise TopoTypeError(
            f"{what} requires a mapping of device type to backend name like "
            f"{{'cpu': 'gloo', 'cuda': 'nccl'}}, but got {type(backends).__name__}"
        )
    for device_type, name in backends.items():
        if device_type not in served:
            raise TopoValueError(
                f"{what} maps device type {device_type!r}, which no registered backend serves; "
                f"valid device types are {', '.join(map(repr, served))} (register a backend "
                f"for another one with topo.communicators.register)"
            )
        if name is None:
            out[device_type] = None
            continue
        backend = get_backend(name)
        if backend.device_type != device_type:
            fits = sorted(n for n, b in table.items() if b.device_type == device_type)
            raise TopoValueError(
                f"{what} maps {device_type!r} tensors to backend {name!r}, which serves "
                f"{backend.device_type!r} tensors; backends for {device_type!r} are "
                f"{', '.join(map(repr, fits))}"
            )
        out[device_type] = backend
    return MappingProxyType(out)


def describe(backends: Mapping[str, Backend | None]) -> str:
    """``"'cpu' (gloo) or 'cuda' (NCCL)"``: the device types a mapping serves, for messages.

    Example::

        describe(resolve_backends(None))   # "'cpu' (gloo) or 'cuda' (NCCL)"
    """
    parts = [f"{d!r} ({b.display_name})" for d, b in backends.items() if b is not None]
    return " or ".join(parts) if parts else "no device (every backend is off)"
