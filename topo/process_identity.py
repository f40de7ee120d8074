"""Which process a rank is, and — for a process on this machine — whether it still lives.

Each rank publishes its identity when it joins an activation (:func:`identity`: the machine's
host name and boot id, the process id and its start time). After a failed collective, a
survivor on the same machine reads a silent peer's identity and looks at the process
(:func:`local_state`): gone (it died), stopped (SIGSTOP, a debugger) or alive (it waits in
another collective, or computes). A process on another machine is not looked at.

Example::

    note = identity()          # {"node": "gpu7/4c1f...", "pid": 4242, "start": 1234567}
    local_state(note)          # "alive"
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Any, Literal

__all__ = ["identity", "local_state", "node_id"]

State = Literal["gone", "stopped", "alive"]


def node_id() -> str:
    """This machine's identity: host name and boot id (two containers with one host name but
    different kernels differ; processes on one kernel share it).

    Example::

        node_id()   # "gpu7/4c1f2d9e-..."
    """
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{socket.gethostname()}/{boot}"


def identity() -> dict[str, Any]:
    """This process: ``{"node": node_id(), "pid": ..., "start": ...}`` (``start``, the start
    time in clock ticks since boot, tells a reused process id apart; 0 where unknown).

    Example::

        store.set(f"{prefix}/process/{rank}", json.dumps(identity()).encode())
    """
    stat = _stat(os.getpid())
    return {"node": node_id(), "pid": os.getpid(), "start": stat[1] if stat else 0}


def local_state(note: dict[str, Any]) -> State | None:
    """``"gone"``, ``"stopped"`` or ``"alive"`` for the process ``note`` describes (from
    :func:`identity`) when it ran on this machine; ``None`` when it ran elsewhere or this
    system has no ``/proc``.

    Example::

        local_state({"node": node_id(), "pid": 1, "start": 0})   # "alive" (init)
    """
    if not sys.platform.startswith("linux") or note.get("node") != node_id():
        return None
    try:
        pid, start = int(note["pid"]), int(note.get("start", 0))
    except (KeyError, TypeError, ValueError):
        return None
    stat = _stat(pid)
    if stat is None or (start and stat[1] != start):
        return "gone"  # no such process, or its id now belongs to another one
    if stat[0] in ("Z", "X", "x"):
        return "gone"  # exited, not yet reaped by its parent
    if stat[0] in ("T", "t"):
        return "stopped"
    return "alive"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a process from ``/proc/<pid>/stat``; None if absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces or parentheses: split after the last ")"
    fields = text.rsplit(")", 1)[1].split()
    try:
        return fields[0], int(fields[19])  # field 22 of the line: starttime
    except (IndexError, ValueError):
        return None
