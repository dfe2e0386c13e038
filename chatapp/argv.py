"""A node's options from its command line, as ``chatapp serve`` or ``chatapp join`` builds
them: the replay builds every node from the command line its trace recorded, so that a
changed default of the command line is a changed node.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer
import typer.main

if TYPE_CHECKING:
    from chatapp.launch import Options

#: The seed's spelling of the two commands.
SEED_COMMANDS = {"-s": "serve", "-c": "join"}


@dataclass
class Parsed:
    """``ctx.obj`` of a command line read by ``options_from_argv``: the command builds its
    options, leaves them here and returns instead of running."""

    seed_spelling: bool
    options: Options | None = None


def captured(obj: object, options: Options) -> bool:
    """In ``chatapp serve``/``join``: whether the command line was only being read
    (``options_from_argv``); then its options are kept, and the command returns."""
    if not isinstance(obj, Parsed):
        return False
    obj.options = options
    return True


@functools.lru_cache(maxsize=4)
def _command(app: typer.Typer, *defaults: object) -> Callable[..., object]:
    """The command line's Click command (its ``main``), as ``app()`` builds it on each
    call; built once per set of the commands' defaults (a test may change one)."""
    return typer.main.get_command(app).main


def options_from_argv(argv: list[str]) -> Options:
    """The options ``chatapp serve`` or ``chatapp join`` builds from this command line
    (``argv[0]``: the program, as a trace records it), through the same command
    definitions, checks and defaults as when it runs. A command line chatapp does not
    take raises ``UsageError`` (``usage_error_line`` says it in one line)."""
    from chatapp.cli import PROG, BadArgument, app, join, serve

    args = list(argv[1:])
    seed_spelling = bool(args) and args[0] in SEED_COMMANDS
    if seed_spelling:
        args[0] = SEED_COMMANDS[args[0]]
    if not args or args[0] not in ("serve", "join"):
        raise BadArgument(f"not a command line that starts a node: {' '.join(argv)!r}")
    parsed = Parsed(seed_spelling)
    command = _command(app, serve.__defaults__, join.__defaults__)
    command(args=args, prog_name=PROG, standalone_mode=False, obj=parsed)
    if parsed.options is None:  # --help, say: nothing was built
        raise BadArgument(f"not a command line that starts a node: {' '.join(argv)!r}")
    return parsed.options
