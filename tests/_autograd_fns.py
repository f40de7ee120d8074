"""Functions that tests/test_autograd.py and tests/test_compile.py run on every rank with
``topo.spawn`` (module level, so picklable), and the inputs both sides rebuild.

Nothing here computes an expected gradient: the ranks run topo's collectives, backpropagate
and report what they got; the parent computes its reference in one process from every rank's
inputs (tests/test_autograd.py).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

import topo

SHAPE = (4, 6)

#: (case name, collective name, keyword arguments). Axes are of DeviceMesh(dp=2, tp=2).
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("all_reduce sum tp", "all_reduce", {"axis": "tp", "op": "sum"}),
    ("all_reduce avg dp", "all_reduce", {"axis": "dp", "op": "avg"}),
    ("all_reduce sum dp,tp", "all_reduce", {"axis": ("dp", "tp"), "op": "sum"}),
    ("all_gather tp dim0", "all_gather", {"axis": "tp", "dim": 0}),
    ("all_gather dp,tp dim1", "all_gather", {"axis": ("dp", "tp"), "dim": 1}),
    ("reduce_scatter tp dim1 sum", "reduce_scatter", {"axis": "tp", "dim": 1, "op": "sum"}),
    ("reduce_scatter dp,tp dim0 avg", "reduce_scatter", {"axis": ("dp", "tp"), "op": "avg"}),
    ("broadcast tp src1", "broadcast", {"axis": "tp", "src": 1}),
    ("broadcast dp,tp src2", "broadcast", {"axis": ("dp", "tp"), "src": 2}),
    ("scatter tp src0 dim1", "scatter", {"axis": "tp", "src": 0, "dim": 1}),
    ("scatter dp,tp src3 dim0", "scatter", {"axis": ("dp", "tp"), "src": 3, "dim": 0}),
    ("gather tp dst1 dim1", "gather", {"axis": "tp", "dst": 1, "dim": 1}),
    ("all_to_all tp 0->1", "all_to_all", {"axis": "tp", "split_dim": 0, "concat_dim": 1}),
    (
        "all_to_all dp,tp 0->1",
        "all_to_all",
        {"axis": ("dp", "tp"), "split_dim": 0, "concat_dim": 1},
    ),
    ("ppermute tp one pair", "ppermute", {"axis": "tp", "perm": [(0, 1)]}),
    (
        "ppermute dp,tp ring",
        "ppermute",
        {"axis": ("dp", "tp"), "perm": [(0, 2), (2, 3), (3, 1), (1, 0)]},
    ),
    ("shift dp,tp +1 nowrap", "shift", {"axis": ("dp", "tp"), "offset": 1, "wrap": False}),
    ("shift tp -1 wrap", "shift", {"axis": "tp", "offset": -1, "wrap": True}),
]


def _random_cases(count: int, seed: int = 0) -> list[tuple[str, str, dict[str, Any]]]:
    """Seeded random shapes (1-3 dims, sizes multiples of 4), dims and axes for the collectives
    whose shapes depend on ``dim``; every rank and the parent build the same list."""
    rng = random.Random(seed)
    cases = []
    for k in range(count):
        shape = tuple(4 * rng.randint(1, 2) for _ in range(rng.randint(1, 3)))
        axis = rng.choice(["tp", "dp", ("dp", "tp")])
        dims = [rng.randrange(len(shape)) for _ in range(2)]
        name = ("all_gather", "reduce_scatter", "all_to_all", "scatter")[k % 4]
        kw: dict[str, Any] = {"axis": axis, "shape": shape}
        if name == "all_to_all":
            kw.update(split_dim=dims[0], concat_dim=dims[1])
        else:
            kw["dim"] = dims[0]
        if name == "reduce_scatter":
            kw["op"] = rng.choice(["sum", "avg"])
        if name == "scatter":
            kw["src"] = rng.randrange(4 if axis == ("dp", "tp") else 2)
        cases.append((f"random {k} {name} {axis} {shape}", name, kw))
    return cases


CASES += _random_cases(8)

#: Reductions without a gradient: the backward must raise NotDifferentiableError.
NO_GRAD_CASES: list[tuple[str, dict[str, Any]]] = [
    ("all_reduce", {"axis": "tp", "op": "max"}),
    ("all_reduce", {"axis": "dp", "op": "min"}),
    ("reduce_scatter", {"axis": "tp", "op": "prod"}),
]


def rank_input(rank: int, case: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * case + rank)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def loss_weight(rank: int, case: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7919 + 1000 * case + rank)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _collective(name: str) -> Callable[..., Any]:
    fn: Callable[..., Any] = getattr(topo, name)
    return fn


def backward(loss: torch.Tensor, elsewhere: bool = False) -> None:
    """``loss.backward()``, here or (``elsewhere``) in a new thread with no active mesh — as
    torch's autograd engine runs the backward of CUDA tensors on its own device thread."""
    if not elsewhere:
        loss.backward()
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            assert topo.active_contexts() == ()  # nothing inherited: like autograd's threads
            loss.backward()
        except BaseException as error:
            failed.append(error)

    thread = threading.Thread(target=run, name="backward elsewhere")
    thread.start()
    thread.join(100)
    if thread.is_alive():
        raise TimeoutError("the backward in another thread did not finish in 100 s")
    if failed:
        raise failed[0]


def _device(device: str) -> torch.device:
    return topo.current().device if device == "cuda" else torch.device("cpu")


def _cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def grad_cases(elsewhere: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Every case of CASES on this rank: forward value and gradient of ``(y * w).sum()``
    (the backward in another thread with ``elsewhere``; on ``device`` tensors, whose backward
    autograd runs on its own device thread for CUDA)."""
    rank = topo.current().world.rank
    dev = _device(device)
    report: dict[str, Any] = {}
    for i, (case, name, kw) in enumerate(CASES):
        kwargs = {k: v for k, v in kw.items() if k != "shape"}
        x = rank_input(rank, i, kw.get("shape", SHAPE)).to(dev)
        if name == "gather" and topo.axis_index(kwargs["axis"]) != kwargs["dst"]:
            report[case] = (_cpu(_collective(name)(x, **kwargs)), None)  # off dst: no grad
            continue
        x.requires_grad_(True)
        y = _collective(name)(x, **kwargs)
        weight = loss_weight(rank, i, tuple(y.shape)).to(dev)
        backward((y * weight).sum(), elsewhere)
        report[case] = (_cpu(y.detach()), _cpu(x.grad))
    if elsewhere:
        return report
    errors = []
    for name, kwargs in NO_GRAD_CASES:  # on CUDA the error comes from autograd's device thread
        x = rank_input(rank, 0).to(dev).requires_grad_(True)
        y = _collective(name)(x, **kwargs)
        try:
            y.sum().backward()
            errors.append("no error")
        except topo.NotDifferentiableError as error:
            errors.append(str(error))
    report["no_grad"] = errors
    # gather off dst with an x that requires grad: an error after the communication
    x = rank_input(rank, 0).to(dev).requires_grad_(True)
    try:
        topo.gather(x, axis="tp", dst=0)
        report["gather_off_dst"] = "no error"
    except topo.NotDifferentiableError as error:
        report["gather_off_dst"] = str(error)
    return report


def mlp_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "x": torch.randn(3, 8, generator=gen, dtype=torch.float64),
        "w1": torch.randn(8, 6, generator=gen, dtype=torch.float64),
        "w2": torch.randn(6, 8, generator=gen, dtype=torch.float64),
        "t": torch.randn(3, 8, generator=gen, dtype=torch.float64),
    }


def tp_mlp(elsewhere: bool = False, device: str = "cpu") -> dict[str, Any]:
    """A 2-way tensor-parallel MLP over axis 'tp': column-parallel then row-parallel linear,
    with Megatron's regions; returns the loss and this rank's gradients (the backwards in
    another thread with ``elsewhere``; on ``device`` tensors)."""
    dev = _device(device)
    p = {k: v.to(dev) for k, v in mlp_params().items()}
    i, n = topo.axis_index("tp"), topo.axis_size("tp")
    cols = slice(i * 6 // n, (i + 1) * 6 // n)
    x = p["x"].clone().requires_grad_(True)
    w1 = p["w1"][:, cols].clone().requires_grad_(True)
    w2 = p["w2"][cols, :].clone().requires_grad_(True)
    h = torch.nn.functional.gelu(topo.autograd.copy_to(x, "tp") @ w1)
    y = topo.autograd.reduce_from(h @ w2, "tp")
    loss = ((y - p["t"]) ** 2).mean()
    backward(loss, elsewhere)
    # scatter_to / gather_from: a round trip whose gradient is the identity's
    u = p["x"].clone().requires_grad_(True)
    v = topo.autograd.gather_from(topo.autograd.scatter_to(u, "tp", dim=-1) * 3.0, "tp", dim=-1)
    backward((v * p["t"]).sum(), elsewhere)
    grads = {"loss": loss.detach(), "x": x.grad, "w1": w1.grad, "w2": w2.grad, "u": u.grad}
    return {k: _cpu(v) for k, v in grads.items()}


def out_cases() -> dict[str, Any]:
    """``out=`` on all_reduce / all_gather / reduce_scatter / broadcast: in place, into a fresh
    buffer, into a non-contiguous buffer; returns what each call returned and whether it was
    ``out``."""
    rank = topo.current().world.rank
    x = rank_input(rank, 0)
    report: dict[str, Any] = {}
    inplace = x.clone()
    report["all_reduce inplace"] = (topo.all_reduce(inplace, "tp", out=inplace) is inplace, inplace)
    fresh = torch.empty_like(x)
    report["all_reduce avg out"] = (topo.all_reduce(x, "dp", "avg", out=fresh) is fresh, fresh)
    strided = torch.empty(SHAPE[1], SHAPE[0], dtype=x.dtype).t()
    report["all_reduce strided"] = (topo.all_reduce(x, "tp", out=strided) is strided, strided)
    g0 = torch.empty(SHAPE[0] * 2, SHAPE[1], dtype=x.dtype)
    report["all_gather dim0"] = (topo.all_gather(x, "tp", out=g0) is g0, g0)
    g1 = torch.empty(SHAPE[0], SHAPE[1] * 4, dtype=x.dtype)
    report["all_gather dim1"] = (topo.all_gather(x, ("dp", "tp"), 1, out=g1) is g1, g1)
    rs = torch.empty(SHAPE[0], SHAPE[1] // 2, dtype=x.dtype)
    report["reduce_scatter"] = (topo.reduce_scatter(x, "tp", 1, out=rs) is rs, rs)
    own = x.clone()  # broadcast in place, as torch.distributed.broadcast does
    report["broadcast inplace"] = (topo.broadcast(own, "tp", 1, out=own) is own, own)
    b = torch.empty_like(x)
    report["broadcast out"] = (topo.broadcast(x, ("dp", "tp"), 2, out=b) is b, b)
    bs = torch.empty(SHAPE[1], SHAPE[0], dtype=x.dtype).t()
    report["broadcast strided"] = (topo.broadcast(x, "dp", 0, out=bs) is bs, bs)
    return report


def everything() -> dict[str, Any]:
    return {
        "grads": grad_cases(),
        "mlp": tp_mlp(),
        "out": out_cases(),
        "grads_elsewhere": grad_cases(elsewhere=True),
        "mlp_elsewhere": tp_mlp(elsewhere=True),
    }


# ------------------------------------------------------------------ torch.compile (tp=2)

#: Arguments of every op for opcheck, on an axis 'tp' of size 2 (x is (4, 6)).
OPCHECK_ARGS: dict[str, Callable[[torch.Tensor], tuple[Any, ...]]] = {
    "all_reduce": lambda x: (x, "tp", 2, "sum"),
    "all_gather": lambda x: (x, "tp", 2, 1),
    "reduce_scatter": lambda x: (x, "tp", 2, 0, "avg"),
    "broadcast": lambda x: (x, "tp", 2, 1),
    "reduce": lambda x: (x, "tp", 2, 0),
    "scatter": lambda x: (x, "tp", 2, 0, 1),
    "gather": lambda x: (x, "tp", 2, 1, 0),
    "chunk": lambda x: (x, "tp", 2, 1),
    "unchunk": lambda x: (x, "tp", 2, 1),
    "all_to_all": lambda x: (x, "tp", 2, 0, 1),
    "ppermute": lambda x: (x, "tp", 2, [0, 1, 1, 0]),
}


def model(x: torch.Tensor, w: torch.Tensor, use: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Several collectives and two regions in one differentiable function, plus an all_reduce
    whose result is ignored where ``use`` is false and a gather (``None`` off dst)."""
    a = topo.all_reduce(x * w, "tp")
    b = topo.all_gather(torch.sin(a), "tp", dim=0)  # (8, 6)
    c = topo.reduce_scatter(b, "tp", dim=0)  # (4, 6)
    d = topo.all_to_all(c, "tp", split_dim=0, concat_dim=1)  # (2, 12)
    e = topo.shift(d, "tp", offset=1) + topo.broadcast(d, "tp", src=0)
    f = topo.autograd.reduce_from(topo.autograd.copy_to(e, "tp") * 2.0, "tp")
    loss = (f**2).sum()
    ignored = topo.all_reduce(x.detach() + 1, "tp")  # must run even where unused
    if use:
        loss = loss + ignored.sum()
    return loss, topo.gather(x.detach() * 2, "tp", dst=0)


def compiled_checks() -> dict[str, Any]:
    """torch.compile(fullgraph=True) of :func:`model` against eager on this rank, a compiled
    collective whose result one rank ignores, a compiled gather, and opcheck of every op."""
    rank = topo.current().world.rank
    x = rank_input(rank, 1).float().requires_grad_(True)
    w = rank_input(rank, 2).float().requires_grad_(True)
    # rank 1 ignores one all_reduce's result; had its graph dropped it, rank 0 would time out
    use = topo.axis_index("tp") == 0
    eager, eager_gathered = model(x, w, use)
    eager.backward()
    eager_grads = (x.grad.clone(), w.grad.clone())  # type: ignore[union-attr]
    x.grad = w.grad = None
    started = time.perf_counter()
    # inductor's peak-memory reordering (torch 2.13) ignores the effect-token order between
    # independent collectives: turn it off for graphs with collectives (docs/compile.md)
    options = {"reorder_for_peak_memory": False}
    compiled_model = torch.compile(model, fullgraph=True, options=options)
    compiled, gathered = compiled_model(x, w, use)
    compiled.backward()
    report: dict[str, Any] = {
        "eager": (eager.detach(), *eager_grads, eager_gathered),
        "compiled": (compiled.detach(), x.grad, w.grad, gathered),
        "compile_s": time.perf_counter() - started,
    }
    # the compiled graph again, its backward in a thread with no active mesh
    x.grad = w.grad = None
    again, gathered = compiled_model(x, w, use)
    backward(again, elsewhere=True)
    report["compiled_elsewhere"] = (again.detach(), x.grad, w.grad, gathered)
    started = time.perf_counter()
    checked = []
    for name, args in OPCHECK_ARGS.items():
        torch.library.opcheck(
            getattr(torch.ops.topo, name).default, args(rank_input(rank, 3).requires_grad_(True))
        )
        checked.append(name)
    report["opcheck"] = checked
    report["opcheck_s"] = time.perf_counter() - started
    return report


class _DoubledSum(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topo.all_reduce(x * 2, "tp")


def exported_all_reduce() -> tuple[list[str], list[float]]:
    """``torch.export`` of a module with an all_reduce, non-strict (the Python code runs on fake
    tensors, and only ``torch.compiler.is_compiling()`` says so): the topo ops in the exported
    graph, and what the exported program returns when run on every rank."""
    program = torch.export.export(_DoubledSum(), (torch.ones(4),), strict=False)
    ops = sorted({str(node.target) for node in program.graph.nodes if "topo" in str(node.target)})
    return ops, program.module()(torch.ones(4)).tolist()
