"""tether in a web page: the demo page and the JavaScript module the relay serves.

``tether serve --web`` answers plain HTTP GETs under ``/web/`` with :func:`web_response`:
the demo page (``index.html``, ``page.js``) and ``tether-peer.js``, the browser counterpart
of ``tether connect`` (an ES module, no build step). The page does everything else itself:
it derives the conversation id and seals every signal with the tunnel secret (WebCrypto),
so the secret never leaves the page and the relay serves nothing secret.

A browser's WebSocket cannot send an ``Authorization`` header, so the page offers the token
as a subprotocol: ``Sec-WebSocket-Protocol: tether.v1, tether.bearer.<base64url(token)>``
(plus ``tether.resume.<credential>`` on a reconnect). :func:`credentials_from_subprotocols`
reads them back for the relay, which must then select :data:`SUBPROTOCOL` in its handshake
response (a browser drops a connection whose offered subprotocols get no answer).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

PREFIX = "/web/"
SUBPROTOCOL = "tether.v1"
TOKEN_SUBPROTOCOL_PREFIX = "tether.bearer."
RESUME_SUBPROTOCOL_PREFIX = "tether.resume."
MAX_CREDENTIAL_CHARS = 1024

_HERE = Path(__file__).parent
_FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "index.html": ("index.html", "text/html; charset=utf-8"),
    "page.js": ("page.js", "text/javascript; charset=utf-8"),
    "tether-peer.js": ("tether-peer.js", "text/javascript; charset=utf-8"),
}
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Scripts only from the relay itself; WebSockets to any relay the user names.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
}


@cache
def _read(name: str) -> bytes:
    return (_HERE / name).read_bytes()


def web_response(path: str) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) for a GET of ``path``, or None if it is not a web path.

    ``path`` is the request path without the query (``/web/``, ``/web/page.js``...);
    ``/web`` redirects to ``/web/``; an unknown name under ``/web/`` is a 404.
    """
    if path == PREFIX.rstrip("/"):
        return 308, {"Location": PREFIX, **_HEADERS}, b""
    if not path.startswith(PREFIX):
        return None
    found = _FILES.get(path[len(PREFIX):])
    if found is None:
        body = f"no such file: {path[:200]}\n".encode("utf-8", "replace")
        return 404, {"Content-Type": "text/plain; charset=utf-8", **_HEADERS}, body
    name, content_type = found
    body = _read(name)
    return 200, {"Content-Type": content_type, **_HEADERS}, body


def credentials_from_subprotocols(values: Iterable[str]) -> tuple[str | None, str | None]:
    """(token, resume credential) a browser offered as subprotocols, each None if absent.

    ``values`` are the request's ``Sec-WebSocket-Protocol`` header values (each may list
    several, comma-separated). A token that is not valid base64url gives None (the relay
    then answers 401 as for a missing token); only the first of each kind counts.
    """
    token: str | None = None
    resume: str | None = None
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item.startswith(TOKEN_SUBPROTOCOL_PREFIX) and token is None:
                token = _decode_token(item[len(TOKEN_SUBPROTOCOL_PREFIX):])
            elif item.startswith(RESUME_SUBPROTOCOL_PREFIX) and resume is None:
                resume = item[len(RESUME_SUBPROTOCOL_PREFIX):][:MAX_CREDENTIAL_CHARS] or None
    return token, resume


def token_subprotocol(token: str) -> str:
    """The subprotocol that carries ``token`` (what tether-peer.js offers)."""
    encoded = base64.urlsafe_b64encode(token.encode("utf-8")).rstrip(b"=").decode("ascii")
    return TOKEN_SUBPROTOCOL_PREFIX + encoded


def _decode_token(text: str) -> str | None:
    if not text or len(text) > MAX_CREDENTIAL_CHARS:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        token = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return token or None


def select_subprotocol(connection: Any, offered: list[str]) -> str | None:
    """For ``websockets.asyncio.server.serve(select_subprotocol=...)``: answer the page's
    :data:`SUBPROTOCOL`; clients that offer none (the CLI) go on without one."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def http_response(connection: Any, path: str) -> Any:
    """:func:`web_response` as a ``websockets`` Response for ``process_request``, or None.

    ``connection`` is the ``ServerConnection`` handed to ``process_request``.
    """
    answer = web_response(path)
    if answer is None:
        return None
    status, headers, body = answer
    response = connection.respond(status, "")
    for name in ("Content-Type", "Content-Length"):
        del response.headers[name]
    for name, value in headers.items():
        response.headers[name] = value
    response.headers["Content-Length"] = str(len(body))
    response.body = body
    return response
