"""`tether up`: run every tunnel the config file lists, in one process; SIGHUP reloads."""

from __future__ import annotations

import contextlib
import logging
import signal as os_signal
from typing import TYPE_CHECKING, Any

import typer

from . import app
from .common import Loopback, Token, Verbose, out, run_main, setup_logging
from .modes import ConfigPath
from .status import side_status

logger = logging.getLogger("tether.up")

# The fleet (aiortc, signaling, asyncio) loads when `up` runs, not to register it (startup).
if TYPE_CHECKING:
    import asyncio

    from .. import control
    from ..fleet import Fleet


class Controls:
    """A control socket per running tunnel, so `tether status|restart|stop NAME` see the
    tunnels of `tether up` as they see a lone `expose`/`connect`. `stop` stops that one
    tunnel (until a reload lists it again); the process goes on."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.servers: dict[tuple[str, str], tuple[object, control.ControlServer]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def sync(self) -> None:
        """Open sockets for new tunnels, close those of tunnels gone or replaced."""
        for key, (tunnel, server) in list(self.servers.items()):
            running = self.fleet.running.get(key)
            if running is None or running.tunnel is not tunnel:
                del self.servers[key]
                await server.close()
        for key, running in self.fleet.running.items():
            if key not in self.servers:
                await self._open(key, running.tunnel)

    async def _open(self, key: tuple[str, str], tunnel: Any) -> None:
        import asyncio

        from .. import control

        side = tunnel.side

        async def restart() -> dict[str, Any]:
            return {"restarted": await side.restart()}

        def stop() -> dict[str, Any]:
            task = asyncio.create_task(self._stop(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return {"stopping": True}

        server = control.ControlServer(side.role, side.name, {
            "status": lambda: {"status": side_status(side)}, "restart": restart, "stop": stop})
        try:
            await server.start()
        except (OSError, control.ControlError) as exc:
            logger.warning("%s %s: no control socket (`tether status` will not see it): %s",
                           key[0], key[1], exc)
            return
        self.servers[key] = (tunnel, server)

    async def _stop(self, key: tuple[str, str]) -> None:
        import asyncio

        await asyncio.sleep(0.05)  # let the answer go out first
        await self.fleet._stop(key, "`tether stop`")
        await self.sync()

    async def close(self) -> None:
        import asyncio

        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, server in self.servers.values():
            await server.close()
        self.servers.clear()


@app.command()
def up(
    config: ConfigPath = None,
    token: Token = None,
    loopback: Loopback = False,
    verbose: Verbose = 0,
) -> None:
    """Run every expose and connect tunnel of the config file in one process.

    SIGHUP reloads the file: tunnels no longer listed stop, new ones start, changed ones
    restart, the rest go on untouched. SIGTERM or Ctrl-C stops everything cleanly. The
    tunnels share one signaling connection per relay.
    """
    import asyncio

    from .. import config as config_mod
    from ..fleet import Fleet, describe

    setup_logging(verbose)
    path = config if config is not None else str(config_mod.default_path())
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    if not cfg.tunnels:
        raise typer.BadParameter(f"{path}: lists no [[expose]] or [[connect]] tunnels",
                                 param_hint="--config")
    if not cfg.signal:
        raise typer.BadParameter(f"{path}: set `signal` (the relay's ws:// or wss:// URL)",
                                 param_hint="--config")
    if not (token or cfg.token):
        raise typer.BadParameter("give `token_file` in the config, --token or TETHER_TOKEN",
                                 param_hint="--token")
    fleet = Fleet(cfg, token=token, loopback=True if loopback else None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reload = asyncio.Event()
        controls = Controls(fleet)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(os_signal.SIGHUP, reload.set)
        try:
            await fleet.start()
            await controls.sync()
            for key, running in fleet.running.items():
                out.print(describe(key, running.tunnel), highlight=False)
            out.print(f"up: {len(fleet.running)} tunnels from {path}", highlight=False)
            while True:
                await reload.wait()
                reload.clear()
                try:
                    new = config_mod.load(path)
                except config_mod.ConfigError as exc:
                    logger.error("reload: %s; the running tunnels go on unchanged", exc)
                    continue
                changes = await fleet.reload(new)
                await controls.sync()
                for key in changes["added"] + changes["restarted"]:
                    kind, name = key.split(" ", 1)
                    running = fleet.running.get((kind, name))
                    if running is not None:
                        out.print(describe((kind, name), running.tunnel), highlight=False)
                out.print("reloaded: " + "; ".join(
                    f"{what} {', '.join(names)}" for what, names in changes.items() if names)
                    if any(changes.values()) else "reloaded: no changes", highlight=False)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(os_signal.SIGHUP)
            await controls.close()
            await fleet.close()

    run_main(main)
