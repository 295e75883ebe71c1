"""Startup errors as one or two lines that say what is wrong and how to fix it.

The OS reports a bad listen address as ``[Errno 98] error while attempting to bind on
address ('127.0.0.1', 8000): address already in use``; a person wants to know which
address, why, and what to type instead. docs/troubleshooting.md lists every message.
"""

from __future__ import annotations

import errno
import re
import socket

_ADDRESS = re.compile(r"address \('([^']*)', (\d+)")


def _where(exc: OSError) -> str:
    match = _ADDRESS.search(str(exc))
    if match is None:
        return ""
    host, port = match.groups()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def explain_os_error(exc: OSError) -> str:
    """A short, fixable description of an OSError met while starting up."""
    where = _where(exc)
    at = f" on {where}" if where else ""
    if isinstance(exc, socket.gaierror):
        return (f"cannot resolve a host name: {exc.strerror or exc}. Check the HOST in "
                "--listen/--host/--metrics (or use an IP address such as 127.0.0.1).")
    code = exc.errno
    if code == errno.EADDRINUSE:
        return (f"cannot listen{at}: address already in use (another program or "
                "another tether listens there).\nPick another port, or port 0 for any free one.")
    if code == errno.EADDRNOTAVAIL:
        return (f"cannot listen{at}: that address is not one of this machine's.\nUse "
                "127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its "
                "own addresses (`ip addr`).")
    if code in (errno.EACCES, errno.EPERM):
        return (f"cannot listen{at}: permission denied (ports below 1024 need root).\n"
                "Pick a port above 1023.")
    if code == errno.EAFNOSUPPORT:
        return f"cannot listen{at}: this machine has no IPv6 (or IPv4) for that address."
    return f"{exc.strerror or exc}{at}" if where else str(exc)
