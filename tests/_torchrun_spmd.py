"""One rank of the SPMD check under torchrun (tests/test_shard_map.py starts 4 with
``python -m torch.distributed.run --nproc-per-node=4``): a shard_map'd row-parallel matmul
(values and gradients) and both variants of examples/moe_ep.py, each compared on this rank
with the single-process reference; prints one line and exits 1 on a difference."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import topo
from topo import P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import moe_ep


def main() -> None:
    with moe_ep.MESH.activate() as ctx:  # dp=2 × tp=2 with ep = ("dp", "tp"), from torchrun
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 6, generator=g, dtype=torch.float64).requires_grad_()
        w = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
        row = topo.shard_map(
            lambda a, b: topo.all_reduce(a @ b, "tp"),
            in_specs=(P("dp", "tp"), P("tp", None)),
            out_specs=P("dp"),
        )
        y = row(x, w)
        y.sin().sum().backward()
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        yr = xr @ wr
        yr.sin().sum().backward()
        assert x.grad is not None and w.grad is not None
        assert xr.grad is not None and wr.grad is not None
        spmd = max(
            float((y - yr).abs().max()),
            float((x.grad - xr.grad).abs().max()),
            float((w.grad - wr.grad).abs().max()),
        )
        got = moe_ep.run_both()
        want = moe_ep.reference(ctx.mesh.size)[ctx.rank]
        moe = max(float((got[v][k] - want[k]).abs().max()) for v in got for k in want)
        print(f"torchrun rank {ctx.rank}: shard_map max error {spmd:.1e}, MoE max error {moe:.1e}")
        if spmd > 1e-12 or moe > 1e-5:
            sys.exit(1)


if __name__ == "__main__":
    main()
