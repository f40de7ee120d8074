"""scripts/gpu-check and benchmarks/nccl_overhead.py without a GPU: the parts that need none
(argument parsing, tables, the markdown section) and the clear failure on a machine that cannot
run the check; and the balanced call order of benchmarks/runtime.py."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("nccl_overhead", ROOT / "benchmarks" / "nccl_overhead.py")


@pytest.fixture(scope="module")
def check() -> ModuleType:
    return _load("gpu_check", ROOT / "scripts" / "gpu_check.py")


def test_benchmark_imports_without_cupy_and_parses_its_arguments(bench: ModuleType) -> None:
    args = bench.parse_args(["--sweep", "--json", "x.json", "--blocks", "3"])
    assert (args.sweep, args.json, args.blocks, args.calls) == (True, "x.json", 3, 200)
    with pytest.raises(SystemExit):
        bench.parse_args(["--calls", "0"])
    assert bench.SWEEP_SIZES[0] == 4 and bench.SWEEP_SIZES[-1] == 64 << 20
    assert [bench.format_size(n) for n in (4, 1024, 3 << 20, 64 << 20)] == [
        "4 B", "1 KiB", "3 MiB", "64 MiB"
    ]  # fmt: skip


def _results() -> dict[str, object]:
    two = {c: {"topo": 7e-6, "raw cupy": 6.5e-6, "ProcessGroupNCCL": 14e-6}
           for c in ("all_reduce", "all_gather", "reduce_scatter")}  # fmt: skip
    one = {
        "topo NCCL communicator all_reduce": 7e-6,
        "raw cupy NcclCommunicator.allReduce": 6.5e-6,
        "torch ProcessGroupNCCL allreduce": 12e-6,
        "topo.all_reduce on the size-1 axis (copy only)": 3e-6,
        "graph replay of 100 topo all_reduces": 1e-4,
        "graph replay of 100 raw allReduces": 1e-4,
    }
    sweep = {"all_reduce": {"4": {"topo": 2e-5, "ProcessGroupNCCL": 1e-5}},
             "all_gather": {"67108864": {"topo": 0.05, "ProcessGroupNCCL": 0.05}}}  # fmt: skip
    return {"header": "# test", "one_rank": one, "two_rank": two, "sweep": sweep}


def test_tables_and_report(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    results = _results()
    table = bench.overhead_table(results["two_rank"])
    assert "| topo.all_reduce | 7.00 | n/a | 6.50 | n/a | 14.00 | 1.08 | n/a | n/a | 0.50 |" in table
    two = {"all_reduce": {"topo": 7e-6, "raw cupy": 5e-6, "raw cupy + alloc": 6e-6}}
    assert "| 7.00 | n/a | 5.00 | 6.00 | n/a | 1.40 | n/a | 1.17 | n/a |" in bench.overhead_table(two)
    sweep = bench.sweep_table(results["sweep"])
    assert "| all_reduce | 4 B | 20.0 | 10.0 | 2.00 |" in sweep
    assert "| all_gather | 64 MiB | 50000.0 | 50000.0 | 1.00 |" in sweep
    bench.print_report(results)
    out = capsys.readouterr().out
    assert "topo / raw cupy            1.077" in out
    assert "| topo.all_gather | 7.00 |" in out and "| 1.08 |" in out


def test_fake_tables(bench: ModuleType) -> None:
    table = bench.fake_table({
        "all_reduce": {"topo": 4e-6, "topo out=": 3e-6, "raw cupy": 1e-6, "raw cupy + alloc": 2e-6},
        "broadcast": {"topo": 3e-6, "raw cupy": 1e-6},
    })  # fmt: skip
    assert "| topo.all_reduce | 4.00 | 3.00 | 1.00 | 2.00 | 3.00 | 2.00 | 2.00 |" in table
    assert "| topo.broadcast | 3.00 | n/a | 1.00 | n/a | 2.00 | n/a | n/a |" in table


@pytest.mark.multiprocess
def test_the_no_gpu_mode_times_every_collective(tmp_path: Path) -> None:
    """``--fake``: topo's Python work per call over a no-op cupy, on 2 CPU ranks."""
    out = tmp_path / "fake.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nccl_overhead.py"), "--fake", "--blocks",
         "1", "--calls", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    import json

    fake = json.loads(out.read_text())["fake"]
    assert list(fake) == [
        "all_reduce", "all_gather", "all_gather dim 1", "reduce_scatter", "broadcast",
        "all_to_all", "send/recv", "all_gatherv",
    ]  # fmt: skip
    assert all(f["topo"] > 0 and f["raw cupy"] > 0 for f in fake.values())
    assert all(f["raw cupy + alloc"] > 0 for f in fake.values() if "raw cupy + alloc" in f)
    assert sum("raw cupy + alloc" in f for f in fake.values()) == 7  # all but dim 1's
    assert "| topo.all_gatherv |" in done.stdout


def test_section_for_docs(check: ModuleType) -> None:
    machine = {"gpu": "Fake GPU", "gpus": "1", "torch": "2.x", "cuda": "13.0", "nccl": "2.28.9",
               "cupy": "14.0 (cupy-cuda13x)", "python": "3.11", "commit": "abc1234"}  # fmt: skip
    tests = {"status": 0, "summary": "19 passed, 2 skipped in 60.0s", "seconds": 60.0}
    text = check.section(machine, tests, 0, _results(), 40.0)
    assert text.startswith("## ") and "UTC: Fake GPU" in text.splitlines()[0]
    assert "NCCL 2.28.9" in text and "cupy 14.0 (cupy-cuda13x)" in text
    assert "19 passed, 2 skipped" in text and "| topo.reduce_scatter |" in text
    failed = check.section(machine, {**tests, "status": 1}, 124, {}, 150.0)
    assert "FAILED, status 1" in failed and "FAILED, status 124" in failed


_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_nccl" name="test_dtype_map_matches_nccl_h" time="0.1"/>
<testcase classname="tests.test_nccl" name="test_gpu_x" time="1"><skipped message="no"/></testcase>
<testcase classname="tests.test_gpu_paths"
 name="test_path_on_a_shared_gpu_matches_gloo[collectives]" time="1"/>
<testcase classname="tests.test_gpu_paths"
 name="test_path_on_a_shared_gpu_matches_gloo[CUDA graphs]" time="1"><failure message="x"/>
</testcase>
<testcase classname="tests.test_nccl_fake" name="test_watchdog[cupy14]" time="1">
<error message="boom"/></testcase>
</testsuite></testsuites>"""


def test_every_failed_path_and_test_is_named(check: ModuleType) -> None:
    cases = check.outcomes(_JUNIT)
    assert cases["test_nccl.py::test_dtype_map_matches_nccl_h"] == "passed"
    assert cases["test_nccl.py::test_gpu_x"] == "skipped"
    assert cases["test_nccl_fake.py::test_watchdog[cupy14]"] == "error"
    assert check.path_results(cases) == {"collectives": "passed", "CUDA graphs": "failed"}
    tests = {"status": 1, "summary": "1 failed", "seconds": 1.0, "cases": cases}
    assert check.failures(tests, 0) == [
        "path 'CUDA graphs'",
        "test_nccl_fake.py::test_watchdog[cupy14]",
    ]
    assert check.failures({**tests, "cases": {}}, 3) == [
        "the tests (status 1: 1 failed)", "the benchmark (status 3)"
    ]  # fmt: skip
    assert check.failures({**tests, "status": 0, "cases": {}}, 0) == []
    machine = {"gpu": "G", "gpus": "1", "torch": "2", "cuda": "13", "nccl": "2", "cupy": "14",
               "python": "3", "commit": "c"}  # fmt: skip
    text = check.section(machine, tests, 0, {}, 1.0)
    assert "| collectives | ok |" in text and "| CUDA graphs | FAILED |" in text


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure")
def test_gpu_check_fails_clearly_without_a_gpu() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--no-write"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: cannot run here: no CUDA GPU")


@pytest.mark.multiprocess
def test_gpu_check_names_a_missing_interpreter() -> None:
    env = dict(os.environ, PYTHON="/nonexistent/python3")
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=30,
        env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no Python interpreter '/nonexistent/python3'" in done.stderr


@pytest.fixture(scope="module")
def runtime_bench() -> ModuleType:
    return _load("runtime", ROOT / "benchmarks" / "runtime.py")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=1, max_value=9), each=st.integers(min_value=1, max_value=20))
def test_the_runtime_benchmark_calls_are_balanced(
    runtime_bench: ModuleType, n: int, each: int
) -> None:
    # benchmarks/runtime.py times its large calls in this order (after an untimed call of the
    # last one): every implementation as often, and after each other one equally often
    names = [f"impl{i}" for i in range(n)]
    sequence = runtime_bench.balanced_sequence(names, each)
    counts = Counter(sequence)
    assert set(counts) == set(names)
    assert len(set(counts.values())) == 1 and each <= counts[names[0]] < each + max(n - 1, 1)
    pairs = Counter(itertools.pairwise([sequence[-1], *sequence]))
    if n == 1:
        assert set(pairs) == {(names[0], names[0])}
    else:
        assert len(pairs) == n * (n - 1)  # every ordered pair of distinct names, none twice in a row
        assert all(a != b for a, b in pairs)
        assert len(set(pairs.values())) == 1
