"""What ``activate`` accepts, checked and put in canonical form (the activation's options).

Each helper turns one argument of :func:`topo.activate` (or its environment variable) into
the value the context uses, or raises topo's error naming the argument.

Example::

    _as_timedelta(30)          # timedelta(seconds=30)
    _as_check(None)            # TOPO_CHECK from the environment, else False
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

import topo._dist as dist
from topo._checks import as_bool, as_seconds, as_timedelta
from topo.errors import TopoTypeError, TopoValueError
from topo.world import World

#: Default bound on every wait of an activation (TOPO_TIMEOUT overrides, in seconds).
DEFAULT_TIMEOUT = timedelta(seconds=300)


def _as_timedelta(timeout: object) -> timedelta:
    if timeout is not None:
        return as_timedelta(timeout, "activate timeout")
    env = os.environ.get("TOPO_TIMEOUT")
    if not env:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(env)
    except ValueError:
        raise TopoValueError(
            f"TOPO_TIMEOUT requires a number of seconds, but got {env!r}; set it like "
            f"TOPO_TIMEOUT=300 or unset it"
        ) from None
    return as_timedelta(seconds, "TOPO_TIMEOUT")


def _torch_default_store(world: World) -> dist.Store | None:
    """The store of torch's default process group, when the user's own
    ``init_process_group`` already made one for this world: topo then rendezvouses on it
    (under its own key prefix) instead of hosting a second server on MASTER_PORT."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return None
    if torch_dist.get_world_size() != world.world_size or torch_dist.get_rank() != world.rank:
        return None
    try:
        from torch.distributed import distributed_c10d as c10d

        default_pg = c10d._world.default_pg
        name = c10d._world.pg_names.get(default_pg, "") if default_pg is not None else ""
        if str(name).startswith("topo:"):
            return None  # a default group a topo activation installed (torch interop)
        default: dist.Store = c10d._get_default_store()
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return None
    return default


def _as_watchdog(watchdog: object) -> float | None:
    if watchdog is None or watchdog is False:
        return None
    if watchdog is True:
        return 0.1
    return as_seconds(watchdog, "activate watchdog")


def _as_check(check: object) -> bool:
    if check is not None:
        return as_bool(check, "activate check")
    env = os.environ.get("TOPO_CHECK", "").strip().lower()
    if env in ("", "0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    raise TopoValueError(
        f"TOPO_CHECK requires 1 or 0 (true/false, yes/no, on/off), but got "
        f"{os.environ['TOPO_CHECK']!r}; set TOPO_CHECK=1 to turn check mode on"
    )


def _as_cuda_device(device: torch.device | str | int | None) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TopoTypeError(
            f"activate device requires a torch.device, a str like 'cuda:0' or an int, but got "
            f"{type(device).__name__} {device!r}"
        )
    if isinstance(device, int) and device < 0:
        raise TopoValueError(
            f"activate device requires a CUDA device index >= 0 (or 'cuda:N'), but got {device}"
        )
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError):
        raise TopoValueError(
            f"activate device requires a device like 'cuda:0' or an index, but got {device!r}"
        ) from None
    if dev.type != "cuda":
        raise TopoValueError(
            f"activate device requires a CUDA device (CPU tensors always use gloo), but got "
            f"{dev}; pass device='cuda:0' or leave it out"
        )
    return dev if dev.index is not None else None
