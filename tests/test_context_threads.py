"""A collective carried to another thread finds the activation it was called in.

torch's autograd engine runs the backward of CUDA tensors on its own device thread, where no
mesh is active; a compiled graph runs whenever it is called. The group key an op carries names
its activation (``"tp@3"``), resolved by ``topo.context.context_for_key``. These tests run in
one process (size-1 axes resolve their activation exactly as larger ones do); the 4-rank
gradients with the backward in another thread are in test_autograd.py and test_compile.py.
"""

from __future__ import annotations

import threading
from typing import Any

import _autograd_fns as fns
import pytest
import torch

import topo
from topo import DeviceMesh, World
from topo.active import context_for_key, group_key

WORLD = World(rank=0, world_size=1, master_port=0)


def _in_thread(fn: Any) -> Any:
    """``fn()`` in a new thread (no active mesh there); its result, or its exception raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_the_key_names_the_axis_and_the_activation() -> None:
    with DeviceMesh(dp=1, tp=1).activate(WORLD, timeout=30) as ctx:
        assert group_key(ctx, ("dp", "tp")) == f"dp,tp@{ctx.id}"
        found = _in_thread(lambda: context_for_key(f"dp,tp@{ctx.id}", "all_reduce"))
        assert found == (ctx, ("dp", "tp"), 1)
        with pytest.raises(topo.NoActiveMeshError, match="none is active in this thread"):
            _in_thread(lambda: context_for_key("tp", "all_reduce"))  # a bare key: this thread's


def test_every_differentiable_collective_backpropagates_in_another_thread() -> None:
    with DeviceMesh(tp=1).activate(WORLD, timeout=30):
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
        fns.backward(total, elsewhere=True)  # type: ignore[arg-type]
    torch.testing.assert_close(x.grad, torch.full((2, 3), float(len(ys))))


def test_a_backward_after_the_activation_closed_names_it() -> None:
    with DeviceMesh(tp=1).activate(WORLD, timeout=30) as ctx:
        x = torch.ones(3, requires_grad=True)
        y = topo.all_reduce(x, "tp")
    with pytest.raises(
        topo.NoActiveMeshError,
        match=rf"topo.all_reduce on axis 'tp' requires the activation it was called .*"
        rf"<MeshContext #{ctx.id} DeviceMesh\(tp=1\) rank 0 \(closed\)> is closed",
    ):
        y.sum().backward()
    assert ctx.closed


def test_the_calling_threads_own_activation_wins() -> None:
    """Nested activations that both have 'tp': the key's own activation, though outer, is
    used in its thread; a thread with only another activation of the axis uses that one."""
    outer_mesh, inner_mesh = DeviceMesh(tp=1), DeviceMesh(dp=1, tp=1)
    with outer_mesh.activate(WORLD, timeout=30, name="outer") as outer:
        key = group_key(outer, ("tp",))
        with inner_mesh.activate(WORLD, timeout=30, name="inner") as inner:
            assert context_for_key(key, "all_reduce")[0] is outer
            assert context_for_key("tp", "all_reduce")[0] is inner  # a bare key: innermost
            assert _in_thread(lambda: context_for_key(key, "all_reduce"))[0] is outer

            def elsewhere() -> Any:
                with DeviceMesh(tp=1).activate(WORLD, timeout=30, name="other") as other:
                    return context_for_key(key, "all_reduce")[0] is other

            assert _in_thread(elsewhere)


def _double_sum(t: torch.Tensor) -> torch.Tensor:
    return topo.all_reduce(t * 2, "tp").sum()


def test_a_compiled_graph_replayed_in_a_later_activation_backpropagates_elsewhere() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_double_sum, fullgraph=True, backend="aot_eager")
    mesh = DeviceMesh(tp=1)
    with mesh.activate(WORLD, timeout=30):  # traced here: the key names this activation
        x = torch.ones(3, requires_grad=True)
        fns.backward(compiled(x), elsewhere=True)
        torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    with mesh.activate(WORLD, timeout=30) as again:  # the graph is reused, not retraced
        x = torch.ones(3, requires_grad=True)
        loss = compiled(x)
        fns.backward(loss, elsewhere=True)  # the one open activation of the same mesh
        torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
        assert not again.closed
    torch._dynamo.reset()


def test_a_key_of_a_collected_activation_still_says_closed() -> None:
    with pytest.raises(topo.NoActiveMeshError, match=r"but activation #999999 is closed"):
        _in_thread(lambda: context_for_key("tp@999999", "all_gather"))
