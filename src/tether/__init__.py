"""tether: keeps WebRTC tunnels alive.

The seed's connection manager API is here at the top (Contract 1); the sides that wire a
whole tunnel are in ``tether.app`` (ExposeSide, ConnectSide), the relay and its client in
``tether.signaling``, the aiortc core in ``tether.cores.aiortc_core``.

To open a tunnel from Python (``tether.api``)::

    async with tether.connect("db", signal="ws://relay:8765", token=TOKEN,
                              secret=SECRET) as t:
        ...  # connect to 127.0.0.1:t.port

and ``tether.expose(name, signal=..., token=..., secret=..., target="HOST:PORT")``.

Every name below is loaded on first use (PEP 562): ``import tether`` (and so every
``tether`` command, ``--version`` included) does not pay for asyncio, the connection
manager or aiortc until something needs them (docs/startup.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Connection, Exposure, connect, expose
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

# name -> the module that defines it. The high-level API pulls in aiortc; the connection
# manager pulls in asyncio: both load on first use, so `import tether` stays light.
_LAZY = {
    **dict.fromkeys(("Connection", "Exposure", "connect", "expose"), ".api"),
    **dict.fromkeys((
        "ConnectionState", "ICERestartPolicy", "NetworkChangeType", "TunnelConnectionManager",
        "get_connection_manager", "list_connection_managers", "register_connection_manager",
        "unregister_connection_manager"), ".connection_manager"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
