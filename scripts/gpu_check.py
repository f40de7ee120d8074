"""Reproduce every GPU claim of topo on a machine with one GPU; append the results to docs/gpu.md.

Run through ``scripts/gpu-check`` (which picks the Python: ``python3``, or ``PYTHON=...``).
Steps, each bounded by a timeout, about 3-4 minutes in all:

1. preflight: torch with CUDA, a GPU, cupy with NCCL (any build: cupy-cuda12x or
   cupy-cuda13x); otherwise exit 2 with a one-line reason;
2. the NCCL tests, ``tests/test_nccl.py``, ``tests/test_nccl_fake.py`` and
   ``tests/test_gpu_paths.py`` (the GPU tests run 4 ranks on the one GPU through
   ``topo.spawn(..., share_gpu=True)``). test_gpu_paths runs every CUDA path — each collective
   and v-collective, tensor dicts, objects, weight transfer (packed, not, over a bridge),
   ``torch_group``/``torch_mesh`` (DTensor, one FSDP2 step), gradients of every
   differentiable collective and the regions, ``torch.compile`` forward and backward, CUDA
   graphs, the watchdog — and compares each with the gloo result of the same function;
3. ``benchmarks/nccl_overhead.py --sweep``: host cost per call against raw cupy and
   ProcessGroupNCCL (one rank, then the free functions on 2 ranks), CUDA-graph replay, and
   the 4 B - 64 MiB latency side-by-side with ProcessGroupNCCL on 2 ranks;
4. a dated section with the machine, the versions and the tables, appended to docs/gpu.md
   (``--no-write`` only prints it).

Nothing here uses the network. Exit status: 0 if every step passed, 1 if a test or the
benchmark failed (the section is still written, saying so, and the last line names every
failed path and test), 2 if the machine cannot run it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "gpu.md"
TESTS = ("tests/test_nccl.py", "tests/test_nccl_fake.py", "tests/test_gpu_paths.py")
#: The GPU path tests, one per path: their ids name the paths in the report.
PATH_TEST = "test_path_on_a_shared_gpu_matches_gloo"


class Unfit(Exception):
    """The machine cannot run the check (no torch, no GPU, no cupy): exit 2, one line."""


def _load_benchmark() -> Any:
    """benchmarks/nccl_overhead.py as a module (for its table formatting)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "nccl_overhead", ROOT / "benchmarks" / "nccl_overhead.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preflight() -> dict[str, str]:
    """The machine and versions, or :class:`Unfit` with the reason."""
    sys.path.insert(0, str(ROOT))
    try:
        import torch
    except ImportError as error:
        raise Unfit(
            f"torch is not importable by {sys.executable} ({error}); set PYTHON=..."
        ) from None
    if not torch.cuda.is_available():
        raise Unfit(
            f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'none'}); run this on a machine with a GPU and a CUDA torch"
        )
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise Unfit(
            f"pytest is not importable by {sys.executable}; pip install -e '.[test]'"
        ) from None
    from topo.communicators.nccl import load_nccl
    from topo.errors import BackendUnavailableError

    try:
        nccl = load_nccl()
    except BackendUnavailableError as error:
        raise Unfit(str(error)) from None
    import cupy

    code = int(nccl.get_version())
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": str(torch.cuda.device_count()),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "nccl": f"{code // 10000}.{code // 100 % 100}.{code % 100}",
        "cupy": f"{cupy.__version__} ({_cupy_distribution()})",
        "python": platform.python_version(),
        "commit": _commit(),
    }


def _cupy_distribution() -> str:
    """The installed cupy wheel's name (cupy-cuda12x, cupy-cuda13x, cupy, ...)."""
    try:
        from importlib.metadata import packages_distributions

        names = packages_distributions().get("cupy", [])
        return ", ".join(sorted(set(names))) or "unknown wheel"
    except Exception:
        return "unknown wheel"


def _commit() -> str:
    """The checkout's commit (``GPU_CHECK_COMMIT`` where the copy has no git history)."""
    given = os.environ.get("GPU_CHECK_COMMIT")
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """Run ``cmd`` in the repository, echo its output; (status, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    ))  # fmt: skip
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        out = error.stdout if isinstance(error.stdout, str) else ""
        print(out)
        return 124, out + f"\n(timed out after {timeout:g} s)", time.monotonic() - start
    output = done.stdout + done.stderr
    print(output, flush=True)
    return done.returncode, output, time.monotonic() - start


def run_tests(timeout: float) -> dict[str, Any]:
    """The tests, with every test's outcome (from pytest's JUnit XML)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "tests.xml"
        status, output, seconds = _run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
             f"--junitxml={xml}", *TESTS],
            timeout,
        )  # fmt: skip
        cases = outcomes(xml.read_text()) if xml.exists() else {}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return {"status": status, "summary": summary[-1].strip("= ") if summary else "no summary",
            "seconds": seconds, "cases": cases}  # fmt: skip


def outcomes(junit_xml: str) -> dict[str, str]:
    """``{test id: "passed" | "failed" | "error" | "skipped"}`` from pytest's JUnit XML.

    Example::

        outcomes(Path("tests.xml").read_text())["test_gpu_paths.py::test_x[collectives]"]
    """
    found: dict[str, str] = {}
    for case in ET.fromstring(junit_xml).iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}.py::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        found[name] = outcome
    return found


def path_results(cases: dict[str, str]) -> dict[str, str]:
    """Each CUDA path's outcome, from the ids of test_gpu_paths's parametrized test."""
    paths: dict[str, str] = {}
    for name, outcome in cases.items():
        head, _, param = name.partition(f"::{PATH_TEST}[")
        if param and head.endswith("test_gpu_paths.py"):
            paths[param.rstrip("]")] = outcome
    return paths


def failures(tests: dict[str, Any], bench_status: int) -> list[str]:
    """What failed, one phrase each (paths first), for the last line of the output."""
    cases: dict[str, str] = tests.get("cases", {})
    failed = [f"path '{p}'" for p, o in path_results(cases).items() if o in ("failed", "error")]
    failed += [n for n, o in cases.items() if o in ("failed", "error") and PATH_TEST not in n]
    if tests["status"] != 0 and not failed:
        failed.append(f"the tests (status {tests['status']}: {tests['summary']})")
    if bench_status != 0:
        failed.append(f"the benchmark (status {bench_status})")
    return failed


def run_benchmark(timeout: float) -> tuple[int, dict[str, Any], float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nccl_overhead.json"
        status, _, seconds = _run(
            [sys.executable, "benchmarks/nccl_overhead.py", "--sweep", "--json", str(path),
             "--blocks", "6", "--calls", "50", "--timeout", str(max((timeout - 30) / 2, 60))],
            timeout,
        )  # fmt: skip
        results = json.loads(path.read_text()) if path.exists() else {}
    return status, results, seconds


def section(machine: dict[str, str], tests: dict[str, Any], bench_status: int,
            results: dict[str, Any], bench_seconds: float) -> str:  # fmt: skip
    """The dated markdown section appended to docs/gpu.md."""
    bench = _load_benchmark()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now}: {machine['gpu']}",
        "",
        f"- machine: {machine['gpu']} ({machine['gpus']} visible), {os.cpu_count()} CPUs",
        f"- torch {machine['torch']} (CUDA {machine['cuda']}), NCCL {machine['nccl']}, "
        f"cupy {machine['cupy']}, Python {machine['python']}, topo commit {machine['commit']}",
        f"- tests ({' '.join(TESTS)}): {tests['summary']} "
        f"({'ok' if tests['status'] == 0 else 'FAILED, status ' + str(tests['status'])}, "
        f"{tests['seconds']:.0f} s)",
        f"- benchmark (benchmarks/nccl_overhead.py --sweep): "
        f"{'ok' if bench_status == 0 else 'FAILED, status ' + str(bench_status)}, "
        f"{bench_seconds:.0f} s",
        "",
    ]
    paths = path_results(tests.get("cases", {}))
    if paths:
        marks = {"passed": "ok", "skipped": "skipped"}
        lines += [
            "Every CUDA path against gloo (tests/test_gpu_paths.py, 4 ranks sharing the GPU):",
            "",
            "| path | result |",
            "|---|---|",
            *[f"| {p} | {marks.get(o, o.upper())} |" for p, o in paths.items()],
            "",
        ]
    if results.get("two_rank"):
        lines += [
            f"Host µs per call, 2 ranks sharing the GPU, {results.get('two_rank_elements', 16)} "
            f"float32 elements (median of blocks of enqueues, slowest rank):",
            "",
            bench.overhead_table(results["two_rank"]),
            "",
        ]
    if results.get("one_rank"):
        lines += ["One-rank group and CUDA-graph replay (host time per call):", "",
                  bench.one_rank_table(results["one_rank"]), ""]  # fmt: skip
    if results.get("sweep"):
        lines += [
            "Latency per completed call, 2 ranks sharing the GPU (NCCL over sockets: "
            "NCCL_P2P_DISABLE=1, NCCL_SHM_DISABLE=1), median of 5 repeats, slowest rank:",
            "",
            bench.sweep_table(results["sweep"]),
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--test-timeout", type=float, default=200.0, help="seconds for the tests")
    parser.add_argument(
        "--bench-timeout", type=float, default=170.0, help="seconds for the benchmark"
    )
    args = parser.parse_args(argv)
    try:
        machine = preflight()
    except Unfit as error:
        print(f"gpu-check: cannot run here: {error}", file=sys.stderr)
        return 2
    print(f"gpu-check: {machine['gpu']}, torch {machine['torch']}, NCCL {machine['nccl']}, "
          f"cupy {machine['cupy']}", flush=True)  # fmt: skip
    tests = run_tests(args.test_timeout)
    bench_status, results, bench_seconds = run_benchmark(args.bench_timeout)
    text = section(machine, tests, bench_status, results, bench_seconds)
    if args.no_write:
        print(text)
    else:
        with DOC.open("a", encoding="utf-8") as doc:
            doc.write("\n" + text)
        print(f"gpu-check: appended a section to {DOC.relative_to(ROOT)}:\n\n{text}")
    failed = failures(tests, bench_status)
    if failed:
        print(f"gpu-check: FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    paths = path_results(tests["cases"])
    print(f"gpu-check: ok: {tests['summary']}; {len(paths)} CUDA paths match gloo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
