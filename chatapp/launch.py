"""Starting a node: the one function that turns options into a running server or client.

``run_node`` binds the endpoint, builds the state machine, opens what the
options name (the database, the trace) and runs the node until it exits; with
``nursery.start`` it hands over the ``Node`` once its tasks run. The command
line, the demo and scenarios, the replay, the benchmarks and the tests all
start nodes with it; they differ only in the network, the screen, the log and
the recorder they pass, and in the options that fix what a real run leaves to
chance (the seed of the node's randomness, the epoch, the wall clock) or reads
from disk (a client's state directory, or the state it starts from).

A node that records a trace draws its randomness from a seeded generator and
writes the seed, and what it read from disk, into the trace: a replay given
them sends the same bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import trio

from chatapp.net import UDP, Endpoint, Network, SendFaults
from chatapp.node import Input, Node, Screen
from chatapp.protocol.admission import Admission, Limits
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Log, Timers
from chatapp.protocol.crypto import (
    KEY_BYTES,
    Entropy,
    Identity,
    SeededEntropy,
    SystemEntropy,
    b64,
    fingerprint,
)
from chatapp.protocol.mailbox import DEFAULT_MAILBOX_LIMIT
from chatapp.protocol.server import ServerProtocol
from chatapp.protocol.tables import Window
from chatapp.statefiles import (
    PINS_FILE,
    ClientFiles,
    StateError,
    default_state_dir,
    load_identity,
    read_pins,
)
from chatapp.store import MemoryStore, Store
from chatapp.trace import JsonlRecorder, NullRecorder, Recorder
from chatapp.wire import fmt_addr


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
    epoch: int | None = None
    wall_offset: float | None = None  # trio.current_time() + this = Unix time
    entropy_seed: bytes | None = None  # the seed of the node's randomness (a replay's)


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
    state_dir: str | None = None  # None: $XDG_STATE_HOME/chatapp
    entropy_seed: bytes | None = None  # the seed of the node's randomness (a replay's)
    # A replay's: what the recorded client read from disk; then nothing is read.
    start_from: ClientStart | None = None
    #: Servers sharing the first one's database, moved to in turn when it stops answering.
    other_servers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ClientStart:
    """What a client reads from its state directory when it starts."""

    key: bytes  # the seed of its Ed25519 key
    pinned: bytes | None = None  # the key pinned for its server
    marks: dict[bytes, dict[str, int]] = field(default_factory=dict)


Options = ServerOptions | ClientOptions


def open_store(db: str | None, port: int) -> Store:
    if db == ":memory:":
        return MemoryStore()
    if db is not None and db.startswith(("postgresql://", "postgres://")):
        return _open_postgres(db, port)
    from chatapp.sqlite_store import SqliteStore, default_db_path

    path = db or default_db_path(port)
    try:
        return SqliteStore(path)
    except Exception as exc:  # sqlite3.Error, OSError: any reason the file cannot be used
        raise StartupError(f"cannot open the database {path}: {exc}") from None


def _open_postgres(url: str, port: int) -> Store:
    """A PostgreSQL database: connected, migrated and read before the server starts."""
    # Imported here: a client, or a server on SQLite, never loads psycopg.
    from chatapp.pg_store import PgStore, server_id

    store = PgStore(url, server_id(port))
    try:
        store.open()
    except Exception as exc:  # psycopg.Error, OSError: any reason the database cannot be used
        store.close()
        line = str(exc).strip().replace("\n", " ")
        raise StartupError(f"cannot use the database {_without_password(url)}: {line}") from None
    return store


def _without_password(url: str) -> str:
    """``url`` as it may be shown: a password in it replaced by ``***``."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


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
    faults: SendFaults | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run the node that ``options`` describe until it exits; its exit status.

    ``store`` (a server's) and ``recorder`` default to what the options name, and
    what is opened here is closed here; the endpoint is always closed at the end.
    A client shows its lines on ``screen``, or on the one ``make_screen`` builds for
    the node once the endpoint is bound (a terminal's input line starts then, completes
    names from the state machine's table and hands typed lines to ``Node.take_input``),
    and reads ``inputs``. ``argv`` is what the trace says started the node; ``faults``
    (tests, scenarios, replays) are injected where it sends.
    """
    log = log or _ignore
    async with AsyncExitStack() as resources:
        endpoint = await _listen(network, options)
        resources.callback(endpoint.close)
        if recorder is None:
            recorder = _open_recorder(options)
            resources.callback(recorder.close)
        entropy, seed = _entropy(options, recorder)
        if isinstance(options, ServerOptions):
            if store is None:
                store = open_store(options.db, options.port)
                resources.callback(store.close)
            node = _server_node(options, endpoint, store, recorder, log, entropy, seed)
        else:
            node = _client_node(options, endpoint, recorder, log, entropy, seed)
            node.screen = make_screen(node) if make_screen is not None else screen
        argv = argv if argv is not None else _argv(options, endpoint)
        node.faults = faults
        if _is_shared(store):
            return await _run_shared(node, inputs, argv, log, task_status)
        status = await node.run(inputs, argv=argv, task_status=task_status)
    return status


def _is_shared(store: Store | None) -> bool:
    """Whether ``store`` is a database other servers may share (PostgreSQL)."""
    return store is not None and hasattr(store, "snapshot") and hasattr(store, "sweep")


async def _run_shared(
    node: Node,
    inputs: trio.MemoryReceiveChannel[Input] | None,
    argv: list[str],
    log: Callable[[Log], None],
    task_status: trio.TaskStatus[Node],
) -> int:
    """A server node with the tasks that keep it in step with the other servers."""
    from chatapp.pg_store import PgStore
    from chatapp.shared import SharedLink

    assert isinstance(node.store, PgStore)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(SharedLink(node.store, node, log).run)
        status = await node.run(inputs, argv=argv, task_status=task_status)
        nursery.cancel_scope.cancel()
    return status


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


def _entropy(options: Options, recorder: Recorder) -> tuple[Entropy, bytes | None]:
    """The node's randomness: the system's, unless it records a trace (then a generator
    seeded from the system, whose seed goes into the trace) or replays one."""
    seed = options.entropy_seed
    if seed is None and not isinstance(recorder, NullRecorder):
        seed = os.urandom(KEY_BYTES)
    return (SeededEntropy(seed), seed) if seed is not None else (SystemEntropy(), None)


def _server_node(
    options: ServerOptions,
    endpoint: Endpoint,
    store: Store,
    recorder: Recorder,
    log: Callable[[Log], None],
    entropy: Entropy,
    seed: bytes | None,
) -> Node:
    disk = store.load()
    identity = Identity(disk.key)
    protocol = ServerProtocol(
        identity=identity,
        entropy=entropy,
        timers=options.timers,
        epoch=time.time_ns() // 1_000_000 if options.epoch is None else options.epoch,
        wall_offset=(
            time.time() - trio.current_time()
            if options.wall_offset is None
            else options.wall_offset
        ),
        mailbox_limit=options.mailbox_limit,
        origin=disk.origin,
        last_n=disk.last_n,
        table_window=table_window(endpoint),
    )
    protocol.restore(disk.clients, disk.mailbox, disk.elsewhere)
    recorder.restored(options.name, disk)  # a replay starts from the same state
    waiting = sum(len(items) for items in disk.mailbox.values())
    log(
        Log(
            f"chatapp server listening on UDP {options.host}:{endpoint.local_address[1]}"
            f" ({len(disk.clients)} known clients, {waiting} stored messages;"
            f" key {fingerprint(identity.public)}); Ctrl-C stops it"
        )
    )
    buffer = getattr(endpoint, "receive_buffer", None)
    if buffer is not None:
        log(
            Log(f"socket receive buffer: {buffer // 1024} KiB (net.core.rmem_max caps it)", "debug")
        )
    admission = Admission(options.limits) if options.limits is not None else None
    started = {"seed": b64(seed), "settings": settings_of(options)} if seed is not None else {}
    return Node(
        options.name,
        protocol,
        endpoint,
        log=log,
        recorder=recorder,
        store=store,
        admission=admission,
        started=started,
    )


def _client_start(options: ClientOptions, files: ClientFiles) -> ClientStart:
    if options.start_from is not None:
        return options.start_from
    try:
        identity, _ = load_identity(files.state_dir, options.name)
        pinned = read_pins(files.state_dir).get(fmt_addr((options.server_ip, options.server_port)))
        marks = files.load_marks([pinned] if pinned is not None else [])
    except StateError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot use the state directory {files.state_dir}: {exc}") from None
    return ClientStart(identity.seed, pinned, marks)


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


def _client_node(
    options: ClientOptions,
    endpoint: Endpoint,
    recorder: Recorder,
    log: Callable[[Log], None],
    entropy: Entropy,
    seed: bytes | None,
) -> Node:
    state_dir = Path(options.state_dir) if options.state_dir else default_state_dir()
    files = ClientFiles(state_dir, options.name)
    start = _client_start(options, files)
    protocol = ClientProtocol(
        options.name,
        (options.server_ip, options.server_port),
        endpoint.local_address[1],
        identity=Identity(start.key),
        entropy=entropy,
        pinned=start.pinned,
        marks={key: dict(marks) for key, marks in start.marks.items()},
        timers=options.timers,
        pins_file=str(state_dir / PINS_FILE),
        other_servers=options.other_servers,
    )
    started: dict[str, object] = {}
    if seed is not None:  # the trace holds what a replay needs: secrets (it says so)
        started = {
            "seed": b64(seed),
            "key": b64(start.key),
            "pinned": b64(start.pinned) if start.pinned else "",
            "marks": {b64(key): marks for key, marks in start.marks.items()},
            "settings": settings_of(options),
        }
    return Node(
        options.name, protocol, endpoint, log=log, recorder=recorder, store=files, started=started
    )


def settings_of(options: Options) -> dict[str, float | int | None]:
    """What a node runs with, as a trace's ``start`` event records it: the timers, and a
    server's mailbox limit and admission limits (None: no limit)."""
    settings: dict[str, float | int | None] = {
        "ack_timeout": options.timers.ack_timeout,
        "tries": options.timers.tries,
    }
    if isinstance(options, ServerOptions):
        settings["mailbox_limit"] = options.mailbox_limit
        limits = dataclasses.asdict(options.limits) if options.limits is not None else {}
        for key, value in limits.items():
            settings[key] = None if value == math.inf else value
        if options.limits is None:
            settings["limits"] = None
    return settings


def _join_limit_argv(limits: Limits | None) -> list[str]:
    """``--join-limit N`` for admission limits that differ from the default only there (as
    ``chatapp serve --join-limit N`` sets them: N registrations, two handshake steps each)."""
    if limits is None or limits.handshakes_per_ip_burst == Limits().handshakes_per_ip_burst:
        return []
    return ["--join-limit", str(int(limits.handshakes_per_ip_burst) // 2)]


def _argv(options: Options, endpoint: Endpoint) -> list[str]:
    """The command line that would start this node where it listens."""
    port = str(endpoint.local_address[1])
    if isinstance(options, ServerOptions):
        limit = options.mailbox_limit
        more = ["--mailbox-limit", str(limit)] if limit != DEFAULT_MAILBOX_LIMIT else []
        return ["chatapp", "serve", port, *more, *_join_limit_argv(options.limits)]
    others = [arg for ip, p in options.other_servers for arg in ("--server", f"{ip}:{p}")]
    return [
        "chatapp",
        "join",
        options.name,
        options.server_ip,
        str(options.server_port),
        port,
        *others,
    ]


__all__ = [
    "ClientOptions",
    "ClientStart",
    "Options",
    "ServerOptions",
    "StartupError",
    "open_store",
    "run_node",
    "settings_of",
]
