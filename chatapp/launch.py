"""Starting a node: the one function that turns options into a running server or client.

``run_node`` binds the endpoint, builds the state machine, opens what the
options name (the database, the trace) and runs the node until it exits; with
``nursery.start`` it hands over the ``Node`` once its tasks run. The command
line, the demo and scenarios, the replay, the benchmarks and the tests all
start nodes with it; they differ only in the network, the screen, the log and
the recorder they pass, and in the options that fix what a real run leaves to
chance (message ids, tokens, the epoch, the wall clock).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from chatapp.net import UDP, Endpoint, Network
from chatapp.node import Input, Node, Screen
from chatapp.protocol.admission import Admission, Limits
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import IdFactory, Log, Timers
from chatapp.protocol.mailbox import DEFAULT_MAILBOX_LIMIT
from chatapp.protocol.server import ServerProtocol
from chatapp.protocol.tables import Window
from chatapp.store import MemoryStore, Store
from chatapp.trace import JsonlRecorder, NullRecorder, Recorder

if TYPE_CHECKING:
    from chatapp.pg_store import PgStore


class StartupError(Exception):
    """A node could not start (port in use, database unreadable): one line for the user."""


@dataclass(frozen=True)
class ServerOptions:
    port: int  # 0: any free port
    host: str = "0.0.0.0"
    db: str | None = None  # None: one file per port in the user's data directory
    trace: str | None = None
    log_level: str = "info"
    mailbox_limit: int = DEFAULT_MAILBOX_LIMIT
    #: What one sender may send before the excess is dropped unread; None: no limit.
    limits: Limits | None = Limits()
    timers: Timers = Timers()
    name: str = "server"  # the node's name in traces
    # What a real run leaves to chance or to the clock (None); tests and replays fix them.
    id_prefix: str | None = None
    epoch: int | None = None
    wall_offset: float | None = None  # trio.current_time() + this = Unix time
    token_prefix: str | None = None


@dataclass(frozen=True)
class ClientOptions:
    name: str
    server_ip: str
    server_port: int
    port: int  # 0: any free port
    host: str = "0.0.0.0"
    trace: str | None = None
    verbose: bool = False
    timers: Timers = Timers()
    id_prefix: str | None = None  # None: the name and a random part
    #: Servers sharing the first one's database, moved to in turn when it stops answering.
    other_servers: tuple[tuple[str, int], ...] = ()


Options = ServerOptions | ClientOptions


def open_store(db: str | None, port: int) -> Store:
    """The store ``--db`` names (SQLite or memory: a shared PostgreSQL database is opened
    by ``run_node``, off the event loop)."""
    if db == ":memory:":
        return MemoryStore()
    from chatapp.sqlite_store import SqliteStore, default_db_path

    path = db or default_db_path(port)
    try:
        return SqliteStore(path)
    except Exception as exc:  # sqlite3.Error, OSError: any reason the file cannot be used
        raise StartupError(f"cannot open the database {path}: {exc}") from None


async def run_node(
    options: Options,
    *,
    network: Network = UDP,
    store: Store | None = None,
    recorder: Recorder | None = None,
    screen: Screen | None = None,
    make_screen: Callable[[Node], Screen] | None = None,
    log: Callable[[Log], None] | None = None,
    inputs: trio.MemoryReceiveChannel[Input] | None = None,
    argv: list[str] | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run the node that ``options`` describe until it exits; its exit status.

    ``store`` (a server's) and ``recorder`` default to what the options name, and
    what is opened here is closed here; the endpoint is always closed at the end.
    A client shows its lines on ``screen``, or on the one ``make_screen`` builds for
    the node once the endpoint is bound (a terminal's input line starts then, completes
    names from the state machine's table and hands typed lines to ``Node.take_input``),
    and reads ``inputs``. ``argv`` is what the trace says started the node.
    """
    log = log or _ignore
    async with AsyncExitStack() as resources:
        endpoint = await _listen(network, options)
        resources.callback(endpoint.close)
        if recorder is None:
            recorder = _open_recorder(options)
            resources.callback(recorder.close)
        shared: PgStore | None = None
        if isinstance(options, ServerOptions):
            if store is None and options.db is not None and _is_postgres_url(options.db):
                store = shared = await _open_shared(options.db, endpoint.local_address[1])
                resources.push_async_callback(shared.aclose)
            elif store is None:
                store = open_store(options.db, options.port)
                resources.callback(store.close)
            node = _server_node(options, endpoint, store, recorder, log)
        else:
            node = _client_node(options, endpoint, recorder, screen, make_screen, log)
        argv = argv if argv is not None else _argv(options, endpoint)
        if shared is not None:
            return await _run_shared(node, shared, inputs, argv, log, task_status)
        status = await node.run(inputs, argv=argv, task_status=task_status)
    return status


def _is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


async def _open_shared(url: str, port: int) -> PgStore:
    """A PostgreSQL database shared with other servers: connected, migrated, read."""
    # Imported here: a client, or a server on SQLite, never loads psycopg.
    from chatapp.pg_store import PgStore, server_id

    store = PgStore(url, server_id(port))
    try:
        await trio.to_thread.run_sync(store.open)
    except Exception as exc:  # psycopg.Error, OSError: any reason the database cannot be used
        line = str(exc).strip().replace("\n", " ")
        raise StartupError(f"cannot use the database {_without_password(url)}: {line}") from None
    return store


async def _run_shared(
    node: Node,
    store: PgStore,
    inputs: trio.MemoryReceiveChannel[Input] | None,
    argv: list[str],
    log: Callable[[Log], None],
    task_status: trio.TaskStatus[Node],
) -> int:
    """A server node with the tasks that keep it in step with the other servers."""
    from chatapp.shared import SharedLink

    async with trio.open_nursery() as nursery:
        nursery.start_soon(SharedLink(store, node, log).run)
        status = await node.run(inputs, argv=argv, task_status=task_status)
        nursery.cancel_scope.cancel()
    return status


def _without_password(url: str) -> str:
    """``url`` as a log line may show it."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _ignore(entry: Log) -> None:
    pass


async def _listen(network: Network, options: Options) -> Endpoint:
    what = "server" if isinstance(options, ServerOptions) else "client"
    try:
        return await network.listen(options.host, options.port)
    except OSError as exc:
        where = f"{options.host}:{options.port}"
        raise StartupError(f"cannot listen on UDP {where} ({what}): {exc.strerror}") from None


def _open_recorder(options: Options) -> Recorder:
    if not options.trace:
        return NullRecorder()
    role = "server" if isinstance(options, ServerOptions) else "client"
    try:
        return JsonlRecorder.open(
            options.trace, timers=options.timers, nodes={options.name: {"role": role}}
        )
    except OSError as exc:
        raise StartupError(f"cannot write the trace {options.trace}: {exc.strerror}") from None


def _server_node(
    options: ServerOptions,
    endpoint: Endpoint,
    store: Store,
    recorder: Recorder,
    log: Callable[[Log], None],
) -> Node:
    protocol = ServerProtocol(
        timers=options.timers,
        id_prefix=options.id_prefix or "s" + secrets.token_hex(3),
        epoch=time.time_ns() // 1_000_000 if options.epoch is None else options.epoch,
        wall_offset=(
            time.time() - trio.current_time()
            if options.wall_offset is None
            else options.wall_offset
        ),
        token_factory=(IdFactory(options.token_prefix) if options.token_prefix else _random_token),
        mailbox_limit=options.mailbox_limit,
        table_window=table_window(endpoint),
    )
    clients, mailbox = store.load()  # a shared store read its tables when it opened
    protocol.restore(clients, mailbox, getattr(store, "elsewhere", ()))
    recorder.restored(options.name, clients, mailbox)  # a replay starts from the same state
    waiting = sum(len(items) for items in mailbox.values())
    log(
        Log(
            f"chatapp server listening on UDP {options.host}:{endpoint.local_address[1]}"
            f" ({len(clients)} known clients, {waiting} stored messages); Ctrl-C stops it"
        )
    )
    buffer = getattr(endpoint, "receive_buffer", None)
    if buffer is not None:
        log(
            Log(f"socket receive buffer: {buffer // 1024} KiB (net.core.rmem_max caps it)", "debug")
        )
    admission = Admission(options.limits) if options.limits is not None else None
    return Node(
        options.name,
        protocol,
        endpoint,
        log=log,
        recorder=recorder,
        store=store,
        admission=admission,
    )


#: Bytes of receive buffer a small datagram takes (the kernel's bookkeeping: about 830
#: on Linux for an ACK of 60 bytes), with room to spare.
DATAGRAM_FOOTPRINT = 1024


def table_window(endpoint: Endpoint) -> Window:
    """How much of the table's updates the server may have unanswered at once: their ACKs
    may fill half the socket's receive buffer (the rest is for everything else). A
    buffer too small for a burst turns ACKs into drops, retries and clients marked
    offline."""
    size = getattr(endpoint, "receive_buffer", None)
    if not isinstance(size, int):
        return Window()  # an endpoint that does not say (the in-memory network)
    return Window(parts=max(64, size // 2 // DATAGRAM_FOOTPRINT))


def _random_token() -> str:
    return secrets.token_hex(8)


def _client_node(
    options: ClientOptions,
    endpoint: Endpoint,
    recorder: Recorder,
    screen: Screen | None,
    make_screen: Callable[[Node], Screen] | None,
    log: Callable[[Log], None],
) -> Node:
    protocol = ClientProtocol(
        options.name,
        (options.server_ip, options.server_port),
        endpoint.local_address[1],
        timers=options.timers,
        id_prefix=options.id_prefix or options.name + "." + secrets.token_hex(3),
        other_servers=options.other_servers,
    )
    node = Node(options.name, protocol, endpoint, screen=screen, log=log, recorder=recorder)
    if make_screen is not None:
        node.screen = make_screen(node)
    return node


def _argv(options: Options, endpoint: Endpoint) -> list[str]:
    """The command line that would start this node where it listens."""
    port = str(endpoint.local_address[1])
    if isinstance(options, ServerOptions):
        return ["chatapp", "serve", port]
    return ["chatapp", "join", options.name, options.server_ip, str(options.server_port), port]


__all__ = [
    "ClientOptions",
    "Options",
    "ServerOptions",
    "StartupError",
    "open_store",
    "run_node",
]
