"""A control socket per running `tether expose`/`connect`, for `tether status|restart|stop`.

Where: ``$TETHER_RUNTIME_DIR`` if set, else ``$XDG_RUNTIME_DIR/tether``, else
``/run/tether`` when writable (root), else ``tether-<uid>`` under the temp directory. The
directory is made 0700 and must belong to us (a temp directory someone else made is
refused); each socket is 0600 and named ``<role>-<name>.sock`` (``-<pid>`` added when a
live process already holds that name; long or odd names are shortened with a hash).

Protocol: one JSON object per line, ``{"cmd": "status" | "restart" | "stop"}``, answered by
one JSON line ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. Requests are at
most MAX_REQUEST bytes, a connection may send MAX_REQUESTS_PER_CONNECTION and must not be
idle longer than IDLE_TIMEOUT, and at most MAX_CONNECTIONS are served at once (others get
an error line and are closed). A socket file whose process is gone (connecting is refused)
is stale: the server replaces it at start and clients remove it when they list.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .listener import Listener

logger = logging.getLogger(__name__)

MAX_REQUEST = 4096
MAX_RESPONSE = 16 * 1024 * 1024
MAX_CONNECTIONS = 8
MAX_REQUESTS_PER_CONNECTION = 1000
IDLE_TIMEOUT = 30.0
MAX_NAME = 60
SUFFIX = ".sock"
COMMANDS = ("status", "restart", "stop")

Handler = Callable[[], Awaitable[dict[str, Any]] | dict[str, Any]]


class ControlError(Exception):
    """A control request failed (no such tunnel, the process did not answer...)."""


def runtime_dir(create: bool = False) -> Path:
    """The directory holding control sockets (see the module docstring)."""
    explicit = os.environ.get("TETHER_RUNTIME_DIR")
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = []
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and Path(xdg).is_dir():
            candidates.append(Path(xdg) / "tether")
        # /run/tether: root's, or one made for us (systemd's RuntimeDirectory=tether).
        if os.access("/run", os.W_OK) or os.access("/run/tether", os.W_OK):
            candidates.append(Path("/run/tether"))
        candidates.append(Path(tempfile.gettempdir()) / f"tether-{os.getuid()}")
    if not create:
        for path in candidates:
            if path.is_dir():
                return path
        return candidates[0]
    last: OSError | None = None
    for path in candidates:
        try:
            return _private_dir(path)
        except OSError as exc:
            last = exc
    raise ControlError(f"no usable directory for control sockets: {last}")


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=False, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(errno.EPERM, f"{path} is not a directory of ours")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def socket_name(role: str, name: str) -> str:
    """``role-name``, with characters outside [A-Za-z0-9._-] and long names hashed."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or len(safe) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        safe = f"{safe[:MAX_NAME - 11]}~{digest}"
    return f"{role}-{safe}"


def _alive(path: Path) -> bool:
    """Whether a process listens on the socket file ``path`` (refused: a stale file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # busy (EAGAIN, timeout): someone is there
        return True


def _remove_stale(path: Path) -> bool:
    """Remove ``path`` if it is our socket file and nobody listens; return whether it was."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return True
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        return False
    if _alive(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    logger.debug("removed the stale control socket %s", path)
    return True


class ControlServer:
    """Serves the control protocol for one side; ``handlers`` maps commands to callables."""

    def __init__(self, role: str, name: str, handlers: dict[str, Handler],
                 directory: Path | None = None) -> None:
        self.role = role
        self.name = name
        self.handlers = handlers
        self.directory = directory
        self.path: Path | None = None
        self._listener = Listener(self._serve, MAX_CONNECTIONS, refuse=self._refuse)
        self._busy = 0

    async def start(self) -> Path:
        directory = self.directory or runtime_dir(create=True)
        base = socket_name(self.role, self.name)
        path = directory / (base + SUFFIX)
        if not _remove_stale(path):
            path = directory / f"{base}-{os.getpid()}{SUFFIX}"
            _remove_stale(path)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            await self._listener.start_unix(str(path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.path = path
        logger.debug("control socket %s", path)
        return path

    async def close(self) -> None:
        await self._listener.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._reply(writer, {"ok": False, "error": "too many control connections"})
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error":
                                               f"request longer than {MAX_REQUEST} bytes"})
                    break
                if not line:
                    break
                await self._reply(writer, await self._answer(line))
        except (TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # closing: the connection ends with the server
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        cmd = request.get("cmd") if isinstance(request, dict) else None
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}; known: "
                                          + ", ".join(sorted(self.handlers))}
        try:
            result = handler()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
        except Exception as exc:  # a failing command must not end the server
            logger.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"{cmd} failed: {exc}"}
        return {"ok": True, **result}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()


# -- client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One running side's control socket."""

    role: str
    name: str  # as in the file name (odd characters replaced)
    path: Path


def endpoints(directory: Path | None = None) -> list[Endpoint]:
    """Every live control socket (stale ones are removed on the way)."""
    directory = directory or runtime_dir()
    found = []
    try:
        entries = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for path in entries:
        if not path.name.endswith(SUFFIX) or "-" not in path.name:
            continue
        if _remove_stale(path):
            continue
        role, _, name = path.name[: -len(SUFFIX)].partition("-")
        found.append(Endpoint(role, name, path))
    return found


def _names(endpoint: Endpoint) -> set[str]:
    """The tunnel name the file stands for, with and without a trailing -<pid>."""
    names = {endpoint.name}
    head, _, tail = endpoint.name.rpartition("-")
    if head and tail.isdigit():
        names.add(head)
    return names


def find(name: str | None, directory: Path | None = None) -> list[Endpoint]:
    """The endpoints of tunnel ``name`` (every one for None)."""
    every = endpoints(directory)
    if name is None:
        return every
    wanted = socket_name("x", name)[2:]
    return [e for e in every if wanted in _names(e)]


async def request(path: Path, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send one command, return the answer (raises ControlError when it fails)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_RESPONSE)
            try:
                writer.write(json.dumps({"cmd": cmd}).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    if not line:
        raise ControlError(f"{path}: the process closed the connection")
    answer = json.loads(line)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "failed")))
    return answer
