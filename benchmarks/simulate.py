"""Figures for topo.simulate, printed (not asserted):

1. a whole call, ``simulate`` vs ``spawn`` (gloo, 4 processes): activating a 2×2 mesh and
   running 20 small all_reduces (alternating axes), wall time per call, and the ratio;
2. inside the ranks: the 20 all_reduces alone (threads backend vs gloo), with and without
   check mode (``TOPO_CHECK=1``), to show what check mode costs;
3. the hypothesis suite (tests/test_simulate_properties.py): wall time of its pytest run.

Run: ``python benchmarks/simulate.py`` (about two minutes on 2 busy cores, where each spawn
of 4 processes takes ~20 s; ``--quick`` for fewer repeats). Medians over repeats; the spawn side is repeated less because each call takes
seconds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import topo

ROOT = Path(__file__).resolve().parent.parent

MESH = topo.DeviceMesh(dp=2, tp=2)
CALLS = 20


def twenty_all_reduces() -> float:
    """On each rank: 20 small all_reduces alternating the two axes; their time in seconds."""
    x = torch.ones(4)
    start = time.perf_counter()
    for i in range(CALLS):
        x = topo.all_reduce(x, axis="tp" if i % 2 else "dp") / 2
    return time.perf_counter() - start


def _whole(runner: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if runner == "simulate":
            topo.simulate(MESH, twenty_all_reduces, timeout=60)
        else:
            topo.spawn(twenty_all_reduces, MESH, timeout=300)
        times.append(time.perf_counter() - start)
    return times


def _inside(runner: str, repeats: int, check: bool) -> list[float]:
    """Rank 0's time for the 20 all_reduces (communicators already created by a warm-up)."""
    env = {"TOPO_CHECK": "1" if check else "0"}
    if runner == "simulate":
        os.environ.update(env)
        try:
            return [topo.simulate(MESH, _warm_then_time, timeout=60)[0] for _ in range(repeats)]
        finally:
            os.environ.pop("TOPO_CHECK")
    return topo.spawn(_warm_then_time_many, MESH, repeats, timeout=300, env=env)[0]  # type: ignore[no-any-return]


def _warm_then_time() -> float:
    twenty_all_reduces()
    return twenty_all_reduces()


def _warm_then_time_many(repeats: int) -> list[float]:
    twenty_all_reduces()
    return [twenty_all_reduces() for _ in range(repeats)]


def _ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):9.2f} ms"


def main() -> None:
    quick = "--quick" in sys.argv
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, mesh {MESH!r}\n")

    sim = _whole("simulate", 5 if quick else 30)
    spawned = _whole("spawn", 1 if quick else 3)
    print(f"1. activation + {CALLS} small all_reduces, whole call (median)")
    print(f"   topo.simulate {_ms(sim)}   ({len(sim)} runs)")
    print(f"   topo.spawn    {_ms(spawned)}   ({len(spawned)} runs)")
    print(f"   simulate is {statistics.median(spawned) / statistics.median(sim):.0f}x faster\n")

    repeats = 5 if quick else 20
    print(f"2. {CALLS} small all_reduces inside the ranks (rank 0, median of {repeats})")
    rows = {}
    for runner in ("simulate", "spawn"):
        for check in (False, True):
            rows[runner, check] = _inside(runner, repeats, check)
            label = f"{runner} ({'threads' if runner == 'simulate' else 'gloo'})"
            print(f"   {label:18} check={'on ' if check else 'off'} {_ms(rows[runner, check])}")
    for runner in ("simulate", "spawn"):
        ratio = statistics.median(rows[runner, True]) / statistics.median(rows[runner, False])
        print(f"   check mode costs {ratio:.1f}x the time of small all_reduces under {runner}")

    print("\n3. the hypothesis suite (tests/test_simulate_properties.py)")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_simulate_properties.py"],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    wall = time.perf_counter() - start
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    print(f"   {wall:.1f} s wall (pytest start-up and torch import included): {summary}")


if __name__ == "__main__":
    main()
