"""tether: keeps WebRTC tunnels alive.

The seed's connection manager API is here at the top (Contract 1); the sides that wire a
whole tunnel are in ``tether.app`` (ExposeSide, ConnectSide), the relay and its client in
``tether.signaling``, the aiortc core in ``tether.cores.aiortc_core``.

To open a tunnel from Python (``tether.api``)::

    async with tether.connect("db", signal="ws://relay:8765", token=TOKEN,
                              secret=SECRET) as t:
        ...  # connect to 127.0.0.1:t.port

and ``tether.expose(name, signal=..., token=..., secret=..., target="HOST:PORT")``.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .api import Connection, Exposure, connect, expose

# The high-level API pulls in aiortc: loaded on first use, so `import tether` stays light.
_API = frozenset({"Connection", "Exposure", "connect", "expose"})


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")

__all__ = [
    "Connection",
    "ConnectionState",
    "Exposure",
    "ICERestartPolicy",
    "NetworkChangeType",
    "TunnelConnectionManager",
    "__version__",
    "connect",
    "expose",
    "get_connection_manager",
    "list_connection_managers",
    "register_connection_manager",
    "unregister_connection_manager",
]
