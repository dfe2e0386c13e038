"""What chatapp's command lines share: Typer apps that say a bad argument in one line."""

from __future__ import annotations

import typer

# Typer may bundle its own copy of Click: find Click's usage error through Typer's classes.
UsageError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


def new_app(name: str, help: str) -> typer.Typer:
    """A Typer app with plain help, no tracebacks and ``-h``."""
    return typer.Typer(
        name=name,
        help=help,
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def usage_error_line(exc: Exception, prog: str) -> str:
    """``PROG CMD: error: MESSAGE (see 'PROG CMD --help')``: a usage error in one line."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else prog
    message = " ".join(exc.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    return f"{where}: error: {message} (see '{where} --help')"
