"""NCCL plumbing that needs no GPU, against the fake cupy of test_nccl.py: the activation's
timeout reaches communicator creation, the async-error watchdog, the install hints."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
from test_nccl import _fake_communicator, _fake_nccl_module, _install_fake_cupy

import topo
from topo.communicators import nccl as nccl_mod
from topo.context import MeshContext
from topo.coordinator import Coordinator
from topo.store import BoundedStore
from topo.world import World


class _Coordinator:
    """Records the rendezvous calls NcclCommunicator.create makes (one rank: index 0)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def broadcast(self, data: bytes | None, src: int, ranks: tuple[int, ...]) -> bytes:
        assert isinstance(data, bytes)  # raw bytes travel, never a pickle
        self.calls.append(("broadcast", len(data)))
        return data

    def barrier(self, name: str, ranks: tuple[int, ...]) -> str:
        self.calls.append(("barrier", name))
        return name


def _pretend_gpu(monkeypatch: pytest.MonkeyPatch, fake: Any) -> None:
    _install_fake_cupy(monkeypatch, fake)
    fake.get_unique_id = lambda: tuple(range(-64, 64))
    fake.NcclCommunicator = lambda n, uid, rank: ("comm", n, uid, rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


def test_create_uses_the_given_timeout_and_raw_unique_id(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nccl_module()
    _pretend_gpu(monkeypatch, fake)
    coord = _Coordinator()
    comm = nccl_mod.NcclCommunicator.create(
        coord,  # type: ignore[arg-type]
        "scope",
        (0,),
        0,
        torch.device("cuda", 0),
        "axis 'tp' group (0,)",
        timedelta(seconds=7),
    )
    assert comm.timeout == timedelta(seconds=7)
    assert coord.calls[0] == ("broadcast", 128)
    assert comm._comm[2] == tuple(range(-64, 64))  # the id survives the raw-bytes trip


def test_activation_timeout_reaches_nccl_create(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def create(cls: Any, coordinator: Any, scope: str, ranks: Any, index: int, device: Any,
               label: str, timeout: timedelta = timedelta(seconds=300)) -> Any:  # fmt: skip
        seen["timeout"] = timeout
        raise topo.BackendUnavailableError("stop here")

    monkeypatch.setattr(nccl_mod.NcclCommunicator, "create", classmethod(create))
    world = World(rank=0, world_size=2, master_port=0)
    mesh = topo.DeviceMesh(tp=2)
    store = BoundedStore(torch.distributed.HashStore(), timedelta(seconds=5))
    coord = Coordinator(store, world, "p", timedelta(seconds=5), "test")
    ctx = MeshContext(mesh, world, coord, timedelta(seconds=42), torch.device("cuda", 0))
    with pytest.raises(topo.BackendUnavailableError):
        ctx.communicator(("tp",), "cuda")
    assert seen["timeout"] == timedelta(seconds=42)


def test_watchdog_aborts_on_async_error_and_names_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, comm, fake = _fake_communicator(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    polls = {"n": 0}

    def check() -> None:
        polls["n"] += 1
        if polls["n"] >= 3:
            raise fake.NcclError("remote process exited or there was a network error")

    comm.check_async_error = check  # type: ignore[attr-defined]
    c.start_watchdog(interval=0.01)
    end = time.monotonic() + 10
    while c.async_error is None and time.monotonic() < end:
        time.sleep(0.01)
    assert c.async_error is not None and "axis 'tp' group (0,)" in c.async_error
    assert comm.calls[-1] == ("abort",)
    with pytest.raises(topo.CommunicationError, match=r"watchdog.*network error"):
        c.all_reduce(torch.ones(2), "sum")


def test_watchdog_stops_with_the_communicator(monkeypatch: pytest.MonkeyPatch) -> None:
    c, comm, _ = _fake_communicator(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    comm.check_async_error = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr(c, "synchronize", lambda what="": None)
    c.start_watchdog(interval=0.01)
    thread = c._watchdog[0]  # type: ignore[index]
    c.close()
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("cuda", "extra"), [("12.4", "nccl-cu12"), ("13.0", "nccl-cu13"), (None, "nccl-cu12")]
)
def test_install_hint_names_the_extra_for_this_cuda(cuda: str | None, extra: str) -> None:
    assert f"topo[{extra}]" in nccl_mod.install_hint(cuda)
