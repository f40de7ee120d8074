"""Every CUDA path of topo against gloo: tests/_gpu_paths.py runs each path on 4 ranks sharing
the one GPU (NCCL) and on 4 CPU ranks (gloo); each path's results must agree on every rank.

On a machine without a GPU only the gloo side runs (every path must run without an error):
that keeps the GPU check's functions working where CI can run them.
"""

from __future__ import annotations

import math
from typing import Any

import _gpu_paths
import pytest
import torch
from test_nccl import gpu

import topo

#: Float results computed on the GPU may differ from the CPU's in the last bits (another
#: summation order): compared with these tolerances; everything else exactly. Paths with real
#: kernels (attention, compiled fusions) get looser ones.
RTOL, ATOL = 1e-5, 1e-6
LOOSE = {
    "FSDP2 + TP step": (1e-4, 1e-5),
    "torch.compile forward + backward": (1e-4, 1e-5),
    "all_to_allv + MoE": (1e-4, 1e-5),  # the MoE layer's matmuls
}
_CPU: list[Any] = []
_GPU: list[Any] = []


def _on_cpu() -> list[Any]:
    if not _CPU:
        _CPU.extend(
            topo.spawn(
                _gpu_paths.all_paths, _gpu_paths.MESH, "cpu", timeout=200, activation_timeout=60
            )
        )
    return _CPU


def _on_gpu() -> list[Any]:
    if not _GPU:
        _GPU.extend(
            topo.spawn(
                _gpu_paths.all_paths,
                _gpu_paths.MESH,
                "cuda",
                share_gpu=True,
                timeout=200,
                activation_timeout=60,
            )
        )
    return _GPU


def _diff(a: Any, b: Any, where: str, tol: tuple[float, float] = (RTOL, ATOL)) -> str | None:
    """Where ``a`` (GPU) and ``b`` (CPU) differ (floats within ``tol``: rtol, atol), or None."""
    rtol, atol = tol
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_floating_point() or a.is_complex():
            close = torch.allclose(a.double() if a.is_floating_point() else a,
                                   b.double() if b.is_floating_point() else b,
                                   rtol=rtol, atol=atol, equal_nan=True)  # fmt: skip
            return None if close else f"{where}: {a} vs {b}"
        return None if torch.equal(a, b) else f"{where}: {a} vs {b}"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            found = _diff(a[key], b[key], f"{where}/{key}", tol)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _diff(x, y, f"{where}[{i}]", tol)
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float):
        return None if math.isclose(a, b, rel_tol=rtol, abs_tol=atol) else f"{where}: {a} vs {b}"
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def _error(result: Any) -> str | None:
    return result.get("error") if isinstance(result, dict) else None


#: Values that legitimately differ between the runs: the devices a tensor dict arrived on.
_DEVICE_KEYS = {"tensor dicts": ("devices",)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("path", list(_gpu_paths.PATHS))
def test_every_path_runs_on_gloo(path: str) -> None:
    for rank, report in enumerate(_on_cpu()):
        assert _error(report[path]) is None, f"rank {rank}: {_error(report[path])}"


@gpu
@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.parametrize("path", list(_gpu_paths.PATHS))
def test_path_on_a_shared_gpu_matches_gloo(path: str) -> None:
    gpu_reports, cpu_reports = _on_gpu(), _on_cpu()
    for rank, (g, c) in enumerate(zip(gpu_reports, cpu_reports, strict=True)):
        assert _error(g[path]) is None, f"{path} on CUDA, rank {rank}: {_error(g[path])}"
        assert _error(c[path]) is None, f"{path} on gloo, rank {rank}: {_error(c[path])}"
        got, want = dict(g[path]), dict(c[path])
        for key in _DEVICE_KEYS.get(path, ()):
            assert got.pop(key) == ["cpu", "cuda"] and want.pop(key) == ["cpu"], (rank, path)
        if path == "watchdog":
            assert got["async_errors"] == [], got["async_errors"]
        found = _diff(got, want, f"{path}, rank {rank}", LOOSE.get(path, (RTOL, ATOL)))
        assert found is None, found
