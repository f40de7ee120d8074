"""Weight transfer over an axis and over a bridge between two jobs (gloo, real processes)."""

from __future__ import annotations

import multiprocessing
import socket
from typing import Any

import _transport_fns as fns
import pytest
import torch

import topo
from topo import DeviceMesh
from topo.transfer.weights import _plan

SPAWN_TIMEOUT = 120


def _same_weights(got: dict[str, torch.Tensor], want: list[tuple[str, torch.Tensor]]) -> None:
    assert list(got) == [name for name, _ in want]
    for name, t in want:
        g = got[name]
        assert g.dtype == t.dtype and g.shape == t.shape and torch.equal(g, t), name


@pytest.mark.multiprocess
def test_send_and_receive_weights_over_an_axis() -> None:
    reports = topo.spawn(fns.transfer_axis_main, DeviceMesh(tp=3), timeout=SPAWN_TIMEOUT)
    want = fns.weights()
    sender, receivers = reports[0], reports[1:]
    assert sender["unpacked"] == len(want)  # one broadcast per tensor
    assert sender["default"] == 1  # everything in one 1 GiB bucket
    assert 1 < sender["small"] < len(want)
    for got in receivers:
        for key in ("small", "default", "unpacked", "one_buffer", "three", "after"):
            _same_weights(got[key], want)
    # every rank, the sender included, names the first difference; nothing moved
    for report in reports:
        assert "index 2 (rank 2) rejected" in report["bad_shape"]
        assert (
            "tensor 'layer3.w' is" in report["bad_shape"] and "(9, 9) here" in report["bad_shape"]
        )
        assert report["bad_shape"].startswith("CollectiveMismatchError")
        assert "index 1 (rank 1) rejected" in report["missing"]
        assert (
            "sender sends 29 tensors, this rank expects 28 (first unmatched: 'strided')"
            in report["missing"]
        )
        assert "bucket_bytes differs: the sender uses 4096, this rank 123" in report["bucket"]
    assert reports[0]["bad_name"].startswith("TopoTypeError")
    assert "could not start the transfer" in reports[1]["bad_name"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.multiprocess
def test_bridge_trainer_to_a_2x2_inference_mesh() -> None:
    port = _free_port()
    trainer = multiprocessing.get_context("spawn").Process(target=fns.trainer_main, args=(port,))
    trainer.start()
    try:
        reports: list[Any] = topo.spawn(
            fns.inference_main, DeviceMesh(dp=2, tp=2), port, timeout=SPAWN_TIMEOUT
        )
        trainer.join(timeout=60)
        assert trainer.exitcode == 0
    finally:
        if trainer.is_alive():
            trainer.kill()
            trainer.join()
    want = list(fns.model(0).state_dict().items())
    for packed, unpacked, last in reports:
        _same_weights(packed, want)
        _same_weights(unpacked, want)
        assert last["sum"].tolist() == [2.0]


def test_plan_packs_buckets_and_sends_big_tensors_alone() -> None:
    steps = _plan([100, 5000, 30, 4000, 90], packed=True, bucket_bytes=4096)
    assert [s.direct for s in steps] == [None, 1, None, None]
    assert [[i for i, _ in s.items] for s in steps] == [[0], [], [2, 3], [4]]
    order = [
        i
        for s in _plan([10, 9000, 10], True, 4096)
        for i in ([s.direct] if s.direct is not None else [i for i, _ in s.items])
    ]
    assert order == [0, 1, 2]
    assert all(s.nbytes <= 4096 for s in steps if s.direct is None)
    assert [s.direct for s in _plan([1, 2], packed=False, bucket_bytes=4096)] == [0, 1]


def test_worker_rank_is_the_seed_formula() -> None:
    assert topo.transfer.worker_rank(0, 0, 2) == 1
    assert topo.transfer.worker_rank(1, 1, 2) == 4
    assert topo.transfer.worker_rank(1, 0, 4, rank_offset=2) == 6
    with pytest.raises(ValueError, match="rank_within_dp requires"):
        topo.transfer.worker_rank(0, 2, 2)
