"""One rank of a mesh inside a Ray actor: it hosts the store (rank 0), holds the activation
open on a thread of its own, and runs the driver's functions there.

The activation lives on one dedicated thread for the actor's whole life: ``mesh.activate`` is
entered there once, every function the driver sends runs there (inside it, so collectives
find the mesh), and it is left there at :meth:`RankActor.close`. A second call therefore finds
its communicators made and does not meet the other ranks again. Every reply is a plain tuple,
``("ok", value)`` or ``("error", text, traceback, culprits)``, so that an exception never
has to cross Ray's serialization: the driver (``topo.ray.collect``) turns it into a
:class:`topo.RankFailedError`.

Example::

    def step():
        state = topo.ray.rank_state()          # this rank's dict, kept across calls
        state["calls"] = state.get("calls", 0) + 1
        return topo.all_reduce(torch.ones(1), axis="tp")
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any

from topo.errors import RendezvousTimeout, TopoValueError
from topo.mesh import DeviceMesh
from topo.world import LOOPBACK, World

__all__ = ["RankActor", "rank_state"]

#: This rank's state dict, set on the rank's thread (see :func:`rank_state`).
_STATE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "topo_ray_rank_state", default=None
)

Reply = tuple[Any, ...]


def rank_state() -> dict[str, Any]:
    """This rank's own dict, kept for the actor's life: what a function sent by
    ``MeshActors.run`` stores there (a model, an optimizer, an open bridge) the next call
    finds again. Only inside a ``topo.ray`` rank.

    Example::

        def train_step(batch):
            state = topo.ray.rank_state()
            model = state.setdefault("model", make_model())
            ...
    """
    state = _STATE.get()
    if state is None:
        raise TopoValueError(
            "topo.ray.rank_state requires a call inside a topo.ray rank (a function run by "
            "topo.ray.MeshActors.run or topo.ray.spawn), but got a call outside one; fix by "
            "calling it from the function you send to the ranks"
        )
    return state


def _error(error: BaseException) -> Reply:
    """The reply for ``error``: its text, its traceback and the ranks its roll call blamed."""
    culprits = [int(r) for r in getattr(error, "culprits", ())]
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return ("error", f"{type(error).__name__}: {error}", trace, culprits)


class _Session(threading.Thread):
    """The thread that holds the activation and runs the jobs, one at a time."""

    def __init__(
        self,
        mesh: DeviceMesh,
        world: World,
        secret: str,
        timeout: float,
        device: int | None,
        state: dict[str, Any],
    ) -> None:
        super().__init__(name=f"topo-ray-rank-{world.rank}", daemon=True)
        self.mesh = mesh
        self.world = world
        self.secret = secret
        self.timeout = timeout
        self.device = device
        self.state = state
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Reply]] | None] = (
            queue.SimpleQueue()
        )
        self.ready: Future[dict[str, Any]] = Future()
        self.finished: Future[None] = Future()

    def run(self) -> None:
        _STATE.set(self.state)
        try:
            if self.device is not None:
                import torch

                torch.cuda.set_device(self.device)
            with self.mesh.activate(
                self.world,
                timeout=timedelta(seconds=self.timeout),
                secret=self.secret,
                device=self.device,
            ) as ctx:
                self.ready.set_result({"store_ops": ctx.coordinator.store.ops})
                self._serve()
        except BaseException as error:
            if not self.ready.done():
                self.ready.set_exception(error)
            self.finished.set_exception(error)
            return
        self.finished.set_result(None)

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, future = job
            try:
                future.set_result(("ok", fn()))
            except BaseException as error:  # its traceback from here: the function's frames
                future.set_result(_error(error))


class RankActor:
    """The body of one rank's Ray actor (``ray.remote(RankActor)``); the driver side is
    :class:`topo.ray.MeshActors`. Each method returns a reply tuple, never raises.

    Example::

        actor = ray.remote(RankActor).remote(topo.DeviceMesh(tp=2), 0)
        addr, port = ray.get(actor.host.remote(False, 60.0))[1]
    """

    def __init__(self, mesh: DeviceMesh, rank: int) -> None:
        self.mesh = mesh
        self.rank = rank
        self.state: dict[str, Any] = {}
        self._store: Any = None
        self._session: _Session | None = None

    def host(self, multi_node: bool, timeout: float) -> Reply:
        """Rank 0: host the rendezvous store on a port the kernel picks (held from now on, so
        no other program can take it) at this node's IP, or loopback for a one-node mesh;
        reply ``("ok", (address, port))``."""
        try:
            from topo.store import host_store, listen_socket

            if multi_node:
                import ray

                address = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
            else:
                address = LOOPBACK
            wait = timedelta(seconds=timeout)
            self._store = host_store(address, listen_socket(address, 0), wait)
            return ("ok", (address, int(self._store.port)))
        except BaseException as error:
            return _error(error)

    def activate(self, world: World, secret: str, timeout: float, use_gpu: bool) -> Reply:
        """Activate the mesh as ``world`` on this actor's thread (authenticated by
        ``secret``), within ``timeout`` seconds; reply ``("ok", facts)`` with the node, the
        process, the device and the store operations the join cost."""
        try:
            import ray

            device = None
            local = world.local_rank
            if use_gpu:
                from topo.ray.devices import gpu_device

                device = gpu_device(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
                # Ray's convention (OpenRLHF's too): LOCAL_RANK names the rank's GPU in its
                # process, so cuda:{LOCAL_RANK} is Ray's GPU; World.local_rank stays the
                # index on the node
                local = device
            from topo.secret import SPAWN_SECRET_VARIABLE

            # This actor's process is this rank's alone: its environment says who it is, as a
            # launcher's would (a nested mesh.activate() inside a function reads it).
            os.environ.update(
                {
                    "RANK": str(world.rank),
                    "WORLD_SIZE": str(world.world_size),
                    "LOCAL_RANK": str(local),
                    "LOCAL_WORLD_SIZE": str(world.local_world_size),
                    "MASTER_ADDR": world.master_addr,
                    "MASTER_PORT": str(world.master_port),
                    SPAWN_SECRET_VARIABLE: f"{world.master_port}:{secret}",
                }
            )
            session = _Session(self.mesh, world, secret, timeout, device, self.state)
            self._session = session
            session.start()
            try:
                facts = session.ready.result(timeout + 10.0)
            except FutureTimeout:
                if session.ready.done():  # the activation's own timeout: its message says more
                    raise
                raise RendezvousTimeout(
                    f"rank {self.rank} did not finish activating {self.mesh!r} within {timeout:g} s"
                ) from None
            facts.update(
                node_id=ray.get_runtime_context().get_node_id(),
                pid=os.getpid(),
                device=f"cuda:{device}" if device is not None else "cpu",
            )
            return ("ok", facts)
        except BaseException as error:
            return _error(error)

    def run(self, payload: tuple[Callable[..., Any], tuple[Any, ...]]) -> Reply:
        """Run ``fn(*args)`` on the rank's thread, inside the activation; reply its result."""
        session = self._session
        if session is None or session.finished.done():
            return _error(
                TopoValueError(
                    f"rank {self.rank} requires an open activation to run a function, but it "
                    f"has none (never activated, or closed)"
                )
            )
        fn, args = payload
        future: Future[Reply] = Future()
        session.jobs.put((lambda: fn(*args), future))
        return future.result()

    def close(self, timeout: float) -> Reply:
        """Leave the activation (a barrier with the other ranks), within ``timeout``."""
        session = self._session
        if session is None:
            return ("ok", None)
        session.jobs.put(None)
        try:
            try:
                session.finished.result(timeout)
            except FutureTimeout:
                raise RendezvousTimeout(
                    f"rank {self.rank} requires its function to return and every rank to "
                    f"leave {self.mesh!r} within {timeout:g} s to close, but it is still "
                    f"running or waiting for the others; collect every submitted call before "
                    f"close(), or give close() a longer timeout"
                ) from None
            return ("ok", None)
        except BaseException as error:
            return _error(error)
        finally:
            self._session = None
            self._store = None

    def ping(self) -> Reply:
        """Reply that the actor is alive (after the call it is running, if any: an actor
        runs one call at a time)."""
        return ("ok", (os.getpid(), time.monotonic()))
