"""What creating an NCCL communicator needs before NCCL runs: cupy loaded (or an install hint
naming the extra for this CUDA), the unique id in the type the installed cupy takes, and one
GPU per rank.

cupy changed the unique id in version 14: ``nccl.get_unique_id()`` returns ``bytes`` and
``NcclCommunicator(ndev, commId, rank)`` takes ``bytes``; cupy 13 used a tuple of 128 C
``char`` values. The id always travels between ranks as its 128 raw bytes
(:func:`encode_unique_id`); :func:`unique_id_argument` turns them into what this cupy takes.
cupy is imported only inside these functions.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Sequence
from types import ModuleType

import torch

from topo.errors import BackendUnavailableError, CommunicationError, TopoValueError

__all__ = [
    "BYTES_ID_CUPY",
    "UNIQUE_ID_BYTES",
    "check_one_gpu_per_rank",
    "cupy_major",
    "decode_unique_id",
    "encode_unique_id",
    "gpu_identity",
    "install_hint",
    "load_nccl",
    "nccl_version",
    "unique_id_argument",
]


def install_hint(cuda_version: str | None = None) -> str:
    """How to install cupy and libnccl for this machine's CUDA (torch's CUDA version).

    Example::

        install_hint("13.0")   # "pip install 'topo[nccl-cu13]' (cupy-cuda13x + ...)"
    """
    version = torch.version.cuda if cuda_version is None else cuda_version
    major = (version or "").split(".")[0]
    if major == "13":
        return "pip install 'topo[nccl-cu13]' (cupy-cuda13x + nvidia-nccl-cu13, for CUDA 13)"
    if major == "12":
        return "pip install 'topo[nccl-cu12]' (cupy-cuda12x + nvidia-nccl-cu12, for CUDA 12)"
    return (
        "pip install 'topo[nccl-cu12]' for CUDA 12 or 'topo[nccl-cu13]' for CUDA 13 (this torch "
        f"reports CUDA {version or 'none'}: install a CUDA build of torch first)"
    )


def load_nccl() -> ModuleType:
    """Import ``cupy.cuda.nccl``, or raise :class:`topo.BackendUnavailableError` saying how to
    install it.

    Example::

        nccl = load_nccl()
        nccl.get_version()   # e.g. 22703
    """
    try:
        import cupy  # noqa: F401
    except ImportError as error:
        raise BackendUnavailableError(
            f"NCCL collectives on CUDA tensors require cupy, which is not installed "
            f"({error}); {install_hint()}"
        ) from None
    try:
        from cupy.cuda import nccl
    except (ImportError, OSError) as error:
        raise BackendUnavailableError(
            f"cupy is installed but its NCCL module could not be loaded ({error}); install "
            f"libnccl for your CUDA version (pip install nvidia-nccl-cu12 or nvidia-nccl-cu13) "
            f"or put libnccl.so.2 on LD_LIBRARY_PATH"
        ) from None
    module: ModuleType = nccl
    if module is None or not getattr(module, "available", True):
        raise BackendUnavailableError(
            f"cupy was built without NCCL support (cupy.cuda.nccl.available is False); "
            f"{install_hint()}"
        )
    return module


def nccl_version() -> int:
    """The loaded NCCL's version code (e.g. 22703 for 2.27.3).

    Example::

        if nccl_version() >= 21000: ...   # ncclAvg available
    """
    return int(load_nccl().get_version())


#: ``ncclUniqueId`` is 128 bytes. cupy >= 14 hands it over (and takes it back) as ``bytes``;
#: cupy 13 as a tuple of 128 C ``char`` values.
UNIQUE_ID_BYTES = 128

#: The first cupy major version whose ``get_unique_id``/``NcclCommunicator`` use ``bytes``.
BYTES_ID_CUPY = 14


def encode_unique_id(unique_id: bytes | Sequence[int]) -> bytes:
    """cupy's unique id (``bytes`` from cupy >= 14, a tuple of C ``char`` values from cupy 13)
    as its 128 raw bytes: what travels through the store (never a pickle).

    Example::

        data = encode_unique_id(nccl.get_unique_id())   # 128 bytes, whatever the cupy
    """
    if isinstance(unique_id, bytes):
        return unique_id
    return bytes(int(v) % 256 for v in unique_id)


def cupy_major(version: str | None = None) -> int:
    """The major version of the installed cupy (or of ``version``), e.g. 14 for "14.2.0".

    Example::

        cupy_major("13.6.0")   # 13
    """
    if version is None:
        import cupy

        version = str(getattr(cupy, "__version__", ""))
    digits = ""
    for char in version.strip():
        if not char.isdigit():
            break
        digits += char
    if not digits:
        raise BackendUnavailableError(
            f"topo's NCCL path requires a cupy whose __version__ starts with its major "
            f"version (e.g. '14.2.0'), but got {version!r}; install a released cupy build "
            f"({install_hint()})"
        )
    return int(digits)


def unique_id_argument(
    data: bytes, label: str = "NCCL", major: int | None = None
) -> bytes | tuple[int, ...]:
    """The 128 raw bytes of a unique id in the type the installed cupy's
    ``NcclCommunicator(ndev, commId, rank)`` takes: ``bytes`` for cupy >= 14, cupy 13's
    tuple of C ``char`` values otherwise (``major`` overrides the detected cupy version).

    Example::

        comm = nccl.NcclCommunicator(2, unique_id_argument(data), rank)
    """
    if major is None:
        major = cupy_major()
    if major >= BYTES_ID_CUPY:
        _check_id_length(data, label)
        return bytes(data)
    return decode_unique_id(data, label)


def decode_unique_id(data: bytes, label: str = "NCCL") -> tuple[int, ...]:
    """The 128 raw bytes of a unique id as cupy 13's tuple of C ``char`` values (signed where
    this platform's ``char`` is, as on x86-64). Use :func:`unique_id_argument`, which picks
    the type the installed cupy takes.

    Example::

        unique_id = decode_unique_id(data)   # for cupy 13
    """
    _check_id_length(data, label)
    if _CHAR_IS_SIGNED:
        return tuple(b - 256 if b > 127 else b for b in data)
    return tuple(data)


def _check_id_length(data: bytes, label: str) -> None:
    if len(data) != UNIQUE_ID_BYTES:
        raise CommunicationError(
            f"creating the NCCL communicator for {label} requires a {UNIQUE_ID_BYTES}-byte "
            f"unique id from the group's first rank, but got {len(data)} bytes; every rank "
            f"must run the same topo version"
        )


_CHAR_IS_SIGNED = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}


def gpu_identity(device: torch.device) -> list[str]:
    """``[host, gpu]`` as NCCL tells ranks apart: the host is ``NCCL_HOSTID`` when set (what
    ``topo.spawn(..., share_gpu=True)`` gives each rank), else the host name; the GPU is its
    UUID (the physical card, whatever ``CUDA_VISIBLE_DEVICES`` calls it).

    Example::

        gpu_identity(torch.device("cuda", 0))   # ['node07', 'GPU-5f1c...']
    """
    host = os.environ.get("NCCL_HOSTID") or socket.gethostname()
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [host, str(uuid) if uuid is not None else f"cuda:{index} of [{visible}]"]


def check_one_gpu_per_rank(
    gpus: Sequence[Sequence[str]], ranks: Sequence[int], device: torch.device, label: str
) -> None:
    """Raise :class:`topo.TopoValueError` if two of ``ranks`` (with ``gpus`` from
    :func:`gpu_identity`, in the same order) would drive one GPU of one host.

    Example::

        check_one_gpu_per_rank([["a", "GPU-1"], ["a", "GPU-2"]], (0, 1), device, "axis 'tp'")
    """
    first: dict[tuple[str, ...], int] = {}
    for rank, gpu in zip(ranks, gpus, strict=True):
        key = tuple(gpu)
        if key in first:
            raise TopoValueError(
                f"NCCL collectives on {label} require one GPU per rank, but ranks "
                f"{first[key]} and {rank} both use GPU {key[1]} on host {key[0]!r} (this rank: "
                f"{device}, {torch.cuda.device_count()} GPU(s) visible); give each rank its own "
                f"GPU (LOCAL_RANK, CUDA_VISIBLE_DEVICES or activate(device=...)), use CPU "
                f"tensors (gloo), or, for tests on one GPU, topo.spawn(..., share_gpu=True) "
                f"(a distinct NCCL_HOSTID per rank)"
            )
        first[key] = rank
