"""The exceptions topo raises beyond ``TypeError``/``ValueError``."""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "CommunicationError",
    "CommunicationTimeout",
    "NoActiveMeshError",
    "RankFailedError",
    "RendezvousError",
    "RendezvousTimeout",
    "StoreLostError",
    "TopoError",
]


class TopoError(Exception):
    """Base class of topo's own runtime errors."""


class RendezvousError(TopoError, RuntimeError):
    """A rendezvous through the store failed."""


class RendezvousTimeout(RendezvousError, TimeoutError):
    """Some ranks did not reach a rendezvous (activation, barrier, broadcast) in time."""


class StoreLostError(RendezvousError):
    """The rendezvous store's connection broke: its host (rank 0 by default) has gone."""


class CommunicationError(TopoError, RuntimeError):
    """A collective failed inside the communication backend (gloo or NCCL)."""


class CommunicationTimeout(CommunicationError, TimeoutError):
    """A collective did not complete within the activation's timeout."""


class BackendUnavailableError(TopoError, RuntimeError):
    """A communication backend cannot be used here (cupy or libnccl missing, no GPU)."""


class NoActiveMeshError(TopoError, RuntimeError):
    """A collective was called with no active mesh context that has the axis."""


class RankFailedError(TopoError, RuntimeError):
    """A rank started by :func:`topo.spawn` raised, died or timed out."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.rank, self.remote_traceback))
