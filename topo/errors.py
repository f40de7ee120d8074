"""Every exception topo raises on purpose: one hierarchy under :class:`TopoError`.

Errors about arguments keep the builtin a caller would catch as a second base
(:class:`TopoValueError` is a ``ValueError``, :class:`TopoTypeError` a ``TypeError``, the
timeouts are ``TimeoutError``), so ``except ValueError`` keeps working, and ``except
topo.TopoError`` catches everything topo raised on purpose.

Example::

    try:
        topo.DeviceMesh(dp=0)
    except topo.TopoError as error:      # also a ValueError
        print(error)
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "CollectiveMismatchError",
    "CommunicationError",
    "CommunicationTimeout",
    "InsecureStoreWarning",
    "NoActiveMeshError",
    "NotDifferentiableError",
    "PortInUseError",
    "RankFailedError",
    "RendezvousError",
    "RendezvousTimeout",
    "SimulationAborted",
    "StoreLostError",
    "TopoError",
    "TopoTypeError",
    "TopoValueError",
    "WorldError",
]


class TopoError(Exception):
    """Base class of every error topo raises on purpose.

    Example::

        try:
            topo.all_reduce(x, axis="tp")
        except topo.TopoError as error:
            log.error("collective failed: %s", error)
    """


class TopoValueError(TopoError, ValueError):
    """An argument has the right type but a wrong value (a size of 0, an unknown axis).

    Example::

        try:
            topo.DeviceMesh(dp=0)
        except topo.TopoValueError as error:   # also caught by `except ValueError`
            print(error)
    """


class TopoTypeError(TopoError, TypeError):
    """An argument has the wrong type (a float size, a str where a tensor was required).

    Example::

        try:
            topo.DeviceMesh(dp=2.0)
        except topo.TopoTypeError as error:   # also caught by `except TypeError`
            print(error)
    """


class WorldError(TopoValueError):
    """The environment does not describe a usable world (missing or contradicting values).

    Example::

        try:
            topo.World.from_env({})
        except topo.WorldError as error:
            print(error)   # ... found no RANK: launch with torchrun, srun or mpirun ...
    """


class RendezvousError(TopoError, RuntimeError):
    """A rendezvous through the store failed.

    Example::

        try:
            with mesh.activate(timeout=30):
                ...
        except topo.RendezvousError as error:
            print(error)
    """


class RendezvousTimeout(RendezvousError, TimeoutError):
    """Some ranks did not reach a rendezvous (activation, barrier, broadcast) in time, or the
    store could not be reached; the message names the ranks (or the address) at fault.

    Example::

        try:
            topo.barrier()
        except topo.RendezvousTimeout as error:
            print(error)   # ... rank(s) [3] of [0, 1, 2, 3] did not arrive ...
    """


class StoreLostError(RendezvousError):
    """The rendezvous store's connection broke: its host (rank 0 by default) has gone.

    Example::

        try:
            topo.barrier()
        except topo.StoreLostError:
            print("rank 0 is gone")
    """


class PortInUseError(RendezvousError, OSError):
    """The rendezvous store could not listen on MASTER_ADDR:MASTER_PORT: another program holds
    the port.

    Example::

        try:
            with mesh.activate():
                ...
        except topo.PortInUseError as error:
            print(error)   # ... pick a free MASTER_PORT ...
    """


class AuthenticationError(RendezvousError):
    """A control message in the store did not carry the job's shared secret (``TOPO_SECRET``):
    it was refused, never used.

    Example::

        try:
            with mesh.activate(secret=b"job-secret"):
                ...
        except topo.AuthenticationError as error:
            print(error)
    """


class InsecureStoreWarning(UserWarning):
    """A multi-host job activated without a shared secret (``TOPO_SECRET``): anyone who
    reaches its store can disrupt it or redirect its connections.

    Example::

        import warnings
        warnings.simplefilter("error", topo.InsecureStoreWarning)   # refuse to run without one
    """


class CommunicationError(TopoError, RuntimeError):
    """A collective failed inside the communication backend (gloo or NCCL).

    ``culprits`` lists the global ranks the roll call after the failure found at fault (dead,
    stopped, elsewhere, or in another call), when it could tell; ``topo.spawn`` blames them.

    Example::

        try:
            topo.all_reduce(x, axis="tp")
        except topo.CommunicationError as error:
            print(error, error.culprits)
    """

    #: The global ranks found at fault by the roll call (empty when it could not tell).
    culprits: list[int] = []  # noqa: RUF012  (a class default, replaced per instance)


class CommunicationTimeout(CommunicationError, TimeoutError):
    """A collective did not complete within the activation's timeout.

    Example::

        try:
            topo.all_reduce(x, axis="tp")
        except topo.CommunicationTimeout as error:
            print(error)   # ... timed out after 60 s ...
    """


class CollectiveMismatchError(CommunicationError, ValueError):
    """The ranks of a group called a collective with arguments that do not match (shape,
    dtype, operation); raised on every rank of the group instead of a crash or wrong values.

    Example::

        try:
            topo.all_reduce(torch.ones(2 + topo.axis_index("tp")), axis="tp")
        except topo.CollectiveMismatchError as error:
            print(error)   # ... rank 1 has shape (3,) but rank 0 has (2,) ...
    """


class BackendUnavailableError(TopoError, RuntimeError):
    """A communication backend cannot be used here (cupy or libnccl missing, no GPU).

    Example::

        try:
            topo.all_reduce(x.cuda(), axis="tp")
        except topo.BackendUnavailableError as error:
            print(error)   # ... pip install 'topo[nccl]' ...
    """


class NoActiveMeshError(TopoError, RuntimeError):
    """A collective was called with no active mesh context that has the axis.

    Example::

        try:
            topo.all_reduce(x, axis="tp")   # outside `with mesh.activate():`
        except topo.NoActiveMeshError as error:
            print(error)
    """


class NotDifferentiableError(TopoError, RuntimeError):
    """A gradient was asked of a collective that has none topo can compute correctly
    (``max``/``min``/``prod`` reductions, or :func:`topo.gather` off its ``dst``).

    Example::

        y = topo.all_reduce(x, axis="tp", op="max")
        try:
            y.sum().backward()
        except topo.NotDifferentiableError as error:
            print(error)   # ... op='max' has no gradient in topo; ...
    """


class RankFailedError(TopoError, RuntimeError):
    """A rank started by :func:`topo.spawn` (or :func:`topo.simulate`) raised, died or timed
    out; ``rank`` names it and
    ``remote_traceback`` carries its traceback.

    Example::

        try:
            topo.spawn(work, mesh)
        except topo.RankFailedError as error:
            print(error.rank, error.remote_traceback)
    """

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.rank, self.remote_traceback))


class SimulationAborted(TopoError):
    """Another rank of :func:`topo.simulate` failed, so this rank's wait was cut short.

    Deliberately no ``RuntimeError``: it passes through topo's own error translation and
    ends the rank at once; ``topo.simulate`` reports the rank that failed first, not this one.

    Example::

        try:
            topo.all_reduce(x, axis="tp")      # inside topo.simulate, while rank 1 crashed
        except topo.SimulationAborted:
            raise                              # let simulate report rank 1's error
    """
