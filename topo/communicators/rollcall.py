"""After a collective fails, ask the group who is still there: the roll call.

gloo reports a dead peer as "connection closed by peer [10.0.0.2]:18097" or a timeout of the
whole group; neither names the rank at fault. When a collective fails, every surviving member
of the group marks itself present under the group's key prefix in the rendezvous store and
looks, for a few seconds, for the others' marks. The ranks whose mark never comes are named:
they died, are stopped, or wait somewhere else. A rank that cannot reach the store at all says
so (then rank 0's host, or the network to it, is down).

Example::

    roll = RollCall(coordinator.store, "topo/dp2.tp2/0/comm/cpu/tp/1", ranks=(2, 3), index=0)
    suffix = roll.report()   # "; rank(s) [3] did not answer the roll call ..." or ""
"""

from __future__ import annotations

import json
import time

from topo.errors import RendezvousTimeout, StoreLostError
from topo.store import BoundedStore

__all__ = ["ROLL_CALL_SECONDS", "RollCall"]

#: How long the survivors of a failed collective look for each other's marks.
ROLL_CALL_SECONDS = 3.0


class RollCall:
    """Names the members of a group that did not answer after a failed collective.

    Example::

        roll = RollCall(store, scope, ranks=(0, 1, 2, 3), index=1)
        raise CommunicationError("all_reduce failed" + roll.report())
    """

    def __init__(
        self,
        store: BoundedStore,
        scope: str,
        ranks: tuple[int, ...],
        index: int,
        seconds: float = ROLL_CALL_SECONDS,
        activation: str = "",
    ) -> None:
        self.store = store
        self.scope = scope
        #: the activation's key prefix, where a rank that leaves after a failure says whom it
        #: blamed (so a peer that finds it gone can follow the chain to the cause).
        self.activation = activation or scope
        self.ranks = ranks
        self.index = index
        self.seconds = seconds
        self._calls = 0

    def report(self) -> str:
        """Mark this rank present, wait up to :attr:`seconds` for the others, and return a
        message suffix naming the absent ranks ("" when everyone answered).

        Example::

            suffix = roll.report()
        """
        self._calls += 1
        self.store.roll_calls += 1
        base = f"{self.scope}/rollcall/{self._calls}"
        limit = min(self.seconds, 2.0)
        try:
            self.store.set_within(f"{base}/{self.index}", b"1", limit)
            deadline = time.monotonic() + self.seconds
            absent = [i for i in range(len(self.ranks)) if i != self.index]
            while absent and time.monotonic() < deadline:
                absent = [i for i in absent if not self.store.check_within([f"{base}/{i}"], limit)]
                if absent:
                    time.sleep(0.05)
            gone = [self.ranks[i] for i in absent]
            cause = self._follow(gone, limit)
            note = json.dumps({"blamed": cause}).encode()
            self.store.set_within(f"{self.activation}/left/{self.ranks[self.index]}", note, limit)
        except (StoreLostError, RendezvousTimeout, RuntimeError):
            return (
                f"; the rendezvous store at {self.store.where} does not answer either: rank 0 "
                f"(its host) or the network to it is down"
            )
        if not gone:
            return ""
        if sorted(cause) != sorted(gone):
            return (
                f"; rank(s) {gone} left after a failure of their own, which they blamed on "
                f"rank(s) {cause}: those did not answer — they died, are stopped, or wait in "
                f"another collective; look at them first"
            )
        return (
            f"; rank(s) {gone} did not answer the roll call after the failure: they died, are "
            f"stopped, or wait in another collective — look at those ranks first"
        )

    def _follow(self, gone: list[int], limit: float) -> list[int]:
        """The ranks to blame: a gone rank that left a note (it failed first and held its own
        roll call) passes the blame on to whom it named; one without a note is the cause."""
        cause: set[int] = set()
        for rank in gone:
            key = f"{self.activation}/left/{rank}"
            blamed: list[int] = []
            if self.store.check_within([key], limit):
                try:
                    blamed = [int(r) for r in json.loads(self.store.get_within(key, limit))["blamed"]]
                except (ValueError, KeyError, TypeError):
                    blamed = []
            cause.update(blamed or [rank])
        return sorted(cause)
