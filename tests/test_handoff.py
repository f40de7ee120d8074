"""HandedTensors: a tensor handed to gloo stays alive in Python while anything else (gloo's
worker thread) still refers to it, and is let go once nothing does."""

from __future__ import annotations

import time
from datetime import timedelta

import _spawn_fns
import pytest
import torch
import torch.distributed as dist

import topo
from topo.communicators.gloo import GlooCommunicator
from topo.communicators.handoff import HandedTensors


def test_held_while_another_reference_lives_then_released() -> None:
    handed = HandedTensors()
    t, other = torch.zeros(4), torch.ones(4)
    before = handed.counts([t, other])
    worker = t.view(-1)  # stands in for gloo's worker: a C++ reference to t's TensorImpl
    assert t._use_count() > before[0]
    handed.keep([t, other], before)
    assert len(handed) == 1  # only t: nothing else refers to other
    del worker
    handed.sweep()
    assert len(handed) == 0


def test_each_keep_releases_what_was_let_go() -> None:
    handed = HandedTensors()
    first = torch.zeros(2)
    before = handed.counts([first])
    worker = first.view(-1)
    handed.keep([first], before)
    del worker
    second = torch.zeros(2)
    handed.keep([second], handed.counts([second]))
    assert len(handed) == 0
    handed.keep([second], [second._use_count() - 1])  # as if still referenced elsewhere
    handed.clear()
    assert len(handed) == 0


def test_a_real_gloo_call_holds_its_tensors_only_until_the_worker_lets_go() -> None:
    comm = GlooCommunicator(
        dist.HashStore(), ranks=(0,), index=0, timeout=timedelta(seconds=30), local=True,
        label="test group (0,)",
    )
    try:
        for _ in range(50):
            y = comm.all_reduce(torch.arange(4.0), "sum")
            assert y.tolist() == [0.0, 1.0, 2.0, 3.0]
            assert len(comm.handed) <= 2  # at most this call's tensor and the one before
        deadline = time.monotonic() + 10
        while len(comm.handed) and time.monotonic() < deadline:
            time.sleep(0.01)
            comm.handed.sweep()
        assert len(comm.handed) == 0
    finally:
        comm.close()


def test_a_tensor_handed_again_is_held_once_with_its_first_count() -> None:
    handed = HandedTensors()
    t = torch.zeros(2)
    first = handed.counts([t])[0]
    workers = []
    for _ in range(100):  # 100 calls still outstanding on the same tensor: one entry
        before = handed.counts([t])
        workers.append(t.view(-1))  # the worker's reference of this call
        handed.keep([t], before)
    assert len(handed) == 1 and handed._held[id(t)][1] == first
    workers.pop()  # one call done, 99 still refer to t: held
    handed.sweep()
    assert len(handed) == 1
    workers.clear()
    handed.sweep()
    assert len(handed) == 0


@pytest.mark.multiprocess
def test_a_sender_ahead_of_its_receiver_holds_one_entry_not_one_per_send() -> None:
    """A pipeline stage that sends the same buffer again and again while its peer is behind:
    gloo's worker still refers to the buffer after each send returns. The sender used to hold
    one entry per outstanding send and scan them all on every call (the time per send grew
    with the backlog); it holds the buffer once."""
    held = topo.spawn(_spawn_fns.repeated_sends, topo.DeviceMesh(pp=2), 300, timeout=120)
    assert max(max(per_rank) for per_rank in held) <= 2, held
