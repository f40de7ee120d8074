"""topo.all_to_allv: the uneven all-to-all (an expert-parallel MoE layer's dispatch and combine).

- hypothesis properties under ``topo.simulate``: random meshes (1–3 axes, up to 8 ranks),
  axes, size tables with zeros, dims and dtypes, against a single-process reference built from
  every rank's input; through the backend's fast path and through plain point-to-point
  exchanges; in check mode too; a round trip with the sizes swapped; gradients;
- multi-process gloo under ``topo.spawn`` (and check mode naming wrong sizes there);
- torch.compile(fullgraph=True) and opcheck of the ops ``topo::all_to_allv``,
  ``topo::all_gatherv`` and ``topo::reduce_scatterv`` (all_gatherv and reduce_scatterv became
  differentiable with all_to_allv: an MoE layer needs all three);
- the NCCL path against the strict fake cupy (cupy 13 and 14);
- argument errors, and the point-to-point check that compares what one end sends with what
  the other expects.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any
from unittest import mock

import _all_to_allv_fns as fns
import _fake_cupy
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import topo
from topo import DeviceMesh, World
from topo.communicators import nccl as nccl_mod
from topo.communicators.alltoallv import by_exchange, sizes_mismatch
from topo.communicators.nccl_types import NCCL_DTYPES
from topo.communicators.threads import ThreadsCommunicator

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WAIT = 30.0
NAMES = ("a", "b", "c")
DTYPES = (
    torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32,
    torch.int8, torch.uint8, torch.bool, torch.complex64,
)  # fmt: skip


# ---------------------------------------------------------------------------- strategies


@st.composite
def meshes(draw: st.DrawFn) -> DeviceMesh:
    sizes: list[int] = []
    for _ in range(draw(st.integers(1, 3))):
        room = 8
        for s in sizes:
            room //= s
        sizes.append(draw(st.integers(1, min(4, room))))
    return DeviceMesh(**dict(zip(NAMES, sizes, strict=False)))


@st.composite
def cases(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = DTYPES) -> dict[str, Any]:
    """A mesh, an axis of it (a name or a tuple), a table of send sizes (row ``i``: index
    ``i``'s ``send_sizes``; zeros included), the input's other sizes, a dim and a dtype."""
    mesh = draw(meshes())
    chosen = draw(
        st.lists(st.sampled_from(mesh.axis_names), min_size=1, max_size=mesh.ndim, unique=True)
    )
    axis = chosen[0] if len(chosen) == 1 else tuple(chosen)
    n = mesh.axis_size(axis)
    row = st.lists(st.integers(0, 3), min_size=n, max_size=n)
    ndim = draw(st.integers(1, 3))
    return {
        "mesh": mesh,
        "axis": axis,
        "n": n,
        "table": draw(st.lists(row, min_size=n, max_size=n)),
        "rest": tuple(draw(st.integers(1, 3)) for _ in range(ndim)),
        "dim": draw(st.integers(-ndim, ndim - 1)),
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.integers(0, 2**16)),
        "given": draw(st.booleans()),  # recv_sizes passed, or exchanged (None)
    }


def _input(case: dict[str, Any], rank: int, index: int) -> torch.Tensor:
    rest, dim = case["rest"], case["dim"] % len(case["rest"])
    shape = fns.shape_for(rest, dim, sum(case["table"][index]))
    return fns.make_input(case["seed"], rank, shape, case["dtype"])


def _expected(case: dict[str, Any], rank: int) -> torch.Tensor:
    mesh, axis = case["mesh"], case["axis"]
    group = mesh.group(axis, rank)
    inputs = [_input(case, r, i) for i, r in enumerate(group)]
    return fns.reference(inputs, case["table"], case["dim"], mesh.axis_index(axis, rank))


def _rank(case: dict[str, Any]) -> torch.Tensor:
    axis, table = case["axis"], case["table"]
    me = topo.axis_index(axis)
    x = _input(case, topo.current().rank, me)
    recvs = fns.recv_sizes(table, me) if case["given"] else None
    return topo.all_to_allv(x, axis, table[me], recvs, dim=case["dim"])


def _check_every_rank(case: dict[str, Any], results: list[torch.Tensor]) -> None:
    assert len(results) == case["mesh"].size
    for rank, got in enumerate(results):
        want = _expected(case, rank)
        assert got.dtype == want.dtype and got.shape == want.shape, (rank, got.shape, want.shape)
        assert got.is_contiguous()
        assert torch.equal(got, want), rank


# ------------------------------------------------------------- properties under simulate


@PROPERTY
@given(cases(), st.sampled_from(["fast", "exchange"]), st.booleans())
def test_every_rank_gets_the_blocks_sent_to_it(
    case: dict[str, Any], path: str, check: bool
) -> None:
    """Every rank's result equals the reference, through the threads backend's own uneven
    all-to-all or a backend without it (one batch of point-to-point exchanges), with and
    without check mode."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"TOPO_CHECK": "1" if check else "0"}))
        if path == "exchange":  # a backend without the fast path: the protocol's exchange
            stack.enter_context(mock.patch.object(ThreadsCommunicator, "all_to_allv_dim0", None))
        results = topo.simulate(case["mesh"], _rank, case, timeout=WAIT)
    _check_every_rank(case, results)


def _round_trip(case: dict[str, Any]) -> bool:
    axis, table, dim = case["axis"], case["table"], case["dim"]
    me = topo.axis_index(axis)
    x = _input(case, topo.current().rank, me)
    there = topo.all_to_allv(x, axis, table[me], dim=dim)
    back = topo.all_to_allv(there, axis, fns.recv_sizes(table, me), table[me], dim=dim)
    assert torch.equal(back, x)
    return True


@PROPERTY
@given(cases())
def test_all_to_allv_then_the_swapped_sizes_is_the_identity(case: dict[str, Any]) -> None:
    assert (
        topo.simulate(case["mesh"], _round_trip, case, timeout=WAIT) == [True] * case["mesh"].size
    )


def _grad_rank(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    axis, table = case["axis"], case["table"]
    rank, me = topo.current().rank, topo.axis_index(axis)
    x = _input(case, rank, me).requires_grad_(True)
    recvs = fns.recv_sizes(table, me) if case["given"] else None
    y = topo.all_to_allv(x, axis, table[me], recvs, dim=case["dim"])
    (y * fns.grad_weight(rank, tuple(y.shape))).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad


@settings(PROPERTY, max_examples=30)
@given(cases(dtypes=(torch.float64,)))
def test_gradients_equal_the_single_process_reference(case: dict[str, Any]) -> None:
    """d(sum of every rank's loss)/d(each rank's x), against autograd through the reference
    in one process (every rank's input a leaf of one graph)."""
    mesh, axis = case["mesh"], case["axis"]
    results = topo.simulate(mesh, _grad_rank, case, timeout=WAIT)
    leaves = {
        r: _input(case, r, mesh.axis_index(axis, r)).requires_grad_(True) for r in range(mesh.size)
    }
    total = torch.zeros((), dtype=torch.float64)
    for rank in range(mesh.size):
        group = mesh.group(axis, rank)
        y = fns.reference([leaves[r] for r in group], case["table"], case["dim"],
                          mesh.axis_index(axis, rank))  # fmt: skip
        total = total + (y * fns.grad_weight(rank, tuple(y.shape))).sum()
    total.backward()
    for rank, (y, grad) in enumerate(results):
        assert torch.equal(y, _expected(case, rank))
        torch.testing.assert_close(grad, leaves[rank].grad, rtol=0, atol=0)


def test_recv_sizes_none_exchanges_and_checks_the_other_dims() -> None:
    def mismatched() -> str:
        me = topo.axis_index("ep")
        x = torch.ones(2, 3 + me)  # the dims outside dim 0 differ
        try:
            topo.all_to_allv(x, "ep", [1, 1])
        except topo.CollectiveMismatchError as error:
            return str(error)
        return "no error"

    messages = topo.simulate(DeviceMesh(ep=2), mismatched, timeout=WAIT)
    for message in messages:
        assert (
            "topo.all_to_allv requires every rank of axis 'ep' to pass x with the same dtype"
            in message
        )

    def dtypes() -> str:
        me = topo.axis_index("ep")
        try:
            topo.all_to_allv(
                torch.ones(2, dtype=torch.float32 if me else torch.float64), "ep", [1, 1]
            )
        except topo.CollectiveMismatchError as error:
            return str(error)
        return "no error"

    assert all("same dtype" in m for m in topo.simulate(DeviceMesh(ep=2), dtypes, timeout=WAIT))


def test_the_threads_backend_names_sizes_that_disagree() -> None:
    """Without check mode, the simulation still refuses sizes that disagree (gloo would
    abort the process): every rank raises the same CollectiveMismatchError."""

    def wrong() -> str:
        me = topo.axis_index("ep")
        try:
            topo.all_to_allv(torch.ones(3), "ep", [1, 2] if me == 0 else [2, 1],
                             [1, 2] if me == 0 else [3, 1])  # fmt: skip
        except topo.CollectiveMismatchError as error:
            return str(error)
        return "no error"

    with mock.patch.dict(os.environ, {"TOPO_CHECK": "0"}):
        messages = topo.simulate(DeviceMesh(ep=2), wrong, timeout=WAIT)
    assert messages[0] == messages[1]
    assert "rank 0 sends rank 1 2 rows, but rank 1 expects 3" in messages[0]


def test_check_mode_names_sizes_that_disagree_and_keeps_the_group_working() -> None:
    with mock.patch.dict(os.environ, {"TOPO_CHECK": "1"}):
        reports = topo.simulate(DeviceMesh(tp=2), fns.checked_cases, timeout=WAIT)
    _assert_checked(reports)


def _assert_checked(reports: list[dict[str, str]]) -> None:
    assert reports[0]["wrong"] == reports[1]["wrong"]
    assert reports[0]["wrong"].startswith("check mode: all_to_allv on axis 'tp' group (0, 1)")
    assert "rank 0 sends rank 1 2 rows, but rank 1 expects 3" in reports[0]["wrong"]
    assert [r["good"] for r in reports] == ["[0.0, 1.0]", "[0.0, 0.0, 1.0, 1.0]"]
    assert all(r["gatherv p2p"] == "[0.0, 1.0, 1.0]" for r in reports)
    assert [r["after"] for r in reports] == ["[0.0, 10.0]", "[1.0, 11.0]"]


def _own_block_wrong_on_rank_0() -> str:
    me = topo.axis_index("tp")
    try:
        topo.all_to_allv(torch.ones(2), "tp", [1, 1], [2, 1] if me == 0 else [1, 1])
    except topo.TopoError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_check_mode_names_a_wrong_own_block_on_every_rank() -> None:
    # without check mode rank 0 alone raises TopoValueError (its peers would wait); with it,
    # the pairwise check names the pair on both ranks
    with mock.patch.dict(os.environ, {"TOPO_CHECK": "1"}):
        messages = topo.simulate(DeviceMesh(tp=2), _own_block_wrong_on_rank_0, timeout=WAIT)
    assert messages[0] == messages[1]
    assert messages[0].startswith("CollectiveMismatchError: check mode: all_to_allv on axis")
    assert "rank 0 sends rank 0 1 rows, but rank 0 expects 2" in messages[0]


def test_check_mode_compares_what_one_end_sends_with_what_the_other_expects() -> None:
    """Point-to-point records pair each send with the peer's receive: uneven point-to-point
    (all_gatherv by p2p) passes, and a send the peer does not expect at all is named."""

    def crossed() -> str:
        me = topo.axis_index("tp")
        try:  # index 0 sends to 1 and 1 sends to 0, but neither expects anything
            topo.ppermute(torch.ones(2), "tp", [(0, 1)] if me == 0 else [(1, 0)])
        except topo.CollectiveMismatchError as error:
            return str(error)
        return "no error"

    with mock.patch.dict(os.environ, {"TOPO_CHECK": "1"}):
        messages = topo.simulate(DeviceMesh(tp=2), crossed, timeout=WAIT)
    assert messages[0] == messages[1]
    assert "send/recv (rank 0 to rank 1)" in messages[0]
    assert "shape: rank 0 has (2,), rank 1 has nothing" in messages[0]


# ------------------------------------------------------------------ gloo, in processes


@pytest.mark.multiprocess
def test_gloo_matches_the_reference(spawn_timeout: int) -> None:
    mesh = DeviceMesh(dp=2, tp=2)
    reports = topo.spawn(fns.gloo_cases, mesh, timeout=spawn_timeout, activation_timeout=fns.WAIT)
    for k, (name, axis, dim, dtype, table, _) in enumerate(fns.GLOO_CASES):
        for rank, report in enumerate(reports):
            group = mesh.group(axis, rank)
            inputs = [
                fns.make_input(k, r, fns.shape_for(fns.REST, dim, sum(table[i])), dtype)
                for i, r in enumerate(group)
            ]
            want = fns.reference(inputs, table, dim, mesh.axis_index(axis, rank))
            got = report[name]
            assert got.dtype == want.dtype and torch.equal(got, want), (name, rank)
    # the gradient case: rebuilt in one process
    _, axis, dim, _, table, _ = fns.GLOO_CASES[3]
    leaves = [
        fns.make_input(3, r, fns.shape_for(fns.REST, dim, sum(table[mesh.axis_index(axis, r)])),
                       torch.float64).requires_grad_(True)
        for r in range(4)
    ]  # fmt: skip
    total = torch.zeros((), dtype=torch.float64)
    for rank in range(4):
        y = fns.reference([leaves[r] for r in mesh.group(axis, rank)], table, dim,
                          mesh.axis_index(axis, rank))  # fmt: skip
        assert torch.equal(reports[rank]["grad"][0], y.detach())
        total = total + (y * fns.grad_weight(rank, tuple(y.shape))).sum()
    total.backward()
    for rank in range(4):
        assert torch.equal(reports[rank]["grad"][1], leaves[rank].grad)


@pytest.mark.multiprocess
def test_gloo_check_mode_names_wrong_sizes_instead_of_aborting(spawn_timeout: int) -> None:
    reports = topo.spawn(fns.checked_cases, DeviceMesh(tp=2), timeout=spawn_timeout,
                         activation_timeout=fns.WAIT, env={"TOPO_CHECK": "1"})  # fmt: skip
    _assert_checked(reports)


# ---------------------------------------------------------------------- torch.compile


def _assert_compiled(results: list[list[tuple[torch.Tensor, ...]]]) -> None:
    for rank, per_table in enumerate(results):
        if isinstance(per_table, dict):
            assert per_table["opcheck"] == list(fns.OPCHECK)
            per_table = per_table["tables"]
        assert len(per_table) == 3
        for loss, grad, eager_loss, eager_grad in per_table:
            torch.testing.assert_close(loss, eager_loss, msg=f"rank {rank}")
            torch.testing.assert_close(grad, eager_grad, msg=f"rank {rank}")


def test_compiled_fullgraph_matches_eager_under_simulate() -> None:
    """aot_eager: the same graph capture (fullgraph, AOTAutograd's backward, effect tokens)
    without inductor's code generation; three size tables, each traced."""
    torch._dynamo.reset()
    results = topo.simulate(DeviceMesh(tp=2), fns.compiled_checks, "aot_eager", timeout=120)
    _assert_compiled(results)


@pytest.mark.multiprocess
def test_compiled_fullgraph_with_inductor_matches_eager(tmp_path: Any) -> None:
    results = topo.spawn(
        fns.compiled_checks_and_opcheck,
        DeviceMesh(tp=2),
        timeout=240,
        activation_timeout=120,
        env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
    )
    _assert_compiled(results)


def _six_tables() -> list[float]:
    me = topo.axis_index("tp")
    compiled = torch.compile(fns.compiled_model, fullgraph=True, backend="aot_eager")
    errors = []
    for k in range(6):
        table = [[k % 3, k + 1], [2, (k * 2) % 5]]
        sends, recvs = table[me], fns.recv_sizes(table, me)
        rows = [sum(row) for row in table]
        x = fns.make_input(k, topo.current().rank, (2, sum(sends))).requires_grad_(True)
        loss = compiled(x, sends, recvs, rows)
        loss.backward()
        grad, x.grad = x.grad, None
        eager = fns.compiled_model(x, sends, recvs, rows)
        eager.backward()
        assert grad is not None and x.grad is not None
        errors.append(max((loss - eager).abs().item(), (grad - x.grad).abs().max().item()))
    return errors


def test_changing_sizes_trace_once_more_with_symbolic_sizes() -> None:
    """Six tables of sizes: dynamo traces each rank's function twice (constants, then
    symbolic sizes), not six times — an MoE layer's counts change every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    errors = topo.simulate(DeviceMesh(tp=2), _six_tables, timeout=120)
    assert max(max(e) for e in errors) == 0.0
    assert counters["stats"]["unique_graphs"] <= 4  # two ranks, two graphs each


def _exchange_in_a_graph(x: torch.Tensor) -> torch.Tensor:
    return topo.all_to_allv(x, "tp", [2])


def test_compiled_without_recv_sizes_says_to_pass_them() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_exchange_in_a_graph, fullgraph=True, backend="eager")
    with (
        DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=0), timeout=30),
        pytest.raises(Exception, match=r"recv_sizes requires a list of ints under torch\.compile"),
    ):
        compiled(torch.ones(2))


def test_opcheck_the_uneven_ops_on_a_group_of_one() -> None:
    """(On a real group of two: in the inductor test's ranks; opcheck is not thread-safe.)"""
    import topo.ops

    topo.ops.load()
    with DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=0), timeout=30):
        assert fns.opcheck_ops() == list(fns.OPCHECK)


# ------------------------------------------- all_gatherv and reduce_scatterv: gradients


def _uneven_grads() -> dict[str, Any]:
    rank, me = topo.current().rank, topo.axis_index(("dp", "tp"))
    rows = [1, 3, 0, 2]
    x = fns.make_input(5, rank, (rows[me], 3), torch.float64).requires_grad_(True)
    g = topo.all_gatherv(x, ("dp", "tp"))  # sizes exchanged
    (g * fns.grad_weight(rank, tuple(g.shape))).sum().backward()
    z = fns.make_input(6, rank, (2, 6), torch.float64).requires_grad_(True)
    r = topo.reduce_scatterv(z, ("dp", "tp"), rows, dim=1, op="avg")
    (r * fns.grad_weight(rank, tuple(r.shape))).sum().backward()
    return {"gatherv": x.grad, "scatterv": z.grad, "scatterv_y": r.detach()}


def test_all_gatherv_and_reduce_scatterv_gradients_equal_the_reference() -> None:
    results = topo.simulate(DeviceMesh(dp=2, tp=2), _uneven_grads, timeout=WAIT)
    rows = [1, 3, 0, 2]
    xs = [fns.make_input(5, r, (rows[r], 3), torch.float64).requires_grad_(True) for r in range(4)]
    zs = [fns.make_input(6, r, (2, 6), torch.float64).requires_grad_(True) for r in range(4)]
    gathered = torch.cat(xs)
    mean = torch.stack(zs).mean(0)
    total = torch.zeros((), dtype=torch.float64)
    for rank in range(4):
        total = total + (gathered * fns.grad_weight(rank, tuple(gathered.shape))).sum()
        part = mean.split(rows, dim=1)[rank]
        torch.testing.assert_close(results[rank]["scatterv_y"], part)
        total = total + (part * fns.grad_weight(rank, tuple(part.shape))).sum()
    total.backward()
    for rank in range(4):
        torch.testing.assert_close(results[rank]["gatherv"], xs[rank].grad)
        torch.testing.assert_close(results[rank]["scatterv"], zs[rank].grad)


def test_reduce_scatterv_max_has_no_gradient() -> None:
    with DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=0), timeout=30):
        y = topo.reduce_scatterv(torch.ones(3, requires_grad=True), "tp", [3], op="max")
        with pytest.raises(topo.NotDifferentiableError, match="op='max'"):
            y.sum().backward()


# ----------------------------------------------------------- NCCL, against a fake cupy


def _one_rank_nccl(monkeypatch: pytest.MonkeyPatch, major: int) -> tuple[Any, Any, Any]:
    from test_nccl import _fake_communicator

    return _fake_communicator(monkeypatch, major=major)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.int64, torch.complex64, torch.float8_e4m3fn]
)
def test_nccl_moves_the_bytes_of_a_one_rank_group(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int, dtype: torch.dtype
) -> None:
    """One group of a send and a receive to itself; dtypes NCCL has no type for move as
    bytes; an empty block moves nothing."""
    c, comm, fake = _one_rank_nccl(monkeypatch, cupy_major)
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3).to(dtype)
    y = c.all_to_allv_dim0(x, [4], [4])
    assert y.view(torch.uint8).equal(x.view(torch.uint8)) and y.data_ptr() != x.data_ptr()
    code = NCCL_DTYPES.get(dtype, NCCL_DTYPES[torch.uint8])
    count = 12 if dtype in NCCL_DTYPES else 12 * x.element_size()
    assert comm.calls == [("send", count, code, 0), ("recv", count, code, 0)]
    assert fake.groups == ["start", "end"]
    empty = c.all_to_allv_dim0(x[:0], [0], [0])
    assert empty.shape == (0, 3) and comm.calls[2:] == [] and fake.groups[2:] == ["start", "end"]


def test_nccl_sends_and_receives_each_block_in_one_group(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    """Index 1 of 3 (a fake that records calls): one send per non-empty block at its byte
    offset, one receive per non-empty incoming block, all in one group."""
    fake = _fake_cupy.make_nccl(cupy_major)
    _fake_cupy.install(monkeypatch, fake)
    comm = fake.NcclCommunicator(3, nccl_mod.unique_id_argument(
        nccl_mod.encode_unique_id(fake.get_unique_id())), 1)  # fmt: skip
    c = nccl_mod.NcclCommunicator(fake, comm, (0, 1, 2), 1, torch.device("cpu"), "axis 'ep'")
    monkeypatch.setattr(c, "_stream", lambda: 0)
    x = torch.zeros(5, 2, dtype=torch.float64)
    y = c.all_to_allv_dim0(x, [2, 0, 3], [1, 4, 0])
    assert y.shape == (5, 2)
    f64 = NCCL_DTYPES[torch.float64]
    assert comm.calls == [("send", 4, f64, 0), ("recv", 2, f64, 0), ("recv", 8, f64, 1),
                          ("send", 6, f64, 2)]  # fmt: skip
    assert fake.groups == ["start", "end"]
    assert [s for s, _, _ in comm.pending] == [x.data_ptr(), x.data_ptr() + 2 * 2 * 8]


def test_nccl_through_the_collective_layout(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    """The free function's layout (dim moved to 0 and back) on the NCCL communicator."""
    from topo.collectives.uneven import alltoallv

    c, comm, _ = _one_rank_nccl(monkeypatch, cupy_major)
    x = torch.arange(24.0).reshape(2, 4, 3)
    assert torch.equal(alltoallv(c, x, 1, [4], [4]), x)
    assert comm.calls[-2:] == [("send", 24, NCCL_DTYPES[torch.float32], 0),
                               ("recv", 24, NCCL_DTYPES[torch.float32], 0)]  # fmt: skip


def test_by_exchange_on_the_nccl_communicator(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, fake = _one_rank_nccl(monkeypatch, cupy_major)
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(by_exchange(c, x, [3], [3]), x)
    assert comm.calls == [] and fake.groups == []  # its own block is a local copy


# ------------------------------------------------------------------------------ errors


def _local() -> Any:
    return DeviceMesh(ep=1).activate(World(rank=0, world_size=1, master_port=0), timeout=30)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", [1, 2]),
            topo.TopoValueError,
            r"topo.all_to_allv send_sizes requires one size per rank of axis 'ep' \(1\), but "
            r"got 2 sizes",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", [3], [3, 0]),
            topo.TopoValueError,
            r"recv_sizes requires one size per rank of axis 'ep' \(1\), but got 2 sizes; "
            r"pass recv_sizes=None to exchange them",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", [-1]),
            topo.TopoValueError,
            r"topo.all_to_allv send_sizes\[0\] requires a non-negative int, but got -1",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3, 2), "ep", [2], dim=0),
            topo.TopoValueError,
            r"topo.all_to_allv send_sizes requires sum\(send_sizes\) == x.shape\[0\] \(3\), but "
            r"got sum\(\[2\]\) = 2; send_sizes\[j\] is the number of rows along dim 0",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3, 2), "ep", [3], dim=-1),
            topo.TopoValueError,
            r"sum\(send_sizes\) == x.shape\[1\] \(2\), but got sum\(\[3\]\) = 3",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", [3.0]),
            topo.TopoTypeError,
            r"topo.all_to_allv send_sizes\[0\] requires an int.*3.0",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", [3], ["3"]),
            topo.TopoTypeError,
            r"topo.all_to_allv recv_sizes\[0\] requires an int",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", torch.tensor([3])),
            topo.TopoTypeError,
            r"send_sizes requires a sequence of 1 ints \(one per index of axis 'ep'\), but got "
            r"Tensor; pass send_sizes.tolist\(\)",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", "3"),
            topo.TopoTypeError,
            r"send_sizes requires a sequence of 1 ints",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", [3], [2]),
            topo.TopoValueError,
            r"topo.all_to_allv recv_sizes\[0\] requires this rank's send_sizes\[0\] \(3: the rows "
            r"it sends itself\), but got 2",
        ),
        (
            lambda: topo.all_to_allv(torch.ones(3), "ep", [3], dim=1),
            topo.TopoValueError,
            r"topo.all_to_allv dim requires -1 <= dim < 1",
        ),
        (
            lambda: topo.all_to_allv([1, 2], "ep", [2]),
            topo.TopoTypeError,
            r"topo.all_to_allv x requires a torch.Tensor, but got list",
        ),
        (lambda: topo.all_to_allv(torch.ones(3), "zz", [3]), topo.TopoError, r"'zz'"),
    ],
)
def test_argument_errors_are_raised_at_the_call(call: Any, error: type, match: str) -> None:
    with _local(), pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 2],), r"send_sizes requires one size per rank of axis 'ep' \(1\)"),
        (([2],), r"sum\(send_sizes\) == x.shape\[0\] \(3\), but got sum\(\[2\]\) = 2"),
        (([3], [2]), r"recv_sizes\[0\] requires this rank's send_sizes\[0\] \(3"),
    ],
)
def test_the_differentiable_path_checks_the_same(args: tuple[Any, ...], match: str) -> None:
    with _local(), pytest.raises(topo.TopoValueError, match=match):
        topo.all_to_allv(torch.ones(3, requires_grad=True), "ep", *args)


def test_wrong_lengths_name_the_axis_size_on_a_bigger_axis() -> None:
    def wrong() -> str:
        try:
            topo.all_to_allv(torch.ones(3), ("dp", "tp"), [1, 2])
        except topo.TopoValueError as error:
            return str(error)
        return "no error"

    messages = topo.simulate(DeviceMesh(dp=2, tp=2), wrong, timeout=WAIT)
    assert messages[0] == (
        "topo.all_to_allv send_sizes requires one size per rank of axis ('dp', 'tp') (4), "
        "but got 2 sizes"
    )


def test_sizes_mismatch_lists_the_first_pairs() -> None:
    assert sizes_mismatch("all_to_allv", "g", (0, 1), [[1, 2], [3, 4]], [[1, 3], [2, 4]]) is None
    message = sizes_mismatch("all_to_allv", "g", (4, 6), [[1, 2], [3, 4]], [[1, 0], [2, 5]])
    assert message is not None
    assert "rank 4 sends rank 6 2 rows, but rank 6 expects 5" not in message
    assert "rank 6 sends rank 4 3 rows, but rank 4 expects 0" in message
    assert "rank 6 sends rank 6 4 rows, but rank 6 expects 5" in message
