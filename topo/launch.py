"""``topo.spawn``: run one function on every rank of a mesh, in local processes.

For tests, scripts and one-machine runs. Rank 0 hosts the rendezvous store on a port the
kernel gives it (held from the moment it is bound, so concurrent spawns never collide) and
reports it; the parent passes it on to the other ranks. Each rank activates the mesh, runs
the function inside it and sends back its return value (pickled: tensors come back intact).
If a rank raises or dies, the parent ends every other rank and raises
:class:`topo.RankFailedError` naming the rank, with its traceback. No child outlives the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, NoReturn

from topo._checks import as_bool, as_seconds, as_str_mapping
from topo.errors import RankFailedError, RendezvousTimeout, TopoTypeError
from topo.mesh import DeviceMesh
from topo.world import LOOPBACK

__all__ = ["spawn"]

_LOOPBACK = LOOPBACK


def spawn(
    fn: Callable[..., Any],
    mesh: DeviceMesh,
    *args: Any,
    timeout: float = 300.0,
    activation_timeout: float | None = None,
    share_gpu: bool = False,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on every rank of ``mesh`` in local processes; return the per-rank
    results in rank order.

    Each of the ``mesh.size`` processes (spawn start method) activates ``mesh`` and calls
    ``fn`` inside it, so ``fn`` can use collectives directly. ``fn`` and ``args`` must be
    picklable (a module-level function). ``timeout`` bounds the whole call in seconds;
    ``activation_timeout`` (default: ``timeout``) bounds each wait inside the ranks.
    ``share_gpu=True`` lets all ranks share GPU 0 for NCCL correctness tests (each rank gets
    its own ``NCCL_HOSTID``, with ``NCCL_P2P_DISABLE=1`` and ``NCCL_SHM_DISABLE=1``, so NCCL
    treats them as separate hosts; slow, but real multi-rank NCCL). ``env`` adds environment
    variables to every rank.

    Example::

        def work():
            return topo.all_reduce(torch.ones(2), axis="tp")

        results = topo.spawn(work, topo.DeviceMesh(dp=2, tp=2))   # 4 × tensor([2., 2.])
    """
    if not isinstance(mesh, DeviceMesh):
        raise TopoTypeError(f"spawn mesh requires a topo.DeviceMesh, but got {type(mesh).__name__}")
    if not callable(fn):
        raise TopoTypeError(f"spawn fn requires a callable, but got {type(fn).__name__}")
    seconds = as_seconds(timeout, "spawn timeout")
    inner = seconds if activation_timeout is None else as_seconds(
        activation_timeout, "spawn activation_timeout"
    )
    share_gpu = as_bool(share_gpu, "spawn share_gpu")
    extra_env = as_str_mapping(env, "spawn env")
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise TopoTypeError(
            f"spawn requires fn to be importable by the new processes, but {fn!r} is defined "
            f"in an interactive __main__ (python -c, a REPL or a notebook); define it in a "
            f"module file and import it"
        )
    try:
        payload = pickle.dumps((fn, args))
    except Exception as error:
        raise TopoTypeError(
            f"spawn requires a picklable fn and args (a module-level function), but pickling "
            f"failed: {error}"
        ) from None
    return _Launch(mesh, payload, seconds, inner, share_gpu, extra_env).run()


class _Launch:
    def __init__(
        self,
        mesh: DeviceMesh,
        payload: bytes,
        timeout: float,
        activation_timeout: float | None,
        share_gpu: bool,
        env: Mapping[str, str] | None,
    ) -> None:
        self.mesh = mesh
        self.payload = payload
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.activation_timeout = activation_timeout or timeout
        self.share_gpu = share_gpu
        self.env = dict(env or {})
        self.procs: list[Any] = []
        self.conns: list[mpc.Connection] = []
        self.lifelines: list[mpc.Connection] = []

    def run(self) -> list[Any]:
        context = mp.get_context("spawn")
        n = self.mesh.size
        try:
            for rank in range(n):
                parent_end, child_end = context.Pipe(duplex=True)
                life_read, life_write = context.Pipe(duplex=False)
                spec = _ChildSpec(
                    rank,
                    n,
                    self.mesh,
                    self.payload,
                    self.activation_timeout,
                    self.share_gpu,
                    self.env,
                )
                proc = context.Process(
                    target=_child_main,
                    args=(spec, child_end, life_read),
                    name=f"topo-rank-{rank}",
                    daemon=False,  # ranks may start processes (DataLoader workers) too
                )
                proc.start()
                child_end.close()
                life_read.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
                self.lifelines.append(life_write)
            return self._collect()
        finally:
            self._shutdown()

    def _collect(self) -> list[Any]:
        n = self.mesh.size
        results: dict[int, Any] = {}
        port_sent = False
        pending = set(range(n))
        while pending:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailedError(
                    f"topo.spawn timed out after {self.timeout:g} s: rank(s) {sorted(pending)} "
                    f"of {self.mesh!r} had not finished; raise timeout= or look for a rank "
                    f"that waits on a collective the others never call"
                )
            watch: list[Any] = [self.conns[r] for r in pending]
            watch += [self.procs[r].sentinel for r in pending]
            ready = mpc.wait(watch, timeout=min(remaining, 1.0))
            for rank in sorted(pending):
                conn = self.conns[rank]
                if conn in ready or conn.poll():
                    try:
                        message = conn.recv()
                    except EOFError:
                        # The rank closed its end without sending a result: it died.
                        self._raise_died(rank)
                    kind = message[0]
                    if kind == "port" and not port_sent:
                        for other in range(1, n):
                            self.conns[other].send(("port", message[1]))
                        port_sent = True
                    elif kind == "result":
                        results[rank] = self._unpickle(rank, message[1])
                        pending.discard(rank)
                    elif kind == "error":
                        raise RankFailedError(
                            f"rank {rank} of {self.mesh!r} raised {message[1]}\n"
                            f"--- traceback of rank {rank} ---\n{message[2]}",
                            rank=rank,
                            remote_traceback=message[2],
                        )
                elif self.procs[rank].sentinel in ready and not self.conns[rank].poll():
                    self._raise_died(rank)
        return [results[r] for r in range(n)]

    def _unpickle(self, rank: int, data: bytes) -> Any:
        try:
            return pickle.loads(data)  # our own child's result
        except Exception as error:
            raise RankFailedError(
                f"rank {rank} of {self.mesh!r} returned a result the parent cannot unpickle "
                f"({type(error).__name__}: {error}); return plain Python values or tensors of "
                f"dtypes this torch can load",
                rank=rank,
            ) from None

    def _raise_died(self, rank: int) -> NoReturn:
        self.procs[rank].join(1.0)
        code = self.procs[rank].exitcode
        raise RankFailedError(
            f"rank {rank} of {self.mesh!r} died without a result (exit code "
            f"{code}{_signal_name(code)}); the other ranks were stopped. A script that calls "
            f"topo.spawn at top level needs `if __name__ == '__main__':` around the call",
            rank=rank,
        )

    def _shutdown(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        end = time.monotonic() + 5.0
        for proc in self.procs:
            proc.join(max(0.0, end - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self.conns + self.lifelines:
            conn.close()


def _signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return ""
    try:
        return f", killed by {signal.Signals(-code).name}"
    except ValueError:
        return ""


class _ChildSpec:
    def __init__(
        self,
        rank: int,
        world_size: int,
        mesh: DeviceMesh,
        payload: bytes,
        activation_timeout: float,
        share_gpu: bool,
        env: dict[str, str],
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.mesh = mesh
        self.payload = payload
        self.activation_timeout = activation_timeout
        self.share_gpu = share_gpu
        self.env = env


def _die_with_parent(lifeline: mpc.Connection) -> None:
    """End this process when the parent goes away (Linux: at once; elsewhere via the pipe)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv()
        os._exit(1)

    threading.Thread(target=watch, name="topo-lifeline", daemon=True).start()


def _child_main(spec: _ChildSpec, conn: mpc.Connection, lifeline: mpc.Connection) -> None:
    os.environ.update(spec.env)  # before anything imports torch: OMP_NUM_THREADS etc. apply
    _die_with_parent(lifeline)
    try:
        result = _run_rank(spec, conn)
        conn.send(("result", pickle.dumps(result)))
    except BaseException as error:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(error).__name__}: {error}", traceback.format_exc()))
    finally:
        conn.close()


def _run_rank(spec: _ChildSpec, conn: mpc.Connection) -> Any:
    import topo._dist as dist
    from topo.world import World

    if spec.share_gpu:
        os.environ.update(
            {
                "NCCL_HOSTID": f"topo-rank-{spec.rank}",
                "NCCL_P2P_DISABLE": "1",
                "NCCL_SHM_DISABLE": "1",
            }
        )
    wait = timedelta(seconds=spec.activation_timeout)
    store = None
    if spec.rank == 0:
        store = dist.TCPStore(
            _LOOPBACK, 0, None, True, wait, wait_for_workers=False, multi_tenant=True
        )
        port = store.port
        conn.send(("port", port))
    else:
        if not conn.poll(spec.activation_timeout):
            raise RendezvousTimeout(
                f"rank {spec.rank} got no rendezvous port from the parent within "
                f"{spec.activation_timeout:g} s (rank 0 did not start its store)"
            )
        port = conn.recv()[1]
    os.environ.update(
        {
            "RANK": str(spec.rank),
            "WORLD_SIZE": str(spec.world_size),
            "LOCAL_RANK": str(spec.rank),
            "LOCAL_WORLD_SIZE": str(spec.world_size),
            "MASTER_ADDR": _LOOPBACK,
            "MASTER_PORT": str(port),
        }
    )
    world = World(
        rank=spec.rank,
        world_size=spec.world_size,
        master_addr=_LOOPBACK,
        master_port=port,
    )
    fn, args = pickle.loads(spec.payload)
    device = "cuda:0" if spec.share_gpu else None
    try:
        with spec.mesh.activate(world, timeout=wait, device=device):
            return fn(*args)
    finally:
        del store
