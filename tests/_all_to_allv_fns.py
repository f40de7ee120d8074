"""What tests/test_all_to_allv.py runs on every rank (module level, so ``topo.spawn`` can pickle
it), the inputs both sides rebuild, and the single-process reference of an uneven all-to-all.

The ranks only run topo's collectives and report what they got; the parent computes what they
should have got from every rank's inputs with :func:`reference` (plain torch, one process).
"""

from __future__ import annotations

from typing import Any

import torch

import topo

#: Bound on every wait inside the ranks.
WAIT = 60.0


def make_input(
    seed: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Small integers (exact in every dtype) from ``(seed, rank)``; bool and complex too."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    values = torch.randint(-3, 4, shape, generator=g)
    if dtype == torch.bool:
        return values > 0
    if dtype.is_complex:
        return torch.complex(values.float(), -values.float()).to(dtype)
    return values.to(dtype)


def shape_for(rest: tuple[int, ...], dim: int, rows: int) -> tuple[int, ...]:
    """``rest`` with ``rows`` at ``dim``."""
    shape = list(rest)
    shape[dim] = rows
    return tuple(shape)


def reference(
    inputs: list[torch.Tensor], table: list[list[int]], dim: int, me: int
) -> torch.Tensor:
    """What index ``me`` of the group receives: block ``me`` of every index's input (index
    ``i`` splits its input along ``dim`` by ``table[i]``), concatenated in index order."""
    parts = [x.split(sizes, dim=dim)[me] for x, sizes in zip(inputs, table, strict=True)]
    return torch.cat(parts, dim=dim)


def recv_sizes(table: list[list[int]], me: int) -> list[int]:
    """Index ``me``'s receive sizes: what every index sends it."""
    return [row[me] for row in table]


# ----------------------------------------------------------------- the cases under spawn

#: (name, axis, dim, dtype, table of send sizes by index, recv_sizes given) on dp=2 × tp=2.
GLOO_CASES: list[tuple[str, Any, int, torch.dtype, list[list[int]], bool]] = [
    ("tp f32 dim0", "tp", 0, torch.float32, [[1, 2], [3, 0]], True),
    ("tp bf16 dim1 exchanged", "tp", 1, torch.bfloat16, [[0, 4], [2, 2]], False),
    ("dp int64 dim0", "dp", 0, torch.int64, [[2, 1], [0, 0]], True),
    (
        "dp,tp complex dim1",
        ("dp", "tp"),
        1,
        torch.complex64,
        [[1, 0, 2, 1], [0, 0, 0, 3], [2, 2, 2, 2], [1, 0, 0, 0]],
        True,
    ),
    (
        "dp,tp bool dim0 exchanged",
        ("dp", "tp"),
        0,
        torch.bool,
        [[3, 1, 0, 0], [0, 0, 1, 1], [0, 5, 0, 2], [1, 1, 1, 1]],
        False,
    ),
    ("tp all zero", "tp", 0, torch.float32, [[0, 0], [0, 0]], True),
]
REST = (3, 2)  # the input's shape, its `dim` replaced by the rows this rank sends


def gloo_cases() -> dict[str, Any]:
    """Every case of :data:`GLOO_CASES` on this rank, then one gradient: this rank's result
    and (for the gradient) its x.grad of ``(y * weight).sum()``."""
    rank = topo.current().rank
    out: dict[str, Any] = {}
    for k, (name, axis, dim, dtype, table, given) in enumerate(GLOO_CASES):
        me = topo.axis_index(axis)
        x = make_input(k, rank, shape_for(REST, dim, sum(table[me])), dtype)
        recvs = recv_sizes(table, me) if given else None
        out[name] = topo.all_to_allv(x, axis, table[me], recvs, dim=dim)
    name, axis, dim, _, table, _ = GLOO_CASES[3]
    me = topo.axis_index(axis)
    x = make_input(3, rank, shape_for(REST, dim, sum(table[me])), torch.float64)
    x.requires_grad_(True)
    y = topo.all_to_allv(x, axis, table[me], dim=dim)
    (y * grad_weight(rank, tuple(y.shape))).sum().backward()
    out["grad"] = (y.detach(), x.grad)
    return out


def grad_weight(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return make_input(777, rank, shape, torch.float64)


def checked_cases() -> dict[str, str]:
    """Under ``TOPO_CHECK=1``: a good all_to_allv, recv_sizes that disagree with a peer's
    send_sizes (named by check mode, not a gloo abort), an uneven all_gatherv by
    point-to-point, and a good call after the errors."""
    rank, me = topo.current().rank, topo.axis_index("tp")
    report: dict[str, str] = {}
    report["good"] = str(topo.all_to_allv(torch.full((3,), float(rank)), "tp", [1, 2]).tolist())
    sends = [1, 2] if me == 0 else [2, 1]
    wrong = [1, 2] if me == 0 else [3, 1]  # index 1 expects 3 rows from index 0, which sends 2
    try:
        topo.all_to_allv(torch.ones(3), "tp", sends, wrong)
        report["wrong"] = "no error"
    except topo.CollectiveMismatchError as error:
        report["wrong"] = str(error)
    gathered = topo.all_gatherv(torch.full((me + 1,), float(me)), "tp", method="p2p")
    report["gatherv p2p"] = str(gathered.tolist())
    report["after"] = str(topo.all_to_allv(torch.arange(2.0) + 10 * me, "tp", [1, 1]).tolist())
    return report


# ------------------------------------------------------------------------ torch.compile


def compiled_model(
    x: torch.Tensor, sends: list[int], recvs: list[int], rows: list[int]
) -> torch.Tensor:
    """all_to_allv, then back with the sizes swapped, an all_gatherv and a reduce_scatterv."""
    y = topo.all_to_allv(torch.sin(x), "tp", sends, recvs, dim=1)
    back = topo.all_to_allv(y * 2.0, "tp", recvs, sends, dim=1)
    g = topo.all_gatherv(back.t(), "tp", sizes=rows)
    r = topo.reduce_scatterv(g * g, "tp", rows)
    return (y**2).sum() + r.sum()


def compiled_checks(backend: str = "inductor") -> list[tuple[torch.Tensor, ...]]:
    """torch.compile(fullgraph=True) of :func:`compiled_model` for three size tables (traced
    again for each), against eager: (compiled loss, grad) and (eager loss, grad) per table."""
    me = topo.axis_index("tp")
    tables = [[[1, 2], [3, 0]], [[2, 2], [0, 1]], [[0, 3], [1, 1]]]
    options = {"reorder_for_peak_memory": False} if backend == "inductor" else None
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend, options=options)
    out = []
    for k, table in enumerate(tables):
        sends, recvs = table[me], recv_sizes(table, me)
        rows = [sum(row) for row in table]
        x = make_input(k, topo.current().rank, (2, sum(sends))).requires_grad_(True)
        loss = compiled(x, sends, recvs, rows)
        loss.backward()
        got = (loss.detach(), x.grad)
        x.grad = None
        eager = compiled_model(x, sends, recvs, rows)
        eager.backward()
        out.append((*got, eager.detach(), x.grad))
    return out


def compiled_checks_and_opcheck() -> dict[str, Any]:
    """:func:`compiled_checks` with inductor, then :func:`opcheck_ops` on this group."""
    return {"tables": compiled_checks("inductor"), "opcheck": opcheck_ops()}


#: Arguments of the uneven ops for opcheck on x of (4, 6): ``(x, n, index)`` → arguments.
OPCHECK: dict[str, Any] = {
    "all_to_allv": lambda x, n, i: (x, "tp", n, *([[4]] * 2 if n == 1 else [[1, 3], [3, 1]][i : i + 1] * 2), 0),
    "all_gatherv": lambda x, n, i: (x, "tp", n, [4] * n, 0, "auto"),
    "reduce_scatterv": lambda x, n, i: (x, "tp", n, [4] if n == 1 else [1, 3], 4 if n == 1 else [1, 3][i], 0, "sum"),
}  # fmt: skip


def opcheck_ops() -> list[str]:
    """torch.library.opcheck of the uneven ops on the active axis 'tp' (size 1 or 2)."""
    import topo.ops

    topo.ops.load()
    n, index = topo.axis_size("tp"), topo.axis_index("tp")
    checked = []
    for name, args in OPCHECK.items():
        example = args(make_input(9, topo.current().rank, (4, 6), torch.float64), n, index)
        example[0].requires_grad_(True)
        torch.library.opcheck(getattr(torch.ops.topo, name).default, example)
        checked.append(name)
    return checked
