"""The fault matrix: each failure ends on every surviving rank within the timeout plus a small
margin, with a TopoError that names the missing, stopped or dead rank (or the address).

Ranks run as separate processes with torchrun-style variables (tests/_fault_rank.py), so a
rank can be left out, stopped with SIGSTOP or killed while the others keep running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import _spawn_fns
import pytest
import torch

import topo
from topo.coordinator import Coordinator
from topo.world import World

pytestmark = pytest.mark.multiprocess

HERE = Path(__file__).resolve().parent
TIMEOUT = 4.0
#: Start-up of a Python process that imports torch on a loaded 2-core machine, plus the store
#: host's linger and the store-call margin: what "within the timeout" may add.
SLACK = 15.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(ranks: list[int], scenario: str, tmp: Path, port: int) -> dict[int, subprocess.Popen[bytes]]:
    procs = {}
    for rank in ranks:
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "4",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "FAULT_TIMEOUT": str(TIMEOUT),
            "PYTHONPATH": str(HERE.parent),
            "OMP_NUM_THREADS": "1",
        }
        procs[rank] = subprocess.Popen(
            [sys.executable, str(HERE / "_fault_rank.py"), scenario, str(tmp / f"r{rank}.json")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return procs


def _reap(procs: dict[int, subprocess.Popen[bytes]], within: float) -> None:
    end = time.monotonic() + within
    try:
        for proc in procs.values():
            proc.wait(timeout=max(0.1, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                with_cont = proc.pid
                os.kill(with_cont, signal.SIGCONT)
                proc.kill()
                proc.wait(5)


def _reports(tmp: Path, ranks: list[int]) -> dict[int, dict[str, Any]]:
    out = {}
    for rank in ranks:
        path = tmp / f"r{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report: it hung or crashed"
        out[rank] = json.loads(path.read_text())
    return out


def test_rank_that_never_activates_is_named_by_every_survivor(tmp_path: Path) -> None:
    survivors = [0, 1, 2]
    procs = _start(survivors, "activate", tmp_path, _free_port())
    _reap(procs, within=TIMEOUT + SLACK + 20)
    for rank, report in _reports(tmp_path, survivors).items():
        assert not report["ok"], report
        assert "TopoError" in report["mro"] and report["type"] == "RendezvousTimeout", report
        assert "rank(s) [3]" in report["message"], (rank, report["message"])
        assert report["elapsed"] < TIMEOUT + SLACK, report


def test_store_host_stopped_during_barrier_is_named(tmp_path: Path) -> None:
    ranks = [0, 1, 2, 3]
    procs = _start(ranks, "barrier-loop", tmp_path, _free_port())
    try:
        end = time.monotonic() + 90
        while not all((tmp_path / f"r{r}.json.ready").exists() for r in ranks):
            assert time.monotonic() < end, "the ranks did not activate"
            assert all(p.poll() is None for p in procs.values()), "a rank exited early"
            time.sleep(0.1)
        time.sleep(0.5)
        stopped_at = time.monotonic()
        os.kill(procs[0].pid, signal.SIGSTOP)
        _reap({r: procs[r] for r in (1, 2, 3)}, within=TIMEOUT + SLACK + 10)
        took = time.monotonic() - stopped_at
    finally:
        _reap(procs, within=0.1)
    assert took < TIMEOUT + SLACK + 10
    for rank, report in _reports(tmp_path, [1, 2, 3]).items():
        assert not report["ok"], report
        assert "TopoError" in report["mro"], report
        assert "rank 0" in report["message"], (rank, report["message"])
        assert "stopped answering" in report["message"] or "did not arrive" in report["message"]


def test_silent_listener_on_master_port_names_the_address() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepts in the kernel, never answers
        port = silent.getsockname()[1]
        world = World(rank=1, world_size=2, master_port=port)
        start = time.monotonic()
        with (
            pytest.raises(topo.RendezvousTimeout) as info,
            topo.DeviceMesh(tp=2).activate(world, timeout=2),
        ):
            pass
        took = time.monotonic() - start
    assert f"127.0.0.1:{port}" in str(info.value)
    assert took < 2 + 10


def test_spawn_blames_the_stopped_rank() -> None:
    with pytest.raises(topo.RankFailedError) as info:
        topo.spawn(
            _spawn_fns.stop_rank_then_all_reduce,
            topo.DeviceMesh(dp=2, tp=2),
            2,
            timeout=60,
            activation_timeout=3,
        )
    assert info.value.rank == 2, str(info.value)
    assert "stopped" in str(info.value)


def test_activation_after_a_failed_attempt_is_not_out_of_step() -> None:
    store = torch.distributed.HashStore()

    def join(rank: int, out: dict[int, Any], timeout: float) -> None:
        try:
            coord = Coordinator.join(
                World(rank=rank, world_size=2),
                timeout=timedelta(seconds=timeout),
                store=store,
                namespace="ns",
            )
            out[rank] = coord.prefix
            coord.close()
        except topo.TopoError as error:
            out[rank] = error

    first: dict[int, Any] = {}
    join(0, first, 1.0)  # rank 1 never comes: this attempt fails
    assert isinstance(first[0], topo.RendezvousTimeout) and "rank(s) [1]" in str(first[0])
    for _ in range(2):  # then both ranks, twice: each attempt in step
        out: dict[int, Any] = {}
        threads = [threading.Thread(target=join, args=(r, out, 10.0)) for r in (1, 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert isinstance(out[0], str) and out[0] == out[1], out
