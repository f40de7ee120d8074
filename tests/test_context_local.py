"""Activation and collectives in this process, with single-rank meshes (no processes started).

A size-1 axis never communicates, so every collective can run here; argument errors are
raised before any communication, so they can be checked here too.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed

import topo
from topo import DeviceMesh, World
from topo.context import DEFAULT_TIMEOUT, MeshContext

WORLD = World(rank=0, world_size=1, master_port=0)  # rank 0 hosts a store on a free port

# Most tests attach to this in-memory store rather than host a TCPStore per activation: on
# some machines about one TCPStore connection in 25 stalls for 5 s inside torch.
STORE = torch.distributed.HashStore()


@pytest.fixture
def ctx() -> Iterator[MeshContext]:
    with DeviceMesh(dp=1, tp=1).activate(WORLD, store=STORE, timeout=30) as context:
        yield context


def _x() -> torch.Tensor:
    return torch.arange(24, dtype=torch.float32).reshape(4, 6) - 3.5


# ----------------------------------------------------------------------------- activation


def test_activation_with_port_zero() -> None:
    with DeviceMesh(tp=1).activate(WORLD, timeout=10) as ctx:
        assert isinstance(ctx, MeshContext)
        assert ctx.rank == 0 and ctx.coords == {"tp": 0}
        assert ctx.world == WORLD
        assert ctx.group("tp") == (0,)
        assert ctx.axis_index("tp") == 0 and ctx.axis_size("tp") == 1
        assert ctx.timeout == timedelta(seconds=10)
        assert ctx.store_ops > 0
        assert "active" in repr(ctx) and "DeviceMesh(tp=1)" in repr(ctx)
        # a nested activation on the same world hosts its own store on another free port
        with DeviceMesh(dp=1).activate(WORLD, timeout=10) as inner:
            assert topo.all_gather(torch.ones(1), "dp").shape == (1,)
            assert topo.all_reduce(torch.ones(1), "tp").shape == (1,)
            assert topo.active_contexts() == (ctx, inner)


def test_activation_on_an_explicit_store() -> None:
    store = torch.distributed.HashStore()
    for _ in range(3):
        with DeviceMesh(tp=1).activate(WORLD, store=store, timeout=10):
            assert torch.equal(topo.all_reduce(torch.ones(2), "tp"), torch.ones(2))
    assert store.num_keys() <= 3  # re-activating leaves (almost) nothing behind


def test_activation_reads_the_world_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",
    }.items():
        monkeypatch.setenv(var, value)
    with DeviceMesh(tp=1).activate(timeout=10) as ctx:
        assert ctx.world == World(rank=0, world_size=1, master_port=0)


def test_timeout_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOPO_TIMEOUT", raising=False)
    with DeviceMesh(tp=1).activate(WORLD, store=STORE) as ctx:
        assert ctx.timeout == DEFAULT_TIMEOUT
    with DeviceMesh(tp=1).activate(WORLD, store=STORE, timeout=timedelta(seconds=12)) as ctx:
        assert ctx.timeout == timedelta(seconds=12)
    with DeviceMesh(tp=1).activate(WORLD, store=STORE, timeout=2.5) as ctx:
        assert ctx.timeout == timedelta(seconds=2.5)
    monkeypatch.setenv("TOPO_TIMEOUT", "7")
    with DeviceMesh(tp=1).activate(WORLD, store=STORE) as ctx:
        assert ctx.timeout == timedelta(seconds=7)
    with DeviceMesh(tp=1).activate(WORLD, store=STORE, timeout=3) as ctx:  # explicit wins
        assert ctx.timeout == timedelta(seconds=3)


@pytest.mark.parametrize(
    ("timeout", "error", "fragment"),
    [
        (0, ValueError, "positive"),
        (-1, ValueError, "positive"),
        (math.nan, ValueError, "positive"),
        (timedelta(0), ValueError, "positive"),
        (timedelta(seconds=-5), ValueError, "positive"),
        ("5", TypeError, "seconds"),
        (True, TypeError, "seconds"),
        ([5], TypeError, "seconds"),
    ],
)
def test_bad_timeouts(timeout: Any, error: type[Exception], fragment: str) -> None:
    with (
        pytest.raises(error, match=fragment),
        DeviceMesh(tp=1).activate(WORLD, store=STORE, timeout=timeout),
    ):
        pass
    assert topo.active_contexts() == ()


def test_bad_topo_timeout_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPO_TIMEOUT", "soon")
    with (
        pytest.raises(ValueError, match="TOPO_TIMEOUT") as info,
        DeviceMesh(tp=1).activate(WORLD, store=STORE),
    ):
        pass
    assert "'soon'" in str(info.value)
    monkeypatch.setenv("TOPO_TIMEOUT", "-3")
    with pytest.raises(ValueError, match="positive"), DeviceMesh(tp=1).activate(WORLD, store=STORE):
        pass


def test_world_size_mismatch_spells_the_arithmetic() -> None:
    with (
        pytest.raises(ValueError) as info,
        DeviceMesh(dp=2, tp=2).activate(World(rank=0, world_size=3)),
    ):
        pass
    assert "dp(2) * tp(2) = 4 does not match world size 3" in str(info.value)
    with pytest.raises(
        ValueError, match=r"dp\(2\) \* pp\(2\) \* tp\(2\) = 8 does not match world size 6"
    ):
        topo.activate(DeviceMesh(dp=2, pp=2, tp=2), World(rank=5, world_size=6)).__enter__()


def test_activate_argument_types() -> None:
    with pytest.raises(TypeError, match="DeviceMesh"), topo.activate("tp=1", WORLD):  # type: ignore[arg-type]
        pass
    with pytest.raises(TypeError, match=r"topo\.World"), DeviceMesh(tp=1).activate({"rank": 0}):  # type: ignore[arg-type]
        pass
    with (
        pytest.raises(ValueError, match="CUDA device"),
        DeviceMesh(tp=1).activate(WORLD, store=STORE, device="cpu"),
    ):
        pass
    with (
        pytest.raises(TypeError, match="device"),
        DeviceMesh(tp=1).activate(WORLD, store=STORE, device=True),
    ):
        pass


def test_activation_without_a_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(topo.WorldError, match="RANK"), DeviceMesh(tp=1).activate():
        pass


# ----------------------------------------------------------------------------- current / stack


def test_current_and_active_contexts() -> None:
    assert topo.active_contexts() == ()
    with pytest.raises(topo.NoActiveMeshError, match=r"mesh\.activate\(\)"):
        topo.current()
    with DeviceMesh(tp=1).activate(WORLD, store=STORE) as outer:
        assert topo.current() is outer
        assert topo.active_contexts() == (outer,)
        with DeviceMesh(dp=1, ep=1).activate(WORLD, store=STORE, name="inner") as inner:
            assert topo.current() is inner
            assert topo.active_contexts() == (outer, inner)
            assert topo.axis_size("tp") == 1  # the outer axis still resolves
            assert topo.axis_size(("dp", "ep")) == 1
        assert topo.active_contexts() == (outer,)
    assert topo.active_contexts() == ()


def test_innermost_context_with_the_axis_wins() -> None:
    with (
        DeviceMesh(tp=1, sp=1).activate(WORLD, store=STORE) as outer,
        DeviceMesh(tp=1).activate(WORLD, store=STORE, name="shadow") as inner,
    ):
        from topo.active import find_context

        assert find_context("tp", "test")[0] is inner
        assert find_context("sp", "test")[0] is outer
        assert find_context(("tp",), "test")[0] is inner
        # a tuple that only the outer mesh has as a whole
        assert find_context(("sp", "tp"), "test")[0] is outer


def test_context_is_closed_after_the_block() -> None:
    with DeviceMesh(tp=1).activate(WORLD, store=STORE) as ctx:
        topo.all_reduce(torch.ones(1), "tp")
    assert "closed" in repr(ctx)
    with pytest.raises(topo.CommunicationError, match="closed"):
        ctx.communicator(("tp",), "cpu")
    with pytest.raises(topo.NoActiveMeshError):
        topo.all_reduce(torch.ones(1), "tp")


def test_context_is_closed_when_the_block_raises() -> None:
    with (
        pytest.raises(KeyError, match="inside"),
        DeviceMesh(tp=1).activate(WORLD, store=STORE) as ctx,
    ):
        raise KeyError("inside")
    assert "closed" in repr(ctx)
    assert topo.active_contexts() == ()


def test_context_var_is_per_thread() -> None:
    seen: dict[str, Any] = {}

    def other_thread() -> None:
        seen["before"] = topo.active_contexts()
        try:
            topo.all_reduce(torch.ones(1), "tp")
        except topo.NoActiveMeshError as error:
            seen["error"] = str(error)
        with DeviceMesh(ep=1).activate(WORLD, store=STORE, name="thread") as own:
            seen["inside"] = topo.active_contexts() == (own,)
            seen["result"] = topo.all_gather(torch.ones(2), "ep")
        seen["after"] = topo.active_contexts()

    with DeviceMesh(tp=1).activate(WORLD, store=STORE) as ctx:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(30)
        assert topo.active_contexts() == (ctx,)
    assert seen["before"] == () and seen["after"] == ()
    assert "in this thread" in seen["error"]
    assert seen["inside"] is True
    assert torch.equal(seen["result"], torch.ones(2))


# ----------------------------------------------------------------------------- size-1 axes


def _assert_copy(result: torch.Tensor, x: torch.Tensor, expected: torch.Tensor) -> None:
    assert isinstance(result, torch.Tensor)
    assert result.dtype == expected.dtype and torch.equal(result, expected)
    assert result.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    before = x.clone()
    result.add_(1) if result.dtype != torch.bool else result.logical_not_()
    assert torch.equal(x, before), "writing to the result changed the input"


@pytest.mark.parametrize("axis", ["tp", "dp", ("dp", "tp"), ["tp", "dp"]])
@pytest.mark.parametrize("transposed", [False, True])
def test_size_one_axis_returns_copies(ctx: MeshContext, axis: Any, transposed: bool) -> None:
    x = _x().t() if transposed else _x()
    for op in ("sum", "avg", "max", "min", "prod"):
        _assert_copy(topo.all_reduce(x, axis, op=op), x, x)
    for dim in (0, 1, -1):
        _assert_copy(topo.all_gather(x, axis, dim=dim), x, x)
        _assert_copy(topo.reduce_scatter(x, axis, dim=dim), x, x)
        _assert_copy(topo.scatter(x, axis, dim=dim), x, x)
        _assert_copy(topo.gather(x, axis, dim=dim), x, x)  # type: ignore[arg-type]
        _assert_copy(topo.all_to_all(x, axis, split_dim=dim, concat_dim=0), x, x)
        _assert_copy(topo.all_to_all(x, axis, split_dim=0, concat_dim=dim), x, x)
    _assert_copy(topo.broadcast(x, axis), x, x)
    _assert_copy(topo.ppermute(x, axis, [(0, 0)]), x, x)
    _assert_copy(topo.shift(x, axis), x, x)
    _assert_copy(topo.shift(x, axis, offset=-3), x, x)
    _assert_copy(topo.shift(x, axis, wrap=False), x, torch.zeros_like(x))
    _assert_copy(topo.ppermute(x, axis, []), x, torch.zeros_like(x))
    assert topo.axis_index(axis) == 0 and topo.axis_size(axis) == 1
    topo.barrier(axis)
    topo.barrier()
    assert torch.equal(x, _x().t() if transposed else _x())


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor(2.5),
        torch.tensor(-3, dtype=torch.int64),
        torch.arange(6, dtype=torch.int8),
        torch.ones(3, dtype=torch.bfloat16),
        torch.ones(3, dtype=torch.float16),
        torch.arange(5, dtype=torch.uint8),
    ],
)
def test_size_one_all_reduce_dtypes(ctx: MeshContext, x: torch.Tensor) -> None:
    for op in ("sum", "max", "min", "prod") + (("avg",) if x.dtype.is_floating_point else ()):
        _assert_copy(topo.all_reduce(x, "tp", op=op), x, x)


def test_size_one_non_reducing_dtypes(ctx: MeshContext) -> None:
    for x in (
        torch.complex(torch.ones(4), torch.arange(4.0)),
        torch.tensor([True, False, True, True]),
    ):
        _assert_copy(topo.all_gather(x, "tp"), x, x)
        _assert_copy(topo.broadcast(x, "tp"), x, x)
        _assert_copy(topo.scatter(x, "tp"), x, x)
        _assert_copy(topo.all_to_all(x, "tp"), x, x)
        _assert_copy(topo.ppermute(x, "tp", [(0, 0)]), x, x)


def test_size_one_objects(ctx: MeshContext) -> None:
    obj = {"a": [1, 2], "b": torch.ones(2)}
    copy = topo.broadcast_object(obj, "tp")
    assert copy is not obj and copy["a"] == [1, 2] and torch.equal(copy["b"], obj["b"])
    gathered = topo.all_gather_object(obj, ("dp", "tp"))
    assert len(gathered) == 1 and gathered[0] is not obj and gathered[0]["a"] == [1, 2]


# ----------------------------------------------------------------------------- bad inputs


def test_no_active_context_for_every_collective() -> None:
    x = torch.ones(2)
    calls = {
        "all_reduce": lambda: topo.all_reduce(x, "tp"),
        "all_gather": lambda: topo.all_gather(x, "tp"),
        "reduce_scatter": lambda: topo.reduce_scatter(x, "tp"),
        "broadcast": lambda: topo.broadcast(x, "tp"),
        "scatter": lambda: topo.scatter(x, "tp"),
        "gather": lambda: topo.gather(x, "tp"),
        "all_to_all": lambda: topo.all_to_all(x, "tp"),
        "ppermute": lambda: topo.ppermute(x, "tp", []),
        "shift": lambda: topo.shift(x, "tp"),
        "send": lambda: topo.send(x, "tp", 1),
        "recv": lambda: topo.recv((2,), torch.float32, "tp", 1),
        "broadcast_object": lambda: topo.broadcast_object(1, "tp"),
        "all_gather_object": lambda: topo.all_gather_object(1, "tp"),
        "axis_index": lambda: topo.axis_index("tp"),
        "axis_size": lambda: topo.axis_size("tp"),
        "barrier": lambda: topo.barrier("tp"),
        "barrier()": lambda: topo.barrier(),
    }
    for name, call in calls.items():
        with pytest.raises(topo.NoActiveMeshError) as info:
            call()
        message = str(info.value)
        assert "mesh.activate()" in message, name
        assert "topo.current" in message if name == "barrier()" else f"topo.{name} " in message


def test_unknown_axis_lists_the_valid_axes(ctx: MeshContext) -> None:
    with pytest.raises(ValueError) as info:
        topo.all_reduce(torch.ones(2), "ep")
    assert "'ep'" in str(info.value) and "'dp', 'tp'" in str(info.value)
    with pytest.raises(ValueError, match="'ep'"):
        topo.all_gather(torch.ones(2), ("dp", "ep"))
    with DeviceMesh(sp=1).activate(WORLD, store=STORE, name="second"):
        with pytest.raises(ValueError) as info:
            topo.broadcast(torch.ones(2), "ep")
        message = str(info.value)
        assert "'ep'" in message and "'dp', 'sp', 'tp'" in message
        assert "DeviceMesh(dp=1, tp=1)" in message and "DeviceMesh(sp=1)" in message
    with pytest.raises(TypeError, match="axis"):
        topo.all_reduce(torch.ones(2), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        topo.all_reduce(torch.ones(2), ("tp", "tp"))
    with pytest.raises(ValueError, match="at least one"):
        topo.all_reduce(torch.ones(2), ())


@pytest.mark.parametrize("op", ["mean", "SUM", None, 0, "band"])
def test_bad_op(ctx: MeshContext, op: Any) -> None:
    with pytest.raises(ValueError, match="'sum', 'avg', 'max', 'min', 'prod'"):
        topo.all_reduce(torch.ones(2), "tp", op=op)
    with pytest.raises(ValueError, match="op requires"):
        topo.reduce_scatter(torch.ones(2), "tp", op=op)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8])
def test_avg_on_integers(ctx: MeshContext, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="op='avg' requires a floating-point") as info:
        topo.all_reduce(torch.ones(2, dtype=dtype), "tp", op="avg")
    assert str(dtype) in str(info.value)
    with pytest.raises(TypeError, match="avg"):
        topo.reduce_scatter(torch.ones(2, dtype=dtype), "tp", op="avg")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.bool, torch.int16])
def test_dtype_gloo_cannot_reduce(ctx: MeshContext, dtype: torch.dtype) -> None:
    x = torch.ones(4, dtype=dtype)
    with pytest.raises(TypeError, match="gloo can reduce") as info:
        topo.all_reduce(x, "tp")
    assert str(dtype) in str(info.value) and "float32" in str(info.value)
    with pytest.raises(TypeError, match="gloo can reduce"):
        topo.reduce_scatter(x, "tp", op="max")


def test_dim_errors(ctx: MeshContext) -> None:
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"-2 <= dim < 2 for a 2-d tensor, but got 2"):
        topo.all_gather(x, "tp", dim=2)
    with pytest.raises(ValueError, match="got -3"):
        topo.reduce_scatter(x, "tp", dim=-3)
    with pytest.raises(ValueError, match="dim"):
        topo.scatter(x, "tp", dim=5)
    with pytest.raises(ValueError, match="dim"):
        topo.gather(x, "tp", dim=-9)
    with pytest.raises(ValueError, match="split_dim"):
        topo.all_to_all(x, "tp", split_dim=2)
    with pytest.raises(ValueError, match="concat_dim"):
        topo.all_to_all(x, "tp", concat_dim=-3)
    with pytest.raises(ValueError, match="0-d"):
        topo.all_gather(torch.tensor(1.0), "tp")
    with pytest.raises(TypeError, match="bool"):
        topo.all_gather(x, "tp", dim=True)
    with pytest.raises(TypeError, match="int"):
        topo.all_gather(x, "tp", dim=0.0)  # type: ignore[arg-type]


def test_src_dst_errors(ctx: MeshContext) -> None:
    x = torch.ones(2)
    with pytest.raises(ValueError, match=r"0 <= src < 1 .*not a global rank.*got 1"):
        topo.broadcast(x, "tp", src=1)
    with pytest.raises(ValueError, match="got -1"):
        topo.scatter(x, "tp", src=-1)
    with pytest.raises(ValueError, match=r"0 <= dst < 1"):
        topo.gather(x, ("dp", "tp"), dst=3)
    with pytest.raises(ValueError, match="src"):
        topo.broadcast_object("o", "tp", src=2)
    with pytest.raises(TypeError, match="bool"):
        topo.broadcast(x, "tp", src=False)
    with pytest.raises(TypeError, match="bool"):
        topo.gather(x, "tp", dst=True)
    with pytest.raises(TypeError, match="int index"):
        topo.scatter(x, "tp", src="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int index"):
        topo.broadcast(x, "tp", src=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[1.0, 2.0], None, 3, "tensor", torch.ones(2).numpy()])
def test_non_tensor_input(ctx: MeshContext, bad: Any) -> None:
    for call in (
        lambda: topo.all_reduce(bad, "tp"),
        lambda: topo.all_gather(bad, "tp"),
        lambda: topo.reduce_scatter(bad, "tp"),
        lambda: topo.broadcast(bad, "tp"),
        lambda: topo.scatter(bad, "tp"),
        lambda: topo.gather(bad, "tp"),
        lambda: topo.all_to_all(bad, "tp"),
        lambda: topo.ppermute(bad, "tp", []),
        lambda: topo.shift(bad, "tp"),
        lambda: topo.send(bad, "tp", 0),
    ):
        with pytest.raises(TypeError, match=r"requires a torch\.Tensor"):
            call()


def test_meta_tensor(ctx: MeshContext) -> None:
    x = torch.ones(4, device="meta")
    for call in (
        lambda: topo.all_reduce(x, "tp"),
        lambda: topo.all_gather(x, "tp"),
        lambda: topo.broadcast(x, "tp"),
        lambda: topo.ppermute(x, "tp", []),
        lambda: topo.all_to_all(x, "tp"),
    ):
        with pytest.raises(ValueError, match=r"'cpu' \(gloo\) or 'cuda' \(NCCL\).*meta"):
            call()
    with pytest.raises(ValueError, match="device"):
        topo.recv((2,), torch.float32, "tp", 0, device="meta")


def test_ppermute_perm_errors(ctx: MeshContext) -> None:
    x = torch.ones(2)
    with pytest.raises(ValueError, match="at most once"):
        topo.ppermute(x, "tp", [(0, 0), (0, 0)])
    with pytest.raises(ValueError, match=r"perm dst requires 0 <= perm dst < 1.*got 1"):
        topo.ppermute(x, "tp", [(0, 1)])
    with pytest.raises(ValueError, match="perm src"):
        topo.ppermute(x, "tp", [(-1, 0)])
    with pytest.raises(TypeError, match="sequence of"):
        topo.ppermute(x, "tp", {(0, 0)})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pairs"):
        topo.ppermute(x, "tp", [(0, 0, 0)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="pairs"):
        topo.ppermute(x, "tp", [0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="bool"):
        topo.ppermute(x, "tp", [(True, 0)])


def test_shift_and_p2p_argument_errors(ctx: MeshContext) -> None:
    x = torch.ones(2)
    with pytest.raises(TypeError, match="offset"):
        topo.shift(x, "tp", offset=True)
    with pytest.raises(TypeError, match="offset"):
        topo.shift(x, "tp", offset=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="wrap"):
        topo.shift(x, "tp", wrap=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="own"):
        topo.send(x, "tp", dst=0)
    with pytest.raises(ValueError, match="own"):
        topo.recv((2,), torch.float32, "tp", src=0)
    with pytest.raises(ValueError, match="0 <= dst < 1"):
        topo.send(x, "tp", dst=1)
    with pytest.raises(TypeError, match="dtype"):
        topo.recv((2,), "float32", "tp", src=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"recv shape requires a sequence of ints"):
        topo.recv(None, torch.float32, "tp", src=0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- errors


def test_error_hierarchy_and_pickling() -> None:
    import pickle

    assert issubclass(topo.RendezvousTimeout, topo.TopoError)
    assert issubclass(topo.RendezvousTimeout, TimeoutError)
    assert issubclass(topo.CommunicationTimeout, topo.CommunicationError)
    assert issubclass(topo.CommunicationTimeout, TimeoutError)
    assert issubclass(topo.CommunicationError, RuntimeError)
    assert issubclass(topo.NoActiveMeshError, RuntimeError)
    assert issubclass(topo.RankFailedError, topo.TopoError)
    error = topo.RankFailedError("rank 3 raised", rank=3, remote_traceback="Traceback ...")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.rank, copy.remote_traceback) == ("rank 3 raised", 3, "Traceback ...")
