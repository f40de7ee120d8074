"""topo.simulate: every rank as a thread; the threads backend; failures, timeouts, check mode.

The last test (multiprocess) runs one function under both simulate and spawn (gloo) and
compares every result bit for bit, with check mode on in both.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import threading
from typing import Any

import _simulate_fns as fns
import pytest
import torch

import topo
from topo import DeviceMesh
from topo.communicators.threads import ring_reduce

WAIT = 20.0


def test_every_rank_runs_in_its_own_context_in_rank_order() -> None:
    def who(tag: str, *, scale: int) -> tuple[Any, ...]:
        ctx = topo.current()
        return tag, ctx.rank, ctx.coords, topo.axis_index(("dp", "tp")) * scale, ctx.backend("cpu")

    results = topo.simulate(DeviceMesh(dp=2, tp=3), who, "t", scale=10, timeout=WAIT)
    assert [r[:4] for r in results] == [
        ("t", r, DeviceMesh(dp=2, tp=3).coords(r), 10 * r) for r in range(6)
    ]
    assert {r[4].name for r in results} == {"threads"}
    with pytest.raises(topo.NoActiveMeshError):
        topo.current()  # nothing leaks into the caller's thread


def test_collectives_against_rank_math() -> None:
    mesh = DeviceMesh(dp=2, pp=2, tp=2)

    def work() -> dict[str, Any]:
        ctx = topo.current()
        r = torch.tensor([float(ctx.rank)])
        out = {
            "sum": topo.all_reduce(r, "tp"),
            "gather": topo.all_gather(r, ("dp", "pp")),
            "rs": topo.reduce_scatter(torch.arange(4.0) + ctx.rank, "pp"),
            "bcast": topo.broadcast(r, "dp", src=1),
            "a2a": topo.all_to_all(torch.arange(2) + 10 * ctx.rank, "tp"),
            "scatter": topo.scatter(torch.arange(4) * (ctx.rank + 1), "pp", src=1),
            "gather_dst": topo.gather(r, "tp", dst=1),
            "shift": topo.shift(r, "pp", offset=1, wrap=False),
            "ring": topo.ppermute(r, ("dp", "pp", "tp"), [(i, (i + 1) % 8) for i in range(8)]),
            "obj": topo.broadcast_object({"rank": ctx.rank}, "dp", src=0),
            "objs": topo.all_gather_object(ctx.rank, "tp"),
        }
        topo.barrier()
        topo.barrier("pp")
        if topo.axis_index("pp") == 0:
            topo.send(r * 100, "pp", dst=1)
        else:
            out["recv"] = topo.recv((1,), torch.float32, "pp", src=0)
        return out

    results = topo.simulate(mesh, work, timeout=WAIT)
    for rank, out in enumerate(results):
        tp, pp, dp = mesh.group("tp", rank), mesh.group("pp", rank), mesh.group("dp", rank)
        assert out["sum"].tolist() == [float(sum(tp))]
        assert out["gather"].tolist() == [float(r) for r in mesh.group(("dp", "pp"), rank)]
        i = mesh.axis_index("pp", rank)
        assert out["rs"].tolist() == [float(sum(2 * i + k + q for q in pp)) for k in range(2)]
        assert out["bcast"].tolist() == [float(dp[1])]
        j = mesh.axis_index("tp", rank)
        assert out["a2a"].tolist() == [j + 10 * q for q in tp]
        assert out["scatter"].tolist() == [(2 * i + k) * (pp[1] + 1) for k in range(2)]
        assert (out["gather_dst"] is None) == (j != 1)
        assert out["shift"].tolist() == ([0.0] if i == 0 else [float(pp[0])])
        assert out["ring"].tolist() == [float((rank - 1) % 8)]
        assert out["obj"] == {"rank": dp[0]}
        assert out["objs"] == list(tp)
        assert out.get("recv", torch.tensor([100.0 * pp[0]])).tolist() == [100.0 * pp[0]]


def test_ring_reduce_is_gloos_order() -> None:
    # Chunk c of 3 ranks is accumulated from rank c-1 downwards: x[c-1], x[c-2] + acc, ...
    big, one = torch.tensor([1e8] * 6, dtype=torch.float32), torch.ones(6)
    values = [big, one, -big]
    out = ring_reduce(values, "sum")
    for c in range(3):
        acc = values[(c - 1) % 3][2 * c : 2 * c + 2]
        for k in (2, 3):
            acc = values[(c - k) % 3][2 * c : 2 * c + 2] + acc
        assert torch.equal(out[2 * c : 2 * c + 2], acc)
    assert out.tolist() != functools.reduce(torch.add, values).tolist()  # the order matters
    assert torch.equal(ring_reduce([torch.tensor([3, 4]), torch.tensor([5, 6])], "prod"),
                       torch.tensor([15, 24]))  # fmt: skip
    assert ring_reduce([torch.ones(0), torch.ones(0)], "sum").shape == (0,)
    assert torch.equal(ring_reduce([torch.ones(2), 3 * torch.ones(2)], "avg"), 2 * torch.ones(2))


def test_float_results_are_bit_identical_on_every_rank() -> None:
    def work() -> torch.Tensor:
        g = torch.Generator().manual_seed(topo.current().rank)
        return topo.all_reduce(torch.randn(1000, generator=g) * 1e4, ("a", "b"))

    results = topo.simulate(DeviceMesh(a=2, b=3), work, timeout=WAIT)
    assert all(torch.equal(r.view(torch.int32), results[0].view(torch.int32)) for r in results)


def test_recv_into_out_contiguous_or_strided() -> None:
    """Each stage sends two tensors down the ring; the next receives them into a contiguous
    and a strided ``out``, gets ``out`` itself back, and holds the sender's values."""

    def sent(rank: int, k: int) -> torch.Tensor:
        return torch.arange(6.0).reshape(2, 3) + 100 * rank + 10 * k

    def work() -> list[Any]:
        me, n = topo.axis_index("pp"), topo.axis_size("pp")
        outs = [torch.full((2, 3), -1.0), torch.full((3, 2), -1.0).t()]
        got = []
        for k, out in enumerate(outs):
            if me % 2 == 0:  # even indices send first: no cycle of blocked sends
                topo.send(sent(me, k), "pp", dst=(me + 1) % n)
                got.append(topo.recv((2, 3), torch.float32, "pp", src=(me - 1) % n, out=out))
            else:
                got.append(topo.recv((2, 3), torch.float32, "pp", src=(me - 1) % n, out=out))
                topo.send(sent(me, k), "pp", dst=(me + 1) % n)
        return [(g is out, g) for g, out in zip(got, outs, strict=True)]

    for rank, received in enumerate(topo.simulate(DeviceMesh(pp=4), work, timeout=WAIT)):
        for k, (is_out, value) in enumerate(received):
            assert is_out, (rank, k)
            assert torch.equal(value, sent((rank - 1) % 4, k)), (rank, k, value)


def test_bad_arguments() -> None:
    with pytest.raises(topo.TopoTypeError, match="callable"):
        topo.simulate(DeviceMesh(tp=2), "work")  # type: ignore[arg-type]
    with pytest.raises(topo.TopoTypeError, match="DeviceMesh"):
        topo.simulate("tp=2", print)  # type: ignore[arg-type]
    with pytest.raises(topo.TopoValueError, match=r"up to 64 ranks.*has 128.*topo\.spawn"):
        topo.simulate(DeviceMesh(dp=2, tp=64), print)
    with pytest.raises(topo.TopoValueError, match="positive"):
        topo.simulate(DeviceMesh(tp=2), print, timeout=0)


def test_cuda_and_meta_tensors_are_refused() -> None:
    def cuda() -> None:
        topo.current().communicator(("tp",), "cuda")

    with pytest.raises(topo.RankFailedError, match=r"'cuda'.*topo\.simulate runs CPU tensors only"):
        topo.simulate(DeviceMesh(tp=2), cuda, timeout=WAIT)

    def meta() -> None:
        topo.all_reduce(torch.ones(2, device="meta"), "tp")

    with pytest.raises(topo.RankFailedError, match="got meta"):
        topo.simulate(DeviceMesh(tp=2), meta, timeout=WAIT)


def _fail_on(rank: int) -> None:
    ctx = topo.current()
    if ctx.rank == rank:
        raise KeyError(f"boom on {rank}")
    topo.all_reduce(torch.ones(1), "tp")  # the others wait in a collective: woken, not timed out
    topo.barrier()


def test_a_failing_rank_is_named_with_its_traceback_and_unblocks_the_others() -> None:
    with pytest.raises(topo.RankFailedError, match=r"rank 2 of .* raised KeyError") as info:
        topo.simulate(DeviceMesh(dp=2, tp=2), _fail_on, 2, timeout=60)
    assert "still running" not in str(info.value)  # the others were woken, none left waiting
    assert info.value.rank == 2
    assert "_fail_on" in info.value.remote_traceback and "boom on 2" in str(info.value)


def test_a_skipped_collective_times_out_naming_the_absent_rank() -> None:
    def skip() -> None:
        if topo.current().rank != 1:
            topo.all_reduce(torch.ones(1), "tp")

    # Rank 0 waits in the all_reduce for rank 1, rank 1 in the closing barrier for rank 0: the
    # first to time out is reported, with what the other one waited for.
    with pytest.raises(topo.RankFailedError) as info:
        topo.simulate(DeviceMesh(dp=2, tp=2), skip, timeout=1.0)
    assert re.search(
        r"all_reduce on axis 'tp' group \(0, 1\)[^\n]*rank\(s\) \[1\][^\n]*(did|had) not arrive",
        str(info.value),
    ), str(info.value)


def test_a_rank_hung_in_user_code_is_named_and_left_as_a_daemon() -> None:
    release = threading.Event()

    def hang() -> None:
        if topo.current().rank == 3:
            release.wait()  # forever, as far as simulate knows
        topo.all_gather(torch.ones(1), ("dp", "tp"))

    try:
        with pytest.raises(topo.RankFailedError, match=r"rank\(s\) \[3\].*did not arrive") as info:
            topo.simulate(DeviceMesh(dp=2, tp=2), hang, timeout=1.0)
        assert "rank(s) [3] were still running" in str(info.value)
        stuck = [t for t in threading.enumerate() if t.name == "topo-simulate-rank-3"]
        assert stuck and all(t.daemon for t in stuck)
    finally:
        release.set()


def test_a_rank_hung_in_user_code_does_not_block_interpreter_exit() -> None:
    code = (
        "import threading, torch, topo\n"
        "def hang():\n"
        "    if topo.current().rank == 1:\n"
        "        threading.Event().wait()\n"
        "try:\n"
        "    topo.simulate(topo.DeviceMesh(tp=2), hang, timeout=0.5)\n"
        "except topo.RankFailedError as e:\n"
        "    print('STUCK', 'rank(s) [1] were still running (in user code)' in str(e))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "STUCK True" in done.stdout


def test_mismatches_are_reported_on_every_rank_without_check_mode() -> None:
    def shapes() -> str:
        tp = topo.axis_index("tp")
        try:
            topo.all_reduce(torch.ones(2 + tp), "tp")
        except topo.CollectiveMismatchError as error:
            return str(error)
        return "no error"

    messages = topo.simulate(DeviceMesh(tp=3), shapes, timeout=WAIT)
    assert len(set(messages)) == 1
    assert "shape: rank 0 has (2,), rank 1 has (3,), rank 2 has (4,)" in messages[0]

    def ops() -> None:
        if topo.axis_index("tp") == 0:
            topo.all_reduce(torch.ones(2), "tp")
        else:
            topo.all_gather(torch.ones(2), "tp")

    with pytest.raises(topo.RankFailedError, match="operation: rank 0 has all_reduce, rank 1"):
        topo.simulate(DeviceMesh(tp=2), ops, timeout=WAIT)

    def recv_wrong() -> None:
        if topo.axis_index("pp") == 0:
            topo.send(torch.ones(3), "pp", dst=1)
        else:
            topo.recv((2,), torch.float32, "pp", src=0)

    with pytest.raises(topo.RankFailedError, match=r"rank 0 sent shape \(3,\).*expects shape \(2,"):
        topo.simulate(DeviceMesh(pp=2), recv_wrong, timeout=WAIT)


def _dtype_mismatch() -> str:
    dtype = torch.float32 if topo.axis_index("tp") else torch.float64
    try:
        topo.broadcast(torch.ones(2, dtype=dtype), ("dp", "tp"), src=0)
    except topo.CollectiveMismatchError as error:
        return str(error)
    return "no error"


def test_check_mode_names_ranks_and_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPO_CHECK", "1")
    messages = topo.simulate(DeviceMesh(dp=2, tp=2), _dtype_mismatch, timeout=WAIT)
    assert len(set(messages)) == 1
    assert messages[0].startswith("check mode: broadcast on axis ('dp', 'tp') group (0, 1, 2, 3)")
    assert "dtype: ranks [0, 2] have float64, ranks [1, 3] have float32" in messages[0]

    def roots() -> None:
        topo.broadcast(torch.ones(1), "tp", src=topo.axis_index("tp"))

    with pytest.raises(topo.RankFailedError, match="root: rank 0 has 0, rank 1 has 1"):
        topo.simulate(DeviceMesh(tp=2), roots, timeout=WAIT)

    def devices() -> bool:
        return topo.current().check

    assert topo.simulate(DeviceMesh(tp=2), devices, timeout=WAIT) == [True, True]
    monkeypatch.setenv("TOPO_CHECK", "maybe")
    with pytest.raises(topo.RankFailedError, match="TOPO_CHECK requires 1 or 0"):
        topo.simulate(DeviceMesh(tp=2), devices, timeout=WAIT)


def test_check_mode_keeps_point_to_point_and_the_group_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOPO_CHECK", "1")

    def p2p() -> Any:
        i = topo.axis_index("pp")
        x = torch.full((2,), float(i))
        moved = topo.ppermute(x, "pp", [(0, 2)])  # index 1 neither sends nor receives
        try:
            if i == 0:
                topo.send(torch.ones(3), "pp", dst=1)
            elif i == 1:
                topo.recv((4,), torch.float32, "pp", src=0)
        except topo.CollectiveMismatchError as error:
            moved = str(error)
        return moved, topo.shift(x, "pp").tolist()

    results = topo.simulate(DeviceMesh(pp=3), p2p, timeout=WAIT)
    assert results[0][0] == results[1][0]
    assert "shape: rank 0 has (3,), rank 1 has (4,)" in results[0][0]
    assert results[2][0].tolist() == [0.0, 0.0]
    assert [r[1] for r in results] == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]


@pytest.mark.multiprocess
def test_simulate_equals_spawn_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = DeviceMesh(dp=2, tp=3)
    spawned = topo.spawn(fns.compare_main, mesh, timeout=180, env={"TOPO_CHECK": "1"})
    monkeypatch.setenv("TOPO_CHECK", "1")
    simulated = topo.simulate(mesh, fns.compare_main, timeout=60)
    assert len(spawned) == len(simulated) == 6
    for rank, (a, b) in enumerate(zip(spawned, simulated, strict=True)):
        assert sorted(a) == sorted(b), rank
        for key in a:
            assert _same(a[key], b[key]), (rank, key)
        if topo.DeviceMesh(dp=2, tp=3).axis_index("tp", rank) < 2:
            assert "check mode: all_reduce on axis 'tp'" in a["mismatch"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.is_complex:
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        if a.dtype.is_floating_point:
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            a, b = a.contiguous().view(bits), b.contiguous().view(bits)
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)
