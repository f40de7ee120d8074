"""The gloo communicator itself, on a one-rank group in this process: a closed one refuses
every collective with the error that says so, without recording a call it did not make; and
the network devices an activation's communicators share."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import _spawn_fns
import pytest
import torch
import torch.distributed as dist

import topo
from topo.communicators.gloo import GlooCommunicator, shared_devices
from topo.errors import CommunicationError, TopoValueError

CALLS: dict[str, Callable[[GlooCommunicator, torch.Tensor], Any]] = {
    "all_reduce": lambda comm, x: comm.all_reduce(x, "sum"),
    "all_gather": lambda comm, x: comm.all_gather(x),
    "all_gather_dim0": lambda comm, x: comm.all_gather_dim0(x),
    "reduce_scatter": lambda comm, x: comm.reduce_scatter(x.view(1, 2), "sum"),
    "broadcast": lambda comm, x: comm.broadcast(x, 0),
    "gather": lambda comm, x: comm.gather(x, 0),
    "scatter": lambda comm, x: comm.scatter(x.view(1, 2), 0),
    "all_to_all": lambda comm, x: comm.all_to_all(x.view(1, 2)),
    "all_to_allv_dim0": lambda comm, x: comm.all_to_allv_dim0(x, [2], [2]),
    "barrier": lambda comm, x: comm.barrier(),
    "exchange": lambda comm, x: comm.exchange([], []),
}


def _one_rank() -> GlooCommunicator:
    return GlooCommunicator(
        dist.HashStore(), ranks=(0,), index=0, timeout=timedelta(seconds=30), local=True,
        label="axis 'tp' (one rank)",
    )  # fmt: skip


@pytest.mark.parametrize("name", list(CALLS))
def test_an_open_one_rank_communicator_returns_its_input(name: str) -> None:
    comm = _one_rank()
    try:
        x = torch.tensor([1.0, 2.0])
        result = CALLS[name](comm, x)
        if result is not None:
            assert torch.equal(result.reshape(-1), x)
        assert comm.flight.calls == 1
    finally:
        comm.close()


@pytest.mark.parametrize("name", list(CALLS))
def test_a_closed_communicator_says_it_is_closed_and_records_nothing(name: str) -> None:
    comm = _one_rank()
    comm.close()
    with pytest.raises(CommunicationError) as raised:
        CALLS[name](comm, torch.tensor([1.0, 2.0]))
    message = str(raised.value)
    assert message.startswith("axis 'tp' (one rank): collectives require an open communicator")
    assert "a peer may have died" not in message  # not a failed call: none was made
    assert comm.flight.calls == 0


@pytest.mark.parametrize("src", [-1, 1])
def test_broadcast_refuses_a_source_outside_the_group(src: int) -> None:
    comm = _one_rank()
    try:
        refused = rf"requires a source index 0 <= src < 1, but got {src}"
        with pytest.raises(TopoValueError, match=refused):
            comm.broadcast(torch.ones(2), src)
        assert comm.flight.calls == 0
    finally:
        comm.close()


def test_communicators_given_shared_devices_run_over_the_same_ones() -> None:
    shared: dict[object, object] = {}
    comms = [
        GlooCommunicator(
            dist.HashStore(), ranks=(0,), index=0, timeout=timedelta(seconds=30), local=True,
            label=f"group {i}", devices=shared_devices(shared, local=True),
        )
        for i in range(3)
    ]
    try:
        assert len(shared) == 1
        (devices,) = shared.values()
        assert all(comm.devices is devices for comm in comms)
        for i, comm in enumerate(comms):
            assert comm.all_reduce(torch.tensor([float(i)]), "sum").item() == float(i)
        own = GlooCommunicator(
            dist.HashStore(), ranks=(0,), index=0, timeout=timedelta(seconds=30), local=True,
            label="its own",
        )  # fmt: skip
        assert own.devices is not devices  # no shared ones given: a device of its own
        own.close()
    finally:
        for comm in comms:
            comm.close()


def test_an_activations_communicators_share_one_device_until_it_closes() -> None:
    results = topo.spawn(_spawn_fns.shared_gloo_devices, topo.DeviceMesh(w=4), timeout=120)
    for rank, seen in enumerate(results):
        dp, tp = divmod(rank, 2)
        # reference from every rank's input (rank + 1): the other index along each axis
        assert seen["sums"] == {"dp": (rank + 1) + (2 * (1 - dp) + tp + 1),
                                "tp": (rank + 1) + (2 * dp + (1 - tp) + 1)}  # fmt: skip
        assert seen["received"] == (None if tp == 0 else float(rank))  # index 0 sent rank + 1
        assert seen["entries"] == 1 and seen["same"] == [True, True, True]
        assert seen["after"] == {}
