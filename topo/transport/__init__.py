"""Transport: tensor dicts, objects point to point, and a shared-memory message queue.

The public names are those of the modules below (``topo.broadcast_tensor_dict``,
``topo.send_object``, ``topo.MessageQueue`` …).
"""

from topo.transport import message_queue, objects, tensor_dict
from topo.transport.message_queue import *  # noqa: F403
from topo.transport.objects import *  # noqa: F403
from topo.transport.tensor_dict import *  # noqa: F403

__all__: list[str] = []
__all__ += message_queue.__all__
__all__ += objects.__all__
__all__ += tensor_dict.__all__
