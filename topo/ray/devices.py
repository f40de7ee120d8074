"""Which CUDA device a rank actor uses: the GPU Ray gave it, as this process numbers it.

Ray gives an actor with ``num_gpus > 0`` its GPUs by id (``ray.get_gpu_ids()``, in the
node's numbering) and normally sets ``CUDA_VISIBLE_DEVICES`` to exactly those ids, so the
process sees them as ``cuda:0``, ``cuda:1``, ... The device index is therefore the position
of the first id in ``CUDA_VISIBLE_DEVICES``, or the id itself when Ray leaves the variable
alone (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``). Pure: no Ray, no torch.

Example::

    >>> gpu_device(["3"], "3")          # Ray's usual case: the one visible GPU
    0
    >>> gpu_device(["3"], "1,3")        # two visible, this rank's is the second
    1
    >>> gpu_device([3], None)           # Ray left CUDA_VISIBLE_DEVICES unset
    3
"""

from __future__ import annotations

from collections.abc import Sequence

from topo.errors import TopoTypeError, TopoValueError

__all__ = ["gpu_device"]


def gpu_device(gpu_ids: Sequence[int | str], visible_devices: str | None = None) -> int:
    """The CUDA device index (``cuda:<index>`` in this process) of the first of ``gpu_ids``
    (``ray.get_gpu_ids()``), given ``CUDA_VISIBLE_DEVICES`` (``visible_devices``; None or
    empty: unset, every GPU visible in the node's numbering).

    Example::

        >>> gpu_device(["GPU-7f3c", "GPU-01aa"], "GPU-01aa,GPU-7f3c")   # UUIDs work too
        1
    """
    if isinstance(gpu_ids, (str, bytes)) or not isinstance(gpu_ids, Sequence):
        raise TopoTypeError(
            f"gpu_device requires ray.get_gpu_ids() (a list of ids), but got "
            f"{type(gpu_ids).__name__} {gpu_ids!r}"
        )
    if not gpu_ids:
        raise TopoValueError(
            "gpu_device requires at least one GPU id, but Ray gave this actor none; fix by "
            "passing num_gpus > 0 (and running on a node with GPUs)"
        )
    first = str(gpu_ids[0]).strip()
    if visible_devices is not None and not isinstance(visible_devices, str):
        raise TopoTypeError(
            f"gpu_device requires CUDA_VISIBLE_DEVICES as a str or None, but got "
            f"{type(visible_devices).__name__} {visible_devices!r}"
        )
    names = [name.strip() for name in (visible_devices or "").split(",") if name.strip()]
    if names:
        if first not in names:
            raise TopoValueError(
                f"gpu_device requires Ray's GPU id {first!r} to be visible, but "
                f"CUDA_VISIBLE_DEVICES={visible_devices!r} does not list it; fix by leaving "
                f"CUDA_VISIBLE_DEVICES to Ray (do not set it in runtime_env)"
            )
        return names.index(first)
    if not first.isdigit():
        raise TopoValueError(
            f"gpu_device requires a numeric GPU id when CUDA_VISIBLE_DEVICES is unset, but got "
            f"{first!r}; fix by letting Ray set CUDA_VISIBLE_DEVICES"
        )
    return int(first)
