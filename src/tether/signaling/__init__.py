"""WebSocket signaling: the relay server and the reconnecting client (docs/architecture.md, "Signals").

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
from .server import SignalingServer

__all__ = [
    "AuthenticationError",
    "CertificateError",
    "ConversationFullError",
    "ConversationTable",
    "HandshakeRefusedError",
    "MemoryConversationTable",
    "OutboundQueueFullError",
    "Peer",
    "PeerReplacedError",
    "Refusal",
    "RelayLimits",
    "SignalingClient",
    "SignalingClosedError",
    "SignalingError",
    "SignalTooLargeError",
    "SignalingServer",
]
