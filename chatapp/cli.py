"""The command line: ``chatapp serve``, ``chatapp join``, ``chatapp demo``.

The seed's spelling works too: ``chatapp -s PORT`` and
``chatapp -c NAME SERVER_IP SERVER_PORT CLIENT_PORT``. A bad argument gets one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys


def _started_as_program() -> bool:
    """True in the ``chatapp`` command and ``python -m chatapp``, not when imported by tests."""
    program = sys.modules.get("__main__")
    spec = getattr(program, "__spec__", None)
    if spec is not None and spec.name == "chatapp.__main__":
        return True
    return os.path.basename(getattr(program, "__file__", None) or "") == "chatapp"


#: The shell's status for a program ended by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT = 130


def _leave_interrupted(command: str | None) -> NoReturn:
    """Ctrl-C before a node is listening for it: leave as a running node would (a client
    with its line), and never with a traceback."""
    if command in ("join", "-c"):
        from chatapp.screen import KEYBOARD_INTERRUPT

        print(KEYBOARD_INTERRUPT, flush=True)
        raise SystemExit(0)
    raise SystemExit(0 if command in ("serve", "-s") else INTERRUPTED_EXIT)


def _interrupted_while_loading(signum: int, frame: object) -> None:
    _leave_interrupted(sys.argv[1] if len(sys.argv) > 1 else None)


# Loading the modules below takes a moment; a Ctrl-C during it would print a traceback.
if _started_as_program():
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import contextlib  # noqa: E402
import ipaddress  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Annotated, NoReturn  # noqa: E402

import trio  # noqa: E402
import typer  # noqa: E402

from chatapp import __version__  # noqa: E402
from chatapp.argv import captured  # noqa: E402
from chatapp.net import resolve_ipv4  # noqa: E402
from chatapp.protocol.admission import Limits  # noqa: E402
from chatapp.protocol.common import Timers  # noqa: E402
from chatapp.protocol.mailbox import MAX_MAILBOX_LIMIT  # noqa: E402
from chatapp.typer_support import (  # noqa: E402
    UsageError,
    WordsCommand,
    new_app,
    usage_error_line,
    version_option,
)
from chatapp.wire import NAME_PATTERN  # noqa: E402

PROG = "chatapp"
NAME_RE = re.compile(NAME_PATTERN)
USAGE_EXIT = 2
#: A bug, not the user's doing (BSD's EX_SOFTWARE).
INTERNAL_ERROR_EXIT = 70

app = new_app(
    PROG,
    (
        "A UDP chat: one server, peer-to-peer clients.\n\n"
        "\b\nStart the server, then each client in a terminal of its own:\n"
        "  chatapp serve 8001\n"
        "  chatapp join user1 127.0.0.1 8001 9001\n\n"
        "\b\nThe seed's spelling works too:\n"
        "  chatapp -s PORT\n"
        "  chatapp -c NAME SERVER_IP SERVER_PORT CLIENT_PORT\n\n"
        "At the client's prompt, type help for the commands."
    ),
)


class BadArgument(UsageError):  # type: ignore[misc,valid-type]
    """A bad value on the command line, said in one line."""


def _port(value: str, what: str) -> int:
    if not re.fullmatch(r"\d{1,5}", value.strip()) or not 1024 <= int(value) <= 65535:
        raise BadArgument(f"{what} must be a whole number from 1024 to 65535, not {value!r}")
    return int(value)


def _name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise BadArgument(f"NAME must be 1 to 32 letters, digits, '_', '-' or '.', not {value!r}")
    return value


def _ipv4(value: str) -> str:
    try:
        address = resolve_ipv4(value)
    except OSError:
        raise BadArgument(
            f"SERVER_IP must be an IPv4 address such as 127.0.0.1, or localhost, not {value!r}"
        ) from None
    parsed = ipaddress.IPv4Address(address)
    # 0.0.0.0 reaches this host, but the server's answers come from another address and
    # are dropped: the client would say the server is not responding while it is.
    if parsed.is_unspecified or parsed.is_multicast or parsed == _BROADCAST:
        raise BadArgument(
            f"SERVER_IP must be the address of the server's machine, such as 127.0.0.1;"
            f" {value} is not one a server can have"
        )
    return address


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _listen_address(value: str) -> str:
    if value == "0.0.0.0":
        return value
    try:
        return resolve_ipv4(value)
    except OSError:
        raise BadArgument(
            f"--host must be an IPv4 address such as 127.0.0.1, or 0.0.0.0, not {value!r}"
        ) from None


def _mailbox_limit(value: int) -> int:
    if not 1 <= value <= MAX_MAILBOX_LIMIT:
        raise BadArgument(
            f"--mailbox-limit must be from 1 to {MAX_MAILBOX_LIMIT} messages, not {value}"
        )
    return value


DEFAULT_RATE = int(Limits().per_address_rate)
#: A registration is two handshake steps (a hello, a register).
STEPS_PER_JOIN = 2
DEFAULT_JOINS = int(Limits().handshakes_per_ip_burst) // STEPS_PER_JOIN


def _limits(rate: int, joins: int) -> Limits | None:
    for value, option in ((rate, "--rate-limit"), (joins, "--join-limit")):
        if not 0 <= value <= 10_000_000:
            raise BadArgument(f"{option} must be from 0 (no limit) to 10000000, not {value}")
    if rate == 0 and joins == 0:
        return None
    unlimited = math.inf
    return Limits(
        per_address_rate=rate or unlimited,
        per_address_burst=rate or unlimited,
        handshakes_per_ip_rate=joins * STEPS_PER_JOIN / 60 or unlimited,
        handshakes_per_ip_burst=joins * STEPS_PER_JOIN or unlimited,
    )


def _timers(ack_timeout: float, tries: int) -> Timers:
    if not 0.01 <= ack_timeout <= 60:
        raise BadArgument(f"--ack-timeout must be from 0.01 to 60 seconds, not {ack_timeout}")
    if not 1 <= tries <= 100:
        raise BadArgument(f"--tries must be from 1 to 100, not {tries}")
    return Timers(ack_timeout=ack_timeout, tries=tries)


def _trace_path(value: str | None) -> str | None:
    """``--trace FILE``, else ``CHATAPP_TRACE``; None: no trace."""
    return value or os.environ.get("CHATAPP_TRACE") or None


@app.callback()
def _root(version: Annotated[bool, version_option(PROG)] = False) -> None:
    pass


TraceOption = Annotated[
    str | None,
    typer.Option(
        "--trace",
        metavar="FILE",
        help="Record every datagram and line to FILE (JSONL). Also: CHATAPP_TRACE.",
    ),
]
AckTimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for an ACK.", hidden=True)]
TriesOption = Annotated[int, typer.Option(help="Tries of a request to the server.", hidden=True)]


RateLimitOption = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="Datagrams per second one address (IP and port) may send, as many at once;"
        " the excess is dropped unread. 0: no limit.",
    ),
]
JoinLimitOption = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="Registrations per minute from one IP address (all at once if need be), each"
        " two handshake datagrams; the excess is dropped unread. 0: no limit.",
    ),
]


#: ``chatapp serve`` alone listens here (SPEC: ``chatapp serve [PORT]``).
DEFAULT_PORT = "8001"


@app.command(cls=WordsCommand)
def serve(
    ctx: typer.Context,
    port: Annotated[
        str | None,
        typer.Argument(
            metavar="PORT",
            help=f"UDP port, 1024-65535 (default: {DEFAULT_PORT}).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="IPv4 address to listen on.")
    ] = "0.0.0.0",
    db: Annotated[
        str | None,
        typer.Option(
            metavar="PATH|URL",
            help=(
                "SQLite file for the table and the mailbox (default: one per port under"
                " the user's data directory); ':memory:' keeps nothing;"
                " postgresql://USER@HOST:PORT/DB: a PostgreSQL database."
            ),
        ),
    ] = None,
    trace: TraceOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every event.")] = False,
    mailbox_limit: Annotated[
        int, typer.Option(metavar="N", help="Stored messages kept per client.")
    ] = 1000,
    rate_limit: RateLimitOption = DEFAULT_RATE,
    join_limit: JoinLimitOption = DEFAULT_JOINS,
    ack_timeout: AckTimeoutOption = 0.5,
    tries: TriesOption = 5,
) -> None:
    """Run the server on UDP PORT of all interfaces."""
    from chatapp.app import run_server
    from chatapp.launch import ServerOptions

    if port is None and (ctx.obj == SEED_SPELLING or getattr(ctx.obj, "seed_spelling", False)):
        # `chatapp -s` names its port, as the seed does; alone, it is more likely a slip
        # than a wish for the default.
        raise BadArgument(f"-s needs a PORT, as in: chatapp -s {DEFAULT_PORT}")
    options = ServerOptions(
        port=_port(DEFAULT_PORT if port is None else port, "PORT"),
        host=_listen_address(host),
        db=db,
        trace=_trace_path(trace),
        log_level="warning" if quiet else "debug" if verbose else "info",
        mailbox_limit=_mailbox_limit(mailbox_limit),
        limits=_limits(rate_limit, join_limit),
        timers=_timers(ack_timeout, tries),
    )
    if captured(ctx.obj, options):  # options_from_argv: read, not run
        return
    _run(run_server, options, sys.argv, command="serve")


OtherServersOption = Annotated[
    list[str] | None,
    typer.Option(
        "--server",
        metavar="IP:PORT",
        help=(
            "Another server sharing the first one's PostgreSQL database (repeatable):"
            " the client moves to the next when its server stops answering."
        ),
    ),
]


@app.command(cls=WordsCommand)
def join(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="Your nickname: 1-32 letters, digits, _ - .")
    ],
    server_ip: Annotated[
        str,
        typer.Argument(metavar="SERVER_IP", help="The server's IPv4 address, or localhost."),
    ],
    server_port: Annotated[
        str, typer.Argument(metavar="SERVER_PORT", help="The server's UDP port.")
    ],
    client_port: Annotated[
        str, typer.Argument(metavar="CLIENT_PORT", help="The UDP port this client listens on.")
    ],
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="IPv4 address to listen on.")
    ] = "0.0.0.0",
    trace: TraceOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log protocol events to stderr.")
    ] = False,
    server: OtherServersOption = None,
    state_dir: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help=(
                "Where NAME's key, the pinned server keys and the delivery marks live"
                " (default: $XDG_STATE_HOME/chatapp, or ~/.local/state/chatapp)."
            ),
        ),
    ] = None,
    ack_timeout: AckTimeoutOption = 0.5,
    tries: TriesOption = 5,
) -> None:
    """Join as NAME, listening on CLIENT_PORT. The first join of NAME makes its key."""
    from chatapp.app import run_client
    from chatapp.launch import ClientOptions

    options = ClientOptions(
        name=_name(name),
        server_ip=_ipv4(server_ip),
        server_port=_port(server_port, "SERVER_PORT"),
        port=_port(client_port, "CLIENT_PORT"),
        host=_listen_address(host),
        trace=_trace_path(trace),
        verbose=verbose,
        timers=_timers(ack_timeout, tries),
        state_dir=state_dir,
        other_servers=tuple(_server_address(value) for value in server or ()),
    )
    if captured(ctx.obj, options):  # options_from_argv: read, not run
        return
    _run(run_client, options, sys.argv, command="join")


def _server_address(value: str) -> tuple[str, int]:
    """``--server IP:PORT``."""
    ip, colon, port = value.rpartition(":")
    if not colon:
        raise BadArgument(f"--server takes IP:PORT, such as 127.0.0.1:8002, not {value!r}")
    return _ipv4(ip), _port(port, "the port of --server")


@app.command(cls=WordsCommand)
def release(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The name to release.")],
    db: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="The server's SQLite file (default: the port's)."),
    ] = None,
    port: Annotated[
        str, typer.Option(metavar="PORT", help="The server's port, to find its default file.")
    ] = "8001",
) -> None:
    """Release NAME on a stopped server: unbind it from its key, so that the next client to
    register NAME binds its own, and delete the messages stored for it."""
    from chatapp.release import release_name

    path = db or _default_db(_port(port, "--port"))
    raise SystemExit(release_name(_name(name), path))


def _default_db(port: int) -> str:
    from chatapp.sqlite_store import default_db_path

    return default_db_path(port)


@app.command(cls=WordsCommand)
def demo(
    test: Annotated[
        int | None, typer.Option("--test", min=1, max=3, help="Play only this seed test (1-3).")
    ] = None,
    trace: Annotated[
        str | None,
        typer.Option("--trace", metavar="DIR", help="Record each test to DIR/testN.jsonl."),
    ] = None,
) -> None:
    """Play the seed's tests on loopback: a server and three clients, each screen shown."""
    from chatapp.demo import run_demo

    tests = [test] if test else [1, 2, 3]
    _run(run_demo, tests, trace, command="demo")


def _run(entry: Callable[..., Awaitable[int]], *args: object, command: str) -> NoReturn:
    """Run ``entry`` under Trio and exit with its status. Whatever goes wrong ends in one
    line: Trio may wrap an error, or a Ctrl-C, in an exception group."""
    from chatapp.launch import StartupError

    try:
        status = trio.run(entry, *args)
    except SystemExit:
        raise
    except BaseException as exc:
        leaves = _leaves(exc)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            _leave_interrupted(command)  # before the node was listening for Ctrl-C
        if len(leaves) == 1 and isinstance(leaves[0], StartupError):
            print(f"{PROG}: error: {leaves[0]}", file=sys.stderr)
            raise SystemExit(1) from None
        # a bug: the user gets one line, the report gets the traceback
        print(f"{PROG}: internal error: {_crash_report(exc)}", file=sys.stderr)
        status = INTERNAL_ERROR_EXIT
    if _started_as_program():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node is done: a late Ctrl-C waits
    _quiet_stdout()
    raise SystemExit(status)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside any exception groups around ``exc`` (``exc`` if none)."""
    inner = getattr(exc, "exceptions", None)
    if not isinstance(inner, tuple) or not inner:
        return [exc]
    return [leaf for child in inner for leaf in _leaves(child)]


def _crash_report(exc: BaseException) -> str:
    leaves = _leaves(exc)
    shown = leaves[0] if len(leaves) == 1 else exc
    summary = f"{type(shown).__name__}: {shown}"
    try:
        fd, path = tempfile.mkstemp(prefix=f"{PROG}-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as report:
            report.write(f"{PROG} {__version__}\n{' '.join(sys.argv)}\n\n")
            report.write("".join(traceback.format_exception(exc)))
    except OSError:
        return f"{summary}. Please report it."
    return f"{summary}. Please report it, with the details in {path}"


def _quiet_stdout() -> None:
    """Flush stdout now; if the terminal is gone, point it at /dev/null so that the
    interpreter's own flush at exit cannot print 'Exception ignored ...'."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


_SEED_SPELLING = {"-s": "serve", "-c": "join"}
#: ``ctx.obj`` of a command given in the seed's spelling.
SEED_SPELLING = "seed spelling"
#: What Typer returns when Ctrl-C interrupts it while it reads the arguments.
_TYPER_INTERRUPTED = INTERRUPTED_EXIT


def main(argv: list[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    seed_spelling = bool(args) and args[0] in _SEED_SPELLING
    if seed_spelling:
        args[0] = _SEED_SPELLING[args[0]]
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        # Trio takes Ctrl-C over only from Python's own handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        obj = SEED_SPELLING if seed_spelling else None
        result = app(args=args, prog_name=PROG, standalone_mode=False, obj=obj)
        if result == _TYPER_INTERRUPTED:
            _leave_interrupted(args[0] if args else None)
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except UsageError as exc:
        _usage_error(exc)
    except KeyboardInterrupt:
        _leave_interrupted(args[0] if args else None)
    raise SystemExit(result if isinstance(result, int) else 0)


def _usage_error(exc: Exception) -> NoReturn:
    if type(exc).__name__ == "NoArgsIsHelpError":
        # `chatapp` alone: a person asking what it does gets the help, as Click does it
        print(exc.format_message(), file=sys.stderr)  # type: ignore[attr-defined]
        raise SystemExit(USAGE_EXIT)
    print(usage_error_line(exc, PROG), file=sys.stderr)
    raise SystemExit(USAGE_EXIT)
