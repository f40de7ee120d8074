"""The coordinator: the rendezvous store (hosting, connecting, the store a launcher hosts),
store barriers and byte broadcasts, and the store-operation count.

All but the last test run in this process on one rank; the last spawns three.
"""

from __future__ import annotations

import time
from datetime import timedelta

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
    import threading

    from topo.coordinator import Coordinator
    from topo.errors import RendezvousTimeout

    store = torch.distributed.HashStore()
    coords: dict[int, Coordinator] = {}

    def join(rank: int) -> None:
        coords[rank] = Coordinator.join(
            World(rank=rank, world_size=4), timeout=timedelta(seconds=10), store=store,
            namespace="race", secret=secret,
        )  # fmt: skip

    joiners = [threading.Thread(target=join, args=(r,)) for r in range(4)]
    for thread in joiners:
        thread.start()
    for thread in joiners:
        thread.join(30)
    assert sorted(coords) == [0, 1, 2, 3]
    for rank in (0, 1, 2):
        coords[rank].timeout = timedelta(seconds=0.5 if rank == first else 8)
    outcome: dict[int, tuple[str, float]] = {}

    def wait_at_barrier(rank: int) -> None:
        start = time.monotonic()
        try:
            coords[rank].barrier("gate")
            outcome[rank] = ("passed", time.monotonic() - start)
        except RendezvousTimeout as error:
            outcome[rank] = (str(error), time.monotonic() - start)

    waiters = [threading.Thread(target=wait_at_barrier, args=(r,)) for r in (0, 1, 2)]
    for thread in waiters:
        thread.start()
    for thread in waiters:
        thread.join(30)
    assert sorted(outcome) == [0, 1, 2], outcome
    for rank, (message, took) in outcome.items():
        assert "rank(s) [3]" in message and "did not arrive" in message, (rank, message)
        assert "rank(s) []" not in message, (rank, message)
        assert took < 5, (rank, took)  # woken by rank 0's verdict, not its own 8 s timeout
    assert f"timed out after 0.5 s on rank {first}" in outcome[first][0]
    for rank in {0, 1, 2} - {first}:
        assert f"failed on rank {rank}: rank {first} timed out" in outcome[rank][0]
