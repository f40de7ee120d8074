"""Fixtures shared by the test files: spawn timeouts, ports, child-process bookkeeping and a
helper that runs Python in a fresh interpreter.

Every test that starts processes (``topo.spawn`` or a Python subprocess) carries
``@pytest.mark.multiprocess``, so ``pytest -m "not multiprocess"`` runs the fast half.
"""

from __future__ import annotations

import os

# Before anything imports torch (here and in every process a test starts): the tests provoke
# failures on purpose (dead peers, a store that goes away), and torch's C++ layer would print
# a 33-frame stack for each, in the middle of passing tests. topo turns every such failure
# into a Python exception with its own message, so nothing is lost.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

import multiprocessing
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from _procs import live_processes

#: The repository root (what ``PYTHONPATH`` must hold for a subprocess to import topo).
ROOT = Path(__file__).resolve().parent.parent

#: The bound on one ``topo.spawn`` call in the tests: generous, because the CI machine has two
#: cores shared with other jobs; a hang still fails in minutes, not at pytest's 600 s timeout.
SPAWN_TIMEOUT = 120


@pytest.fixture(scope="session")
def spawn_timeout() -> int:
    """Seconds one ``topo.spawn`` call of a test may take (its ``timeout=``)."""
    return SPAWN_TIMEOUT


@pytest.fixture(params=[14, 13], ids=["cupy14", "cupy13"])
def cupy_major(request: pytest.FixtureRequest) -> int:
    """The cupy major version the strict fake cupy (tests/_fake_cupy.py) models: 14 (bytes
    unique ids, what ``topo[nccl]`` installs today) and 13 (tuples)."""
    major: int = request.param
    return major


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port that another socket is listening on for the duration of the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A loopback port that nothing listens on (bound once by the kernel, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _children() -> set[int]:
    """Live child processes of this process, from /proc (no psutil); multiprocessing's
    resource tracker (started by the first spawn, it lives as long as this process) aside."""
    me = os.getpid()
    return {
        pid
        for pid, (parent, command) in live_processes().items()
        if parent == me and "resource_tracker" not in command
    }


@pytest.fixture
def no_leftover_children() -> Iterator[None]:
    """Fails the test if it leaves a child process of this process behind."""
    before = _children()
    yield
    assert multiprocessing.active_children() == []
    assert _children() - before == set()  # spawn has joined every rank before it returns


def run_python(
    code: str, *, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports topo from this checkout."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
    )


@pytest.fixture(scope="session")
def python_subprocess() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`run_python`: ``python_subprocess(code)`` → a ``CompletedProcess`` (text)."""
    return run_python
