"""WebSocket signaling: the relay server and the reconnecting client (DESIGN.md Contract 3).

The wire protocol is documented in :mod:`tether.signaling.server`.
"""

from .client import (
    AuthenticationError,
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
from .server import SignalingServer

__all__ = [
    "AuthenticationError",
    "ConversationFullError",
    "ConversationTable",
    "HandshakeRefusedError",
    "MemoryConversationTable",
    "OutboundQueueFullError",
    "Peer",
    "PeerReplacedError",
    "Refusal",
    "SignalingClient",
    "SignalingClosedError",
    "SignalingError",
    "SignalTooLargeError",
    "SignalingServer",
]
