"""What gloo and NCCL can reduce, as plain data, and topo's reduce ops as torch's.

No communicator is imported here (nor cupy): the backend registry declares what each backend
reduces from these tables without loading gloo or NCCL code, and the gloo communicator and
``topo bench`` read the same tables. Which backend serves which device is the registry's
choice (``topo/communicators/registry.py``), not a table here.

Example::

    >>> import torch
    >>> torch.bfloat16 in GLOO_REDUCE_DTYPES, torch.float8_e4m3fn in NCCL_REDUCE_DTYPES
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

import topo._dist as dist
from topo.communicators.nccl_types import NCCL_REDUCE_DTYPES

__all__ = [
    "GLOO_REDUCE_DTYPES",
    "NCCL_REDUCE_DTYPES",
    "TORCH_REDUCE_OPS",
    "dtype_names",
]

#: Dtypes gloo can reduce; other dtypes move as raw bytes in non-reducing collectives.
GLOO_REDUCE_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
    }
)

#: topo reduce op → torch ReduceOp (gloo has no AVG: "avg" sums, then divides).
TORCH_REDUCE_OPS: Mapping[str, Any] = MappingProxyType(
    {
        "sum": dist.ReduceOp.SUM,
        "avg": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
        "prod": dist.ReduceOp.PRODUCT,
    }
)


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    """The dtypes' short names, sorted and comma-separated, for messages that list choices.

    Example::

        >>> dtype_names({torch.int8, torch.float32})
        'float32, int8'
    """
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
