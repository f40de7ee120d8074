"""Tensors handed to gloo stay alive in Python until gloo's worker thread has let go of them.

``ProcessGroupGloo`` runs each collective on a worker thread. When the work is done the worker
drops its reference to the work's tensors *while holding the process group's queue lock*. If
that is the last reference to a tensor that has a Python object, dropping it needs the GIL.
torch's functional collectives (``torch.distributed._functional_collectives``, which DTensor
and FSDP2 use) enqueue on the same process group from C++ *with the GIL held*, and wait for
that lock. The two threads then wait for each other forever: gdb shows the worker in
``TensorImpl::decref_pyobject`` waiting for the GIL and the main thread in
``ProcessGroupGloo::enqueue`` waiting for the lock.

topo shares its gloo process groups with torch (``ctx.torch_group`` registers them), so every
tensor topo hands to gloo is kept here until its C++ use count is back to what it was before
the call: the worker's reference is gone, and dropping ours never needs the worker's lock.
(After a single-rank ``all_reduce`` the worker still refers to the tensor about once in a
thousand calls.) topo's CUDA wrapper group avoids the other half of the deadlock by serving
torch's calls in Python (``topo/interop.py``); docs/interop.md tells the whole story.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["HandedTensors", "use_count"]


def use_count(tensor: torch.Tensor) -> int:
    """How many C++ references ``tensor``'s implementation has (torch ≥ 2.4:
    ``Tensor._use_count``); one Python object counts once, however many names refer to it.

    Example::

        use_count(torch.zeros(2))      # 1
    """
    count: int = tensor._use_count()  # type: ignore[attr-defined]
    return count


class HandedTensors:
    """The tensors of finished gloo calls that gloo's worker thread may still refer to.

    Take :meth:`counts` of the tensors before handing them to gloo and :meth:`keep` them once
    the call has been waited for; each later call sweeps the ones gloo has let go of.

    Each tensor is held once, with its use count before the first call that is still
    outstanding: a tensor handed to gloo again and again (a pipeline stage that sends the same
    buffer while its peer is behind) is one entry, not one per call, so a sweep costs the
    number of distinct tensors gloo still refers to, not the number of calls made.

    Example::

        handed = HandedTensors()
        before = handed.counts([y])
        pg.allreduce([y]).wait()
        handed.keep([y], before)      # held only while gloo's worker still refers to y
    """

    def __init__(self) -> None:
        #: id(tensor) -> (tensor, its use count before gloo first referred to it)
        self._held: dict[int, tuple[torch.Tensor, int]] = {}

    def __len__(self) -> int:
        return len(self._held)

    @staticmethod
    def counts(tensors: Sequence[torch.Tensor]) -> list[int]:
        """The C++ use count of each tensor (call before handing them to gloo).

        Example::

            before = HandedTensors.counts([x, out])
        """
        return list(map(use_count, tensors))  # no comprehension: this runs on every gloo call

    def keep(self, tensors: Sequence[torch.Tensor], before: Sequence[int]) -> None:
        """Hold each of ``tensors`` whose use count is still above its count ``before`` the
        call (gloo's worker has not let go of it yet); release the held ones it has let go of.

        Example::

            handed.keep([y], before)
        """
        if self._held:
            self.sweep()
        for tensor, count in zip(tensors, before, strict=True):
            if use_count(tensor) > count:
                self._hold(tensor, count)

    def keep_one(self, tensor: torch.Tensor, before: int) -> None:
        """:meth:`keep` for one tensor (the all-reduce hot path: no lists, no zip).

        Example::

            handed.keep_one(y, before)
        """
        if self._held:
            self.sweep()
        if tensor._use_count() > before:  # type: ignore[attr-defined]  # use_count, inlined
            self._hold(tensor, before)

    def _hold(self, tensor: torch.Tensor, before: int) -> None:
        # Held already (an earlier call is still outstanding): its count from before that
        # call is the lower one, the count to wait for. The entry keeps the tensor alive, so
        # its id stays its own while it is here.
        held = self._held.get(id(tensor))
        if held is None or held[1] > before:
            self._held[id(tensor)] = (tensor, before)

    def sweep(self) -> None:
        """Release the held tensors gloo's worker has let go of.

        Example::

            handed.sweep()
        """
        self._held = {
            key: entry for key, entry in self._held.items() if use_count(entry[0]) > entry[1]
        }

    def clear(self) -> None:
        """Release everything (once the process group is gone and its workers with it).

        Example::

            handed.clear()
        """
        self._held.clear()
