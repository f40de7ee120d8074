"""torch.compile of functions that call topo collectives (fullgraph: zero graph breaks), the
collectives kept in compiled graphs whose result a rank ignores, and opcheck of every op."""

from __future__ import annotations

from typing import Any

import _autograd_fns as fns
import pytest
import torch

import topo
from topo import DeviceMesh, World


@pytest.mark.multiprocess
def test_compiled_collectives_match_eager_and_are_never_dropped(tmp_path: Any) -> None:
    reports = topo.spawn(
        fns.compiled_checks,
        DeviceMesh(tp=2),
        timeout=240,
        activation_timeout=120,
        env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
    )
    for rank, report in enumerate(reports):
        for eager, compiled in zip(report["eager"], report["compiled"], strict=True):
            torch.testing.assert_close(compiled, eager, msg=f"rank {rank}")
        # the same graph with its backward in a thread with no active mesh (autograd's own
        # device thread for CUDA tensors)
        for eager, elsewhere in zip(report["eager"], report["compiled_elsewhere"], strict=True):
            torch.testing.assert_close(elsewhere, eager, msg=f"rank {rank}, backward elsewhere")
        assert report["opcheck"] == list(fns.OPCHECK_ARGS)
    assert reports[0]["compiled"][3] is not None
    assert reports[1]["compiled"][3] is None  # gather: None off dst, compiled as eager


def _ar(x: torch.Tensor) -> torch.Tensor:
    return topo.all_reduce(x, "tp") * 2


def test_compile_outside_an_activation_says_so() -> None:
    torch._dynamo.reset()
    with pytest.raises(Exception, match="requires an active mesh, but none is active"):
        torch.compile(_ar, fullgraph=True, backend="eager")(torch.ones(2))


def test_opcheck_every_op_on_a_group_of_one() -> None:
    import topo.ops

    topo.ops.load()  # torch.ops.topo.* used directly: register them first
    with DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=0), timeout=30):
        for name, args in fns.OPCHECK_ARGS.items():
            example = args(torch.randn(4, 6, requires_grad=True))
            example = (example[0], example[1], 1, *example[3:])
            if name == "ppermute":
                example = (example[0], "tp", 1, [0, 0])
            torch.library.opcheck(getattr(torch.ops.topo, name).default, example)


def test_compiled_max_reduction_compiles_and_raises_only_at_backward() -> None:
    with DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=0), timeout=30):
        x = torch.ones(3, requires_grad=True)
        y = torch.compile(lambda t: topo.all_reduce(t, "tp", "max"), backend="aot_eager")(x)
        torch.testing.assert_close(y, torch.ones(3))
        with pytest.raises(topo.NotDifferentiableError, match="op='max'"):
            y.sum().backward()


def test_plain_collectives_register_no_custom_op(python_subprocess: Any) -> None:
    """``import topo`` and a plain collective leave torch.library and dynamo alone; the first
    collective on an input that requires grad registers topo's ops."""
    code = (
        "import sys, torch, topo\n"
        "w = topo.World(rank=0, world_size=1, master_port=0)\n"
        "with topo.DeviceMesh(tp=1).activate(w, timeout=30):\n"
        "    topo.all_reduce(torch.ones(2), 'tp')\n"
        "    topo.all_gather(torch.ones(2), 'tp')\n"
        "    print(sorted(m for m in ('topo.ops.all_reduce', 'torch._dynamo') if m in sys.modules))\n"
        "    topo.all_reduce(torch.ones(2, requires_grad=True), 'tp').sum().backward()\n"
        "    print('topo.ops.scatter' in sys.modules, hasattr(torch.ops.topo, 'all_to_all'))\n"
    )
    done = python_subprocess(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "True"]


@pytest.mark.multiprocess
def test_non_strict_export_records_the_custom_op_and_runs() -> None:
    """Non-strict ``torch.export`` traces the collective as ``torch.ops.topo.all_reduce`` (a
    plain call would hand gloo a fake tensor), and the exported program reduces."""
    for ops, values in topo.spawn(fns.exported_all_reduce, DeviceMesh(tp=2), timeout=240):
        assert ops == ["topo.all_reduce.default"]
        assert values == [4.0, 4.0, 4.0, 4.0]
