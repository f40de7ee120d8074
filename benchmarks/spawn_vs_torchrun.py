"""The training step of a 2×2 tensor- and data-parallel MLP under ``topo.spawn`` and under
torchrun: the same rank function, the same mesh, the two launchers.

The step: a Megatron-style MLP (column-parallel ``w1``, GELU, row-parallel ``w2`` whose partial
sums are all_reduced over ``tp``: ``topo.autograd.copy_to`` / ``reduce_from``), a mean-squared
loss, the backward (``copy_to`` all_reduces the input's gradient over ``tp``), then the gradients all_reduced over ``dp`` and an SGD update. Each rank times
``--steps`` steps after ``--warmup``; a launch's figure is the slowest rank's median step. The
launches alternate which launcher goes first; the table gives the median over launches.

torchrun sets ``OMP_NUM_THREADS=1`` for its workers; ``topo.spawn`` sets a fair share of the
cores (``max(1, cores // ranks)``, also 1 on this 2-core machine) unless the caller set it.
Run: ``python benchmarks/spawn_vs_torchrun.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import topo
import topo.autograd

ROOT = Path(__file__).resolve().parent.parent
MESH = topo.DeviceMesh(dp=2, tp=2)
HIDDEN, BATCH = 256, 64


def train(steps: int, warmup: int) -> dict[str, float]:
    """Every rank: ``warmup + steps`` training steps; the median step time and the loss."""
    tp = topo.axis_size("tp")
    g = topo.rank_generator(0, axis="tp")  # tp shards differ, dp replicas agree
    w1 = (torch.randn(HIDDEN, 4 * HIDDEN // tp, generator=g) * 0.02).requires_grad_()
    w2 = (torch.randn(4 * HIDDEN // tp, HIDDEN, generator=g) * 0.02).requires_grad_()
    data = topo.rank_generator(1, axis="dp")  # each dp replica its own batch
    times, loss = [], torch.zeros(())
    for step in range(warmup + steps):
        x = torch.randn(BATCH, HIDDEN, generator=data)
        start = time.perf_counter()
        h = torch.nn.functional.gelu(topo.autograd.copy_to(x, "tp") @ w1)
        y = topo.autograd.reduce_from(h @ w2, "tp")
        loss = (y - x).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            for w in (w1, w2):
                assert w.grad is not None
                w -= 0.1 * topo.all_reduce(w.grad, "dp", op="avg")
                w.grad = None
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"step": statistics.median(times), "loss": float(loss.detach())}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def under_spawn(steps: int, warmup: int) -> tuple[float, float]:
    results = topo.spawn(train, MESH, steps, warmup, timeout=600)
    return max(r["step"] for r in results), results[0]["loss"]


def under_torchrun(steps: int, warmup: int, out: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets its own (1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(MESH.size),
        "--master-port", str(_free_port()), __file__, "--worker", str(out),
        "--steps", str(steps), "--warmup", str(warmup),
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, timeout=600, capture_output=True)
    results = [json.loads((out / f"{r}.json").read_text()) for r in range(MESH.size)]
    return max(r["step"] for r in results), results[0]["loss"]


def worker(out: Path, steps: int, warmup: int) -> None:
    """One torchrun worker: activate from torchrun's variables and train."""
    with MESH.activate(timeout=120) as ctx:
        result = train(steps, warmup)
        result["omp"] = float(os.environ.get("OMP_NUM_THREADS", "0"))
        (out / f"{ctx.rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--worker", type=Path)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.warmup)
        return
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"topo-step-{os.getpid()}"
    out.mkdir(exist_ok=True)
    spawned: list[float] = []
    torchrun: list[float] = []
    losses: set[float] = set()
    for launch in range(args.launches):
        order = ("spawn", "torchrun") if launch % 2 == 0 else ("torchrun", "spawn")
        for kind in order:
            if kind == "spawn":
                step, loss = under_spawn(args.steps, args.warmup)
                spawned.append(step)
            else:
                step, loss = under_torchrun(args.steps, args.warmup, out)
                torchrun.append(step)
            losses.add(round(loss, 6))
    s, t = statistics.median(spawned), statistics.median(torchrun)
    print(
        f"# {MESH} MLP step (hidden {HIDDEN}, batch {BATCH}), {args.steps} steps after "
        f"{args.warmup} warm-up, median of {args.launches} launches, slowest rank; torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs"
    )
    print("| launcher | step | spawn/torchrun |")
    print("|---|---:|---:|")
    print(f"| topo.spawn | {s * 1e3:.2f} ms | {s / t:.2f} |")
    print(f"| torchrun | {t * 1e3:.2f} ms | 1.00 |")
    print(f"final loss, every launch: {sorted(losses)} (the same run under both launchers)")


if __name__ == "__main__":
    main()
