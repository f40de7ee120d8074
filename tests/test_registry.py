"""The backend table: registration, validation, and a new backend used without touching any
collective or the context (a spy wrapping the threads backend, under activate(backends=))."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch

import topo
import topo.communicators as comms
from topo import DeviceMesh, World
from topo.communicators.threads import ThreadHub, ThreadsCommunicator


@pytest.fixture
def spy() -> Iterator[list[str]]:
    calls: list[str] = []

    class Spy(ThreadsCommunicator):
        def all_reduce(self, x: torch.Tensor, op: Any) -> torch.Tensor:
            calls.append(f"all_reduce {op} on {self.label}")
            return super().all_reduce(x, op)

    def factory(group: comms.GroupSpec) -> Spy:
        calls.append(f"created {group.backend} for {group.ranks} index {group.index}")
        hub = group.root_store
        assert isinstance(hub, ThreadHub)
        return Spy(hub, group.scope, group.ranks, group.index, group.timeout, group.label)

    comms.register("spy", factory, device_type="cpu", reduce_dtypes={torch.float32})
    try:
        yield calls
    finally:
        comms.unregister("spy")


def _two_threads(fn: Any, **activate: Any) -> list[Any]:
    """Activate DeviceMesh(tp=2) in two threads on one ThreadHub (as simulate does, but with
    the activate arguments under test)."""
    hub, results = ThreadHub(), [None, None]

    def rank_main(rank: int) -> None:
        hub.local.rank = rank
        try:
            with DeviceMesh(tp=2).activate(World(rank=rank, world_size=2), store=hub,
                                           timeout=20, **activate):  # fmt: skip
                results[rank] = fn()
        except Exception as error:
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_defaults_and_table() -> None:
    table = comms.registered_backends()
    assert {n: b.device_type for n, b in table.items()}.items() >= {
        "gloo": "cpu", "nccl": "cuda", "threads": "cpu"
    }.items()  # fmt: skip
    resolved = comms.resolve_backends(None)
    assert {d: b.name for d, b in resolved.items() if b} == {"cpu": "gloo", "cuda": "nccl"}
    assert comms.resolve_backends({"cpu": "threads", "cuda": None})["cuda"] is None
    assert torch.bool not in comms.get_backend("gloo").reduce_dtypes


def test_a_registered_backend_runs_the_collectives(spy: list[str]) -> None:
    def work() -> torch.Tensor:
        assert topo.current().backend("cpu").name == "spy"
        return topo.all_reduce(torch.ones(2) * (topo.axis_index("tp") + 1), "tp")

    results = _two_threads(work, backends={"cpu": "spy"})
    assert [r.tolist() for r in results] == [[3.0, 3.0], [3.0, 3.0]]
    assert sorted(spy) == [
        "all_reduce sum on axis 'tp' group (0, 1)",
        "all_reduce sum on axis 'tp' group (0, 1)",
        "created spy for (0, 1) index 0",
        "created spy for (0, 1) index 1",
    ]

    def int_sum() -> torch.Tensor:
        return topo.all_reduce(torch.ones(2, dtype=torch.int64), "tp")

    errors = _two_threads(int_sum, backends={"cpu": "spy"})
    assert all(isinstance(e, topo.TopoTypeError) for e in errors)
    assert "requires a dtype spy can reduce (float32), but got torch.int64" in str(errors[0])


def test_threads_backend_outside_simulate_says_so() -> None:
    store = torch.distributed.HashStore()

    def work() -> None:
        topo.all_reduce(torch.ones(1), "tp")

    results: list[Any] = [None, None]

    def rank_main(rank: int) -> None:
        try:
            with DeviceMesh(tp=2).activate(World(rank=rank, world_size=2), store=store,
                                           timeout=5, backends={"cpu": "threads"}):  # fmt: skip
                work()
        except Exception as error:
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(e, topo.BackendUnavailableError) for e in results), results
    assert "run the function under topo.simulate" in str(results[0])


def test_bad_backend_mappings() -> None:
    with pytest.raises(topo.TopoValueError, match=r"'gloo', 'nccl', 'threads'"):
        comms.resolve_backends({"cpu": "mpi"})
    with pytest.raises(topo.TopoValueError, match=r"device type 'gpu'.*valid device types are 'cpu', 'cuda'"):
        comms.resolve_backends({"gpu": "nccl"})
    with pytest.raises(topo.TopoValueError, match=r"serves 'cuda' tensors; backends for 'cpu' are 'gloo', 'threads'"):
        comms.resolve_backends({"cpu": "nccl"})
    with pytest.raises(topo.TopoTypeError, match="mapping"):
        comms.resolve_backends(["gloo"])  # type: ignore[arg-type]
    with pytest.raises(topo.TopoValueError, match="'gloo', 'nccl', 'threads'"), DeviceMesh(tp=1).activate(
        World(rank=0, world_size=1), store=torch.distributed.HashStore(), backends={"cpu": "glo"}
    ):
        pass
    with pytest.raises(topo.TopoTypeError, match="check requires True or False"), DeviceMesh(tp=1).activate(
        World(rank=0, world_size=1), store=torch.distributed.HashStore(), check="yes"
    ):
        pass


def test_bad_registrations() -> None:
    def factory(group: comms.GroupSpec) -> Any:
        return None

    with pytest.raises(topo.TopoTypeError, match="identifier"):
        comms.register("my backend", factory, device_type="cpu")
    with pytest.raises(topo.TopoTypeError, match="callable"):
        comms.register("mine", "factory", device_type="cpu")  # type: ignore[arg-type]
    with pytest.raises(topo.TopoValueError, match="device type like"):
        comms.register("mine", factory, device_type="gpu")
    with pytest.raises(topo.TopoValueError, match="without index"):
        comms.register("mine", factory, device_type="cuda:0")
    with pytest.raises(topo.TopoTypeError, match="torch dtypes"):
        comms.register("mine", factory, device_type="cpu", reduce_dtypes=["float32"])  # type: ignore[list-item]
    with pytest.raises(topo.TopoValueError, match="built-in"):
        comms.register("gloo", factory, device_type="cpu")
    comms.register("mine", factory, device_type="cpu")
    try:
        with pytest.raises(topo.TopoValueError, match="replace=True"):
            comms.register("mine", factory, device_type="cpu")
        assert comms.register("mine", factory, device_type="cpu", replace=True).name == "mine"
    finally:
        comms.unregister("mine")
    with pytest.raises(topo.TopoValueError, match="registered backend name"):
        comms.unregister("mine")
    with pytest.raises(topo.TopoValueError, match="built-in"):
        comms.unregister("threads")


def test_a_group_spec_is_an_immutable_value() -> None:
    args: dict[str, Any] = {
        "backend": "gloo", "ranks": (0, 1), "index": 1, "label": "axis 'tp' group (0, 1)",
        "store": None, "root_store": None, "scope": "s/", "timeout": timedelta(seconds=5),
        "device": torch.device("cpu"), "world": World(rank=1, world_size=2), "coordinator": None,
    }  # fmt: skip
    spec = comms.GroupSpec(**args)
    assert spec == comms.GroupSpec(**args) and hash(spec) == hash(comms.GroupSpec(**args))
    assert spec != comms.GroupSpec(**{**args, "index": 0}) and spec != tuple(args.values())
    assert (spec.backend, spec.ranks, spec.index, spec.coordinator) == ("gloo", (0, 1), 1, None)
    with pytest.raises(AttributeError, match="immutable: cannot assign to field 'index'"):
        spec.index = 0  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable: cannot delete field 'label'"):
        del spec.label  # type: ignore[misc]
    assert repr(spec).startswith("GroupSpec(backend='gloo', ranks=(0, 1), index=1, label=")
