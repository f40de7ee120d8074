"""examples/moe_ep.py: a top-2 MoE layer with its experts sharded over ep = ("dp", "tp"), by
all_to_allv and by all_gatherv/reduce_scatterv, equals the single-process layer (outputs and
the gradients of tokens, router and experts) under topo.simulate (also in check mode) and
topo.spawn (gloo)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

import topo

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BOUND = 1e-5  # float32; the errors measured are about 4e-7


@pytest.fixture(scope="module")
def moe_ep() -> Iterator[ModuleType]:
    sys.path.insert(0, str(EXAMPLES))  # spawned ranks inherit sys.path, and import it too
    try:
        import moe_ep

        yield moe_ep
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("check", ["0", "1"], ids=["plain", "check mode"])
def test_both_variants_equal_the_single_process_layer_under_simulate(
    moe_ep: ModuleType, check: str
) -> None:
    with mock.patch.dict(os.environ, {"TOPO_CHECK": check}):
        results = topo.simulate(moe_ep.MESH, moe_ep.run_both, timeout=60)
    errors = moe_ep.max_errors(results)
    assert set(errors) == {"a2a", "allgather"}
    assert max(errors.values()) < BOUND, errors


@pytest.mark.multiprocess
def test_both_variants_equal_the_single_process_layer_under_spawn(
    moe_ep: ModuleType, spawn_timeout: int
) -> None:
    results = topo.spawn(moe_ep.run_both, moe_ep.MESH, timeout=spawn_timeout)
    errors = moe_ep.max_errors(results)
    assert max(errors.values()) < BOUND, errors
