"""``topo.ray.MeshActors``: one long-lived Ray actor per rank of a mesh, activated once.

The driver places the actors with the mesh's placement group (``topo.ray.placement``), lets
rank 0's actor host the rendezvous store at its node's address on a port the kernel picks,
and hands every actor its explicit :class:`topo.World` and a fresh secret; each actor then
activates the mesh on a thread it keeps (``topo.ray.rank``). ``run(fn, *args)`` sends a
function to every rank and returns the results in rank order; the activation stays open
between calls, so the second call meets nobody at the store again. A rank that raises, or an
actor that dies, ends the call with :class:`topo.RankFailedError` naming the rank, and every
actor is stopped (no rank is left waiting on the dead one).

Example::

    with topo.ray.MeshActors(topo.DeviceMesh(dp=2, tp=2)) as ranks:
        ranks.run(load_shard, "ckpt/")            # per-rank results, in rank order
        for batch in range(10):
            losses = ranks.run(train_step, batch)
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from topo._checks import as_seconds
from topo.errors import RankFailedError, TopoTypeError, TopoValueError
from topo.mesh import DeviceMesh
from topo.ray._require import require_ray
from topo.ray.collect import collect
from topo.ray.placement import RayPlan, place, ray_plan
from topo.ray.rank import RankActor
from topo.world import World

__all__ = ["MeshActors", "MeshRun"]


@functools.cache
def _remote_rank_class() -> Any:
    """``ray.remote(RankActor)``, made once per process (Ray exports it once per job)."""
    ray = require_ray()
    return ray.remote(RankActor)


class MeshRun:
    """A call sent to every rank by :meth:`MeshActors.submit`, not yet collected. Two meshes
    that must run together (a trainer and its inference engine, meeting on a bridge) submit
    both calls first and collect them afterwards.

    Example::

        sending = trainer.submit(send_weights_step)
        loading = inference.submit(load_weights_step)
        sending.result(timeout=60), loading.result(timeout=60)
    """

    def __init__(self, owner: MeshActors, refs: list[Any], what: str) -> None:
        self._owner = owner
        self._refs = refs
        self._what = what
        self._value: list[Any] | None = None

    def done(self) -> bool:
        """Whether every rank has replied (without waiting).

        Example::

            while not run.done():
                time.sleep(0.1)
        """
        if self._value is not None:
            return True
        ray = require_ray()
        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def result(self, timeout: float | None = None) -> list[Any]:
        """The per-rank results in rank order, waiting at most ``timeout`` seconds (None: as
        long as the ranks run; an actor that dies still ends the wait at once). Unlike
        ``Future.result``, a timeout is final: it stops every actor (a rank that has not
        answered by then is taken as stuck) and raises :class:`topo.RankFailedError`; poll
        with :meth:`done` instead.

        Example::

            losses = ranks.submit(train_step, 3).result(timeout=120)
        """
        if self._value is None:
            if self._owner._failure is not None:  # its actors are gone: say why
                self._owner._check_open("run")
            deadline = None
            if timeout is not None:
                deadline = time.monotonic() + as_seconds(timeout, f"{self._what} timeout")
            self._value = self._owner._collect(self._refs, deadline, self._what)
        return self._value


class MeshActors:
    """One Ray actor per rank of ``mesh``, each holding its activation open across calls.

    Each rank takes ``resources_per_rank`` (default ``{"CPU": 1}``) and ``num_gpus`` GPUs,
    placed ``ranks_per_node`` to a Ray node (default: the whole mesh on one node; see
    :func:`topo.ray.ray_plan`). ``activation_timeout`` bounds every wait inside the ranks
    (the rendezvous and each collective); ``start_timeout`` (default: ``activation_timeout``)
    bounds the start: placing the group, starting the actors and activating. ``runtime_env``
    is Ray's, for every actor (e.g. ``{"env_vars": {"PYTHONPATH": ...}}`` so that the
    workers import your module). A context manager; :meth:`close` ends it.

    Example::

        with topo.ray.MeshActors(topo.DeviceMesh(dp=2, tp=2), num_gpus=1) as ranks:
            ranks.run(topo.all_reduce, torch.ones(2), "tp")   # 4 × tensor([2., 2.])
            ranks.run(topo.all_reduce, torch.ones(2), "dp")   # no second rendezvous
    """

    def __init__(
        self,
        mesh: DeviceMesh,
        *,
        resources_per_rank: Mapping[str, float] | None = None,
        num_gpus: float = 0,
        ranks_per_node: int | None = None,
        activation_timeout: float = 300.0,
        start_timeout: float | None = None,
        runtime_env: Mapping[str, Any] | None = None,
    ) -> None:
        self.plan: RayPlan = ray_plan(mesh, ranks_per_node, resources_per_rank, num_gpus)
        self.mesh = mesh
        self.activation_timeout = as_seconds(activation_timeout, "MeshActors activation_timeout")
        start = (
            self.activation_timeout
            if start_timeout is None
            else as_seconds(start_timeout, "MeshActors start_timeout")
        )
        if runtime_env is not None and not isinstance(runtime_env, Mapping):
            raise TopoTypeError(
                f"MeshActors runtime_env requires a dict (Ray's runtime_env), but got "
                f"{type(runtime_env).__name__}; pass e.g. {{'env_vars': {{'PYTHONPATH': '.'}}}}"
            )
        self._ray = require_ray()
        self._group: Any = None
        self._handles: list[Any] = []
        self._failure: RankFailedError | None = None
        self._closed = False
        #: One rank's facts after activation: node id, pid, device, store operations.
        self.facts: list[dict[str, Any]] = []
        #: Each rank's world, as handed to its actor.
        self.worlds: tuple[World, ...] = ()
        try:
            self._start(time.monotonic() + start, dict(runtime_env or {}))
        except BaseException:
            self._stop()
            raise

    def __repr__(self) -> str:
        state = "failed" if self._failure else "closed" if self._closed else "open"
        return f"<MeshActors {self.mesh!r} on {self.plan.num_nodes} node(s) ({state})>"

    # ------------------------------------------------------------------ start

    def _start(self, deadline: float, runtime_env: dict[str, Any]) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        plan = self.plan
        self._group = place(plan, max(deadline - time.monotonic(), 1.0))
        remote = _remote_rank_class()
        for rank in range(self.mesh.size):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self._group,
                placement_group_bundle_index=plan.bundle_of_rank[rank],
                placement_group_capture_child_tasks=False,
            )
            options = plan.actor_options(rank)
            options.update(scheduling_strategy=strategy, max_restarts=0, max_task_retries=0)
            if runtime_env:
                options["runtime_env"] = runtime_env
            self._handles.append(remote.options(**options).remote(self.mesh, rank))
        limit = self.activation_timeout
        multi_node = plan.num_nodes > 1
        host = [self._handles[0].host.remote(multi_node, limit)]
        ((address, port),) = self._collect(host, deadline, "MeshActors start (rank 0's store)")
        secret = secrets.token_hex(16)  # every value in this mesh's store is authenticated
        worlds = []
        for rank in range(self.mesh.size):
            worlds.append(
                World(
                    rank=rank,
                    world_size=self.mesh.size,
                    local_rank=plan.local_ranks[rank],
                    local_world_size=plan.local_world_size,
                    master_addr=address,
                    master_port=port,
                )
            )
        self.worlds = tuple(worlds)
        use_gpu = plan.rank_resources.get("GPU", 0.0) > 0
        refs = [
            handle.activate.remote(world, secret, limit, use_gpu)
            for handle, world in zip(self._handles, worlds, strict=True)
        ]
        self.facts = self._collect(refs, deadline, "MeshActors start (activation)")

    # ------------------------------------------------------------------ calls

    @property
    def handles(self) -> tuple[Any, ...]:
        """The Ray actor handles, in rank order (to watch them, or ``ray.kill`` one in a
        test).

        Example::

            ray.kill(ranks.handles[1])   # the next run raises RankFailedError(rank=1)
        """
        return tuple(self._handles)

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Each rank's Ray node id, in rank order.

        Example::

            len(set(ranks.node_ids))   # how many Ray nodes the mesh spans
        """
        return tuple(str(f["node_id"]) for f in self.facts)

    def submit(self, fn: Callable[..., Any], *args: Any) -> MeshRun:
        """Send ``fn(*args)`` to every rank (it runs inside the activation there) and return
        at once; :meth:`MeshRun.result` collects the results.

        Example::

            pending = ranks.submit(train_step, 0)
            results = pending.result(timeout=60)
        """
        self._check_open("submit")
        if not callable(fn):
            raise TopoTypeError(
                f"MeshActors.run fn requires a callable, but got {type(fn).__name__}"
            )
        try:
            payload = self._ray.put((fn, args))  # once, shared by every rank
        except Exception as error:
            raise TopoTypeError(
                f"MeshActors.run requires fn and args that Ray can serialize, but serializing "
                f"them failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
            ) from None
        refs = [handle.run.remote(payload) for handle in self._handles]
        name = getattr(fn, "__qualname__", type(fn).__name__)
        return MeshRun(self, refs, f"MeshActors.run({name})")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        """Run ``fn(*args)`` on every rank, inside its open activation; return the results in
        rank order. ``timeout`` bounds the call (None: as long as the ranks run; a rank that
        fails or an actor that dies ends it at once). On failure every actor is stopped and
        :class:`topo.RankFailedError` names the rank.

        Example::

            ranks.run(topo.axis_index, "tp")   # [0, 1, 0, 1] on DeviceMesh(dp=2, tp=2)
        """
        return self.submit(fn, *args).result(timeout)

    def _collect(self, refs: list[Any], deadline: float | None, what: str) -> list[Any]:
        try:
            return collect(refs, self.mesh, deadline=deadline, what=what)
        except RankFailedError as error:
            if self._failure is None:
                self._failure = error
            self._stop()
            raise

    def _check_open(self, what: str) -> None:
        if self._failure is not None:
            raise RankFailedError(
                f"MeshActors.{what} requires live actors, but they were stopped after a "
                f"failure: {str(self._failure).splitlines()[0]}; fix by starting new MeshActors",
                rank=self._failure.rank,
            )
        if self._closed:
            raise TopoValueError(
                f"MeshActors.{what} requires open actors, but {self!r} is closed; fix by "
                f"starting new MeshActors"
            )

    # ------------------------------------------------------------------ ending

    def close(self, timeout: float | None = None) -> None:
        """Leave every rank's activation together (at most ``timeout`` seconds, default the
        activation timeout), then end the actors and remove the placement group. Idempotent;
        after a failure it only makes sure everything is gone.

        Example::

            ranks = topo.ray.MeshActors(mesh)
            try:
                ranks.run(step)
            finally:
                ranks.close()
        """
        if self._closed or self._failure is not None:
            self._stop()
            return
        seconds = (
            self.activation_timeout
            if timeout is None
            else as_seconds(timeout, "MeshActors.close timeout")
        )
        try:
            refs = [handle.close.remote(seconds) for handle in self._handles]
            self._collect(refs, time.monotonic() + seconds + 5.0, "MeshActors.close")
        finally:
            self._stop()

    def _stop(self) -> None:
        """End every actor and remove the placement group (never waits on a rank)."""
        self._closed = True
        ray = self._ray
        for handle in self._handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self._group)
            self._group = None

    def __enter__(self) -> MeshActors:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:  # the driver failed: ranks may be mid-call; never wait on them
            self._stop()
