"""Ray is optional: imported on first use, never at ``import topo.ray``.

Example::

    ray = require_ray()   # the ray module, or BackendUnavailableError naming the extra
"""

from __future__ import annotations

import importlib
from types import ModuleType

from topo.errors import BackendUnavailableError

__all__ = ["require_ray"]


def require_ray() -> ModuleType:
    """The ``ray`` module, imported now; without Ray a
    :class:`~topo.errors.BackendUnavailableError` that names the extra to install.

    Example::

        ray = require_ray()
        ray.is_initialized()
    """
    try:
        return importlib.import_module("ray")
    except ImportError as error:
        raise BackendUnavailableError(
            f"topo.ray requires Ray; pip install 'topo[ray]' (or pip install 'ray>=2.9'), but "
            f"importing ray failed: {error}"
        ) from None
