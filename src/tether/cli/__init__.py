"""The command line: tether serve | expose | connect | up | status | restart | stop | demo |
lab | bench.

One module per command family; ``common`` holds what they share. Importing them registers
the commands (their options and help) and nothing heavy: each command imports its machinery
when it runs, so `--version`, `--help`, `status` and `stop` answer at once (docs/startup.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .. import __version__
from . import coercion

# --help lists the commands in the order a user meets them.
COMMAND_ORDER = ("serve", "expose", "connect", "up", "status", "restart", "stop", "demo",
                 "lab", "bench", "version")


class _Commands(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


# Plain option values skip typer's pydantic coercion (~150 ms a command): cli/coercion.py.
coercion.install()

app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: no type tags, no boxes, greppable
    help="tether keeps WebRTC tunnels alive: TCP forwarding over WebRTC data channels.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print tether's version and exit.")] = False,
) -> None:
    """tether keeps WebRTC tunnels alive: TCP forwarding over WebRTC data channels."""


@app.command()
def version() -> None:
    """Print tether's version."""
    typer.echo(__version__)


from . import common  # noqa: E402,F401  (the commands register themselves on ``app``)
from . import serve, tunnels, demo  # noqa: E402,F401
from . import up  # noqa: E402,F401  (tether up: the tunnels of a config file)
from . import status  # noqa: E402,F401  (tether status | restart | stop)
from ..lab.command import lab as lab_command  # noqa: E402

app.command("lab")(lab_command)
from ..bench import command as _bench_command  # noqa: E402,F401  (registers `tether bench`)
