"""NCCL plumbing that needs no GPU, against the strict fake cupy (tests/_fake_cupy.py) in its
cupy-14 and cupy-13 modes: the unique id in the type each takes, one GPU per rank, the
activation's timeout reaching communicator creation, the async-error watchdog, the install
hints."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any

import _fake_cupy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nccl import _fake_communicator

import topo
from topo.communicators import nccl as nccl_mod
from topo.context import MeshContext
from topo.coordinator import Coordinator
from topo.store import BoundedStore
from topo.world import World


class _Coordinator:
    """Records the rendezvous calls NcclCommunicator.create makes; the other members' GPUs
    are ``others`` (one rank, index 0, by default)."""

    def __init__(self, others: list[list[str]] | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.others = others or []

    def broadcast(self, data: bytes | None, src: int, ranks: tuple[int, ...]) -> bytes:
        assert isinstance(data, bytes)  # raw bytes travel, never a pickle
        self.calls.append(("broadcast", len(data)))
        return data

    def all_gather_json(self, value: Any, ranks: tuple[int, ...]) -> list[Any]:
        self.calls.append(("all_gather_json", value))
        return [value, *self.others]


def _pretend_gpu(monkeypatch: pytest.MonkeyPatch, fake: Any) -> None:
    _fake_cupy.install(monkeypatch, fake)
    props = type("Props", (), {"uuid": "GPU-0000-fake"})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    monkeypatch.delenv("NCCL_HOSTID", raising=False)


def _create(coord: _Coordinator, ranks: tuple[int, ...] = (0,)) -> nccl_mod.NcclCommunicator:
    return nccl_mod.NcclCommunicator.create(
        coord,  # type: ignore[arg-type]
        "scope",
        ranks,
        0,
        torch.device("cuda", 0),
        f"axis 'tp' group {ranks}",
        timedelta(seconds=7),
    )


def test_create_uses_the_given_timeout_and_raw_unique_id(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    fake = _fake_cupy.make_nccl(cupy_major)
    _pretend_gpu(monkeypatch, fake)
    coord = _Coordinator()
    comm = _create(coord)
    assert comm.timeout == timedelta(seconds=7)
    assert coord.calls[0] == ("broadcast", 128)
    made = fake.created[-1]  # type: ignore[attr-defined]
    # the id reached cupy in the type this cupy takes (bytes from 14 on, a tuple before)
    assert type(made.comm_id) is (bytes if cupy_major >= 14 else tuple)
    assert nccl_mod.encode_unique_id(made.comm_id) == nccl_mod.encode_unique_id(
        made.comm_id if cupy_major >= 14 else tuple(made.comm_id)
    )


@settings(max_examples=50, deadline=None)
@given(raw=st.binary(min_size=128, max_size=128), major=st.sampled_from([13, 14]))
def test_unique_id_survives_the_raw_bytes_trip_for_any_cupy(raw: bytes, major: int) -> None:
    fake = _fake_cupy.make_nccl(major)
    sent = raw if major >= 14 else tuple(b - 256 if b > 127 else b for b in raw)
    data = nccl_mod.encode_unique_id(sent)
    assert data == raw
    received = nccl_mod.unique_id_argument(data, major=major)
    assert received == sent and type(received) is type(sent)
    fake.NcclCommunicator(2, received, 1)  # type: ignore[attr-defined]  # the fake accepts it


def test_the_fake_cupy_refuses_the_other_versions_id() -> None:
    id14 = _fake_cupy.make_nccl(14).get_unique_id()  # type: ignore[attr-defined]
    id13 = _fake_cupy.make_nccl(13).get_unique_id()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"commId' has incorrect type \(expected bytes, got tuple"):
        _fake_cupy.make_nccl(14).NcclCommunicator(2, id13, 0)  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"expected tuple, got bytes"):
        _fake_cupy.make_nccl(13).NcclCommunicator(2, id14, 0)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="commId length 5 != 128"):
        _fake_cupy.make_nccl(14).NcclCommunicator(2, b"12345", 0)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((1.0, 2, 16, 7, 0, 0), TypeError),  # a float pointer
        ((1, 2, -1, 7, 0, 0), OverflowError),  # a negative count
        ((1, 2, 16, 7, 0, None), TypeError),  # no stream
        ((1, 2, 16, 99, 0, 0), RuntimeError),  # not an NCCL dtype: NcclError
        ((1, 2, 16, 7, 9, 0), RuntimeError),  # not an NCCL op: NcclError
    ],
)
def test_the_fake_cupy_parses_arguments_like_cython(
    args: tuple[Any, ...], error: type[Exception], cupy_major: int
) -> None:
    fake = _fake_cupy.make_nccl(cupy_major)
    comm = fake.NcclCommunicator(1, fake.get_unique_id(), 0)  # type: ignore[attr-defined]
    with pytest.raises(error):
        comm.allReduce(*args)


def test_the_cupy_version_decides_the_id_type(monkeypatch: pytest.MonkeyPatch) -> None:
    assert nccl_mod.cupy_major("14.2.0") == 14
    assert nccl_mod.cupy_major("13.6.0") == 13
    assert nccl_mod.cupy_major("15.0.0rc1") == 15
    with pytest.raises(topo.BackendUnavailableError, match=r"__version__.*'unknown'"):
        nccl_mod.cupy_major("unknown")
    _fake_cupy.install(monkeypatch, _fake_cupy.make_nccl(13))
    assert type(nccl_mod.unique_id_argument(bytes(128))) is tuple
    _fake_cupy.install(monkeypatch, _fake_cupy.make_nccl(14))
    assert type(nccl_mod.unique_id_argument(bytes(128))) is bytes
    with pytest.raises(topo.CommunicationError, match=r"128-byte unique id.*got 3 bytes"):
        nccl_mod.unique_id_argument(b"abc")


def test_two_ranks_on_one_gpu_are_refused_before_nccl(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    fake = _fake_cupy.make_nccl(cupy_major)
    _pretend_gpu(monkeypatch, fake)
    monkeypatch.setattr("socket.gethostname", lambda: "node7")
    coord = _Coordinator(others=[["node7", "GPU-0000-fake"]])
    with pytest.raises(
        topo.TopoValueError,
        match=r"require one GPU per rank, but ranks 0 and 1 both use GPU GPU-0000-fake on "
        r"host 'node7'.*share_gpu=True",
    ):
        _create(coord, (0, 1))
    assert fake.created == []  # type: ignore[attr-defined]  # NCCL was never called
    # a distinct NCCL_HOSTID (what share_gpu gives each rank) or another GPU passes the check
    nccl_mod.check_one_gpu_per_rank([["a", "G"], ["b", "G"], ["a", "H"]], (0, 1, 2),
                                    torch.device("cuda", 0), "axis 'x'")  # fmt: skip
    monkeypatch.setenv("NCCL_HOSTID", "topo-rank-0")
    assert nccl_mod.gpu_identity(torch.device("cuda", 0)) == ["topo-rank-0", "GPU-0000-fake"]


def test_a_refused_argument_is_not_dressed_as_a_runtime_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _fake_cupy.make_nccl(14)
    _pretend_gpu(monkeypatch, fake)
    monkeypatch.setattr(nccl_mod, "unique_id_argument", lambda data, label="": tuple(data))
    with pytest.raises(TypeError, match="expected bytes, got tuple"):
        _create(_Coordinator())


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
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, fake = _fake_communicator(monkeypatch, major=cupy_major)
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


def test_watchdog_stops_with_the_communicator(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, _ = _fake_communicator(monkeypatch, major=cupy_major)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    comm.check_async_error = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr(c, "synchronize", lambda what="": None)
    c.start_watchdog(interval=0.01)
    thread = c._watchdog[0]  # type: ignore[index]
    c.close()
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("cuda", "extra"), [("12.4", "nccl-cu12"), ("13.0", "nccl-cu13"), ("12.8", "nccl-cu12")]
)
def test_install_hint_names_the_extra_for_this_cuda(cuda: str, extra: str) -> None:
    assert f"topo[{extra}]" in nccl_mod.install_hint(cuda)


@pytest.mark.parametrize("cuda", ["12.6", "13.0", None])
def test_install_hint_follows_this_torchs_cuda(
    monkeypatch: pytest.MonkeyPatch, cuda: str | None
) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda)
    hint = nccl_mod.install_hint()
    if cuda is None:  # a CPU build of torch: both extras, and a word about a CUDA torch
        assert "topo[nccl-cu12]" in hint and "topo[nccl-cu13]" in hint and "CUDA none" in hint
    else:
        assert f"topo[nccl-cu{cuda.split('.')[0]}]" in hint


def _over_fake_nccl(fake: Any) -> dict[str, list[bool]]:
    """:func:`_spawn_fns.out_writes_bump_versions` with this rank's "tp" communicator replaced
    by topo's NCCL communicator over a 2-rank strict fake cupy (it moves nothing between ranks:
    the versions are what this checks)."""
    import _spawn_fns

    ctx = topo.current()
    me = ctx.axis_index("tp")
    raw = fake.NcclCommunicator(2, nccl_mod.unique_id_argument(  # type: ignore[attr-defined]
        nccl_mod.encode_unique_id(fake.get_unique_id())), me)  # type: ignore[attr-defined]  # fmt: skip
    comm = nccl_mod.NcclCommunicator(
        fake, raw, ctx.group("tp"), me, torch.device("cpu"), "axis 'tp' (fake cupy)"
    )
    comm._stream = lambda: 0  # type: ignore[method-assign]
    ctx._communicators[(("tp",), "cpu", None)] = comm  # type: ignore[assignment]
    ctx._routes.clear()
    got = _spawn_fns.out_writes_bump_versions()
    assert [call[0] for call in raw.calls] == [
        "allReduce", "allReduce", "broadcast", "broadcast", "allGather", "reduceScatter"
    ]  # fmt: skip
    return got


def test_nccl_out_writes_bump_the_version(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    """NCCL writes ``out=`` through a pointer: topo moves its version counter, as gloo's and a
    torch op's ``out=`` do (tests/test_collectives.py), so autograd refuses a saved ``out``."""
    every = {name: [True, True] for name in (
        "all_reduce in place", "all_reduce", "broadcast in place", "broadcast", "all_gather",
        "reduce_scatter",
    )}  # fmt: skip
    fake = _fake_cupy.make_nccl(cupy_major)
    _fake_cupy.install(monkeypatch, fake)
    assert topo.simulate(topo.DeviceMesh(tp=2), _over_fake_nccl, fake) == [every, every]
