"""``topo.spawn``: its argument checks, and what happens when a rank raises, dies or never
arrives (every other rank is ended, the error names the rank, no child is left behind), and
concurrent spawns (each its own store port).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _spawn_fns as fns
import pytest

import topo
from topo import DeviceMesh

ROOT = Path(__file__).resolve().parent.parent


def test_spawn_argument_errors() -> None:
    mesh = DeviceMesh(tp=1)
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="spawn timeout requires a positive, finite"):
            topo.spawn(print, mesh, timeout=bad)
    for bad in (True, "5", None):
        with pytest.raises(TypeError, match="spawn timeout requires a number of seconds"):
            topo.spawn(print, mesh, timeout=bad)  # type: ignore[arg-type]
    for bad in (0, -2.5, math.nan):
        with pytest.raises(ValueError, match="spawn activation_timeout"):
            topo.spawn(print, mesh, timeout=5, activation_timeout=bad)
    for bad in (False, "5"):
        with pytest.raises(TypeError, match="spawn activation_timeout"):
            topo.spawn(print, mesh, timeout=5, activation_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DeviceMesh"):
        topo.spawn(print, "tp=2", timeout=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        topo.spawn(42, mesh, timeout=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="picklable"):
        topo.spawn(lambda: None, mesh, timeout=5)


@pytest.mark.multiprocess
@pytest.mark.usefixtures("no_leftover_children")
def test_rank_that_raises(spawn_timeout: int) -> None:
    start = time.monotonic()
    with pytest.raises(topo.RankFailedError) as info:
        topo.spawn(fns.raise_on_rank, DeviceMesh(dp=2, tp=2), 2, timeout=spawn_timeout)
    elapsed = time.monotonic() - start
    error = info.value
    assert error.rank == 2
    assert "rank 2 of DeviceMesh(dp=2, tp=2) raised KeyError" in str(error)
    assert "deliberate failure on rank 2" in str(error)
    assert "raise_on_rank" in error.remote_traceback  # the rank's own traceback
    assert "Traceback" in str(error)
    assert elapsed < 60  # the others (asleep for 100 s) were ended at once


@pytest.mark.multiprocess
@pytest.mark.usefixtures("no_leftover_children")
def test_rank_that_dies(spawn_timeout: int) -> None:
    start = time.monotonic()
    with pytest.raises(topo.RankFailedError) as info:
        topo.spawn(fns.exit_on_rank, DeviceMesh(tp=2), 1, 3, timeout=spawn_timeout)
    elapsed = time.monotonic() - start
    assert info.value.rank == 1
    assert "rank 1" in str(info.value) and "exit code 3" in str(info.value)
    assert elapsed < 60


@pytest.mark.multiprocess
@pytest.mark.usefixtures("no_leftover_children")
def test_rank_that_never_arrives(tmp_path: Path, spawn_timeout: int) -> None:
    start = time.monotonic()
    with pytest.raises(topo.RankFailedError) as info:
        topo.spawn(
            fns.rank3_goes_missing,
            DeviceMesh(dp=2, tp=2),
            str(tmp_path),
            3.0,
            timeout=spawn_timeout,
        )
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert info.value.rank in (0, 1, 2)
    assert "RendezvousTimeout" in message
    # the rank that timed out first, or one that relays its verdict ("failed on rank 1: rank 0
    # timed out after 3 s waiting for rank(s) [3]"), whichever spawn heard first
    assert re.search(r"barrier 'topo.barrier:dp.tp' (timed out|failed on rank \d)", message)
    assert re.search(r"rank\(s\) \[3\]( of \[0, 1, 2, 3\])?,? (which )?did not arrive", message)
    assert "timed out after 3 s" in message
    assert elapsed < 60
    timed_out: list[int] = []
    for rank in (0, 1, 2):
        caught = json.loads((tmp_path / f"rank{rank}.json").read_text())
        activation = caught["activation"]
        assert "activating DeviceMesh(a=4)" in activation
        # the rank that times out first says so; the others relay its verdict
        assert "rank(s) [3]" in activation and "did not arrive" in activation, activation
        assert caught["activation_s"] < 10
        kind, text = caught["communicator"]
        assert kind in ("CommunicationTimeout", "CommunicationError"), text
        assert "[3]" in text and "('dp', 'tp')" in text
        assert caught["communicator_s"] < 15
        kind, text = caught["collective"]
        # The first rank to time out closes its gloo connections, so a peer still waiting
        # may see "connection closed by peer" a moment before its own timeout.
        assert kind in ("CommunicationTimeout", "CommunicationError"), text
        assert re.search(r"all_reduce #\d+ on axis 'every' group \(0, 1, 2, 3\)", text), text
        if kind == "CommunicationTimeout":
            assert "timed out after 3 s" in text
            timed_out.append(rank)
        else:
            assert "closed by peer" in text.lower(), text
        assert caught["collective_s"] < 15
    assert timed_out, "no rank reported the collective's timeout itself"


@pytest.mark.multiprocess
def test_concurrent_spawns_do_not_collide(spawn_timeout: int) -> None:
    results: dict[int, Any] = {}

    def launch(tag: int) -> None:
        mesh = DeviceMesh(tp=2) if tag % 2 else DeviceMesh(tp=1)
        try:
            results[tag] = topo.spawn(
                fns.small_job, mesh, tag, timeout=spawn_timeout, env={"TEST_TAG": f"t{tag}"}
            )
        except BaseException as error:
            results[tag] = error

    threads = [threading.Thread(target=launch, args=(tag,)) for tag in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(spawn_timeout + 10)
    assert sorted(results) == list(range(8))
    for tag, result in results.items():
        assert not isinstance(result, BaseException), f"spawn {tag}: {result}"
        size = 2 if tag % 2 else 1
        expected = float(sum(tag * 10 + r for r in range(size)))
        assert [(t, r, total, env, var) for t, r, total, _, env, var in result] == [
            (tag, r, expected, f"{r}/{size}", f"t{tag}") for r in range(size)
        ]
        assert len({port for _, _, _, port, _, _ in result}) == 1  # one store per spawn
    assert multiprocessing.active_children() == []


@pytest.mark.multiprocess
def test_env_reaches_ranks_before_the_script_imports_torch(tmp_path: Path) -> None:
    """A script that imports torch at the top: ``env`` (and the default OMP_NUM_THREADS, a
    fair share of the cores as torchrun sets it) are in place before the rank imports it."""
    script = tmp_path / "train.py"
    script.write_text(
        "import os, torch, topo\n"
        "def threads():\n"
        "    return torch.get_num_threads(), os.environ.get('MY_FLAG')\n"
        "if __name__ == '__main__':\n"
        "    mesh = topo.DeviceMesh(tp=2)\n"
        "    print(topo.spawn(threads, mesh, env={'OMP_NUM_THREADS': '1', 'MY_FLAG': 'x'}))\n"
        "    print(topo.spawn(threads, mesh))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180,
        env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first == "[(1, 'x'), (1, 'x')]"
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert second == f"[({share}, None), ({share}, None)]"
    assert "MY_FLAG" not in os.environ  # the parent's environment is left as it was
