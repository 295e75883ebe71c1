"""tether: keeps WebRTC tunnels alive."""

__version__ = "0.1.0"
