"""After a collective fails, ask the group who is still there and where each rank is.

gloo reports a dead peer as "connection closed by peer [10.0.0.2]:18097" or a timeout of the
whole group; neither names the rank at fault. When a collective fails, every surviving member
of the group publishes its flight records (``topo.communicators.recorder``: which call each of
its communicators is in), marks itself present under the group's key prefix in the
rendezvous store, and looks, for a few seconds, for the others' marks. Then it reads what
every member said:

- members in *different* calls of this group: "rank 3 is in all_gather(float32[4]) #58 on
  axis 'tp' ... while ranks 0-2 are in all_reduce(float32[4]) #58" — a mismatch of operation,
  dtype or shape (``TOPO_CHECK=1`` names it at the call);
- a member that did not come but left a flight record: "rank 3 never reached call #58,
  all_reduce(float32[4]), on axis 'tp' ... (its last there was #57, all_reduce(float32[4]));
  it is in all_gather(float32[4]) #12 on axis 'dp' ..." or "... it is closing its
  activation"; if that other collective failed too, the member's own roll call leaves a note
  naming its cause, and the report waits a little (:data:`CHAIN_SECONDS`) to pass it on
  ("..., where it failed too and blamed rank(s) [3]");
- a member that left nothing: it died or is stopped.

A rank that cannot reach the store at all says so (then rank 0's host, or the network to it,
is down). The ranks found at fault are in :attr:`RollCall.culprits` for the error to carry.

Example::

    roll = RollCall(coordinator.store, "topo/dp2.tp2/0/comm/cpu/tp/1", ranks=(2, 3), index=0)
    suffix = roll.report(comm.flight)   # "; rank 3 never reached call #58 ..." or ""
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

from topo.communicators.recorder import FlightRecorder
from topo.errors import RendezvousTimeout, StoreLostError
from topo.process_identity import local_state
from topo.store import BoundedStore

__all__ = ["ROLL_CALL_SECONDS", "RollCall", "publish_flights"]

#: How long the survivors of a failed collective look for each other's marks.
ROLL_CALL_SECONDS = 3.0

#: How much longer a survivor waits for the note of a member that is in another collective
#: (that member's own roll call may still run): the chain from it to the cause.
CHAIN_SECONDS = 2.0

#: A check for the mismatch at the call, named in every report of a mismatch.
_CHECK_HINT = "run with TOPO_CHECK=1 (or activate(check=True)) to name such a mismatch at the call"


def publish_flights(
    store: BoundedStore,
    activation: str,
    rank: int,
    flights: Mapping[str, tuple[str, FlightRecorder]],
    where: str,
    seconds: float = 2.0,
) -> None:
    """Publish this rank's flight records (every communicator's calls) and where it is, for
    peers whose collective with it failed; best effort, bounded by ``seconds``.

    Example::

        publish_flights(store, coordinator.prefix, 3, coordinator.flights, "closing")
    """
    groups = {
        scope: {"label": label, **recorder.summary()} for scope, (label, recorder) in flights.items()
    }
    note = json.dumps({"where": where, "groups": groups}).encode()
    with contextlib.suppress(Exception):  # the store itself is gone: the report says so elsewhere
        store.set_within(f"{activation}/flight/{rank}", note, seconds)


class RollCall:
    """Names the members of a group that did not answer after a failed collective, and where
    every member is.

    Example::

        roll = RollCall(store, scope, ranks=(0, 1, 2, 3), index=1)
        raise CommunicationError("all_reduce failed" + roll.report(comm.flight))
    """

    def __init__(
        self,
        store: BoundedStore,
        scope: str,
        ranks: tuple[int, ...],
        index: int,
        seconds: float = ROLL_CALL_SECONDS,
        activation: str = "",
        label: str = "",
        flights: Mapping[str, tuple[str, FlightRecorder]] | None = None,
    ) -> None:
        self.store = store
        self.scope = scope
        #: the activation's key prefix, where a rank that leaves after a failure says whom it
        #: blamed, and publishes its flight records.
        self.activation = activation or scope
        self.ranks = ranks
        self.index = index
        self.seconds = seconds
        self.label = label or f"group {ranks}"
        #: every communicator of this rank's activation (scope -> (label, recorder)).
        self.flights = flights if flights is not None else {}
        #: the global ranks the last report found at fault.
        self.culprits: list[int] = []
        self._calls = 0

    def report(self, flight: FlightRecorder | None = None) -> str:
        """Publish this rank's flight records, mark it present, wait up to :attr:`seconds`
        for the others, and return a message suffix saying where each member is ("" when
        everyone answered and agrees). ``flight`` is this group's recorder on this rank.

        Example::

            suffix = roll.report(comm.flight)
        """
        self._calls += 1
        self.store.roll_calls += 1
        base = f"{self.scope}/rollcall/{self._calls}"
        limit = min(self.seconds, 2.0)
        me = self.ranks[self.index]
        mine = _position(flight)
        self.culprits = []
        try:
            where = f"in {mine[1]} #{mine[0]} on {self.label}" if mine else f"on {self.label}"
            publish_flights(self.store, self.activation, me, self.flights, where, limit)
            self.store.set_within(f"{base}/{self.index}", json.dumps(mine).encode(), limit)
            deadline = time.monotonic() + self.seconds
            absent = [i for i in range(len(self.ranks)) if i != self.index]
            while absent and time.monotonic() < deadline:
                absent = [i for i in absent if not self.store.check_within([f"{base}/{i}"], limit)]
                if absent:
                    time.sleep(0.05)
            present = {
                i: self._mark(f"{base}/{i}", limit)
                for i in range(len(self.ranks))
                if i not in absent
            }
            gone = [self.ranks[i] for i in absent]
            records = {rank: self._flight(rank, limit) for rank in gone}
            silent = [r for r in gone if records[r] is None]
            passed = self._passed_on(silent, limit)
            # members in another collective: if that one failed too, they hold their own roll
            # call and leave a note naming its cause (rank 1 waited for rank 3 in dp); give
            # them a little longer than a roll call, so the chain reaches the cause
            elsewhere = [r for r in gone if records[r] is not None]
            chained = self._notes_of(elsewhere, limit) if elsewhere else {}
            states = {r: self._state(r, limit) for r in silent if r not in passed}
            silence = _Silence(passed, states)
            note = json.dumps({"blamed": silence.culprits()}).encode()
            self.store.set_within(f"{self.activation}/left/{me}", note, limit)
        except (StoreLostError, RendezvousTimeout, RuntimeError):
            return (
                f"; the rendezvous store at {self.store.where} does not answer either: rank 0 "
                f"(its host) or the network to it is down"
            )
        return self._describe(present, records, gone, silence, chained)

    # ------------------------------------------------------------------- reading

    def _mark(self, key: str, limit: float) -> tuple[int, str] | None:
        try:
            value = json.loads(self.store.get_within(key, limit))
            return (int(value[0]), str(value[1])) if value else None
        except (ValueError, TypeError, IndexError, KeyError):
            return None

    def _flight(self, rank: int, limit: float) -> dict[str, Any] | None:
        """What ``rank`` published (its calls here and where it is), or None."""
        key = f"{self.activation}/flight/{rank}"
        try:
            if not self.store.check_within([key], limit):
                return None
            note = json.loads(self.store.get_within(key, limit))
            group = note.get("groups", {}).get(self.scope)
            return {"where": str(note.get("where", "")), "group": group}
        except (ValueError, TypeError, AttributeError):
            return None

    def _passed_on(self, silent: list[int], limit: float) -> dict[int, list[int]]:
        """Silent ranks that left a note (they failed first, held their own roll call and
        left): whom each blamed."""
        passed: dict[int, list[int]] = {}
        for rank in silent:
            key = f"{self.activation}/left/{rank}"
            if not self.store.check_within([key], limit):
                continue
            try:
                note = json.loads(self.store.get_within(key, limit))
                passed[rank] = [int(r) for r in note["blamed"]]
            except (ValueError, KeyError, TypeError):
                passed[rank] = []
        return passed

    def _notes_of(self, ranks: list[int], limit: float) -> dict[int, list[int]]:
        """The notes ``ranks`` leave after a failure of their own (whom each blamed), waiting
        up to :data:`CHAIN_SECONDS` for them: their roll call may still be running."""
        deadline = time.monotonic() + CHAIN_SECONDS
        notes = self._passed_on(ranks, limit)
        while len(notes) < len(ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
            notes = self._passed_on(ranks, limit)
        return notes

    def _state(self, rank: int, limit: float) -> str | None:
        """How a silent rank's process is, when it runs on this machine (it published its
        identity when it joined): gone, stopped or alive; None when unknown."""
        key = f"{self.activation}/process/{rank}"
        try:
            if not self.store.check_within([key], limit):
                return None
            note = json.loads(self.store.get_within(key, limit))
            return local_state(note) if isinstance(note, dict) else None
        except ValueError:
            return None

    # ----------------------------------------------------------------- the report

    def _describe(
        self,
        present: dict[int, tuple[int, str] | None],
        records: dict[int, dict[str, Any] | None],
        gone: list[int],
        silence: _Silence,
        chained: Mapping[int, list[int]],
    ) -> str:
        parts: list[str] = []
        culprits: set[int] = set()
        positions = {self.ranks[i]: pos for i, pos in present.items() if pos is not None}
        if len(set(positions.values())) > 1:
            parts.append(self._mismatch(positions, culprits))
        here = max(positions.values(), default=None)
        for rank in gone:
            record = records[rank]
            if record is None:
                continue
            group = record["group"] or {}
            calls = int(group.get("calls", 0))
            last = (group.get("last") or ["no call"])[-1]
            reached = f"call #{here[0]}, {here[1]}," if here else "this call"
            if here is not None and calls >= here[0]:
                parts.append(
                    f"rank {rank} left this group after its call #{calls}, {last}, while others "
                    f"are in {reached[:-1]}: the ranks made different calls here; it is "
                    f"{record['where']} ({_CHECK_HINT})"
                )
            else:
                parts.append(
                    f"rank {rank} never reached {reached} on {self.label} (its last there was "
                    f"#{calls}, {last}); it is {record['where']}"
                )
            blamed = [r for r in chained.get(rank, []) if r != rank]
            if blamed:  # its own collective failed too: the chain goes on to the cause
                parts[-1] += (
                    f", where it failed too and blamed rank(s) {blamed}: look at those first"
                )
                culprits.update(blamed)
            culprits.add(rank)
        parts += silence.describe()
        culprits.update(silence.culprits())
        self.culprits = sorted(culprits)
        return "".join(f"; {part}" for part in parts)

    def _mismatch(self, positions: dict[int, tuple[int, str]], culprits: set[int]) -> str:
        """Ranks of this group in different calls: name the minority against the majority."""
        by_position: dict[tuple[int, str], list[int]] = {}
        for rank, position in sorted(positions.items()):
            by_position.setdefault(position, []).append(rank)
        groups = sorted(by_position.items(), key=lambda item: (-len(item[1]), item[0]))
        (common, majority), rest = groups[0], groups[1:]
        others = "; ".join(f"{_who(ranks)} in {op} #{calls}" for (calls, op), ranks in rest)
        for _, ranks in rest:
            culprits.update(ranks)
        return (
            f"{others} on {self.label} while {_who(majority)} in {common[1]} #{common[0]}: the "
            f"ranks called different collectives ({_CHECK_HINT})"
        )


class _Silence:
    """The members that did not answer the roll call and left no flight record: those that
    passed the blame on (they failed first and left), and how the others' processes are."""

    def __init__(self, passed: dict[int, list[int]], states: dict[int, str | None]) -> None:
        self.passed = passed
        self.dead = sorted(r for r, s in states.items() if s == "gone")
        self.stopped = sorted(r for r, s in states.items() if s == "stopped")
        self.alive = sorted(r for r, s in states.items() if s == "alive")
        self.unknown = sorted(r for r, s in states.items() if s is None)

    def culprits(self) -> list[int]:
        """The dead, the stopped, those blamed by the ones that left, and the silent ones
        elsewhere; the live ones only when nothing else explains the silence."""
        found = {*self.dead, *self.stopped, *self.unknown}
        for rank, blamed in self.passed.items():
            found.update(blamed or [rank])
        return sorted(found or self.alive)

    def describe(self) -> list[str]:
        parts = []
        if self.dead:
            parts.append(
                f"rank(s) {self.dead} died: their processes on this machine are gone — look at "
                f"their output for the reason (a crash, the out-of-memory killer)"
            )
        if self.stopped:
            parts.append(
                f"rank(s) {self.stopped} are stopped (SIGSTOP, Ctrl-Z or a debugger): their "
                f"processes on this machine do not run"
            )
        if self.passed:
            blamed = sorted({r for rank, named in self.passed.items() for r in named or [rank]})
            parts.append(
                f"rank(s) {sorted(self.passed)} left after a failure of their own, which they "
                f"blamed on rank(s) {blamed}: look at those first"
            )
        if self.unknown:
            parts.append(
                f"rank(s) {self.unknown} did not answer the roll call after the failure: they "
                f"died, are stopped, or wait in another collective — look at those ranks first"
            )
        if self.alive and self.alive != self.culprits():
            parts.append(
                f"rank(s) {self.alive} are alive on this machine and did not answer: they still "
                f"wait in the collective and will fail too"
            )
        elif self.alive:
            parts.append(
                f"rank(s) {self.alive} are alive on this machine but did not answer: they wait "
                f"in another collective or compute (a skipped call, or a slow rank) — look at "
                f"those ranks first"
            )
        return parts


def _position(flight: FlightRecorder | None) -> tuple[int, str] | None:
    """(sequence number, operation) of the call in flight on this rank."""
    if flight is None or flight.calls == 0:
        return None
    return flight.calls, flight.last()[-1]


def _who(ranks: list[int]) -> str:
    """``rank 3 is`` / ``ranks 0-2 are``."""
    return f"rank {ranks[0]} is" if len(ranks) == 1 else f"ranks {_ranks(ranks)} are"


def _ranks(ranks: list[int]) -> str:
    """``[0, 1, 2]`` as ``0-2``; other lists as they are."""
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))
