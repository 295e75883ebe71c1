"""``python -m tether.lab.echo_server --port P``: tether's echo server as a program.

The lab runs it in the server namespace as ``tether expose``'s target. It serves until it
is signalled; the echo itself is :mod:`tether.echo`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from ..echo import start_echo_server


async def serve(host: str, port: int) -> None:
    server = await start_echo_server(host, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TCP echo server for the tether lab")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
