"""Functions that run on every rank under both ``topo.simulate`` and ``topo.spawn`` (module
level, so spawn can pickle them). Nothing here computes an expected value: the tests compare
what the two runners return."""

from __future__ import annotations

from typing import Any

import torch

import topo

#: An all-reduce this long (float32, 8 MiB) makes gloo's ring use several segments per rank
#: on a 3-rank axis, so the reduction-order model is checked beyond the 2-segment case.
LONG = 2_000_000


def rank_inputs(rank: int) -> dict[str, torch.Tensor]:
    """Deterministic inputs of ``rank`` whose float sums depend on the summation order."""
    g = torch.Generator().manual_seed(1234 + rank)
    wide = torch.randn(6, 12, generator=g, dtype=torch.float64)
    wide = wide * 10.0 ** torch.randint(-5, 6, (6, 12), generator=g)
    return {
        "f32": wide.to(torch.float32),
        "f64": wide,
        "bf16": wide.to(torch.bfloat16),
        "f16": (wide / 1e3).clamp(-6e4, 6e4).to(torch.float16),
        "i64": torch.randint(-(2**40), 2**40, (6, 12), generator=g),
        "i8": torch.randint(-128, 128, (6, 12), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (6, 12), generator=g, dtype=torch.uint8),
        "c64": torch.complex(wide.float(), -wide.float()),
        "bool": torch.rand(6, 12, generator=g) > 0.5,
        "long": torch.randn(LONG, generator=g) * 1e3,
    }


AXES: list[Any] = ["tp", "dp", ("dp", "tp")]


def compare_main() -> dict[str, Any]:
    """Every collective on every axis of a dp×tp mesh, then (when check mode is on) a
    deliberate shape mismatch whose error message is returned."""
    ctx = topo.current()
    x = rank_inputs(ctx.rank)
    out: dict[str, Any] = {}
    for axis in AXES:
        n = ctx.axis_size(axis)
        key = str(axis)
        for name in ("f32", "f64", "bf16", "f16", "i64", "i8", "u8"):
            out[f"{key} all_reduce sum {name}"] = topo.all_reduce(x[name], axis)
            out[f"{key} reduce_scatter sum {name}"] = topo.reduce_scatter(x[name], axis, dim=1)
        for op in ("avg", "max", "min", "prod"):
            out[f"{key} all_reduce {op} f32"] = topo.all_reduce(x["f32"], axis, op=op)
            out[f"{key} reduce_scatter {op} f64"] = topo.reduce_scatter(x["f64"], axis, 1, op)
        out[f"{key} all_reduce prod i64"] = topo.all_reduce(x["i64"] % 7 - 3, axis, op="prod")
        for name in ("f32", "c64", "bool"):
            out[f"{key} all_gather {name}"] = topo.all_gather(x[name], axis, dim=1)
            out[f"{key} broadcast {name}"] = topo.broadcast(x[name], axis, src=n - 1)
            out[f"{key} scatter {name}"] = topo.scatter(x[name], axis, src=n // 2, dim=1)
            out[f"{key} gather {name}"] = topo.gather(x[name], axis, dst=0, dim=1)
            out[f"{key} all_to_all {name}"] = topo.all_to_all(x[name], axis, 1, 0)
            out[f"{key} ppermute {name}"] = topo.ppermute(
                x[name], axis, [(i, (i + 2) % n) for i in range(n - 1)]
            )
            out[f"{key} shift {name}"] = topo.shift(x[name], axis, offset=-1, wrap=False)
        out[f"{key} objects"] = (
            topo.broadcast_object({"from": ctx.rank}, axis, src=n - 1),
            topo.all_gather_object(("rank", ctx.rank), axis),
        )
    out["tp all_reduce long"] = topo.all_reduce(x["long"], "tp")
    tp = ctx.axis_index("tp")
    if tp == 0:
        topo.send(x["f32"], "tp", dst=1)
    elif tp == 1:
        out["recv"] = topo.recv((6, 12), torch.float32, "tp", src=0)
    topo.barrier()
    if ctx.check:
        try:
            topo.all_reduce(torch.ones(2 + tp % 2), "tp")
        except topo.CollectiveMismatchError as error:
            out["mismatch"] = str(error)
        out["after mismatch"] = topo.all_reduce(torch.ones(2), "tp")  # the group still works
    return out
