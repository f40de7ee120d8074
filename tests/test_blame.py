"""Blame: when one rank misbehaves, the error names that rank and what it did — not the first
rank to notice, not rank 0, not the store.

Each scenario runs a loop of collectives (tests/_blame_fns.py) where one rank, the victim,
skips a call, leaves the loop early, is killed, or calls another collective. Under
``topo.spawn`` the RankFailedError must name the victim; in an explicit world (one process
per rank with torchrun's variables) the rank that waited for the victim must name it in its own
error and in ``error.culprits``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _blame_fns
import pytest

import topo

pytestmark = pytest.mark.multiprocess

HERE = Path(__file__).resolve().parent
MESH = topo.DeviceMesh(dp=2, tp=2)
TIMEOUT = 6.0


def _spawn_failure(scenario: str, victim: int) -> topo.RankFailedError:
    with pytest.raises(topo.RankFailedError) as info:
        topo.spawn(
            _blame_fns.loop, MESH, scenario, victim, timeout=120, activation_timeout=TIMEOUT
        )
    return info.value


def test_spawn_names_the_rank_that_skipped_a_call(no_leftover_children: None) -> None:
    # rank 3 makes one tp call fewer: rank 2 waits for it in its last tp call while rank 3
    # closes, rank 0 waits for rank 2 in dp; the blame follows 0 -> 2 -> 3
    error = _spawn_failure("skip", 3)
    assert error.rank == 3, str(error)
    text = str(error)
    assert "rank 3 of DeviceMesh(dp=2, tp=2) is the cause, as rank 2 found" in text
    assert "rank 3 never reached call #8, all_reduce(float32[4]), on axis 'tp'" in text
    assert "it is closing its activation" in text


def test_spawn_names_the_rank_that_left_early(no_leftover_children: None) -> None:
    error = _spawn_failure("early", 1)
    assert error.rank == 1, str(error)
    text = str(error)
    assert "rank 1 never reached call #5, all_reduce(float32[4])" in text
    assert "it is closing its activation" in text


def test_spawn_names_the_killed_rank_and_why_it_may_have_died(no_leftover_children: None) -> None:
    error = _spawn_failure("kill", 2)
    assert error.rank == 2, str(error)
    assert "died without a result (exit code -9, killed by SIGKILL)" in str(error)
    assert "out-of-memory killer" in str(error)


def test_spawn_names_the_rank_in_another_collective(no_leftover_children: None) -> None:
    error = _spawn_failure("mismatch", 3)
    assert error.rank == 3, str(error)
    text = str(error)
    assert "rank 3 is in all_gather(float32[4]) #5" in text
    assert "ranks 0-2 are in all_reduce(float32[4]) #5" in text
    assert "TOPO_CHECK=1" in text


def test_spawn_says_a_rank_died_before_its_function_began() -> None:
    from topo import launch

    assert "before its function began" in launch._death_hint(1, started=False)
    assert "TOPO_CHECK=1" in launch._death_hint(-int(signal.SIGABRT), started=True)
    assert "SIGKILL" in launch._death_hint(-int(signal.SIGKILL), started=True)
    assert "sys.exit" in launch._death_hint(3, started=True)


def test_blame_follows_a_chain_of_waiting_ranks() -> None:
    from topo.launch import _follow_blame

    errors = {
        0: ("CommunicationTimeout: dp", "", [2]),
        2: ("CommunicationTimeout: tp", "", [3]),
        1: ("RendezvousTimeout: close", "", []),
    }
    assert _follow_blame(errors, 2) == (2, 3)  # rank 2 named rank 3, which raised nothing
    cyclic = {0: ("x", "", [1]), 1: ("y", "", [0])}
    assert _follow_blame(cyclic, 1) == (1, 0)  # a cycle ends instead of looping


# --------------------------------------------------------------- explicit worlds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _explicit_world(scenario: str, victim: int, tmp: Path) -> dict[int, dict[str, Any]]:
    """Run the scenario as four processes with torchrun's variables; every rank's report
    (the victim's, when it was killed, is absent)."""
    port = _free_port()
    procs = {}
    for rank in range(MESH.size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(MESH.size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(MESH.size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "BLAME_TIMEOUT": str(TIMEOUT),
            "PYTHONPATH": str(HERE.parent),
            "OMP_NUM_THREADS": "1",
        }
        procs[rank] = subprocess.Popen(
            [sys.executable, str(HERE / "_blame_fns.py"), scenario, str(victim), str(tmp / f"{rank}.json")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    end = time.monotonic() + 120
    try:
        for proc in procs.values():
            proc.wait(timeout=max(0.1, end - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    return {
        rank: json.loads((tmp / f"{rank}.json").read_text())
        for rank in procs
        if (tmp / f"{rank}.json").exists()
    }


def test_explicit_world_survivors_name_the_killed_rank(tmp_path: Path) -> None:
    reports = _explicit_world("kill", 2, tmp_path)
    assert sorted(reports) == [0, 1, 3], reports
    for rank, report in reports.items():
        assert report["outcome"] == "error", report
        assert report["culprits"] == [2], (rank, report["message"])
        assert "rank(s) [2] died: their processes on this machine are gone" in report["message"]
        assert "rendezvous store" not in report["message"], report  # rank 0's store is fine


def test_explicit_world_names_the_rank_that_skipped_a_call(tmp_path: Path) -> None:
    reports = _explicit_world("skip", 3, tmp_path)
    assert sorted(reports) == [0, 1, 2, 3], reports
    waiting = reports[2]  # rank 2 waits for rank 3 in its last tp call
    assert waiting["type"] == "CommunicationTimeout", waiting
    assert waiting["culprits"] == [3], waiting["message"]
    assert "rank 3 never reached call #8, all_reduce(float32[4]), on axis 'tp'" in waiting["message"]
    assert reports[0]["culprits"] == [2], reports[0]["message"]  # it waits for rank 2 in dp
    assert "it is in all_reduce(float32[4]) #8 on axis 'tp'" in reports[0]["message"]
