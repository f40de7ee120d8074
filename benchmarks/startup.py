"""Cold start: a fresh process's import, activation and first collective on every axis, topo vs
torch's ``init_process_group`` + ``init_device_mesh`` + a first all_reduce per mesh dim (gloo,
CPU), and the store round trips topo's ranks make.

Each launch starts ``world`` fresh Python processes (plain ``subprocess``, the rank in the
environment as torchrun would set it), each of which imports torch, then times:

- ``import``: ``import topo`` (torch already imported), and whether it loaded
  ``torch._dynamo`` or registered topo's custom ops (it must not);
- ``start``: topo: ``mesh.activate()`` + one ``topo.all_reduce`` per axis; torch:
  ``init_process_group("gloo")`` + ``init_device_mesh("cpu", shape)`` + one
  ``dist.all_reduce`` per mesh dim (the same job, the way torch users write it), timed from
  the moment the last rank begins (wall clock: the processes' start-up skew is left out)
  until every rank is done;
- ``store ops``: the store operations topo's rank made (``ctx.store_ops``), which must grow
  with the number of axes, not with the world size;
- ``CPU per rank``: the CPU time a rank's process (all its threads) spent from its begin to
  its end, the mean over ranks: what one rank's start costs a machine whose cores its peers
  share. On a small machine it is much steadier than the wall clock, which swings with the
  order in which the ranks get a core. topo's includes importing its runtime
  (``topo.context``, the collectives it calls, the gloo communicator: about 5.7 ms here),
  which it loads on first use so that ``import topo`` stays free of torch; torch's
  distributed package is imported by ``import torch``, before the clock starts.

Launches alternate which of the two goes first (a warm page cache helps the second); the
figures are medians over launches, and each side's best launch. torch's start is bimodal on
a small machine: about 0.02 s when every rank's gloo connects at once, about 0.5 s when one
waits out gloo's connect retry, so its median over a few launches can land on either side;
``--launches 9`` or more shows which. Run:
``python benchmarks/startup.py`` (about a minute on 2 cores; ``--launches`` to change, and
``--large-launches`` for the 32-rank mesh, which takes about 35 s a launch there).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

RANK_CODE = r"""
import json, os, sys, time
kind, shape = sys.argv[1], [int(s) for s in sys.argv[2].split("x")]
t0 = time.perf_counter()
import torch
torch_s = time.perf_counter() - t0
if kind == "topo":
    t0 = time.perf_counter()
    import topo
    import_s = time.perf_counter() - t0
    names = ["a", "b", "c"][: len(shape)]
    mesh = topo.DeviceMesh(**dict(zip(names, shape)))
    begin, cpu = time.time(), time.process_time()
    with mesh.activate(timeout=60) as ctx:
        activated = time.time()
        for name in names:
            topo.all_reduce(torch.ones(4), axis=name)
        end, cpu = time.time(), time.process_time() - cpu
        ops = ctx.store_ops
        loaded = {m: m in sys.modules for m in ("torch._dynamo", "topo.ops.all_reduce")}
    print(json.dumps({"import": import_s, "begin": begin, "activated": activated, "end": end,
                      "ops": ops, "loaded": loaded, "torch": torch_s, "cpu": cpu}))
else:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    begin, cpu = time.time(), time.process_time()
    dist.init_process_group("gloo")
    names = tuple(["a", "b", "c"][: len(shape)])
    dm = init_device_mesh("cpu", tuple(shape), mesh_dim_names=names)
    activated = time.time()
    for name in names:
        dist.all_reduce(torch.ones(4), group=dm.get_group(name))
    end, cpu = time.time(), time.process_time() - cpu
    dist.destroy_process_group()
    print(json.dumps({"begin": begin, "activated": activated, "end": end, "torch": torch_s,
                      "cpu": cpu}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(kind: str, shape: list[int], timeout: float = 120.0) -> list[dict[str, Any]]:
    """One job of ``kind`` ("topo" or "torch") on a mesh of ``shape``: every rank's figures."""
    world = 1
    for s in shape:
        world *= s
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
        )  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-c", RANK_CODE, kind, "x".join(map(str, shape))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ))  # fmt: skip
    results = []
    deadline = time.monotonic() + timeout
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} rank {rank} failed ({proc.returncode}): {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def compare(shape: list[int], launches: int) -> dict[str, Any]:
    """Medians over ``launches`` of the slowest rank, alternating which kind goes first."""
    figures: dict[str, dict[str, list[float]]] = {"topo": {}, "torch": {}}
    ops: list[int] = []
    loaded: dict[str, bool] = {}
    for i in range(launches):
        for kind in ("topo", "torch") if i % 2 == 0 else ("torch", "topo"):
            ranks = launch(kind, shape)
            # From the moment the last rank begins (process start-up skew left out) until
            # every rank is done: the job's own cost.
            last = max(r["begin"] for r in ranks)
            job = {
                "activate": max(r["activated"] for r in ranks) - last,
                "start": max(r["end"] for r in ranks) - last,
                "cpu": statistics.mean(r["cpu"] for r in ranks),
            }
            if "import" in ranks[0]:
                job["import"] = max(r["import"] for r in ranks)
            for key, value in job.items():
                figures[kind].setdefault(key, []).append(value)
            if kind == "topo":
                ops.append(max(r["ops"] for r in ranks))
                loaded = {m: any(r["loaded"][m] for r in ranks) for m in ranks[0]["loaded"]}
    medians = {k: {f: statistics.median(v) for f, v in by.items()} for k, by in figures.items()}
    bests = {k: {f: min(v) for f, v in by.items()} for k, by in figures.items()}
    return {"shape": shape, "medians": medians, "bests": bests, "store_ops": max(ops),
            "loaded": loaded, "launches": launches}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--launches", type=int, default=5, help="launches per kind (>= 5)")
    parser.add_argument(
        "--large-launches", type=int, default=None,
        help="launches per kind of the 32-rank 4x4x2 mesh (default: --launches // 5, at least 1)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    large = args.large_launches or max(1, args.launches // 5)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {os.cpu_count()} CPUs, load average {load:.2f} at start; medians of the slowest "
          f"rank over {args.launches} launches each ({large} of 4x4x2)")  # fmt: skip
    # topo's bytecode first, as `pip install` compiles it: with PYTHONDONTWRITEBYTECODE set (or
    # a checkout edited since its last import) every launch would compile topo's stale modules
    # from source, 2-3 ms each, while torch's installed bytecode is ready.
    compileall.compile_dir(str(ROOT / "topo"), quiet=1)
    print("topo's bytecode compiled first (compileall), as an installed package has it")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import topo"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                   check=True)  # fmt: skip
    print(f"python -c 'import topo' (torch not imported): {time.perf_counter() - t0:.3f} s")
    results = []
    print("| mesh | topo import s | topo activate s | topo start s | torch start s | "
          "topo/torch | best: topo s / torch s | CPU ms per rank: topo / torch | "
          "store ops per rank | dynamo / custom ops loaded |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape, launches in (([2, 2], args.launches), ([2, 2, 2], args.launches),
                            ([4, 4, 2], large)):  # fmt: skip
        r = compare(shape, launches)
        results.append(r)
        t, h = r["medians"]["topo"], r["medians"]["torch"]
        best = f"{r['bests']['topo']['start']:.3f} / {r['bests']['torch']['start']:.3f}"
        print(f"| {'x'.join(map(str, shape))} | {t['import']:.3f} | {t['activate']:.3f} | "
              f"{t['start']:.3f} | {h['start']:.3f} | {t['start'] / h['start']:.2f} | {best} | "
              f"{t['cpu'] * 1e3:.1f} / {h['cpu'] * 1e3:.1f} | "
              f"{r['store_ops']} | {r['loaded']['torch._dynamo']} / "
              f"{r['loaded']['topo.ops.all_reduce']} |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
