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
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from datetime import timedelta
from typing import Any, NoReturn

from topo._checks import as_bool, as_seconds, as_str_mapping
from topo.communicators.rollcall import ROLL_CALL_SECONDS
from topo.errors import RankFailedError, RendezvousTimeout, TopoTypeError
from topo.mesh import DeviceMesh
from topo.world import LOOPBACK

__all__ = ["spawn"]

_LOOPBACK = LOOPBACK

#: After a first rank fails, how long spawn keeps listening to the others before it names the
#: culprit (a rank that only saw its peer vanish is not the cause): long enough for a rank whose
#: collective timed out at the same moment to hold its roll call and report what it found.
_SETTLE_SECONDS = ROLL_CALL_SECONDS + 4.0

#: Errors a rank raises because a peer failed, not of its own making.
_PEER_ERRORS = frozenset(
    {
        "CommunicationError",
        "CommunicationTimeout",
        "RendezvousError",
        "RendezvousTimeout",
        "StoreLostError",
        "CollectiveMismatchError",
    }
)


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
    variables to every rank; they are in the rank's environment from its first instruction,
    before it imports your script (and torch), as a launcher's would be. As torchrun does,
    each rank gets ``OMP_NUM_THREADS`` = max(1, cores // ranks) unless ``env`` or this
    process's environment sets it: ranks that each use every core's threads run several times
    slower. Every value in the ranks' store is authenticated with a fresh random secret that
    spawn hands to each rank over its private pipe (``TOPO_SECRET``, if set, is used
    instead); an activation a rank makes on another store — a bridge to a process outside
    the spawn — takes ``TOPO_SECRET`` or ``secret=`` as usual.

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
    inner = (
        seconds
        if activation_timeout is None
        else as_seconds(activation_timeout, "spawn activation_timeout")
    )
    share_gpu = as_bool(share_gpu, "spawn share_gpu")
    extra_env = as_str_mapping(env, "spawn env")
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if getattr(fn, "__module__", None) == "__main__" and not (
        main_file and os.path.isfile(main_file)
    ):
        raise TopoTypeError(
            f"spawn requires fn to be importable by the new processes, but {fn!r} is defined "
            f"in an interactive __main__ (python -c, a script read from stdin, a REPL or a "
            f"notebook); define it in a module file and import it"
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
        # A fresh secret per spawn, handed to the ranks over their private pipe (never a
        # command line): every store value of the job is then authenticated. A TOPO_SECRET the
        # caller set (in env or here) is used instead.
        given = "TOPO_SECRET" in self.env or "TOPO_SECRET" in os.environ
        self.secret = None if given else secrets.token_hex(16)
        self.procs: list[Any] = []
        self.conns: list[mpc.Connection] = []
        self.lifelines: list[mpc.Connection] = []

    def _child_env(self, rank: int) -> dict[str, str]:
        """What rank ``rank``'s process must see from its start: the caller's ``env``, a
        fair share of the cores for its OpenMP threads, and the shared-GPU NCCL variables."""
        env = dict(self.env)
        if "OMP_NUM_THREADS" not in env and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, _cores() // self.mesh.size))
        if self.share_gpu:
            env.update(NCCL_HOSTID=f"topo-rank-{rank}", NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1")
        return env

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
                    self._child_env(rank),
                    self.secret,
                )
                proc = context.Process(
                    target=_child_main,
                    args=(spec, child_end, life_read),
                    name=f"topo-rank-{rank}",
                    daemon=False,  # ranks may start processes (DataLoader workers) too
                )
                with _environment(spec.env):  # the new interpreter starts with it
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
        errors: dict[int, tuple[str, str, list[int]]] = {}  # rank -> (text, traceback, culprits)
        died: list[int] = []
        self.started: set[int] = set()  # ranks whose function began (they had activated)
        port_sent = False
        pending = set(range(n))
        settle_until: float | None = None  # after a first failure: gather the others' too
        while pending:
            now = time.monotonic()
            if settle_until is not None and now >= settle_until:
                break
            if now >= self.deadline:
                raise RankFailedError(self._timeout_message(pending), rank=self._stopped(pending))
            limit = min(self.deadline, settle_until or self.deadline) - now
            watch: list[Any] = [self.conns[r] for r in pending]
            watch += [self.procs[r].sentinel for r in pending]
            ready = mpc.wait(watch, timeout=min(limit, 1.0))
            for rank in sorted(pending):
                conn = self.conns[rank]
                message: Any = None
                if conn in ready or conn.poll():
                    try:
                        message = conn.recv()
                    except EOFError:
                        message = ("died",)  # closed its end without a result
                elif self.procs[rank].sentinel in ready and not conn.poll():
                    message = ("died",)
                if message is None:
                    continue
                kind = message[0]
                if kind == "port" and not port_sent:
                    for other in range(1, n):
                        self.conns[other].send(("port", message[1]))
                    port_sent = True
                elif kind == "started":
                    self.started.add(rank)
                elif kind == "result":
                    results[rank] = self._unpickle(rank, message[1])
                    pending.discard(rank)
                elif kind in ("error", "died"):
                    pending.discard(rank)
                    if kind == "died":
                        died.append(rank)
                        settle_until = time.monotonic()  # the cause is known: report it now
                        continue
                    culprits = [int(r) for r in message[3]] if len(message) > 3 else []
                    errors[rank] = (message[1], message[2], culprits)
                    if message[1].split(":")[0] not in _PEER_ERRORS:
                        settle_until = time.monotonic()  # an error of its own: the cause
                    elif settle_until is None:
                        settle_until = time.monotonic() + _SETTLE_SECONDS
        if errors or died:
            self._raise_culprit(errors, died, pending, set(results))
        return [results[r] for r in range(n)]

    def _raise_culprit(
        self,
        errors: dict[int, tuple[str, str, list[int]]],
        died: list[int],
        pending: set[int],
        finished: set[int],
    ) -> NoReturn:
        """Blame the cause, not the first to notice: a stopped rank, then a dead one, then one
        that raised an error of its own, before ranks that only saw a peer vanish."""
        stopped = self._stopped(pending)
        others = ", ".join(
            f"rank {r}: {errors[r][0].splitlines()[0][:160]}" for r in sorted(errors)
        )
        seen = f"; what the other ranks saw — {others}" if others else ""
        if stopped is not None:
            raise RankFailedError(
                f"rank {stopped} of {self.mesh!r} is stopped (process state T: SIGSTOP or a "
                f"debugger) and made its peers time out{seen}",
                rank=stopped,
            )
        if died:
            self._raise_died(died[0], seen)
        raise_cause(self.mesh, errors, finished=finished)

    def _stopped(self, ranks: set[int]) -> int | None:
        """The lowest of ``ranks`` whose process is stopped (Linux /proc), if any."""
        for rank in sorted(ranks):
            pid = self.procs[rank].pid
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{pid}/stat") as stat:
                    state = stat.read().rsplit(")", 1)[1].split()[0]
                if state in ("T", "t"):
                    return rank
        return None

    def _timeout_message(self, pending: set[int]) -> str:
        stopped = self._stopped(pending)
        why = f"; rank {stopped} is stopped (process state T)" if stopped is not None else ""
        return (
            f"topo.spawn timed out after {self.timeout:g} s: rank(s) {sorted(pending)} of "
            f"{self.mesh!r} had not finished{why}; raise timeout= or look for a rank that waits "
            f"on a collective the others never call"
        )

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

    def _raise_died(self, rank: int, seen: str = "") -> NoReturn:
        self.procs[rank].join(1.0)
        code = self.procs[rank].exitcode
        raise RankFailedError(
            f"rank {rank} of {self.mesh!r} died without a result (exit code "
            f"{code}{_signal_name(code)}); the other ranks were stopped. "
            f"{_death_hint(code, rank in self.started)}{seen}",
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


#: Serializes the brief change of this process's environment around a rank's start.
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _environment(extra: Mapping[str, str]) -> Any:
    """``os.environ`` with ``extra`` while the block runs (a process started inside inherits
    it from its first instruction); restored afterwards."""
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in extra}
        os.environ.update(extra)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def raise_cause(
    mesh: DeviceMesh,
    errors: dict[int, tuple[str, str, list[int]]],
    *,
    where: str = "",
    finished: Collection[int] = (),
) -> NoReturn:
    """Raise :class:`RankFailedError` for the cause among the ranks' ``errors`` (rank ->
    (text, traceback, the ranks its roll call blamed)): a rank with an error of its own, else
    the rank the survivors' roll calls name, followed from rank to rank, else the lowest.
    ``where`` goes after "is the cause" / "raised ..." (e.g. " in MeshActors.run(step)");
    ``finished`` are the ranks whose function returned. Shared by ``topo.spawn`` and
    ``topo.ray``, after each has named its stopped or dead ranks.

    Example::

        raise_cause(mesh, {0: ("CommunicationTimeout: ...", trace, [3])})   # names rank 3
    """
    own = [r for r, (text, _, _) in errors.items() if text.split(":")[0] not in _PEER_ERRORS]
    blamed = _most_blamed(errors)
    witness = None
    if blamed is not None:
        witness, blamed = _follow_blame(errors, blamed)
    if not own and blamed is not None and witness is not None:
        # The survivors' roll calls agree on a rank whose own error (if any) is only a
        # wait on others: it skipped a call, left early, or waits elsewhere; their
        # messages say which.
        text, trace, _ = errors[witness]
        if blamed in errors:
            state = f"it raised {errors[blamed][0].splitlines()[0][:300]}"
        else:
            state = "it finished its function" if blamed in finished else "it raised nothing"
        raise RankFailedError(
            f"rank {blamed} of {mesh!r} is the cause{where}, as rank {witness} found: {text}"
            f"\n(rank {blamed}: {state})\n--- traceback of rank {witness} ---\n{trace}",
            rank=blamed,
            remote_traceback=trace,
        )
    if own:
        rank = min(own)
    elif blamed is not None and blamed in errors:
        rank = blamed
    else:
        rank = min(errors)
    text, trace, _ = errors[rank]
    raise RankFailedError(
        f"rank {rank} of {mesh!r} raised {text}{where}\n--- traceback of rank {rank} ---\n"
        f"{trace}",
        rank=rank,
        remote_traceback=trace,
    )


def _most_blamed(errors: dict[int, tuple[str, str, list[int]]]) -> int | None:
    """The rank the survivors' roll calls name most often (the lowest on a tie), if any."""
    counts: dict[int, int] = {}
    for _, _, culprits in errors.values():
        for rank in culprits:
            counts[rank] = counts.get(rank, 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda r: (-counts[r], r))


def _follow_blame(
    errors: dict[int, tuple[str, str, list[int]]], blamed: int
) -> tuple[int | None, int]:
    """Follow the blame from rank to rank: a blamed rank that failed itself, waiting in another
    collective, names whom it waited for (rank 0 waits for rank 2 in a dp call, rank 2 waits
    for rank 3 in a tp call: the cause is rank 3). Returns (the witness that named the last
    rank, the last rank)."""
    witness = min((r for r, (_, _, named) in errors.items() if blamed in named), default=None)
    seen = {blamed}
    while blamed in errors:
        onward = [r for r in errors[blamed][2] if r not in seen]
        if not onward:
            break
        witness, blamed = blamed, min(onward)
        seen.add(blamed)
    return witness, blamed


def _death_hint(code: int | None, started: bool) -> str:
    """What a rank's death most likely means, from when it died and how."""
    if not started:
        return (
            "It died before its function began: a script that calls topo.spawn at top level "
            "needs `if __name__ == '__main__':` around the call, and the function must be "
            "importable by a new process"
        )
    if code is not None and code < 0 and -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
        return (
            "It crashed in native code during its function: gloo aborts the process when the "
            "ranks of a collective pass different shapes or dtypes, or call different "
            "collectives; run with TOPO_CHECK=1 (or env={'TOPO_CHECK': '1'}) to name the "
            "mismatch at the call"
        )
    if code is not None and code == -signal.SIGKILL:
        return (
            "It was killed (SIGKILL) during its function: the kernel's out-of-memory killer, "
            "or someone's kill -9"
        )
    return f"It exited during its function (os._exit or sys.exit with code {code}?)"


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
        secret: str | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.mesh = mesh
        self.payload = payload
        self.activation_timeout = activation_timeout
        self.share_gpu = share_gpu
        self.env = env
        self.secret = secret


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
    os.environ.update(spec.env)  # set at the process's start already (see _environment)
    _die_with_parent(lifeline)
    try:
        result = _run_rank(spec, conn)
        conn.send(("result", pickle.dumps(result)))
    except BaseException as error:
        if not getattr(error, "_topo_reported", False):
            _report_error(conn, error)
    finally:
        conn.close()


def _report_error(conn: mpc.Connection, error: BaseException) -> None:
    """Send the parent this rank's error: its text, traceback and the ranks it blames."""
    with contextlib.suppress(Exception):
        culprits = [int(r) for r in getattr(error, "culprits", ())]
        conn.send(("error", f"{type(error).__name__}: {error}", traceback.format_exc(), culprits))


def _run_rank(spec: _ChildSpec, conn: mpc.Connection) -> Any:
    from topo.secret import SPAWN_SECRET_VARIABLE
    from topo.store import host_store, listen_socket
    from topo.world import World

    wait = timedelta(seconds=spec.activation_timeout)
    store = None
    if spec.rank == 0:
        # Listens on loopback only: the local ranks are all that ever reach it.
        store = host_store(_LOOPBACK, listen_socket(_LOOPBACK, 0), wait)
        port = store.port
        conn.send(("port", port))
    else:
        if not conn.poll(spec.activation_timeout):
            raise RendezvousTimeout(
                f"rank {spec.rank} got no rendezvous port from the parent within "
                f"{spec.activation_timeout:g} s (rank 0 did not start its store)"
            )
        port = conn.recv()[1]
    if spec.secret is not None:
        # Every activation on this spawn's store (nested ones too) uses the secret; one on
        # another store (a bridge to a process outside the spawn) does not.
        os.environ[SPAWN_SECRET_VARIABLE] = f"{port}:{spec.secret}"
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
            conn.send(("started",))
            try:
                return fn(*args)
            except BaseException as error:
                # Now, not after the activation closes: rank 0 (the store's host) lingers
                # there for its peers, and the parent names the culprit from what arrives.
                _report_error(conn, error)
                with contextlib.suppress(Exception):
                    error._topo_reported = True  # type: ignore[attr-defined]
                raise
    finally:
        del store
