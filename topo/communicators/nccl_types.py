"""NCCL's dtype and reduction-op enums, as plain data (no cupy import needed).

The values are NCCL's stable C enum values (``nccl.h``), so the map can be checked without a
GPU and handed to any cupy build.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from topo.errors import TopoTypeError

__all__ = ["NCCL_DTYPES", "NCCL_OPS", "NCCL_REDUCE_DTYPES", "nccl_dtype"]

#: torch dtype → ncclDataType_t.
NCCL_DTYPES: Mapping[torch.dtype, int] = MappingProxyType(
    {
        torch.int8: 0,  # ncclInt8
        torch.uint8: 1,  # ncclUint8
        torch.int32: 2,  # ncclInt32
        torch.int64: 4,  # ncclInt64
        torch.float16: 6,  # ncclFloat16
        torch.float32: 7,  # ncclFloat32
        torch.float64: 8,  # ncclFloat64
        torch.bfloat16: 9,  # ncclBfloat16 (NCCL >= 2.10)
    }
)

#: Dtypes NCCL can reduce (all of the map above).
NCCL_REDUCE_DTYPES = frozenset(NCCL_DTYPES)

#: topo reduce op → ncclRedOp_t (ncclAvg needs NCCL >= 2.10).
NCCL_OPS: Mapping[str, int] = MappingProxyType({"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4})

_UINT8 = NCCL_DTYPES[torch.uint8]


def nccl_dtype(dtype: torch.dtype, reducing: bool) -> int:
    """The ncclDataType_t for ``dtype``; without reduction, any other dtype moves as bytes.

    Example::

        >>> nccl_dtype(torch.float32, reducing=True)
        7
        >>> nccl_dtype(torch.float8_e4m3fn, reducing=False)  # moved as uint8 bytes
        1
    """
    code = NCCL_DTYPES.get(dtype)
    if code is not None:
        return code
    if reducing:
        valid = ", ".join(str(d).removeprefix("torch.") for d in NCCL_DTYPES)
        raise TopoTypeError(
            f"NCCL cannot reduce dtype {dtype}; reductions require one of {valid}; cast the "
            f"tensor (e.g. x.float()) first"
        )
    return _UINT8
