"""Figures for the autograd / compile / ``out=`` issue, printed (not asserted), on DeviceMesh(tp=2):

1. topo's per-call layer cost of a no-grad ``all_reduce`` (context lookup, checks, dispatch)
   with a stub communicator, so communication noise stays out; run this file once on the
   commit before the change and once after to compare (``--layer-only`` runs on both: the
   layer cost and the no-grad 4-byte all_reduce against the raw call);
2. 4-byte ``all_reduce`` over gloo: no grad vs an input that requires grad (forward only, and
   forward + backward), vs the raw ProcessGroupGloo call;
3. a small function (all_reduce, all_gather, a few pointwise ops) under torch.compile vs eager;
4. 64 MiB ``all_reduce`` with ``out=x`` (in place) and ``out=y`` vs raw in-place
   ProcessGroupGloo, and the allocating call.

Run: ``python benchmarks/autograd.py`` (about two minutes on 2 cores). Each line gives
medians over interleaved repeats and the ratio to the raw call of the same run.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import topo


class _Stub:
    def __init__(self, real: Any) -> None:
        self.ranks, self.index, self.label = real.ranks, real.index, real.label

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return x


def layer_cost(calls: int = 20000, repeats: int = 7) -> dict[str, float]:
    ctx = topo.current()
    key = (("tp",), "cpu", None)
    real = ctx.communicator(("tp",), "cpu")
    ctx._communicators[key] = _Stub(real)  # type: ignore[assignment]
    x = torch.ones(1)
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                topo.all_reduce(x, axis="tp")
            times.append((time.perf_counter() - start) / calls)
    finally:
        ctx._communicators[key] = real
    return {"median": statistics.median(times), "best": min(times)}


def _interleaved(fns: dict[str, Callable[[], Any]], blocks: int, per_block: int) -> dict[str, list[float]]:
    from topo.bench import RawGroup  # noqa: F401  (same barrier source as the raw calls)

    ctx = topo.current()
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for block in range(blocks):
        order = names if block % 2 == 0 else names[::-1]
        for name in order:
            ctx.communicator(("tp",), "cpu").barrier()
            start = time.perf_counter()
            for _ in range(per_block):
                fns[name]()
            out[name].append((time.perf_counter() - start) / per_block)
    return out


def small_calls(
    blocks: int = 15, per_block: int = 200, no_grad_only: bool = False
) -> dict[str, list[float]]:
    from topo.bench import RawGroup

    raw = RawGroup(topo.current(), ("tp",))
    opts = raw.dist.AllreduceOptions()
    x = torch.ones(1)
    xg = torch.ones(1, requires_grad=True)
    raw_x = torch.ones(1)

    def fwd_bwd() -> None:
        topo.all_reduce(xg, axis="tp").sum().backward()

    fns: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw.pg.allreduce([raw_x], opts).wait(),
        "no grad": lambda: topo.all_reduce(x, axis="tp"),
        "requires grad, forward": lambda: topo.all_reduce(xg, axis="tp"),
        "requires grad, forward+backward": fwd_bwd,
    }
    if no_grad_only:
        fns = {name: fns[name] for name in ("raw", "no grad")}
    for fn in fns.values():
        for _ in range(50):
            fn()
    return _interleaved(fns, blocks, per_block)


def _step(x: torch.Tensor) -> torch.Tensor:
    y = topo.all_reduce(x * 2.0, axis="tp")
    z = topo.all_gather(torch.tanh(y), axis="tp")
    return z.sum(0) + y


def compiled_vs_eager(blocks: int = 15, per_block: int = 100) -> dict[str, list[float]]:
    x = torch.randn(256)
    compiled = torch.compile(_step, fullgraph=True, options={"reorder_for_peak_memory": False})
    for _ in range(3):
        compiled(x)
    fns: dict[str, Callable[[], Any]] = {"eager": lambda: _step(x), "compiled": lambda: compiled(x)}
    return _interleaved(fns, blocks, per_block)


def large_out(reps: int = 15, nbytes: int = 64 << 20) -> dict[str, list[float]]:
    from topo.bench import RawGroup

    raw = RawGroup(topo.current(), ("tp",))
    opts = raw.dist.AllreduceOptions()
    n = nbytes // 4
    raw_x, x, y, z = (torch.ones(n) for _ in range(4))
    fns: dict[str, Callable[[], Any]] = {
        "raw in place": lambda: raw.pg.allreduce([raw_x], opts).wait(),
        "topo out=x (in place)": lambda: topo.all_reduce(x, axis="tp", out=x),
        "topo out=y": lambda: topo.all_reduce(z, axis="tp", out=y),
        "topo (allocating)": lambda: topo.all_reduce(z, axis="tp"),
    }
    for fn in fns.values():
        fn()
    return _interleaved(fns, reps, 1)


def everything(layer_only: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"layer": layer_cost()}
    if layer_only:
        result["small"] = small_calls(blocks=21, no_grad_only=True)
    else:
        result["small"] = small_calls()
        result["compiled"] = compiled_vs_eager()
        result["large"] = large_out()
    return result


def _slowest(per_rank: list[dict[str, list[float]]], name: str) -> float:
    n = len(per_rank[0][name])
    return statistics.median(max(r[name][i] for r in per_rank) for i in range(n))


def _best(per_rank: list[dict[str, list[float]]], name: str) -> float:
    n = len(per_rank[0][name])
    return min(max(r[name][i] for r in per_rank) for i in range(n))


def _lines(title: str, per_rank: list[dict[str, list[float]]], base: str, unit: float, u: str) -> None:
    print(f"\n{title} (slowest rank per repeat; median and best repeat; ratios to {base!r})")
    ref, ref_best = _slowest(per_rank, base), _best(per_rank, base)
    for name in per_rank[0]:
        t, b = _slowest(per_rank, name), _best(per_rank, name)
        print(
            f"  {name:<34} median {t * unit:9.1f} {u} (ratio {t / ref:.3f})   "
            f"best {b * unit:9.1f} {u} (ratio {b / ref_best:.3f})"
        )


def main() -> None:
    layer_only = "--layer-only" in sys.argv
    print(f"# torch {torch.__version__}; DeviceMesh(tp=2), 2 local processes, gloo")
    results = topo.spawn(everything, topo.DeviceMesh(tp=2), layer_only, timeout=900)
    layer = [r["layer"] for r in results]
    print(
        "topo.all_reduce layer cost, no grad, stub communicator: "
        f"median {statistics.median(r['median'] for r in layer) * 1e6:.2f} us, "
        f"best {min(r['best'] for r in layer) * 1e6:.2f} us per call"
    )
    _lines("4-byte all_reduce", [r["small"] for r in results], "raw", 1e6, "us")
    if layer_only:
        return
    _lines("small function, torch.compile vs eager", [r["compiled"] for r in results], "eager", 1e6, "us")
    _lines("64 MiB all_reduce", [r["large"] for r in results], "raw in place", 1e3, "ms")


if __name__ == "__main__":
    main()
