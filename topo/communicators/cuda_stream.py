"""The raw handle of torch's current CUDA stream, the argument every cupy NCCL call takes.

torch's private ``torch._C._cuda_getCurrentRawStream(device_index)`` gives it as an int
without building a ``torch.cuda.Stream`` or resolving the device (the path torch's own
collectives take); where a torch build lacks it, the public API does the same, slower.

Example::

    stream = raw_stream(0)   # an int: the cudaStream_t of cuda:0's current stream
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["raw_stream"]


def _public_raw_stream(device_index: int) -> int:
    return int(torch.cuda.current_stream(device_index).cuda_stream)


#: The current stream's raw handle for a device index.
raw_stream: Callable[[int], int] = getattr(
    torch._C, "_cuda_getCurrentRawStream", _public_raw_stream
)
