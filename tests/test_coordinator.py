"""The coordinator: the rendezvous store (hosting, connecting, the store a launcher hosts),
store barriers and byte broadcasts, and the store-operation count.

All but the last test run in this process on one rank; the last spawns three.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import _spawn_fns as fns
import pytest
import torch
import torch.distributed

import topo
from topo import DeviceMesh, World


def test_coordinator_on_one_rank_cleans_up() -> None:
    from topo.coordinator import Coordinator

    store = torch.distributed.HashStore()
    for _ in range(3):
        coord = Coordinator.join(
            World(rank=0, world_size=1), timeout=timedelta(seconds=5), store=store, namespace="ns"
        )
        assert coord.is_master and coord.is_local_master
        assert coord.rank == 0 and coord.world_size == 1
        assert coord.key("a", 1).startswith(coord.prefix + "/")
        assert coord.broadcast(b"data", src=0) == b"data"
        assert coord.all_gather_json({"x": 1}) == [{"x": 1}]
        for _ in range(5):
            coord.barrier()
            coord.barrier("named", ranks=[0])
        with pytest.raises(TypeError, match="bytes"):
            coord.broadcast("text", src=0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="src requires a rank among"):
            coord.broadcast(b"", src=1)
        coord.close()
        assert store.num_keys() <= 3  # the round counter and the last close round at most


def test_counting_store_counts_and_remembers() -> None:
    from topo.store import BoundedStore

    counting = BoundedStore(torch.distributed.HashStore(), timedelta(seconds=5))
    counting.set("a", b"1")
    assert counting.get("a") == b"1"
    assert counting.add("n", 2) == 2
    assert counting.check(["a", "n"])
    counting.wait(["a"])
    counting.wait(["a"], timedelta(seconds=1))
    assert counting.multi_get(["a"]) == [b"1"]
    assert counting.compare_set("c", "", "v") == b"v"
    assert counting.written == {"a", "c"}
    assert counting.delete_key("a")
    assert counting.written == {"c"}
    assert counting.ops == 9
    assert counting.num_keys() == 2  # n and c; num_keys is not counted
    # topo's own gloo rendezvous goes through the wrapper: a PrefixStore over it counts too
    prefixed = torch.distributed.PrefixStore("p", counting)
    prefixed.set("k", b"v")
    assert "p/k" in counting.written and counting.ops == 10


def test_store_port_in_use_is_port_in_use_error(held_port: int) -> None:
    port = held_port  # another socket listens there throughout the test
    world = World(rank=0, world_size=1, master_port=port)
    with (
        pytest.raises(topo.PortInUseError) as info,
        DeviceMesh(tp=1).activate(world, timeout=2),
    ):
        pass
    message = str(info.value)
    assert f"requires a free port at 127.0.0.1:{port}" in message
    assert "MASTER_PORT" in message
    assert isinstance(info.value, topo.RendezvousError)


def test_unreachable_store_is_a_rendezvous_error(closed_port: int) -> None:
    port = closed_port  # nothing listens there
    world = World(rank=1, world_size=2, master_port=port)
    with (
        pytest.raises(topo.RendezvousTimeout) as info,
        DeviceMesh(tp=2).activate(world, timeout=0.5),
    ):
        pass
    message = str(info.value)
    assert f"rank 1 could not reach the rendezvous store at 127.0.0.1:{port}" in message
    assert "is rank 0 running" in message


def test_store_hosted_externally_connects_instead_of_hosting() -> None:
    # a launcher's agent (here: this test) hosts the store; rank 0 must not try to host it too
    agent = torch.distributed.TCPStore(
        "127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False
    )
    hosted = World(rank=0, world_size=1, master_port=agent.port, store_hosted_externally=True)
    with DeviceMesh(tp=1).activate(hosted, timeout=10):
        assert torch.equal(topo.all_reduce(torch.ones(2), "tp"), torch.ones(2))
    assert agent.num_keys() <= 3
    with (
        pytest.raises(topo.PortInUseError, match="requires a free port"),
        DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=agent.port), timeout=2),
    ):
        pass


@pytest.mark.multiprocess
def test_back_to_back_activations_on_a_rank0_hosted_store(spawn_timeout: int) -> None:
    # Rank 0's store shuts down as each activation ends; a fast peer's next activation must
    # reach the new one, not fail on the old (the srun / mpirun case).
    results = topo.spawn(fns.back_to_back_on_own_store, DeviceMesh(a=3), 6, timeout=spawn_timeout)
    assert results == [[3.0 * i for i in range(6)]] * 3


def _coordinators(world_size: int, secret: bytes | None) -> dict[int, Any]:
    """``world_size`` coordinators of one activation on one in-process store, joined by
    threads (the join is a rendezvous)."""
    import threading

    from topo.coordinator import Coordinator

    store = torch.distributed.HashStore()
    coords: dict[int, Coordinator] = {}

    def join(rank: int) -> None:
        coords[rank] = Coordinator.join(
            World(rank=rank, world_size=world_size), timeout=timedelta(seconds=10),
            store=store, namespace="race", secret=secret,
        )  # fmt: skip

    joiners = [threading.Thread(target=join, args=(r,)) for r in range(world_size)]
    for thread in joiners:
        thread.start()
    for thread in joiners:
        thread.join(30)
    assert sorted(coords) == list(range(world_size))
    return coords


def _barriers(coords: dict[int, Any], ranks: list[int]) -> dict[int, tuple[str, float]]:
    """Each of ``ranks`` calls ``barrier("gate")`` in its own thread, in this order, each
    starting once the ones before have marked their arrival: what each ended with (its
    error's message, or "passed") and how long it took."""
    import threading

    from topo.errors import RendezvousTimeout

    outcome: dict[int, tuple[str, float]] = {}

    def wait_at_barrier(rank: int) -> None:
        start = time.monotonic()
        try:
            coords[rank].barrier("gate")
            outcome[rank] = ("passed", time.monotonic() - start)
        except RendezvousTimeout as error:
            outcome[rank] = (str(error), time.monotonic() - start)

    waiters = []
    for rank in ranks:
        waiters.append(threading.Thread(target=wait_at_barrier, args=(rank,)))
        waiters[-1].start()
        arrival = f"{_gate(coords)}/arrived/{rank}"
        end = time.monotonic() + 20
        # the raw store: a BoundedStore runs one call at a time, and the rank's wait is in it
        while not coords[rank].store.inner.check([arrival]) and time.monotonic() < end:
            time.sleep(0.005)
    for thread in waiters:
        thread.join(60)
    assert sorted(outcome) == sorted(ranks), outcome
    return outcome


def _gate(coords: dict[int, Any]) -> str:
    """The store keys' base of the first ``barrier("gate")`` round of every rank."""
    return str(coords[0].key("barrier/gate/all", 0))


@pytest.mark.parametrize("first", [0, 1], ids=["collector-first", "other-first"])
@pytest.mark.parametrize("secret", [None, b"s" * 16], ids=["plain", "sealed"])
def test_barrier_timeout_names_the_missing_rank_on_every_waiter(
    secret: bytes | None, first: int
) -> None:
    """Rank 3 joins but never reaches the barrier; rank ``first`` times out first (rank 0
    collects the sealed barrier's arrivals, rank 1 waits for its ``done``). Every other waiter
    must then end with that rank's verdict naming rank 3 — at once, not after its own timeout
    — and never with an empty list of missing ranks (wake-up marks set in the arrival keys
    must not read as arrivals)."""
    coords = _coordinators(4, secret)
    for rank in (0, 1, 2):
        coords[rank].timeout = timedelta(seconds=0.5 if rank == first else 8)
    # the first to time out arrives last, so that the others have arrived when it judges
    outcome = _barriers(coords, [r for r in (0, 1, 2) if r != first] + [first])
    for rank, (message, took) in outcome.items():
        assert "rank(s) [3]" in message and "did not arrive" in message, (rank, message)
        assert "rank(s) []" not in message, (rank, message)
        assert took < 5, (rank, took)  # woken by the first one's verdict, not its own 8 s
    assert f"timed out after 0.5 s on rank {first}" in outcome[first][0]
    for rank in {0, 1, 2} - {first}:
        # the verdict says the judging rank's timeout, not the reader's
        assert f"failed on rank {rank}: rank {first} timed out after 0.5 s" in outcome[rank][0]


def test_sealed_barrier_names_a_collector_that_arrived_and_stopped() -> None:
    """With a secret rank 0 collects the arrivals and completes the round. If it marks its
    arrival and then stops, every rank has arrived: the verdict must name rank 0 as the one
    that did not complete the round (not "rank(s) [] did not arrive"), after the grace."""
    from topo.verdict import GRACE_SECONDS

    coords = _coordinators(3, b"s" * 16)
    coords[0].store.set(f"{_gate(coords)}/arrived/0", b"1")  # and stops there
    coords[1].timeout, coords[2].timeout = timedelta(seconds=0.5), timedelta(seconds=30)
    outcome = _barriers(coords, [2, 1])
    for rank, (message, took) in outcome.items():
        assert "but rank 0, which completes the round, did not complete it" in message, message
        assert "rank(s) []" not in message, message
        assert took < 0.5 + GRACE_SECONDS + 5, (rank, took)  # rank 2 follows rank 1's verdict
    assert "timed out after 0.5 s on rank 1: every rank of [0, 1, 2] arrived" in outcome[1][0]
    assert "failed on rank 2: rank 1 timed out after 0.5 s: every rank arrived" in outcome[2][0]


def test_barrier_whose_last_rank_stops_before_completing_says_so() -> None:
    """Without a secret the last rank to arrive completes the round. Rank 0 arrives last (it
    marks its arrival and counts itself) and stops: the others say that every rank arrived
    but the round was not completed."""
    coords = _coordinators(3, None)
    coords[1].timeout = coords[2].timeout = timedelta(seconds=0.5)
    gate = _gate(coords)

    def rank0_arrives_and_stops() -> None:
        end = time.monotonic() + 20
        while coords[0].store.inner.add(f"{gate}/count", 0) < 2 and time.monotonic() < end:
            time.sleep(0.005)
        coords[0].store.set(f"{gate}/arrived/0", b"1")
        coords[0].store.add(f"{gate}/count", 1)

    import threading

    stopper = threading.Thread(target=rank0_arrives_and_stops)
    stopper.start()
    outcome = _barriers(coords, [1, 2])
    stopper.join(30)
    for message, _ in outcome.values():
        assert "arrived, but the round was not completed" in message, message
        assert "rank(s) []" not in message, message


@pytest.mark.parametrize("secret", [None, b"s" * 16], ids=["plain", "sealed"])
def test_barrier_completed_just_after_a_timeout_passes(secret: bytes | None) -> None:
    """Every rank has arrived when rank 1's timeout ends, and the round's last step (rank 0
    completing it) comes a moment later, within the grace: rank 1 passes instead of failing
    the round that is being completed (and rank 0 with it)."""
    import threading

    coords = _coordinators(2, secret)
    coords[1].timeout = timedelta(seconds=0.3)
    gate, store0 = _gate(coords), coords[0].store

    def rank0() -> None:  # arrives after rank 1 (the last to arrive completes a plain round)
        time.sleep(0.1)
        store0.set(f"{gate}/arrived/0", b"1")
        if secret is None:
            store0.add(f"{gate}/count", 1)
        time.sleep(0.7)  # past rank 1's timeout, within its grace
        store0.set(f"{gate}/done", b"1")

    completes = threading.Thread(target=rank0)
    completes.start()
    outcome = _barriers(coords, [1])
    completes.join(30)
    assert outcome[1][0] == "passed", outcome[1][0]
    assert outcome[1][1] > 0.7  # it did wait past its timeout


def test_sealed_close_marks_are_not_the_roll_calls_notes() -> None:
    """A survivor of a failed collective leaves its roll-call note at ``<prefix>/left/<rank>``
    (topo.communicators.rollcall). With a secret, close marks each rank's leaving with a key
    of its own: if it were the same key, rank 0 would take an earlier note for a rank that has
    left and shut the store down under it."""
    import threading

    coords = _coordinators(2, b"s" * 16)
    written: list[str] = []
    for coord in coords.values():
        set_key = coord.store.set

        def recording(key: str, value: Any, set_key: Any = set_key) -> None:
            written.append(key)
            set_key(key, value)

        coord.store.set = recording
    notes = {f"{coords[0].prefix}/left/{r}" for r in (0, 1)}
    closers = [threading.Thread(target=coords[r].close) for r in (0, 1)]
    for thread in closers:
        thread.start()
    for thread in closers:
        thread.join(30)
    assert written and not notes & set(written), written
