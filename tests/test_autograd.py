"""Autograd through topo's collectives and Megatron regions, and ``out=``.

The gradient tests spawn DeviceMesh(dp=2, tp=2) once; every rank runs every case of
tests/_autograd_fns.py and reports its forward values and gradients. The parent rebuilds every
rank's inputs and computes the reference in one process with plain torch ops (no topo
collective): the derivative of the sum of every rank's loss.
"""

from __future__ import annotations

from typing import Any

import _autograd_fns as fns
import pytest
import torch

import topo
from topo import DeviceMesh, World

MESH = DeviceMesh(dp=2, tp=2)
_REPORT: list[Any] = []


def _emulate(name: str, kw: dict[str, Any], xs: list[torch.Tensor], k: int) -> Any:
    """What index ``k`` of a group whose inputs are ``xs`` gets from collective ``name``."""
    n = len(xs)
    if name == "all_reduce":
        y = sum(xs[1:], xs[0])
        return y / n if kw["op"] == "avg" else y
    if name == "all_gather":
        return torch.cat(xs, kw["dim"])
    if name == "reduce_scatter":
        y = sum(xs[1:], xs[0])
        y = y / n if kw["op"] == "avg" else y
        return torch.chunk(y, n, kw.get("dim", 0))[k]
    if name == "broadcast":
        return xs[kw["src"]]
    if name == "scatter":
        return torch.chunk(xs[kw["src"]], n, kw["dim"])[k]
    if name == "gather":
        return torch.cat(xs, kw["dim"]) if k == kw["dst"] else None
    if name == "all_to_all":
        parts = [torch.chunk(xs[j], n, kw["split_dim"])[k] for j in range(n)]
        return torch.cat(parts, kw["concat_dim"])
    if name == "ppermute":
        src = next((s for s, d in kw["perm"] if d == k), None)
        return torch.zeros_like(xs[k]) if src is None else xs[src]
    if name == "shift":
        src = k - kw["offset"]
        if kw["wrap"]:
            src %= n
        return xs[src] if 0 <= src < n else torch.zeros_like(xs[k])
    raise AssertionError(name)


def _reference(i: int, name: str, kw: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    shape = kw.get("shape", fns.SHAPE)
    xs = [fns.rank_input(r, i, shape).requires_grad_(True) for r in range(MESH.size)]
    ys = []
    for r in range(MESH.size):
        group = MESH.group(kw["axis"], r)
        ys.append(_emulate(name, kw, [xs[q] for q in group], group.index(r)))
    total = sum(
        (y * fns.loss_weight(r, i, tuple(y.shape))).sum() for r, y in enumerate(ys) if y is not None
    )
    total.backward()  # type: ignore[union-attr]
    # an input that reaches no loss (broadcast/scatter off src) has a zero gradient
    return ys, [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]


@pytest.fixture(scope="module")
def report() -> list[Any]:
    if not _REPORT:
        _REPORT.extend(topo.spawn(fns.everything, MESH, timeout=120))
    return _REPORT


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["grads", "grads_elsewhere"], ids=["here", "backward_elsewhere"])
@pytest.mark.parametrize(("i", "case"), list(enumerate(fns.CASES)), ids=[c[0] for c in fns.CASES])
def test_gradient_matches_single_process_reference(
    report: list[Any], i: int, case: tuple[str, str, dict[str, Any]], where: str
) -> None:
    """``backward_elsewhere``: the backward runs in a new thread with no active mesh, as
    autograd runs the backward of CUDA tensors on its own device thread."""
    label, name, kw = case
    ys, grads = _reference(i, name, kw)
    for r in range(MESH.size):
        y, grad = report[r][where][label]
        if ys[r] is None:
            assert y is None, (label, r)
            continue
        torch.testing.assert_close(y, ys[r].detach(), msg=f"{label} forward on rank {r}")
        if name == "gather":  # only dst asks for a gradient: its own slice of g
            assert grad is not None
        torch.testing.assert_close(grad, grads[r], msg=f"{label} gradient on rank {r}")


@pytest.mark.multiprocess
def test_max_min_prod_backward_raise_naming_the_op(report: list[Any]) -> None:
    for r in range(MESH.size):
        errors = report[r]["grads"]["no_grad"]
        for (name, kw), error in zip(fns.NO_GRAD_CASES, errors, strict=True):
            assert f"topo.{name} has no gradient: op={kw['op']!r}" in error, error
            assert "detach" in error


@pytest.mark.multiprocess
def test_gather_off_dst_with_grad_raises_at_forward(report: list[Any]) -> None:
    for r in range(MESH.size):
        error = report[r]["grads"]["gather_off_dst"]
        if MESH.axis_index("tp", r) == 0:
            assert error == "no error"
        else:
            assert "requires an x that needs no gradient off dst" in error
            assert "topo.all_gather" in error


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["mlp", "mlp_elsewhere"], ids=["here", "backward_elsewhere"])
def test_tensor_parallel_mlp_matches_unsharded(report: list[Any], where: str) -> None:
    """The four Megatron regions; ``backward_elsewhere`` as in the test above."""
    p = fns.mlp_params()
    x, w1, w2 = (p[k].clone().requires_grad_(True) for k in ("x", "w1", "w2"))
    loss = ((torch.nn.functional.gelu(x @ w1) @ w2 - p["t"]) ** 2).mean()
    loss.backward()
    for r in range(MESH.size):
        got = report[r][where]
        i = MESH.axis_index("tp", r)
        cols = slice(i * 3, (i + 1) * 3)
        torch.testing.assert_close(got["loss"], loss.detach())
        torch.testing.assert_close(got["x"], x.grad)
        torch.testing.assert_close(got["w1"], w1.grad[:, cols])  # type: ignore[index]
        torch.testing.assert_close(got["w2"], w2.grad[cols, :])  # type: ignore[index]
        torch.testing.assert_close(got["u"], 3.0 * p["t"])


@pytest.mark.multiprocess
def test_out_writes_into_the_callers_tensor(report: list[Any]) -> None:
    xs = [fns.rank_input(r, 0) for r in range(MESH.size)]

    def group(axis: Any, r: int) -> list[torch.Tensor]:
        return [xs[q] for q in MESH.group(axis, r)]

    for r in range(MESH.size):
        got = report[r]["out"]
        k = MESH.axis_index("tp", r)
        expected = {
            "all_reduce inplace": sum(group("tp", r)),
            "all_reduce avg out": sum(group("dp", r)) / 2,
            "all_reduce strided": sum(group("tp", r)),
            "all_gather dim0": torch.cat(group("tp", r), 0),
            "all_gather dim1": torch.cat(group(("dp", "tp"), r), 1),
            "reduce_scatter": torch.chunk(sum(group("tp", r)), 2, 1)[k],
            "broadcast inplace": group("tp", r)[1],
            "broadcast out": group(("dp", "tp"), r)[2],
            "broadcast strided": group("dp", r)[0],
        }
        for label, value in expected.items():
            is_out, tensor = got[label]
            assert is_out, label
            torch.testing.assert_close(tensor, value, msg=f"{label} on rank {r}")


# ----------------------------------------------------------------- one process, no peers

WORLD = World(rank=0, world_size=1, master_port=0)


@pytest.fixture
def single() -> Any:
    with DeviceMesh(tp=1).activate(WORLD, timeout=30) as ctx:
        yield ctx


@pytest.mark.parametrize(
    ("out", "kind", "message"),
    [
        (torch.empty(3), topo.TopoValueError, "requires the result's shape (2, 3), but got (3,)"),
        (torch.empty(2, 3, dtype=torch.float64), topo.TopoTypeError, "dtype and device"),
        ([1.0], topo.TopoTypeError, "requires a torch.Tensor (or None), but got list"),
    ],
)
def test_out_of_the_wrong_kind_is_refused(single: Any, out: Any, kind: type, message: str) -> None:
    x = torch.ones(2, 3)
    for call in (
        lambda: topo.all_reduce(x, "tp", out=out),
        lambda: topo.all_gather(x, "tp", out=out),
        lambda: topo.reduce_scatter(x, "tp", out=out),
        lambda: topo.broadcast(x, "tp", out=out),
    ):
        with pytest.raises(kind, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_out_refuses_autograd(single: Any) -> None:
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(topo.TopoValueError, match="does not support autograd"):
        topo.all_reduce(x, "tp", out=torch.empty(2, 3))
    with pytest.raises(topo.TopoValueError, match="does not support autograd"):
        topo.broadcast(x, "tp", out=torch.empty(2, 3))
    with pytest.raises(topo.TopoValueError, match="does not support autograd"):
        topo.broadcast(x, "tp", out=x)  # in place is refused too
    with torch.no_grad():
        out = torch.empty(2, 3)
        assert topo.all_reduce(x, "tp", out=out) is out
        assert topo.all_reduce(x, "tp", out=x) is x  # in place, under no_grad
        assert topo.broadcast(x, "tp", out=x) is x


def test_integer_tensors_cannot_require_grad() -> None:
    # torch itself refuses; topo never sees one (so no integer gradient can be wrong)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ones(2, dtype=torch.int64).requires_grad_(True)


def test_group_of_one_differentiates(single: Any) -> None:
    x = torch.arange(6.0).reshape(2, 3).requires_grad_(True)
    ys = [
        topo.all_reduce(x, "tp"),
        topo.all_gather(x, "tp", 1),
        topo.reduce_scatter(x, "tp", 1, "avg"),
        topo.broadcast(x, "tp"),
        topo.scatter(x, "tp"),
        topo.gather(x, "tp"),
        topo.all_to_all(x, "tp", 0, 1),
        topo.ppermute(x, "tp", [(0, 0)]),
        topo.shift(x, "tp", 1),
        topo.autograd.copy_to(x, "tp"),
        topo.autograd.reduce_from(x, "tp"),
        topo.autograd.scatter_to(x, "tp"),
        topo.autograd.gather_from(x, "tp"),
    ]
    total = sum(y.sum() for y in ys if y is not None)
    total.backward()  # type: ignore[union-attr]
    torch.testing.assert_close(x.grad, torch.full((2, 3), float(len(ys))))


def test_plain_path_for_tensors_without_grad(single: Any) -> None:
    from topo.ops._library import needs_op

    x = torch.ones(2)
    assert not needs_op(x)
    assert needs_op(x.requires_grad_(True))
    with torch.no_grad():
        assert not needs_op(x)
