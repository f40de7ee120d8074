"""Who am I: this process's place in the launch, read from the launcher's environment.

A :class:`World` is a frozen value: rank, world size, local rank, local world size and the
address of the rendezvous store. :meth:`World.from_env` reads it from torchrun, Slurm or
OpenMPI variables; arguments given explicitly win over the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from topo._checks import as_bool, as_host, as_int, as_port
from topo.errors import TopoTypeError, TopoValueError, WorldError

__all__ = ["World", "WorldError"]

LOOPBACK = "127.0.0.1"


@attrs.frozen
class World:
    """This process's place in a launch.

    ``master_addr``/``master_port`` locate the rendezvous store: rank 0 hosts it there unless
    ``store_hosted_externally`` is set (torchrun's agent hosts its own store and tells workers
    so with ``TORCHELASTIC_USE_AGENT_STORE=True``).

    Example::

        >>> World(rank=1, world_size=4).local_rank
        1
        >>> World(rank=5, world_size=8, local_rank=1, local_world_size=4).node_rank
        1
    """

    rank: int
    world_size: int
    local_rank: int = attrs.field(default=attrs.Factory(lambda self: self.rank, takes_self=True))
    local_world_size: int = attrs.field(
        default=attrs.Factory(lambda self: self.world_size, takes_self=True)
    )
    master_addr: str = LOOPBACK
    master_port: int = 29500
    store_hosted_externally: bool = False

    def __attrs_post_init__(self) -> None:
        # Canonical ints (a NumPy integer becomes an int), so equal worlds compare and hash equal.
        for field in ("rank", "local_rank", "world_size", "local_world_size"):
            minimum = 1 if field.endswith("size") else 0
            value = as_int(getattr(self, field), f"World {field}", minimum=minimum)
            object.__setattr__(self, field, value)
        object.__setattr__(self, "master_port", as_port(self.master_port, "World master_port"))
        as_host(self.master_addr, "World master_addr")
        as_bool(self.store_hosted_externally, "World store_hosted_externally")
        if self.rank >= self.world_size:
            raise TopoValueError(
                f"World requires rank < world_size, but got rank {self.rank} and world_size "
                f"{self.world_size}"
            )
        if self.local_rank >= self.local_world_size:
            raise TopoValueError(
                f"World requires local_rank < local_world_size, but got local_rank "
                f"{self.local_rank} and local_world_size {self.local_world_size}"
            )
        if self.local_world_size > self.world_size:
            raise TopoValueError(
                f"World requires local_world_size <= world_size, but got local_world_size "
                f"{self.local_world_size} and world_size {self.world_size}"
            )

    @property
    def node_rank(self) -> int:
        """Index of this process's node when every node runs ``local_world_size`` ranks.

        Example::

            >>> World(rank=6, world_size=8, local_rank=2, local_world_size=4).node_rank
            1
        """
        return self.rank // self.local_world_size

    @property
    def is_local(self) -> bool:
        """True when every rank runs on this node and the store is on the loopback address,
        so communication can stay on loopback.

        Example::

            >>> World(rank=0, world_size=4).is_local
            True
        """
        loopback = self.master_addr in ("localhost", "::1") or self.master_addr.startswith("127.")
        return self.is_single_node and loopback

    @property
    def is_single_node(self) -> bool:
        """True when every rank of the world runs on this node.

        Example::

            >>> World(rank=0, world_size=4).is_single_node
            True
        """
        return self.local_world_size == self.world_size

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **explicit: Any) -> World:
        """Read the world from torchrun, Slurm or OpenMPI variables; ``explicit`` values win.

        torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
        Slurm (srun) sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE or
        SLURM_TASKS_PER_NODE, SLURM_JOB_NODELIST (the first host is the master unless
        MASTER_ADDR is set). OpenMPI (mpirun) sets OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
        OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE. MASTER_ADDR/MASTER_PORT apply to
        every launcher.

        Example::

            >>> World.from_env({"RANK": "3", "WORLD_SIZE": "4", "MASTER_PORT": "1234"})
            World(rank=3, world_size=4, local_rank=3, local_world_size=4, master_addr='127.0.0.1', master_port=1234, store_hosted_externally=False)
        """
        environ = os.environ if env is None else env
        names = [f.name for f in attrs.fields(cls)]
        unknown = sorted(set(explicit) - set(names))
        if unknown:
            raise TopoTypeError(
                f"World.from_env got unknown argument(s) {unknown}; valid ones are {names}"
            )
        launcher, read, variables = next(
            (entry for entry in _LAUNCHERS if entry[2]["rank"] in environ), _LAUNCHERS[0]
        )
        found = read(environ)
        if environ.get("MASTER_ADDR"):  # an empty variable counts as unset, as for torchrun
            addr = environ["MASTER_ADDR"]
            if addr != addr.strip() or any(c.isspace() for c in addr):
                raise WorldError(
                    f"environment variable MASTER_ADDR requires rank 0's host name or address "
                    f"without blanks, but got {addr!r}; set it (e.g. MASTER_ADDR=127.0.0.1 for "
                    f"one machine) or unset it"
                )
            found["master_addr"] = addr
        port = _read_int(environ, "MASTER_PORT")
        if port is not None:
            found["master_port"] = port
        found.update(explicit)
        for key in ("rank", "world_size"):
            if key not in found:
                raise WorldError(
                    f"World.from_env requires the {key.replace('_', ' ')}, but found no "
                    f"{variables[key]}: launch with torchrun, srun or mpirun, set "
                    f"{variables[key]}, or pass {key}=... explicitly"
                )
        try:
            world = cls(**found)
        except ValueError as error:
            used = ", ".join(
                f"{var}={environ[var]}"
                for field, var in variables.items()
                if var in environ and field not in explicit
            )
            if not used:
                raise  # the explicit arguments alone are at fault: World's own message says so
            given = f" and the explicit {sorted(explicit)}" if explicit else ""
            raise WorldError(
                f"{error}; the values came from the {launcher} environment ({used}){given}: fix "
                f"those variables or pass explicit values"
            ) from None
        if world.local_world_size < world.world_size and "master_addr" not in found:
            raise WorldError(
                f"World.from_env requires MASTER_ADDR for a world that spans nodes "
                f"({world.world_size} ranks, {world.local_world_size} on this node), but found "
                f"none: export MASTER_ADDR=<address of rank 0's node> on every rank"
            )
        return world


def _read_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise WorldError(
            f"environment variable {name} requires an integer, but got {raw!r}"
        ) from None


def _collect(env: Mapping[str, str], names: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, var in names.items():
        value = _read_int(env, var)
        if value is not None:
            out[field] = value
    return out


def _torchrun(env: Mapping[str, str]) -> dict[str, Any]:
    out = _collect(env, _TORCHRUN_VARS)
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        out["store_hosted_externally"] = True
    return out


def _slurm(env: Mapping[str, str]) -> dict[str, Any]:
    out = _collect(env, _SLURM_VARS)
    if not out:
        return out
    per_node = _read_int(env, "SLURM_NTASKS_PER_NODE")
    if per_node is None and env.get("SLURM_TASKS_PER_NODE"):
        per_node = _slurm_tasks_on_node(env)
    if per_node is not None:
        out["local_world_size"] = per_node
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        out["master_addr"] = first_slurm_host(nodelist)
    return out


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks on this node from SLURM_TASKS_PER_NODE (e.g. ``"4(x2),3"``) and SLURM_NODEID."""
    counts: list[int] = []
    for part in env["SLURM_TASKS_PER_NODE"].split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise WorldError(
                f"environment variable SLURM_TASKS_PER_NODE requires a form like '4(x2),3', "
                f"but got {env['SLURM_TASKS_PER_NODE']!r}; set LOCAL_WORLD_SIZE instead"
            )
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _read_int(env, "SLURM_NODEID") or 0
    return counts[node] if node < len(counts) else None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list, expanding the bracket syntax.

    Example::

        >>> first_slurm_host("gpu[003-005,009],cpu1")
        'gpu003'
        >>> first_slurm_host("rack[1-2]-node[07-08]-ib")
        'rack1-node07-ib'
    """
    text = nodelist.strip()
    # The first host expression: runs of plain characters and bracketed id lists
    # ("prefix[ids]suffix", possibly several brackets), up to a separator.
    head = re.match(r"(?:[^,\[\]\s]|\[[^\[\]]*\])+", text)
    if head is None or not re.fullmatch(r"[,\s].*|", text[head.end() :], re.S):
        raise WorldError(
            f"environment variable SLURM_JOB_NODELIST requires a host list like 'node[01-04]', "
            f"but got {nodelist!r}; set MASTER_ADDR instead"
        )
    # Each bracketed id list contributes its first id (leading zeros kept).
    return re.sub(
        r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0].strip(), head.group(0)
    )


def _openmpi(env: Mapping[str, str]) -> dict[str, Any]:
    return _collect(env, _OPENMPI_VARS)


_TORCHRUN_VARS = {
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
    "local_world_size": "LOCAL_WORLD_SIZE",
}
_SLURM_VARS = {"rank": "SLURM_PROCID", "world_size": "SLURM_NTASKS", "local_rank": "SLURM_LOCALID"}
_OPENMPI_VARS = {
    "rank": "OMPI_COMM_WORLD_RANK",
    "world_size": "OMPI_COMM_WORLD_SIZE",
    "local_rank": "OMPI_COMM_WORLD_LOCAL_RANK",
    "local_world_size": "OMPI_COMM_WORLD_LOCAL_SIZE",
}

# Checked in this order: torchrun inside an srun allocation sees both, and its RANK is the one.
_LAUNCHERS: tuple[
    tuple[str, Callable[[Mapping[str, str]], dict[str, Any]], dict[str, str]], ...
] = (
    ("torchrun", _torchrun, _TORCHRUN_VARS),
    ("Slurm", _slurm, _SLURM_VARS),
    ("OpenMPI", _openmpi, _OPENMPI_VARS),
)
