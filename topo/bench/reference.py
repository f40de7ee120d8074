"""``topo bench``'s inputs and the values each rank must get back: the #wrong column.

Every rank's input is a pattern of small integers, so every reference value is exact in every
dtype (sums of up to 8 ranks included) and a result is either right or counted wrong.
"""

from __future__ import annotations

from typing import Any

__all__ = ["input_count", "pattern", "reference", "wrong"]


def input_count(collective: str, size: int, n: int, itemsize: int) -> int | None:
    """Element count of each rank's input for a row of ``size`` bytes (None: too small).

    Example::

        >>> input_count("all_gather", 64, 2, 4)  # 64 B gathered from 2 ranks: 8 floats each
        8
    """
    count = size // itemsize
    if collective == "all_gather":
        count //= n
    elif collective in ("reduce_scatter", "all_to_all"):
        count -= count % n
    return count if count > 0 else None


def pattern(index: int, count: int, dtype: Any, offset: int = 0) -> Any:
    """Rank ``index``'s input: small integers, exact in every dtype for sums of 8 ranks.

    Example::

        pattern(1, 4, torch.float32)  # tensor([2., 3., 4., 5.])
    """
    import torch

    return ((torch.arange(offset, offset + count) % 7) + index + 1).to(dtype)


def _reduce(parts: list[Any], op: str, dtype: Any) -> Any:
    import torch

    stacked = torch.stack(parts)
    if op == "sum":
        return stacked.sum(0).to(dtype)
    if op == "prod":
        return stacked.prod(0).to(dtype)
    return (stacked.amax(0) if op == "max" else stacked.amin(0)).to(dtype)


def reference(collective: str, n: int, me: int, count: int, dtype: Any, op: str) -> Any:
    """What index ``me`` of a group of ``n`` must receive when every index sends its
    :func:`pattern` of ``count`` elements.

    Example::

        reference("all_reduce", 2, 0, 4, torch.float32, "sum")  # tensor([3., 5., 7., 9.])
    """
    import torch

    if collective == "all_reduce":
        return _reduce([pattern(i, count, torch.float64) for i in range(n)], op, dtype)
    if collective == "all_gather":
        return torch.cat([pattern(i, count, dtype) for i in range(n)])
    chunk = count // n
    if collective == "reduce_scatter":
        parts = [pattern(i, chunk, torch.float64, me * chunk) for i in range(n)]
        return _reduce(parts, op, dtype)
    if collective == "all_to_all":
        return torch.cat([pattern(i, chunk, dtype, me * chunk) for i in range(n)])
    return pattern(0, count, dtype)


def wrong(result: Any, expected: Any) -> int:
    """How many elements of ``result`` differ from ``expected`` (all of them if the shapes
    differ).

    Example::

        wrong(torch.tensor([1, 2]), torch.tensor([1, 3]))  # 1
    """
    if result.shape != expected.shape:
        return int(expected.numel())
    return int((result != expected).sum().item())
