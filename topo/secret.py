"""The job's shared secret: where it comes from, and the HMAC seal on every store value.

With a secret (``TOPO_SECRET``, ``activate(secret=...)``, or the one ``topo.spawn`` makes for
its own store) every value a rank writes to the rendezvous store carries an HMAC-SHA256 tag
bound to its key, and every value read is checked: a value written by anyone without the
secret ends in :class:`~topo.errors.AuthenticationError`. Without one, a multi-host job is
warned (:class:`~topo.errors.InsecureStoreWarning`).

Example::

    sealer = Sealer(load_secret("job-secret-123"))
    sealer.open("topo/0/uid", sealer.seal("topo/0/uid", b"..."))   # b"..."
"""

from __future__ import annotations

import hashlib
import os
import warnings

from topo.errors import AuthenticationError, InsecureStoreWarning, TopoTypeError, TopoValueError
from topo.world import World

__all__ = ["SPAWN_SECRET_VARIABLE", "Sealer", "load_secret", "warn_without_secret"]

_TAG_BYTES = 32  # HMAC-SHA256


def warn_without_secret(world: World) -> None:
    """Warn (once per call site) that a multi-host job without ``TOPO_SECRET`` can be disrupted
    or redirected by anyone who reaches its store.

    Example::

        warn_without_secret(World.from_env())
    """
    warnings.warn(
        f"activating a multi-host job (world of {world.world_size}, {world.local_world_size} per "
        f"node) without a shared secret: anyone who reaches {world.master_addr}:"
        f"{world.master_port} can disrupt the job or redirect its connections; export the same "
        f"TOPO_SECRET (e.g. python -c 'import secrets; print(secrets.token_hex(16))') on every "
        f"rank — see docs/security.md",
        InsecureStoreWarning,
        stacklevel=4,
    )


#: Where ``topo.spawn`` puts the secret it made for its ranks' store: ``"PORT:SECRET"``.
SPAWN_SECRET_VARIABLE = "TOPO_SPAWN_SECRET"


def load_secret(secret: object, world: World | None = None) -> bytes | None:
    """The job's shared secret: ``secret`` (bytes or str), else ``TOPO_SECRET``, else — for
    an activation on the store of the ``topo.spawn`` this process is a rank of — the secret
    spawn made for it, else None.

    Example::

        load_secret("s3cret")   # b's3cret'
    """
    if secret is None:
        env = os.environ.get("TOPO_SECRET")
        if env:
            return env.encode()
        spawned = os.environ.get(SPAWN_SECRET_VARIABLE, "")
        port, _, token = spawned.partition(":")
        if world is not None and token and port == str(world.master_port):
            return token.encode()
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TopoTypeError(
            f"activate secret requires bytes or a str, but got {type(secret).__name__}; pass "
            f"e.g. secret=os.environ['JOB_SECRET']"
        )
    if len(secret) < 8:
        raise TopoValueError(
            f"activate secret requires at least 8 bytes, but got {len(secret)}; use a random "
            f"token such as secrets.token_hex(16)"
        )
    return secret


class Sealer:
    """Tags control messages with HMAC-SHA256 of (key, value) under the job's secret, and
    checks the tags of what it reads; without a secret it passes values through.

    Example::

        sealer = Sealer(b"job-secret")
        blob = sealer.seal("topo/0/uid", b"...")
        sealer.open("topo/0/uid", blob)   # b"..."
    """

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret

    def _tag(self, key: str, value: bytes) -> bytes:
        # hmac is imported here, by the jobs that seal: the others' start saves 0.25 ms
        import hmac

        assert self.secret is not None
        return hmac.new(self.secret, key.encode() + b"\0" + value, hashlib.sha256).digest()

    def seal(self, key: str, value: bytes) -> bytes:
        if self.secret is None:
            return value
        return self._tag(key, value) + value

    def open(self, key: str, blob: bytes) -> bytes:
        if self.secret is None:
            return blob
        import hmac  # see _tag

        tag, value = blob[:_TAG_BYTES], blob[_TAG_BYTES:]
        if len(tag) != _TAG_BYTES or not hmac.compare_digest(tag, self._tag(key, value)):
            raise AuthenticationError(
                f"the control message at store key {key!r} requires a valid HMAC tag under the "
                f"job's secret, but its tag does not match: it was written by a process without "
                f"the secret (an intruder, or a rank started without TOPO_SECRET); refused it. "
                f"Give every rank the same TOPO_SECRET"
            )
        return value
