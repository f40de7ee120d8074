"""A rendezvous wait's verdict: which ranks did not arrive.

Every wait of a :class:`~topo.coordinator.Coordinator` is bounded by the activation's timeout.
The first rank to time out publishes its verdict (the ranks that did not arrive) in the store
and wakes the ranks still waiting by setting the keys they wait for; they read the verdict and
end with it, at once and naming the same ranks, instead of each timing out on its own (or
reading a lost connection when the store's host has gone). The store's host stays up a
moment (:data:`LINGER_SECONDS`) until the others have read it.

Example::

    wait_or_verdict(coordinator, [f"{base}/done"], "barrier 'join'", members, f"{base}/arrived")
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn, Protocol

from topo.errors import RendezvousTimeout, StoreLostError
from topo.generation import is_connection_loss
from topo.store import BoundedStore

__all__ = ["GRACE_SECONDS", "LINGER_SECONDS", "end_if_judged", "wait_or_verdict"]

#: How long the store's host stays up after a rendezvous failed, so that the ranks still
#: waiting read its verdict (which ranks did not arrive) instead of a lost connection.
LINGER_SECONDS = 5.0

#: How much longer a rank that timed out waits when every member has arrived but the round
#: is not complete (its last step, by the last rank to arrive, may be under way).
GRACE_SECONDS = 2.0

#: What a rank that timed out writes into the keys its peers still wait for, to wake them
#: (they then read its verdict).
_WAKE = b"topo:failed"


class Waiter(Protocol):
    """What a verdict needs of the rank that waits (a :class:`~topo.coordinator.Coordinator`)."""

    store: BoundedStore
    timeout: timedelta
    label: str
    hosts_store: bool

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...


def wait_or_verdict(
    waiter: Waiter,
    keys: list[str],
    what: str,
    members: Sequence[int],
    arrived: str | None,
    *,
    verdict: str | None = None,
    wake: list[str] | None = None,
    completer: int | None = None,
) -> None:
    """Wait for ``keys`` at most the waiter's timeout. The first rank to time out publishes
    its verdict (which ``members`` have no key under ``arrived``) at ``verdict`` (default:
    ``failed`` beside the first key) and sets the keys in ``wake`` (default: ``keys``), so
    every other waiter wakes at once and ends with that verdict. Waiters that wait for
    different keys in one round must pass the same ``verdict`` and ``wake``.

    When every member has arrived but ``keys`` are still unset, the rank that completes the
    round is late or stopped right after arriving: it gets :data:`GRACE_SECONDS` more, then
    the verdict names it (``completer``, where the round has a fixed one).

    Example::

        wait_or_verdict(coord, [f"{base}/{r}" for r in members], "all_gather_json", members, base)
    """
    store = waiter.store
    seconds = waiter.timeout.total_seconds()
    verdict_key = verdict or f"{keys[0].rsplit('/', 1)[0]}/failed"
    if _set_within(store, keys, seconds):
        end_if_judged(waiter, verdict_key, what)  # woken by a rank that timed out
        return
    end_if_judged(waiter, verdict_key, what)
    forged = store.alarm()
    if forged is not None:  # a forged store value, refused by this rank or a peer
        raise forged
    missing = list(members)
    if arrived is not None:
        with contextlib.suppress(RuntimeError):  # the store itself may be gone
            missing = [r for r in members if not store.check([f"{arrived}/{r}"])]
        # A waiter that timed out a moment earlier may have woken the waits with marks in
        # the arrival keys: it set its verdict first, so follow that one.
        end_if_judged(waiter, verdict_key, what)
        if not missing and _set_within(store, keys, GRACE_SECONDS):
            end_if_judged(waiter, verdict_key, what)
            return  # the round's last step came just after this rank's timeout
    stalled = None if missing else completer
    verdict_value = {"missing": missing, "by": waiter.rank, "arrived": len(members) - len(missing),
                     "seconds": seconds, "stalled": stalled}  # fmt: skip
    _publish(waiter, verdict_key, verdict_value, wake or keys)
    raise RendezvousTimeout(
        f"{waiter.label}: {what} timed out after {seconds:g} s on rank {waiter.rank}: "
        f"{_absent(missing, stalled, members)}; check that they are running and call the same "
        f"topo operations in the same order, or raise the timeout"
    )


def _set_within(store: BoundedStore, keys: list[str], seconds: float) -> bool:
    """Whether ``keys`` are all set within ``seconds`` (a lost store still raises)."""
    try:
        store.wait(keys, timedelta(seconds=seconds))
    except StoreLostError:
        raise
    except RuntimeError as error:
        if is_connection_loss(error):
            raise
        return False
    return True


def _absent(missing: list[int], stalled: int | None, members: Sequence[int] | None) -> str:
    """Who kept a round from completing, for a message."""
    of = "" if members is None else f" of {short(list(members))}"
    if missing:
        return f"rank(s) {short(missing)}{of} did not arrive"
    if stalled is not None:
        return (
            f"every rank{of} arrived, but rank {stalled}, which completes the round, did not "
            f"complete it (it stopped or died right after arriving?)"
        )
    return (
        f"every rank{of} arrived, but the round was not completed: the rank that completes it "
        f"stopped or died right after arriving"
    )


def end_if_judged(waiter: Waiter, key: str, what: str) -> None:
    """If a rank that timed out has published its verdict at ``key``: read it, say so (the
    store's host may be waiting for that) and raise it as this rank's
    :class:`~topo.errors.RendezvousTimeout`. Otherwise return.

    Example::

        end_if_judged(coord, f"{base}/failed", "barrier 'join'")   # the last to arrive
        coord.store.set(f"{base}/done", b"1")
    """
    if waiter.store.check([key]):
        _follow(waiter, key, what)


def _follow(waiter: Waiter, key: str, what: str) -> NoReturn:
    """Read the verdict at ``key``, mark it read, and raise it."""
    store = waiter.store
    seconds, stalled = waiter.timeout.total_seconds(), None
    try:
        verdict = json.loads(store.get(key))
        missing = [int(r) for r in verdict["missing"]]
        by, arrived = int(verdict["by"]), int(verdict["arrived"])
        seconds = float(verdict.get("seconds", seconds))  # the timeout of the rank that judged
        stalled = None if verdict.get("stalled") is None else int(verdict["stalled"])
    except (ValueError, KeyError, TypeError, AttributeError):
        missing, by, arrived = [], -1, 0
    with contextlib.suppress(Exception):
        if store.sealed:
            store.set_within(f"{key}/read/{waiter.rank}", b"1", 2.0)
        else:
            store.add(f"{key}/read", 1)
    _linger(waiter, key, arrived)
    absent = (
        f" waiting for rank(s) {short(missing)}, which did not arrive"
        if missing
        else f": {_absent(missing, stalled, None)}"
    )
    raise RendezvousTimeout(
        f"{waiter.label}: {what} failed on rank {waiter.rank}: rank {by} timed out after "
        f"{seconds:g} s{absent}; check that they are running and call the same topo "
        f"operations in the same order, or raise the timeout"
    )


def _publish(waiter: Waiter, key: str, verdict: dict[str, Any], wake: list[str]) -> None:
    """Tell the ranks still waiting which ranks did not arrive (and wake them by setting
    the keys they wait for); the store's host then stays up until they have read it (at
    most :data:`LINGER_SECONDS`)."""
    store = waiter.store
    with contextlib.suppress(Exception):
        store.set(key, json.dumps(verdict).encode())
        for awaited in wake:
            if not store.check([awaited]):
                store.set(awaited, _WAKE)
        _linger(waiter, key, verdict["arrived"])


def _linger(waiter: Waiter, key: str, arrived: int) -> None:
    if not waiter.hosts_store:
        return
    end = time.monotonic() + LINGER_SECONDS
    with contextlib.suppress(Exception):
        while time.monotonic() < end and _readers(waiter, key) < arrived - 1:
            time.sleep(0.05)


def _readers(waiter: Waiter, key: str) -> int:
    """How many ranks have read the verdict at ``key`` (with a secret: their own marks, not a
    counter anyone could corrupt)."""
    store = waiter.store
    if not store.sealed:
        return store.add(f"{key}/read", 0)
    others = [r for r in range(waiter.world_size) if r != waiter.rank]
    return sum(store.check_within([f"{key}/read/{r}"], 2.0) for r in others)


def short(ranks: list[int]) -> str:
    """A rank list for a message: in full up to 16 ranks, else the first 16 and the count.

    Example::

        short([3])   # '[3]'
    """
    if len(ranks) <= 16:
        return str(ranks)
    return f"[{', '.join(map(str, ranks[:16]))}, … ({len(ranks)} ranks)]"
