"""WebSocket signaling: the relay server and the reconnecting client (docs/architecture.md, "Signals").

:class:`SignalingClient` carries one conversation on a connection of its own;
:class:`SignalingMux` carries many (:class:`MuxConversation`, same API) on one connection.

The wire protocol is documented in :mod:`tether.signaling.server`.
"""

from .client import (
    AuthenticationError,
    CertificateError,
    ConversationFullError,
    HandshakeRefusedError,
    OutboundQueueFullError,
    PeerReplacedError,
    SignalingClient,
    SignalingClosedError,
    SignalingError,
    SignalTooLargeError,
)
from .conversations import ConversationTable, MemoryConversationTable, Peer, Refusal
from .limits import RelayLimits
from .mux import MuxConversation, SignalingMux
from .server import SignalingServer

__all__ = [
    "AuthenticationError",
    "CertificateError",
    "ConversationFullError",
    "ConversationTable",
    "HandshakeRefusedError",
    "MemoryConversationTable",
    "MuxConversation",
    "OutboundQueueFullError",
    "Peer",
    "PeerReplacedError",
    "Refusal",
    "RelayLimits",
    "SignalingClient",
    "SignalingClosedError",
    "SignalingError",
    "SignalingMux",
    "SignalTooLargeError",
    "SignalingServer",
]
