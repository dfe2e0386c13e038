"""The command line: ``chatapp serve``, ``chatapp join``, ``chatapp demo``.

The seed's spelling works too: ``chatapp -s PORT`` and
``chatapp -c NAME SERVER_IP SERVER_PORT CLIENT_PORT``. A bad argument gets one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, NoReturn

import trio
import typer

from chatapp import __version__
from chatapp.net import resolve_ipv4
from chatapp.protocol.common import Timers

PROG = "chatapp"
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
USAGE_EXIT = 2

app = typer.Typer(
    name=PROG,
    help=(
        "A UDP chat: one server, peer-to-peer clients.\n\n"
        "Seed spelling: chatapp -s PORT | chatapp -c NAME SERVER_IP SERVER_PORT CLIENT_PORT"
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Typer may bundle its own copy of Click: find its exception classes through Typer's.
_UsageError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


class BadArgument(_UsageError):  # type: ignore[misc,valid-type]
    """A bad value on the command line, said in one line."""


def _port(value: str, what: str) -> int:
    if not re.fullmatch(r"\d{1,5}", value.strip()) or not 1024 <= int(value) <= 65535:
        raise BadArgument(f"{what} must be a whole number from 1024 to 65535, not {value!r}")
    return int(value)


def _name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise BadArgument(
            f"NAME must be 1 to 32 letters, digits, '_', '-' or '.', not {value!r}"
        )
    return value


def _ipv4(value: str) -> str:
    try:
        return resolve_ipv4(value)
    except OSError:
        raise BadArgument(
            f"SERVER_IP must be an IPv4 address such as 127.0.0.1, or localhost, not {value!r}"
        ) from None


def _timers(ack_timeout: float, tries: int) -> Timers:
    if not 0.01 <= ack_timeout <= 60:
        raise BadArgument(f"--ack-timeout must be from 0.01 to 60 seconds, not {ack_timeout}")
    if not 1 <= tries <= 100:
        raise BadArgument(f"--tries must be from 1 to 100, not {tries}")
    return Timers(ack_timeout=ack_timeout, tries=tries)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    pass


TraceOption = Annotated[
    str | None,
    typer.Option("--trace", metavar="FILE", help="Record every datagram and line to FILE (JSONL). Also: CHATAPP_TRACE."),
]
AckTimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for an ACK.", hidden=True)]
TriesOption = Annotated[int, typer.Option(help="Tries of a request to the server.", hidden=True)]


@app.command()
def serve(
    port: Annotated[str, typer.Argument(metavar="[PORT]", help="UDP port, 1024-65535.")] = "8001",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    db: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="SQLite file for the table and the mailbox (default: one per port under the user's data directory); ':memory:' keeps nothing."),
    ] = None,
    trace: TraceOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every event.")] = False,
    mailbox_limit: Annotated[int, typer.Option(help="Stored messages kept per client.")] = 1000,
    ack_timeout: AckTimeoutOption = 0.5,
    tries: TriesOption = 5,
) -> None:
    """Run the server on UDP PORT of all interfaces."""
    from chatapp.app import ServerOptions, run_server

    options = ServerOptions(
        port=_port(port, "PORT"),
        host=_ipv4(host) if host != "0.0.0.0" else host,
        db=db,
        trace=trace,
        log_level="warning" if quiet else "debug" if verbose else "info",
        mailbox_limit=max(1, mailbox_limit),
        timers=_timers(ack_timeout, tries),
    )
    _run(run_server, options)


@app.command()
def join(
    name: Annotated[str, typer.Argument(help="Your nickname: 1-32 letters, digits, _ - .")],
    server_ip: Annotated[str, typer.Argument(help="The server's IPv4 address, or localhost.")],
    server_port: Annotated[str, typer.Argument(help="The server's UDP port.")],
    client_port: Annotated[str, typer.Argument(help="The UDP port this client listens on.")],
    trace: TraceOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log protocol events to stderr.")] = False,
    ack_timeout: AckTimeoutOption = 0.5,
    tries: TriesOption = 5,
) -> None:
    """Join as NAME, listening on CLIENT_PORT."""
    from chatapp.app import ClientOptions, run_client

    options = ClientOptions(
        name=_name(name),
        server_ip=_ipv4(server_ip),
        server_port=_port(server_port, "SERVER_PORT"),
        port=_port(client_port, "CLIENT_PORT"),
        trace=trace,
        verbose=verbose,
        timers=_timers(ack_timeout, tries),
    )
    _run(run_client, options)


@app.command()
def demo(
    test: Annotated[
        int | None, typer.Option("--test", min=1, max=3, help="Play only this seed test (1-3).")
    ] = None,
    trace: Annotated[
        str | None, typer.Option("--trace", metavar="DIR", help="Record each test to DIR/testN.jsonl.")
    ] = None,
) -> None:
    """Play the seed's tests on loopback: a server and three clients, each screen shown."""
    from chatapp.demo import run_demo

    tests = [test] if test else [1, 2, 3]
    status = trio.run(run_demo, tests, trace)
    raise typer.Exit(status)


def _run(entry: object, options: object) -> NoReturn:
    from chatapp.app import StartupError

    try:
        status = trio.run(entry, options, sys.argv)  # type: ignore[arg-type]
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        status = 0
    raise SystemExit(status)


_SEED_SPELLING = {"-s": "serve", "-c": "join"}


def main(argv: list[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _SEED_SPELLING:
        args[0] = _SEED_SPELLING[args[0]]
    try:
        result = app(args=args, prog_name=PROG, standalone_mode=False)
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except _UsageError as exc:
        _usage_error(exc)
    raise SystemExit(result if isinstance(result, int) else 0)


def _usage_error(exc: Exception) -> NoReturn:
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else PROG
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    print(f"{where}: error: {message} (see '{where} --help')", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)
