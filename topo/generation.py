"""Activation attempts: each one opens under a fresh generation of its namespace.

Rank 0 draws the generation (a counter, or a random number when a secret is set: no counter
anyone could corrupt) and publishes it as ``{namespace}/open``; the other ranks join the open
generation, never a finished or failed one, so an attempt that failed or timed out never puts
later ones out of step. The generation is the middle of every key prefix of the attempt.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

from topo.errors import AuthenticationError, RendezvousTimeout, StoreLostError
from topo.store import BoundedStore
from topo.world import World

__all__ = ["is_connection_loss", "open_generation", "opening_alarm"]


def opening_alarm(namespace: str) -> str:
    """Where a rank that read a forged open key raises the alarm (the generation, and with it
    the activation's own alarm key, is not known yet).

    Example::

        store.alarm_key = opening_alarm("topo/dp2.tp2")   # "topo/dp2.tp2/alarm-opening"
    """
    return f"{namespace}/alarm-opening"


def open_generation(
    store: BoundedStore, world: World, namespace: str, deadline: float, label: str
) -> int:
    """The generation of this activation attempt: rank 0 draws a fresh one and opens it;
    the other ranks join the open one (never a finished or failed one).

    Example::

        generation = open_generation(store, world, "topo/dp2.tp2", deadline, "activation")
        prefix = f"topo/dp2.tp2/{generation}"
    """
    open_key = f"{namespace}/open"
    if world.rank == 0:
        with contextlib.suppress(RuntimeError):  # an earlier attempt's alarm is not this one's
            store.delete_key(opening_alarm(namespace))
        # with a secret no counter anyone could corrupt: a random generation (48 bits from the
        # OS's CSPRNG, as secrets.randbits draws them; that module costs every start 0.1 ms)
        generation = (
            int.from_bytes(os.urandom(6), "big")
            if store.sealed
            else store.add(f"{namespace}/round", 1)
        )
        store.set(open_key, str(generation).encode())
        return generation
    while True:
        left = deadline - time.monotonic()
        if left < 0.01:
            raise RendezvousTimeout(
                f"rank {world.rank} {label}: rank 0 did not open the activation within the "
                f"timeout: rank 0 did not arrive (is it running, with the same mesh and name?)"
            )
        try:
            store.wait([open_key], timedelta(seconds=left))
        except StoreLostError:
            raise
        except RuntimeError as error:
            if is_connection_loss(error):
                raise
            continue
        try:
            generation = int(store.get(open_key))
        except AuthenticationError:
            raise  # rank 0 has another secret (or none), or an intruder wrote it
        except (RuntimeError, ValueError):
            continue  # rank 0 closed it between our wait and get
        join = f"{namespace}/{generation}/barrier/join/all/0"
        if not store.check([f"{join}/done"]) and not store.check([f"{join}/failed"]):
            return generation
        time.sleep(0.01)  # a finished attempt's key not yet deleted: wait for the next one


def is_connection_loss(error: BaseException) -> bool:
    """Whether a store call's RuntimeError means the connection to the store broke.

    Example::

        except RuntimeError as error:
            if is_connection_loss(error):
                raise StoreLostError("...") from None
    """
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    return "DistNetworkError" in names or any(
        s in text for s in ("Connection reset", "Broken pipe", "likely closed", "Failed to recv")
    )
