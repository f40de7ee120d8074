"""BufferPool: large outputs reuse memory nobody refers to; referenced memory never is."""

from __future__ import annotations

import pytest
import torch

from topo.communicators.buffers import BufferPool

MIB = 1 << 20


def test_small_outputs_are_plain_allocations() -> None:
    pool = BufferPool()
    small = pool.empty((16,), torch.float32)
    assert small.shape == (16,) and pool.held_bytes == 0


def test_a_dropped_output_is_reused_and_a_held_one_is_not() -> None:
    pool = BufferPool()
    first = pool.empty((MIB,), torch.float32)
    ptr = first.data_ptr()
    second = pool.empty((MIB,), torch.float32)  # first still held: new memory
    assert second.data_ptr() != ptr
    del first
    third = pool.empty((MIB,), torch.float32)
    assert third.data_ptr() == ptr and third.shape == (MIB,) and third.is_contiguous()
    assert pool.held_bytes == 8 * MIB


@pytest.mark.parametrize(
    "keep",
    [
        lambda t: t[10:],  # a view
        lambda t: t.numpy(),  # a NumPy array sharing the memory
        lambda t: t.untyped_storage(),  # the storage object itself
        lambda t: t.view(torch.int32),  # a reinterpreting view
    ],
    ids=["view", "numpy", "storage", "int32-view"],
)
def test_memory_still_referenced_in_any_way_is_never_reused(keep: object) -> None:
    pool = BufferPool()
    out = pool.empty((MIB,), torch.float32)
    out.fill_(7.0)
    alias = keep(out)  # type: ignore[operator]
    ptr = out.data_ptr()
    del out
    again = pool.empty((MIB,), torch.float32)
    again.fill_(0.0)
    assert again.data_ptr() != ptr
    if isinstance(alias, torch.UntypedStorage):
        kept = torch.empty(0).set_(alias)  # type: ignore[call-overload]
    else:
        kept = torch.as_tensor(alias)
    assert float(kept.view(torch.float32).flatten()[0]) == 7.0


def test_shape_and_dtype_may_differ_for_the_same_byte_size() -> None:
    pool = BufferPool()
    a = pool.empty((2, MIB // 2), torch.float32)
    ptr = a.data_ptr()
    del a
    b = pool.empty((MIB // 2, 4), torch.bfloat16)  # 4 MiB as well
    assert b.data_ptr() == ptr and b.shape == (MIB // 2, 4) and b.dtype == torch.bfloat16


def test_cap_and_clear_and_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BufferPool(max_bytes=4 * MIB)
    held = [pool.empty((MIB,), torch.float32), pool.empty((MIB,), torch.float32)]
    assert pool.held_bytes == 4 * MIB  # the second was not pooled: over the cap
    pool.clear()
    assert pool.held_bytes == 0 and held[0].shape == (MIB,)
    monkeypatch.setenv("TOPO_REUSE_BUFFERS", "0")
    off = BufferPool()
    off.empty((MIB,), torch.float32)
    assert not off.enabled and off.held_bytes == 0


@pytest.mark.parametrize("nbytes", [4, 4 * MIB], ids=["small", "large"])
def test_clone_is_a_contiguous_copy_that_never_aliases_its_input(nbytes: int) -> None:
    pool = BufferPool()
    x = torch.arange(nbytes // 4, dtype=torch.float32)
    transposed = x.view(-1, 1).t() if nbytes == 4 else x.view(-1, 2).t()
    pointers = set()
    for source in (x, transposed):
        y = pool.clone(source)
        assert y.is_contiguous() and torch.equal(y, source)
        assert y.data_ptr() != source.data_ptr()
        y.add_(1)
        assert torch.equal(x, torch.arange(nbytes // 4, dtype=torch.float32))
        pointers.add(y.data_ptr())
        del y
    again = pool.clone(transposed)
    if nbytes >= pool.min_bytes:
        assert again.data_ptr() in pointers  # a dropped output's memory again
    else:
        assert pool.held_bytes == 0  # small copies are plain clones, never pooled


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool, torch.complex64]
)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), torch.Size([4, 1, 2])])
def test_fresh_outputs_have_the_shape_and_dtype_asked_for(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    small, large = BufferPool(), BufferPool(min_bytes=0)  # the plain and the pooled allocation
    for pool in (small, large):
        y = pool.empty(shape, dtype)
        assert (y.shape, y.dtype, y.device.type) == (torch.Size(shape), dtype, "cpu")
        assert y.is_contiguous() and not y.requires_grad


def test_outputs_are_on_the_cpu_whatever_the_default_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from topo.communicators import buffers

    monkeypatch.setattr(buffers, "_TEMPLATES", {})  # the first allocation of each dtype: here
    small, large = BufferPool(), BufferPool(min_bytes=0)
    with torch.device("meta"):
        made = [pool.empty((4,), torch.float64) for pool in (small, large)]
    made += [pool.empty((4,), torch.float64) for pool in (small, large)]  # after: still the CPU
    del made[1]  # the large pool's first storage is free again: the next one reuses it
    with torch.device("meta"):
        made.append(large.empty((4,), torch.float64))
    assert large.held_bytes == 2 * 32  # the reused storage and the one still held
    assert [y.device.type for y in made] == ["cpu"] * 4
    x = torch.ones(2, 3, dtype=torch.float64).t()  # not contiguous: the outputs are
    with torch.device("meta"):
        likes = [pool.empty_like(x) for pool in (small, large)]
        likes += [pool.clone(x) for pool in (small, large)]
    assert [(y.device.type, y.shape, y.is_contiguous()) for y in likes] == [
        ("cpu", torch.Size([3, 2]), True)
    ] * 4
