"""The contract with the real cupy, on a machine without a GPU.

``cupy.cuda.nccl`` imports and parses its arguments without a GPU: a call whose arguments
cupy accepts reaches NCCL and fails there with ``NcclError`` (no CUDA device, or a null
communicator: ``NCCL_ERROR_INVALID_ARGUMENT``), while an argument of the wrong type fails
first with ``TypeError``/``OverflowError``/``ValueError``. So every cupy entry point topo
calls is fed here, through topo's own code, with exactly what topo passes, and must fail only
in NCCL. (cupy 14 changed the unique id from a tuple to ``bytes``; the fake cupy of the other
tests had kept the tuple, and every multi-rank NCCL communicator failed on a real GPU.)

The tests skip when cupy is not installed; CI installs the ``nccl`` extra and runs this file
with ``TOPO_REQUIRE_CUPY=1`` (``make contract``), which turns the skip into a failure. They
also check that the strict fake cupy (tests/_fake_cupy.py) refuses what the real one refuses.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import _fake_cupy
import pytest
import torch

import topo
from topo.communicators import nccl as nccl_mod
from topo.communicators.nccl_types import NCCL_DTYPES, NCCL_OPS


def _real_nccl() -> Any:
    try:
        from cupy.cuda import nccl
    except Exception as error:  # ImportError, or OSError without libnccl
        if os.environ.get("TOPO_REQUIRE_CUPY") == "1":
            pytest.fail(
                f"TOPO_REQUIRE_CUPY=1 requires cupy with NCCL (pip install -e '.[nccl]'), but "
                f"importing cupy.cuda.nccl failed: {type(error).__name__}: {error}"
            )
        pytest.skip(f"the contract test needs the real cupy ({type(error).__name__}: {error})")
    return nccl


@pytest.fixture
def nccl() -> Any:
    return _real_nccl()


pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the contract is checked where there is no GPU"
)


class _Coordinator:
    """What NcclCommunicator.create asks of the coordinator, for rank 0 of a 2-rank group
    whose other member is on another host."""

    def broadcast(self, data: bytes | None, src: int, ranks: tuple[int, ...]) -> bytes:
        assert isinstance(data, bytes)
        return data

    def all_gather_json(self, value: Any, ranks: tuple[int, ...]) -> list[Any]:
        return [value, ["another-host", "GPU-other"]]

    def barrier(self, name: str, ranks: tuple[int, ...]) -> str:
        return name


def _null_communicator(nccl: Any) -> nccl_mod.NcclCommunicator:
    """topo's communicator over a real, never initialized cupy NcclCommunicator (a null
    ``ncclComm_t``): cupy parses every argument, then NCCL answers ncclInvalidArgument."""
    raw = nccl.NcclCommunicator.__new__(nccl.NcclCommunicator)
    comm = nccl_mod.NcclCommunicator(nccl, raw, (0, 1), 0, torch.device("cpu"), "axis 'tp'")
    comm._stream = lambda: 0  # torch's raw stream handle: an int
    return comm


def test_topo_loads_the_real_cupy_and_reads_its_version(nccl: Any) -> None:
    assert nccl_mod.load_nccl() is nccl
    assert nccl_mod.cupy_major() >= 13
    assert nccl_mod.nccl_version() == nccl.get_version() > 0


def test_topos_dtype_and_op_codes_are_cupys(nccl: Any) -> None:
    names = {
        torch.int8: "NCCL_INT8",
        torch.uint8: "NCCL_UINT8",
        torch.int32: "NCCL_INT32",
        torch.int64: "NCCL_INT64",
        torch.float16: "NCCL_FLOAT16",
        torch.float32: "NCCL_FLOAT32",
        torch.float64: "NCCL_FLOAT64",
        torch.bfloat16: "NCCL_BFLOAT16",
    }
    assert {dtype: getattr(nccl, name) for dtype, name in names.items()} == NCCL_DTYPES
    assert {op: getattr(nccl, f"NCCL_{op.upper()}") for op in NCCL_OPS} == NCCL_OPS


def test_the_unique_id_topo_passes_gets_past_cupys_parsing(
    nccl: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id through NcclCommunicator.create, as on a GPU: only NCCL (no CUDA device) fails."""
    data = nccl_mod.encode_unique_id(nccl.get_unique_id())
    assert len(data) == nccl_mod.UNIQUE_ID_BYTES
    props = type("Props", (), {"uuid": "GPU-this"})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    with pytest.raises(topo.CommunicationError) as caught:
        nccl_mod.NcclCommunicator.create(
            _Coordinator(),  # type: ignore[arg-type]
            "scope",
            (0, 1),
            0,
            torch.device("cuda", 0),
            "axis 'tp' group (0, 1)",
            timedelta(seconds=5),
        )
    message = str(caught.value)
    assert "NcclError" in message and "NCCL_ERROR" in message, message
    assert "TypeError" not in message, message
    # and the raw call the benchmark makes with topo's helper
    with pytest.raises(nccl.NcclError):
        nccl.NcclCommunicator(2, nccl_mod.unique_id_argument(data), 0)


def _calls(comm: nccl_mod.NcclCommunicator) -> dict[str, Callable[[], object]]:
    """Every communicator method that reaches cupy, with tensors of several dtypes."""
    f32, bf16, f8 = torch.ones(2, 3), torch.ones(4, dtype=torch.bfloat16), torch.zeros(5)
    f8 = f8.to(torch.float8_e4m3fn)
    stacked = torch.ones(2, 3)
    return {
        "all_reduce": lambda: comm.all_reduce(f32, "sum"),
        "all_reduce avg": lambda: comm.all_reduce(bf16, "avg"),
        "all_gather": lambda: comm.all_gather(f32),
        "all_gather as bytes": lambda: comm.all_gather(f8),
        "reduce_scatter": lambda: comm.reduce_scatter(stacked, "max"),
        "broadcast": lambda: comm.broadcast(f32, 1),
        "gather (root)": lambda: comm.gather(f32, 0),
        "gather (sender)": lambda: comm.gather(f32, 1),
        "scatter": lambda: comm.scatter(stacked, 0),
        "all_to_all": lambda: comm.all_to_all(stacked),
        "send/recv": lambda: comm.exchange([(1, f32)], [(1, torch.empty(3))]),
        "all_reduce_into": lambda: comm.all_reduce_into(f32, "sum", torch.empty(2, 3)),
        "all_gather_dim0": lambda: comm.all_gather_dim0(f32),
        "reduce_scatter_dim0": lambda: comm.reduce_scatter_dim0(stacked, "avg"),
        "all_to_all_dim0": lambda: comm.all_to_all_dim0(stacked),
        "all_gatherv_dim0": lambda: comm.all_gatherv_dim0(f32, [2, 1]),
        "all_gatherv_dim0 as bytes": lambda: comm.all_gatherv_dim0(f8, [5, 0]),
        "all_to_allv_dim0": lambda: comm.all_to_allv_dim0(f32, [0, 2], [1, 3]),
        "all_to_allv_dim0 as bytes": lambda: comm.all_to_allv_dim0(f8, [2, 3], [0, 1]),
    }


_COLLECTIVES = ["all_reduce", "all_reduce avg", "all_gather", "all_gather as bytes",
                "reduce_scatter", "broadcast", "gather (root)", "gather (sender)", "scatter",
                "all_to_all", "send/recv", "all_reduce_into", "all_gather_dim0",
                "reduce_scatter_dim0", "all_to_all_dim0", "all_gatherv_dim0",
                "all_gatherv_dim0 as bytes", "all_to_allv_dim0",
                "all_to_allv_dim0 as bytes"]  # fmt: skip


@pytest.mark.parametrize("what", _COLLECTIVES)
def test_every_collective_reaches_nccl_with_arguments_cupy_accepts(nccl: Any, what: str) -> None:
    comm = _null_communicator(nccl)
    calls = _calls(comm)
    assert sorted(calls) == sorted(_COLLECTIVES)
    with pytest.raises(topo.CommunicationError, match="failed in NCCL: NCCL_ERROR"):
        calls[what]()


def test_watchdog_check_and_abort_reach_cupy(nccl: Any) -> None:
    comm = _null_communicator(nccl)
    comm.start_watchdog(interval=0.01)
    deadline = time.monotonic() + 10
    while comm.async_error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert comm.async_error is not None and "NCCL_ERROR" in comm.async_error
    with pytest.raises(topo.CommunicationError, match="closed"):
        comm.all_reduce(torch.ones(2), "sum")


def test_without_a_gpu_topo_names_the_missing_gpu(nccl: Any) -> None:
    with pytest.raises(topo.BackendUnavailableError, match=r"require a CUDA GPU.*torch sees none"):
        nccl_mod.NcclCommunicator.create(
            _Coordinator(),  # type: ignore[arg-type]
            "scope",
            (0, 1),
            0,
            torch.device("cuda", 0),
            "axis 'tp' group (0, 1)",
        )


#: Arguments cupy must refuse before NCCL runs, as (method, args): the strict fake must agree.
_REFUSED: list[tuple[str, tuple[Any, ...]]] = [
    ("allReduce", (1.5, 2, 16, 7, 0, 0)),
    ("allReduce", (1, 2, -1, 7, 0, 0)),
    ("allReduce", (1, 2, 16, 7, 0, None)),
    ("allGather", (1, 2, 16, "7", 0)),
    ("reduceScatter", (1, 2, 2**64, 7, 0, 0)),
    ("broadcast", (1, 2, 16, 7, 0, 0.0)),
    ("send", (None, 16, 7, 1, 0)),
    ("recv", (1, -16, 7, 1, 0)),
]


@pytest.mark.parametrize(("method", "args"), _REFUSED)
def test_the_fake_refuses_what_the_real_cupy_refuses(
    nccl: Any, method: str, args: tuple[Any, ...], cupy_major: int
) -> None:
    raw = nccl.NcclCommunicator.__new__(nccl.NcclCommunicator)
    with pytest.raises(Exception) as real:
        getattr(raw, method)(*args)
    fake = _fake_cupy.make_nccl(cupy_major)
    comm = fake.NcclCommunicator(2, fake.get_unique_id(), 0)  # type: ignore[attr-defined]
    with pytest.raises(Exception) as faked:
        getattr(comm, method)(*args)
    assert not isinstance(real.value, nccl.NcclError)  # refused in parsing, before NCCL
    assert type(faked.value) is type(real.value), (real.value, faked.value)


def test_the_fake_refuses_the_id_type_the_real_cupy_refuses(nccl: Any) -> None:
    major = nccl_mod.cupy_major()
    fake = _fake_cupy.make_nccl(major)
    wrong = tuple(nccl.get_unique_id()) if major >= 14 else bytes(128)
    for module in (nccl, fake):
        with pytest.raises(TypeError, match="Argument 'commId' has incorrect type"):
            module.NcclCommunicator(2, wrong, 0)
    assert type(fake.get_unique_id()) is type(nccl.get_unique_id())  # type: ignore[attr-defined]
