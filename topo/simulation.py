"""``topo.simulate``: every rank of a mesh as a thread of this process, for tests.

(The module is ``topo.simulation``: a module ``topo.simulate`` would shadow the function
once imported, since importing a submodule sets the attribute of the same name on ``topo``.)

Each rank is a daemon thread with a fresh ``contextvars`` context in which the mesh is active
(``topo.current()``, ``topo.axis_index``, every collective, send/recv/ppermute/shift, barriers
and object collectives work as under ``topo.spawn``). The rendezvous store and the tensors move
in memory through one :class:`~topo.communicators.threads.ThreadHub`; CPU collectives go
through the ``threads`` backend, whose results equal gloo's bit for bit (see
``topo/communicators/threads.py``). Starting a 4-rank mesh costs about a millisecond, not the
seconds of starting processes, so hypothesis can afford hundreds of examples.
"""

from __future__ import annotations

import contextvars
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from topo._checks import as_seconds
from topo.communicators.threads import ThreadHub
from topo.context import activate
from topo.errors import RankFailedError, SimulationAborted, TopoTypeError, TopoValueError
from topo.mesh import DeviceMesh
from topo.world import World

__all__ = ["simulate"]

#: The largest mesh ``simulate`` runs: beyond it, threads sharing one interpreter stop being
#: a faithful or fast stand-in for processes.
MAX_SIMULATED_RANKS = 64

#: How long ``simulate`` waits for the other ranks to notice that one has failed (at most
#: the timeout): ranks waiting inside topo wake at once, ranks in user code may not.
_GRACE_SECONDS = 2.0


@dataclass
class _Outcome:
    size: int
    results: dict[int, Any] = field(default_factory=dict)
    # rank → (time, error, traceback) for errors of the rank's own (not SimulationAborted)
    failures: dict[int, tuple[float, BaseException, str]] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    # what the other ranks were waiting for when the first failure happened
    waiting: dict[int, str] = field(default_factory=dict)


def simulate(
    mesh: DeviceMesh, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of ``mesh``, each in its own thread of this
    process with that rank's mesh context active; return the results in rank order.

    CPU tensors only (the ``threads`` backend; CUDA collectives raise). ``timeout`` (seconds)
    bounds every wait inside the ranks and the whole call. If a rank raises, the others are
    woken and :class:`topo.RankFailedError` names the rank that failed first, with its
    traceback (``error.remote_traceback``); a rank that skips a collective makes the others
    time out naming it. ``TOPO_CHECK=1`` turns check mode on, as for ``mesh.activate``. The
    rank threads are daemon threads: one stuck in user code never blocks interpreter exit.

    Example::

        def step(scale):
            x = torch.ones(2) * (topo.axis_index("tp") + 1) * scale
            return topo.all_reduce(x, axis="tp")

        topo.simulate(topo.DeviceMesh(dp=2, tp=2), step, 10.0)   # 4 × tensor([30., 30.])
    """
    if not isinstance(mesh, DeviceMesh):
        raise TopoTypeError(
            f"topo.simulate mesh requires a topo.DeviceMesh, but got {type(mesh).__name__}"
        )
    if not callable(fn):
        raise TopoTypeError(
            f"topo.simulate fn requires a callable (the function every rank runs), but got "
            f"{type(fn).__name__} {fn!r}"
        )
    if mesh.size > MAX_SIMULATED_RANKS:
        raise TopoValueError(
            f"topo.simulate runs every rank as a thread of this process and supports meshes of "
            f"up to {MAX_SIMULATED_RANKS} ranks, but {mesh!r} has {mesh.size}: that many "
            f"threads share one interpreter and would be slow; test the same axes with smaller "
            f"sizes, or use topo.spawn (processes)"
        )
    seconds = as_seconds(timeout, "topo.simulate timeout")
    return _Simulation(mesh, fn, args, kwargs, seconds).run()


class _Simulation:
    def __init__(
        self,
        mesh: DeviceMesh,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
    ) -> None:
        self.mesh = mesh
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.hub = ThreadHub()
        self.outcome = _Outcome(mesh.size)

    def run(self) -> list[Any]:
        n = self.mesh.size
        threads = [
            threading.Thread(
                target=contextvars.Context().run,  # no context of the caller leaks in
                args=(self._rank_main, rank),
                name=f"topo-simulate-rank-{rank}",
                daemon=True,
            )
            for rank in range(n)
        ]
        for thread in threads:
            thread.start()
        hub, outcome = self.hub, self.outcome
        # A rank's own waits end at `timeout`; leave it time to report before giving up.
        deadline = time.monotonic() + self.timeout + min(self.timeout, 2.0)
        with hub.cond:
            while len(outcome.finished) < n and not outcome.failures:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                hub.cond.wait(left)
            if not outcome.failures and len(outcome.finished) == n:
                return [outcome.results[r] for r in range(n)]
            timed_out = not outcome.failures
            waiting = dict(hub.waiting)
        hub.abort("topo.simulate timed out" if timed_out else "another rank failed")
        end = time.monotonic() + min(_GRACE_SECONDS, self.timeout)
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
        with hub.cond:
            stuck = [r for r in range(n) if r not in outcome.finished]
            failures = dict(outcome.failures)
        if timed_out:
            raise self._timeout_error(stuck, waiting)
        raise self._failure_error(failures, stuck, outcome.waiting)

    def _rank_main(self, rank: int) -> None:
        hub, outcome = self.hub, self.outcome
        hub.local.rank = rank
        world = World(rank=rank, world_size=self.mesh.size)
        try:
            with activate(
                self.mesh,
                world,
                timeout=self.timeout,
                store=hub,
                backends={"cpu": "threads", "cuda": None},
            ):
                result = self.fn(*self.args, **self.kwargs)
        except BaseException as error:
            with hub.cond:
                outcome.finished.add(rank)
                if not isinstance(error, SimulationAborted):
                    if not outcome.failures:
                        outcome.waiting = {r: w for r, w in hub.waiting.items() if r != rank}
                    outcome.failures[rank] = (time.monotonic(), error, traceback.format_exc())
                hub.cond.notify_all()
            if not isinstance(error, SimulationAborted):
                hub.abort(f"rank {rank} failed ({type(error).__name__})")
            return
        with hub.cond:
            outcome.results[rank] = result
            outcome.finished.add(rank)
            hub.cond.notify_all()

    def _failure_error(
        self,
        failures: dict[int, tuple[float, BaseException, str]],
        stuck: list[int],
        waiting: dict[int, str],
    ) -> RankFailedError:
        order = sorted(failures, key=lambda r: (failures[r][0], r))
        first = order[0]
        _, error, trace = failures[first]
        lines = [f"rank {first} of {self.mesh!r} raised {type(error).__name__}: {error}"]
        for rank in order[1:]:
            other = failures[rank][1]
            text = str(other).splitlines()[0] if str(other) else ""
            lines.append(f"then rank {rank} raised {type(other).__name__}: {text}")
        if waiting:
            states = "; ".join(f"rank {r} waited for {w}" for r, w in sorted(waiting.items()))
            lines.append(f"at that moment {states}")
        if stuck:
            lines.append(
                f"rank(s) {stuck} were still running (in user code) when topo.simulate gave up; "
                f"they go on as daemon threads and do not block interpreter exit"
            )
        lines.append(f"--- traceback of rank {first} ---\n{trace}")
        return RankFailedError("\n".join(lines), rank=first, remote_traceback=trace)

    def _timeout_error(self, stuck: list[int], waiting: dict[int, str]) -> RankFailedError:
        hung = [r for r in stuck if r not in waiting]
        states = [
            f"rank {r} waits for {waiting[r]}" if r in waiting else f"rank {r} is in user code"
            for r in stuck
        ]
        return RankFailedError(
            f"topo.simulate timed out after {self.timeout:g} s: rank(s) {stuck} of "
            f"{self.mesh!r} did not finish ({'; '.join(states)}); a rank in user code hangs or "
            f"runs longer than the timeout: raise timeout= or look for a rank that waits on a "
            f"collective the others never call",
            rank=(hung or stuck)[0] if stuck else None,
        )
