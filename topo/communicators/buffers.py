"""Reuse of large CPU output buffers the caller has dropped.

topo's collectives are out-of-place, so every call returns new memory. For large CPU tensors
the cost of fresh memory is mostly the kernel's page faults on first touch (on a 2-core VM,
about 1 ms per MiB, as much as the gloo transfer itself), not the copy. A communicator's
:class:`BufferPool` therefore keeps the storages of its large outputs and hands one out again
once no tensor refers to it any more (its storage use count is back to the pool's own
reference), so its pages are already mapped. A storage still referenced — by the result, a
view of it, a NumPy array of it — is never reused.

The pool belongs to one communicator and is emptied when the communicator closes (when its
mesh context ends). Set ``TOPO_REUSE_BUFFERS=0`` to turn it off.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence

import torch

__all__ = ["BufferPool"]

_CONTIGUOUS = torch.contiguous_format
_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


#: An empty CPU tensor per dtype, whose ``new_empty`` allocates the pool's fresh tensors.
_TEMPLATES: dict[torch.dtype, torch.Tensor] = {}


def _fresh(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A new uninitialized CPU tensor, its sizes passed as separate ints to an empty tensor's
    ``new_empty``: the allocation torch parses fastest (``torch.empty(tuple, dtype=...)``
    costs 0.7 µs more per call in a loop: every small gloo output and ``topo.recv`` on CPU
    allocates here).

    Example::

        y = _fresh((4, 2), torch.float32)
    """
    template = _TEMPLATES.get(dtype)
    if template is None:
        # on the CPU whatever the default device (torch.set_default_device, `with torch.device`)
        template = _TEMPLATES[dtype] = torch.empty(0, dtype=dtype, device="cpu")
    return template.new_empty(*shape) if len(shape) else template.new_empty(())


class BufferPool:
    """Hands out CPU tensors, reusing the storage of large ones nobody refers to any more.

    Example::

        pool = BufferPool()
        y = pool.empty((1 << 20,), torch.float32)   # 4 MiB, kept by the pool
        del y
        z = pool.empty((1 << 20,), torch.float32)   # the same memory, pages already mapped
    """

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int = 1 << 30) -> None:
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.enabled = _use_count is not None and os.environ.get("TOPO_REUSE_BUFFERS") != "0"
        self._storages: dict[int, list[torch.UntypedStorage]] = {}
        self._total = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of storage the pool keeps (in use by callers or free).

        Example::

            pool.held_bytes   # 0 before the first large output
        """
        return self._total

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous CPU tensor of ``shape`` and ``dtype``.

        Example::

            out = pool.empty((4, 1024), torch.bfloat16)
        """
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.enabled or nbytes < self.min_bytes:
            return _fresh(shape, dtype)
        assert _use_count is not None
        for storage in self._storages.get(nbytes, ()):
            # Free when no tensor holds the storage (C++ count 1: the pool's) and no Python
            # code holds its storage object (torch shares one object per storage): the
            # references are the pool's list, this loop variable and getrefcount's argument.
            if _use_count(storage._cdata) == 1 and sys.getrefcount(storage) <= 3:
                reused: torch.Tensor = _fresh((0,), dtype).set_(
                    storage,
                    0,
                    tuple(shape),  # type: ignore[call-overload]
                )
                return reused
        tensor = _fresh(shape, dtype)
        if self._total + nbytes <= self.max_bytes:
            self._storages.setdefault(nbytes, []).append(tensor.untyped_storage())
            self._total += nbytes
        return tensor

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`empty` with ``x``'s shape and dtype.

        Example::

            y = pool.empty_like(x)
        """
        if x.nbytes < self.min_bytes or not self.enabled:
            # One C++ call, as clone's: on x's device (the CPU), whatever torch's default is.
            return torch.empty_like(x, memory_format=_CONTIGUOUS)
        return self.empty(x.shape, x.dtype)

    def clone(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``x`` in a fresh tensor (a reused storage when large).

        Example::

            y = pool.clone(x)   # then reduce into y in place
        """
        if x.nbytes < self.min_bytes or not self.enabled:
            # One C++ call: the small-message hot path. Measured on a 4-byte tensor: a gloo
            # allreduce of a clone costs ~3 µs less host time than of empty(shape, dtype) +
            # copy_ (the allocation alone differs by under 1 µs).
            if x.is_contiguous():
                return x.clone()
            return x.clone(memory_format=torch.contiguous_format)
        return self.empty(x.shape, x.dtype).copy_(x)

    def clear(self) -> None:
        """Let go of every storage (tensors callers still hold stay valid).

        Example::

            pool.clear()
        """
        self._storages.clear()
        self._total = 0
