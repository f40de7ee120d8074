"""Transport: tensor dicts, objects point to point, and a shared-memory message queue.

The public names are those of the modules below (``topo.broadcast_tensor_dict``,
``topo.send_object``, ``topo.MessageQueue`` …).
"""

from topo.transport.message_queue import *  # noqa: F403
from topo.transport.objects import *  # noqa: F403
from topo.transport.tensor_dict import *  # noqa: F403

# A literal list: type checkers read it (``__all__ += module.__all__`` they do not), so that
# ``topo.broadcast_tensor_dict`` and the others keep their types at the top level.
__all__ = [  # noqa: F405 (defined by the star imports above)
    "MessageQueue",
    "broadcast_tensor_dict",
    "recv_object",
    "recv_tensor_dict",
    "send_object",
    "send_tensor_dict",
]
