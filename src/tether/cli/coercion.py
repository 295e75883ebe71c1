"""Option values that need no coercion skip pydantic (startup).

typer 0.29 (pinned) checks every parameter value through a pydantic TypeAdapter, built
when the command runs: importing pydantic and building the adapters costs ~150 ms before
any command does anything, `tether status` and `tether stop` included. Most values need
nothing done: a str option holds a str, a list[str] option a tuple of str, a number option
its own default or a plain decimal number. :class:`Plain` returns those exactly as typer's
pydantic coercion would (the str, ``list(value)``, ``int(value)``/``float(value)`` in range)
and hands anything else (a value out of range, "1_000", a wrong type...) to typer's own
coercion, so its conversions and error messages stay typer's (tests/test_startup.py checks
every parameter against it). :func:`install` makes typer use it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, get_args, get_origin

logger = logging.getLogger(__name__)

try:  # typer's private coercion layer: when it changes, typer simply coerces as before
    from typer._coercion import RuntimeParam, build_runtime_param
except ImportError:  # pragma: no cover - another typer
    RuntimeParam = None  # type: ignore[assignment,misc]


# Numbers as typed on the command line that int() / float() read exactly as pydantic does;
# anything else ("1_000", " 5", "inf", "0x10"...) is left to typer's coercion.
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _kind(annotation: Any) -> str | None:
    if annotation is str:
        return "str"
    if annotation is bool:
        return "bool"
    if get_origin(annotation) is list and get_args(annotation) == (str,):
        return "list[str]"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    return None


if RuntimeParam is not None:

    @dataclasses.dataclass(frozen=True)
    class Plain(RuntimeParam):  # type: ignore[misc,valid-type]
        """A str, list[str], bool, int or float parameter; typer's coercion for the rest."""

        kind: str = "str"

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            plain = self._plain(value)
            if plain is not None:
                return plain
            # typer's own coercion (pydantic), built once and kept by the parameter.
            real = build_runtime_param(param.type_descriptor)
            param._runtime_param = real
            return real._coerce_value(value, param=param, ctx=ctx)

        def _plain(self, value: Any) -> Any:
            if self.kind == "str":
                return value if isinstance(value, str) else None
            if self.kind == "bool":
                return value if isinstance(value, bool) else None
            if self.kind == "list[str]":
                if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                    return list(value)
                return None
            info = self.parameter_info
            if self.kind == "int" and (type(value) in (int, bool) or (
                    type(value) is str and len(value) <= 30 and _INT.fullmatch(value))):
                number: int | float = int(value)
            elif self.kind == "float" and (type(value) in (float, int, bool) or (
                    type(value) is str and len(value) <= 30 and _FLOAT.fullmatch(value))):
                number = float(value)
            else:
                return None
            if getattr(info, "clamp", False):
                return None
            if info.min is not None and number < info.min:
                return None
            if info.max is not None and number > info.max:
                return None
            return number


def _build(descriptor: Any) -> Any:
    """typer's build_runtime_param, with :class:`Plain` for the plain parameters."""
    info = descriptor.parameter_info
    kind = _kind(descriptor.annotation)
    if (kind is None or descriptor.file_annotation is not None
            or getattr(info, "parser", None) is not None
            or getattr(info, "click_type", None) is not None):
        return build_runtime_param(descriptor)
    return Plain(parameter_info=info, annotation=descriptor.annotation, kind=kind)


def install() -> None:
    """Make typer build :class:`Plain` coercion for plain parameters (every command's, the
    help options' too: typer builds them lazily, as a command runs)."""
    if RuntimeParam is None:
        return
    import typer.core

    if getattr(typer.core, "build_runtime_param", None) is build_runtime_param:
        typer.core.build_runtime_param = _build
    else:  # pragma: no cover - another typer
        logger.debug("typer's coercion is not the one expected; not installing")
