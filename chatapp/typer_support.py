"""What chatapp's command lines share: Typer apps that say a bad argument in one line,
show arguments as the words they are (``PORT``, not ``{PORT}`` or ``PORT <str>``),
have ``--version`` and offer shell completion (``--install-completion``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand

from chatapp import __version__

# Typer may bundle its own copy of Click: find Click's usage error through Typer's classes.
UsageError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


def new_app(name: str, help: str, *, no_args_is_help: bool = True) -> typer.Typer:
    """A Typer app with plain help, no tracebacks, ``-h`` and shell completion."""
    return typer.Typer(
        name=name,
        help=help,
        add_completion=True,
        no_args_is_help=no_args_is_help,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


class WordsCommand(TyperCommand):
    """A command whose help names its arguments as words: ``chatapp join NAME ...``
    and ``NAME  Your nickname``, as a man page does."""

    # Typer bundles its own Click: parameters are told apart as Typer itself does.

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                word = _word(param)
                pieces.append(word if param.required else f"[{word}]")
            else:
                pieces += param.get_usage_pieces(ctx)
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                explained = record[1].replace("  [required]", "")
                arguments.append((_word(param), explained))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _word(param: Any) -> str:
    return str(param.metavar or (param.name or "").upper())


def show_version(prog: str) -> Callable[[bool], None]:
    """An eager ``--version`` option's callback: ``PROG VERSION`` and exit."""

    def callback(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {__version__}")
            raise typer.Exit()

    return callback


def version_option(prog: str) -> Any:
    return typer.Option(
        "--version", callback=show_version(prog), is_eager=True, help="Show the version and exit."
    )


def usage_error_line(exc: Exception, prog: str) -> str:
    """``PROG CMD: error: MESSAGE (see 'PROG CMD --help')``: a usage error in one line."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else prog
    message = " ".join(exc.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    return f"{where}: error: {message} (see '{where} --help')"
