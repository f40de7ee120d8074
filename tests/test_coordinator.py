"""The coordinator: the rendezvous store (hosting, connecting, the store a launcher hosts),
store barriers and byte broadcasts, and the store-operation count.

All but the last test run in this process on one rank; the last spawns three.
"""

from __future__ import annotations

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
