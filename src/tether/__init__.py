"""tether: keeps WebRTC tunnels alive.

The seed's connection manager API is here at the top (Contract 1); the sides that wire a
whole tunnel are in ``tether.app`` (ExposeSide, ConnectSide), the relay and its client in
``tether.signaling``, the aiortc core in ``tether.cores.aiortc_core``.
"""

from .connection_manager import (
    ConnectionState,
    ICERestartPolicy,
    NetworkChangeType,
    TunnelConnectionManager,
    get_connection_manager,
    list_connection_managers,
    register_connection_manager,
    unregister_connection_manager,
)

__version__ = "0.1.0"

__all__ = [
    "ConnectionState",
    "ICERestartPolicy",
    "NetworkChangeType",
    "TunnelConnectionManager",
    "__version__",
    "get_connection_manager",
    "list_connection_managers",
    "register_connection_manager",
    "unregister_connection_manager",
]
