"""topo.shard_map against the unsharded function: values and gradients, over random meshes
(1-3 axes), specs (single and multi-axis dims, in any order) and shapes, for functions that use
all_reduce, all_gather, reduce_scatter, ppermute and all_to_all inside; the check of outputs
left out of an axis; DTensors; torch.compile; torchrun; the errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _spawn_fns  # noqa: F401  (tests/ on sys.path for spawn's pickling)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import topo
from topo import DeviceMesh, P

FAMILIES = ("elementwise", "psum", "gather", "scatter", "ppermute", "all_to_all")


@st.composite
def meshes(draw: st.DrawFn) -> DeviceMesh:
    ndim = draw(st.integers(1, 3))
    sizes: list[int] = []
    for _ in range(ndim):
        room = 8 // math.prod(sizes) if sizes else 8
        sizes.append(draw(st.integers(1, min(3, room))))
    return DeviceMesh.from_shape(sizes, ["a", "b", "c"][:ndim])


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    mesh = draw(meshes())
    family = draw(st.sampled_from(FAMILIES))
    names = list(mesh.axis_names)
    order = draw(st.permutations(names))
    cut = draw(st.integers(0, len(names)))
    a_axes, b_axes = list(order[:cut]), list(order[cut:])
    b_axes = b_axes[: draw(st.integers(0, len(b_axes)))]
    if family in ("psum", "gather", "scatter", "ppermute", "all_to_all") and not a_axes:
        a_axes = [order[0]]
        b_axes = [b for b in b_axes if b != order[0]]
    if family in ("gather", "scatter"):  # tuple axes of collectives run in mesh order
        a_axes = [n for n in names if n in a_axes]
    if family in ("ppermute", "all_to_all"):
        a_axes = a_axes[:1]
    if family == "all_to_all":
        b_axes = []
    na, nb = mesh.axis_size(a_axes) if a_axes else 1, mesh.axis_size(b_axes) if b_axes else 1
    rows = na * draw(st.integers(1, 2)) * (na if family == "scatter" else 1)
    cols = nb * draw(st.integers(1, 2)) * (na if family == "all_to_all" else 1)
    return {
        "mesh": mesh,
        "family": family,
        "a": tuple(a_axes),
        "b": tuple(b_axes),
        "shape": (rows, cols),
        "seed": draw(st.integers(0, 2**16)),
    }


def _entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _program(case: dict[str, Any]) -> tuple[Callable[..., Any], P, P, Callable[..., Any]]:
    """(fn, in spec, out spec, reference of the global function)."""
    a, b, family = case["a"], case["b"], case["family"]
    ea, eb = _entry(a), _entry(b)
    if family == "elementwise":
        return (lambda t: t.sin() * 3), P(ea, eb), P(ea, eb), (lambda x: x.sin() * 3)
    if family == "psum":
        fn = lambda t: topo.all_reduce(t.sum(0, keepdim=True), a)  # noqa: E731
        return fn, P(ea, eb), P(None, eb), (lambda x: x.sum(0, keepdim=True))
    if family == "gather":
        return (lambda t: topo.all_gather(t, a, dim=0)), P(ea, eb), P(None, eb), (lambda x: x)
    if family == "scatter":
        n = case["mesh"].axis_size(a)
        fn = lambda t: topo.reduce_scatter(t, a, dim=0)  # noqa: E731
        return fn, P(None, eb), P(ea, eb), (lambda x: x * n)
    if family == "ppermute":
        n = case["mesh"].axis_size(a)
        ring = [(i, (i + 1) % n) for i in range(n)]
        block = case["shape"][0] // n
        fn = lambda t: topo.ppermute(t, a[0], ring)  # noqa: E731
        return fn, P(ea, eb), P(ea, eb), (lambda x: torch.roll(x, block, dims=0))
    fn = lambda t: topo.all_to_all(t, a[0], split_dim=1, concat_dim=0)  # noqa: E731
    return fn, P(ea, None), P(None, ea), (lambda x: x)


def _inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["shape"], generator=g, dtype=torch.float64)
    weight = torch.randn(64, generator=g, dtype=torch.float64)
    return x, weight


def _loss(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (y.reshape(-1) * weight[: y.numel()].repeat(1 + y.numel() // 64)[: y.numel()]).sum()


def _rank(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    fn, in_spec, out_spec, _ = _program(case)
    x, weight = _inputs(case)
    x.requires_grad_()
    y = topo.shard_map(fn, in_specs=in_spec, out_specs=out_spec)(x)
    _loss(y, weight).backward()
    assert x.grad is not None
    return y.detach(), x.grad


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_shard_map_equals_the_unsharded_function(case: dict[str, Any]) -> None:
    _, _, _, reference = _program(case)
    x, weight = _inputs(case)
    x.requires_grad_()
    expected = reference(x)
    _loss(expected, weight).backward()
    results = topo.simulate(case["mesh"], _rank, case, timeout=60)
    for rank, (y, grad) in enumerate(results):
        torch.testing.assert_close(y, expected.detach(), rtol=1e-12, atol=1e-12, msg=str(rank))
        torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12, msg=str(rank))


def _matmuls() -> dict[str, Any]:
    """Sharded matmul in three layouts (column-, row-parallel with a psum, and both inputs
    split), with the gradients of both inputs; every rank's results."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 6, generator=g, dtype=torch.float64)
    w0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    out: dict[str, Any] = {}
    layouts = {
        "column": ((P("dp", None), P(None, "tp")), P("dp", "tp"), lambda a, b: a @ b),
        "row": ((P("dp", "tp"), P("tp", None)), P("dp"), lambda a, b: topo.all_reduce(a @ b, "tp")),
        "mixed": ((P(("tp", "dp"), None), P()), P(("tp", "dp")), lambda a, b: a @ b),
    }  # fmt: skip
    for name, (in_specs, out_spec, body) in layouts.items():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = topo.shard_map(body, in_specs=in_specs, out_specs=out_spec)(x, w)
        y.sin().sum().backward()
        out[name] = (y.detach(), x.grad, w.grad)
    return out


def _matmul_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    y = x @ w
    y.sin().sum().backward()
    assert x.grad is not None and w.grad is not None
    return y.detach(), x.grad, w.grad


def _assert_matmuls(results: list[dict[str, Any]]) -> None:
    expected = _matmul_reference()
    for per_rank in results:
        for name, got in per_rank.items():
            for value, want in zip(got, expected, strict=True):
                torch.testing.assert_close(value, want, msg=name)


def test_matmul_layouts_under_simulate() -> None:
    _assert_matmuls(topo.simulate(DeviceMesh(dp=2, tp=2), _matmuls))


@pytest.mark.multiprocess
def test_matmul_layouts_under_spawn(no_leftover_children: None) -> None:
    _assert_matmuls(topo.spawn(_matmuls, DeviceMesh(dp=2, tp=2), timeout=300))


def _varying() -> Any:
    f = topo.shard_map(lambda t: t * (1 + topo.axis_index("tp")), in_specs=P("dp"), out_specs=P("dp"))
    try:
        f(torch.ones(4))
    except topo.CollectiveMismatchError as error:
        return str(error)
    return "no error"


def test_an_output_that_varies_along_a_left_out_axis_is_named_on_every_rank() -> None:
    messages = topo.simulate(DeviceMesh(dp=2, tp=2), _varying)
    for message in messages:
        assert "out_specs P('dp') leaves out axis 'tp'" in message
        assert "rank 3's output differs from rank 2's" in message  # the highest such rank


def _unchecked() -> list[float]:
    f = topo.shard_map(
        lambda t: t * (1 + topo.axis_index("tp")), in_specs=P("dp"), out_specs=P("dp"), check=False
    )
    return f(torch.ones(4)).tolist()


def _nan_and_shapes() -> tuple[list[float], str]:
    nan = topo.shard_map(lambda t: t.sum(0) * float("nan"), in_specs=P("dp"), out_specs=P())
    same = nan(torch.ones(4, 2)).isnan().tolist()  # NaN on every rank: it does not vary
    ragged = topo.shard_map(lambda t: t[t > 1], in_specs=P("dp"), out_specs=P())
    try:
        ragged(torch.arange(4.0))  # dp index 0 keeps [], index 1 keeps [2, 3]
    except topo.CollectiveMismatchError as error:
        return same, str(error)
    return same, "no error"


def test_the_check_takes_nan_as_equal_and_names_blocks_of_other_shapes() -> None:
    for same, message in topo.simulate(DeviceMesh(dp=2, tp=2), _nan_and_shapes):
        assert same == [True, True]
        assert "out_specs P() leaves out axis ('dp', 'tp')" in message
        assert "rank 3's shape or dtype differs from rank 0's" in message


def test_check_false_skips_the_check() -> None:
    results = topo.simulate(DeviceMesh(dp=2, tp=2), _unchecked)
    assert results[0] == [1.0] * 4 and results[1] == [2.0] * 4


def _derived_and_view() -> list[float]:
    ctx = topo.current()
    with ctx.view(ctx.mesh.with_axes(ep=("dp", "tp"))):
        f = topo.shard_map(
            lambda t: topo.all_reduce(t, "ep"), in_specs=P("ep"), out_specs=P()
        )  # a derived axis in a spec: the block index along it is its index
        return f(torch.arange(8.0)).tolist()


def test_derived_axes_in_specs() -> None:
    for result in topo.simulate(DeviceMesh(dp=2, tp=2), _derived_and_view):
        assert result == [12.0, 16.0]  # the sum of the four blocks [0,1] [2,3] [4,5] [6,7]


def _axis_twice() -> str:
    ctx = topo.current()
    with ctx.view(ctx.mesh.with_axes(ep=("dp", "tp"))):
        f = topo.shard_map(lambda t: t, in_specs=P("ep", "dp"), out_specs=P("ep", "dp"))
        return _error(lambda: f(torch.ones(8, 2)))


def test_an_axis_named_twice_through_a_derived_axis_is_refused() -> None:
    for message in topo.simulate(DeviceMesh(dp=2, tp=2), _axis_twice):
        assert message == (
            "TopoValueError: shard_map in_specs[0] P('ep', 'dp') requires each mesh axis at most "
            "once, but axis 'dp' is named twice (through the derived axes ep=('dp', 'tp')); "
            "name it once"
        )


def _dtensors() -> Any:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ctx = topo.current()
    mesh = ctx.torch_mesh(device_type="cpu")  # gloo, on a GPU machine too
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    xd = distribute_tensor(x, mesh, [Shard(0), Shard(1)]).detach().requires_grad_()
    wd = distribute_tensor(w, mesh, [Replicate(), Shard(0)]).detach().requires_grad_()
    ops = ctx.store_ops
    row = topo.shard_map(
        lambda a, b: topo.all_reduce(a @ b, "tp"),
        in_specs=(P("dp", "tp"), P("tp", None)),
        out_specs=P("dp"),
        check=False,
    )
    y = row(xd, wd)
    moved = ctx.store_ops - ops
    full = y.full_tensor()
    full.sin().sum().backward()
    wrong = ""
    try:
        row(distribute_tensor(x, mesh, [Replicate(), Replicate()]), wd)
    except topo.TopoValueError as error:
        wrong = str(error)
    ident = topo.shard_map(lambda a: a, in_specs=P(), out_specs=P())
    sub = _error(lambda: ident(distribute_tensor(x, mesh["dp"], [Replicate()])))
    return type(y).__name__, tuple(map(repr, y.placements)), full.detach(), xd.grad.full_tensor(), wd.grad.full_tensor(), moved, wrong + "|" + sub  # type: ignore[union-attr]  # fmt: skip


@pytest.mark.multiprocess
def test_dtensors_in_dtensors_out_with_the_unsharded_gradients(no_leftover_children: None) -> None:
    y, gx, gw = _matmul_reference()
    for kind, placements, full, grad_x, grad_w, moved, wrong in topo.spawn(
        _dtensors, DeviceMesh(dp=2, tp=2), timeout=300
    ):
        assert kind == "DTensor" and placements == ("Shard(dim=0)", "Replicate()")
        torch.testing.assert_close(full, y)
        torch.testing.assert_close(grad_x, gx)
        torch.testing.assert_close(grad_w, gw)
        assert moved == 0  # no store traffic: the torch mesh was built before
        assert "requires a DTensor placed (Shard(dim=0), Shard(dim=1))" in wrong
        # a DTensor on the dp dim alone: its copies along tp would get a gradient no one sums
        assert wrong.endswith(
            "|TopoValueError: shard_map on DTensors requires their device mesh to have the "
            "mesh's axes ('dp', 'tp') as its dims, but got dims ('dp',); distribute them on "
            "ctx.torch_mesh() (every axis; Replicate() along the axes they do not split)"
        )


def _compiled() -> tuple[float, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    row = topo.shard_map(
        lambda a, b: topo.all_reduce(a @ b, "tp"),
        in_specs=(P("dp", "tp"), P("tp", None)),
        out_specs=P("dp"),
    )
    step = torch.compile(lambda a, b: row(a, b).sin().sum(), backend="aot_eager", fullgraph=True)
    loss = step(x, w)
    loss.backward()
    assert x.grad is not None and w.grad is not None
    return float(loss.detach()), x.grad, w.grad


@pytest.mark.multiprocess
def test_compiled_fullgraph(no_leftover_children: None) -> None:
    y, gx, gw = _matmul_reference()
    for loss, grad_x, grad_w in topo.spawn(_compiled, DeviceMesh(dp=2, tp=2), timeout=300):
        assert loss == pytest.approx(float(y.sin().sum()), rel=1e-12)
        torch.testing.assert_close(grad_x, gx)
        torch.testing.assert_close(grad_w, gw)


def _error(call: Callable[[], Any]) -> str:
    try:
        call()
    except topo.TopoError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _errors() -> dict[str, str]:
    ident = lambda t: t  # noqa: E731
    x = torch.ones(6, 4)
    sm = topo.shard_map
    return {
        "uneven": _error(lambda: sm(ident, in_specs=P(None, ("dp", "tp")), out_specs=P())(torch.ones(2, 6))),
        "unknown": _error(lambda: sm(ident, in_specs=P("pp"), out_specs=P("pp"))(x)),
        "too_long": _error(lambda: sm(ident, in_specs=P("dp", None, None), out_specs=P())(x)),
        "structure": _error(lambda: sm(lambda a, b: a, in_specs=(P(),), out_specs=P())(x, x)),
        "not_tensor": _error(lambda: sm(lambda t: 3, in_specs=P(), out_specs=P())(x)),
        "bad_spec": _error(lambda: sm(ident, in_specs="dp", out_specs=P())(x)),
    }  # fmt: skip


def test_errors_name_what_was_required() -> None:
    found = topo.simulate(DeviceMesh(dp=2, tp=2), _errors)[0]
    assert "TopoValueError: shard_map in_specs[0] P(None, ('dp', 'tp')) requires dimension 1 (size 6) to split evenly over dp(2) * tp(2) = 4, but 6 % 4 = 2" in found["uneven"]
    assert "names axis 'pp', which the mesh does not have; valid axes are 'dp', 'tp'" in found["unknown"]
    assert "requires a tensor of at least 3 dimensions, but got shape (6, 4)" in found["too_long"]
    assert "got 1 specs for a tuple of 2" in found["structure"]
    assert "TopoTypeError: shard_map out_specs P() requires fn to return a tensor there, but it returned int" in found["not_tensor"]
    assert "TopoTypeError: shard_map in_specs requires a topo.P" in found["bad_spec"]
    with pytest.raises(topo.TopoValueError, match="each axis at most once"):
        P("dp", ("tp", "dp"))
    with pytest.raises(topo.TopoTypeError, match="P entry 0 requires None, an axis name"):
        P(3)
    with pytest.raises(topo.TopoTypeError, match="shard_map requires a callable"):
        topo.shard_map(3, in_specs=P(), out_specs=P())  # type: ignore[arg-type]


def test_partition_spec_is_a_value() -> None:
    import pickle

    spec = P("dp", None, ("tp", "sp"))
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(pickle.loads(pickle.dumps(spec)))
    assert spec.axes == ("dp", "tp", "sp") and spec.dim_axes(2) == ("tp", "sp") and spec.dim_axes(5) == ()
    assert repr(P(("tp",))) == "P('tp')" and P() == ()


def test_the_first_example_of_the_docs_runs_verbatim() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "shard_map.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "topo.simulate" in block  # the example that runs itself
    exec(compile(block, "docs/shard_map.md", "exec"), {"__name__": "docs_example"})


@pytest.mark.multiprocess
def test_shard_map_and_the_moe_example_under_torchrun(closed_port: int) -> None:
    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
        "--master-addr=127.0.0.1", f"--master-port={closed_port}",
        str(root / "tests" / "_torchrun_spmd.py"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within 300 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert out.count("shard_map max error") == 4, out[-3000:]
