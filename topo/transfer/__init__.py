"""Weight transfer: trainer → inference, over any axis of an active mesh or over a bridge.

``topo.transfer.send_weights`` / ``receive_weights`` run on any axis; ``topo.transfer.bridge``
joins a trainer and an inference job in one stateless group. These names stay in this
subpackage (``topo.transfer.send_weights``), not at the top level.
"""

from topo.transfer import bridge as _bridge_module
from topo.transfer import weights
from topo.transfer.bridge import *  # noqa: F403
from topo.transfer.weights import *  # noqa: F403

__all__: list[str] = []
__all__ += _bridge_module.__all__
__all__ += weights.__all__
