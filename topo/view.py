"""Views of an activation: another mesh over the same ranks, sharing the rendezvous and every
communicator whose group coincides.

An engine carves one world into several meshes (torchtitan: a data mesh, a non-expert mesh and
an expert mesh over the same ranks). ``ctx.view(mesh)`` activates such a mesh — any mesh of the
activation's size, usually one of its derived meshes (``unflatten``, ``flatten``,
``with_axes``), which keep every rank's number — without a second join: the view uses the
activation's store and coordinator, and a group that the activation (or another view of it)
already has a communicator for is served by that one. Only groups new to the activation get a
communicator, set up by their own ranks alone.

Example::

    with DeviceMesh(dp=4, tp=2).activate() as ctx:
        with ctx.view(ctx.mesh.unflatten("dp", rep=2, shard=2)) as v:
            topo.all_reduce(x, ("rep", "shard"))   # the activation's dp communicator
            topo.all_gather(x, "shard")            # a new communicator for the shard groups
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from topo.active import _ACTIVE
from topo.errors import CommunicationError, TopoTypeError, TopoValueError
from topo.mesh import DeviceMesh

if TYPE_CHECKING:
    from topo.context import MeshContext

__all__: list[str] = []


@contextmanager
def open_view(ctx: MeshContext, mesh: DeviceMesh) -> Iterator[MeshContext]:
    """A context of ``mesh`` over ``ctx``'s ranks and communicators, active on this thread
    inside the ``with`` block (``MeshContext.view`` delegates here).

    Example::

        with open_view(ctx, ctx.mesh.with_axes(ep=("dp", "tp"))) as v:
            topo.all_to_all(x, "ep")
    """
    if not isinstance(mesh, DeviceMesh):
        raise TopoTypeError(
            f"MeshContext.view requires a topo.DeviceMesh over the same ranks, but got "
            f"{type(mesh).__name__}; pass e.g. ctx.mesh.unflatten('dp', rep=2, shard=2)"
        )
    if mesh.size != ctx.mesh.size:
        raise TopoValueError(
            f"MeshContext.view requires a mesh of the activation's {ctx.mesh.size} ranks "
            f"({ctx.mesh}), but got {mesh} = {mesh.size}; derive it with unflatten, flatten "
            f"or with_axes, which keep every rank"
        )
    if ctx._closed:
        raise CommunicationError(
            f"MeshContext.view requires an open activation, but {ctx!r} is closed; call it "
            f"inside the `with mesh.activate() as ctx:` block"
        )
    root = ctx._root if ctx._root is not None else ctx
    view = type(ctx)(
        mesh,
        ctx.world,
        ctx.coordinator,
        ctx.timeout,
        ctx._device,
        backends=ctx.backends,
        check=ctx.check,
        store=ctx._root_store,
    )
    view.watchdog = ctx.watchdog
    view._root = root
    view._shared = root._shared  # the same communicators, by group
    view._check_channels = root._check_channels
    root._views.append(view)
    token = _ACTIVE.set((*_ACTIVE.get(), view))
    failed = True
    try:
        yield view
        failed = False
    finally:
        _ACTIVE.reset(token)
        view.close(abort=failed)
        if view in root._views:
            root._views.remove(view)
