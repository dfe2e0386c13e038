"""The benchmarks. Each returns its figures, every one beside a baseline from the same run.

Servers always run in their own process (the real ``chatapp serve``, or a bare
Trio worker for the baseline), and load comes from another, so the two cores
are used as in a real deployment: server on one, clients on the other.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from chatapp import screen
from chatapp.launch import ClientOptions, open_store, run_node
from chatapp.protocol.changes import Change, ClientRecord, ClientSaved, MessageStored, Presence
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.codecs import ClientCodec
from chatapp.protocol.common import Received, Timers
from chatapp.protocol.crypto import Identity, SystemEntropy
from chatapp.protocol.inputs import ClientInput
from chatapp.protocol.mailbox import MAX_MAILBOX_LIMIT
from chatapp.protocol.sealing import PEER_OVERHEAD, Session
from chatapp.protocol.server import ServerProtocol
from chatapp.sqlite_store import SqliteStore
from chatapp.testing import CapturedScreen
from chatapp.trace import NullRecorder
from chatapp.wire import (
    Address,
    Chat,
    Deregister,
    Mailbox,
    SaveMessage,
    Seq,
    StoredItem,
    encode,
)

from . import registrations
from .crypto import bench_crypto
from .fanout import bench_fanout
from .flood import bench_flood
from .loadgen import (
    HOST,
    LoadResult,
    Request,
    SimClient,
    close_clients,
    open_clients,
    register_all,
    register_request,
    run_bursts,
    run_closed_loop,
    settle,
)
from .mutation import bench_mutation
from .procs import (
    STATE_DIR,
    BenchError,
    Worker,
    chatapp_client,
    chatapp_server,
    chatapp_servers,
    cpu_seconds,
    free_port,
    wait_for_file_text,
)
from .report import Figure, median, percentile, unavailable
from .sizes import Sizes, scratch

#: The ACK timeout of the servers the suite starts (they run with the default timers).
ACK_TIMEOUT = Timers().ack_timeout
#: Saves sent at once when measuring a server at saturation: well within the 4 MiB socket
#: buffer a chatapp server asks for (and the bare echo server too).
BURST = 2000
TEXT = "hello nice to meet you."  # the seed's first direct message


# --- direct message round trip ---------------------------------------------------------


async def _ping(sock: trio.socket.SocketType, payload: bytes, port: int) -> float:
    """One datagram to a bare Trio echo worker and its answer back: seconds taken."""
    start = time.perf_counter()
    await sock.sendto(payload, (HOST, port))
    with trio.fail_after(5):
        await sock.recvfrom(65536)
    return time.perf_counter() - start


#: Round trips are measured in blocks, chatapp's and the floor's taking turns, so that a
#: neighbour's burst on a shared machine lands on both alike.
RTT_BLOCK = 50


async def _round_trips(
    server_port: int, echo_port: int, size: int, rounds: int, warmup: int
) -> tuple[list[float], list[float]]:
    """(chatapp's send -> ACK times, the bare ping-pong's times), in alternating blocks."""
    acked = [trio.Event()]
    expected = screen.received_by("user2")

    def on_line(line: str) -> None:
        if line == expected:
            acked[0].set()

    captured = CapturedScreen(on_line)
    send_input, receive_input = trio.open_memory_channel[ClientInput](16)
    state_dir = tempfile.mkdtemp(dir=STATE_DIR)
    options = ClientOptions("user1", HOST, server_port, 0, host=HOST, state_dir=state_dir)
    payload = b"x" * size
    chat: list[float] = []
    floor: list[float] = []

    async def chat_once() -> float:
        acked[0] = trio.Event()
        start = time.perf_counter()
        await send_input.send(f"send user2 {TEXT}")
        with trio.fail_after(5):
            await acked[0].wait()
        elapsed = time.perf_counter() - start
        captured.lines.clear()
        return elapsed

    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind((HOST, 0))
        async with trio.open_nursery() as nursery:
            node = await nursery.start(
                partial(run_node, options, screen=captured, inputs=receive_input)
            )
            assert isinstance(node.protocol, ClientProtocol)
            with trio.fail_after(10):
                while "user2" not in node.protocol.table:
                    await trio.sleep(0.01)
            for _ in range(warmup):
                await chat_once()
                await _ping(sock, payload, echo_port)
            while len(chat) < rounds:
                block = min(RTT_BLOCK, rounds - len(chat))
                chat += [await chat_once() for _ in range(block)]
                floor += [await _ping(sock, payload, echo_port) for _ in range(block)]
            node.stop()
    return chat, floor


def bench_round_trip(sizes: Sizes) -> list[Figure]:
    warmup = max(10, sizes.rtt_rounds // 10)
    # the floor pings the size of a sealed peer datagram: what a direct message weighs
    size = PEER_OVERHEAD + len("user1") + len(encode(Chat("i" * 16, TEXT, bytes(8))))
    with (
        Worker("echo") as echo,
        chatapp_server() as server_port,
        chatapp_client("user2", server_port, free_port()) as (_, screen_file),
    ):
        wait_for_file_text(screen_file, screen.TABLE_UPDATED)
        chat, floor = trio.run(
            _round_trips, server_port, echo.ready["port"], size, sizes.rtt_rounds, warmup
        )
    figures = []
    for name, stat in (("median", median), ("p99", lambda v: percentile(v, 99))):
        figures.append(
            Figure(
                f"rtt_{name}",
                f"direct send -> ACK, {name}",
                stat(chat),
                "s",
                stat(floor),
                f"Trio UDP ping-pong, {size} B",
                "lower",
                goal="<= 2x" if name == "median" else "",
                goal_on="ratio" if name == "median" else "",
                goal_limit=2.0 if name == "median" else None,
                extra={"rounds": len(chat), "payload_bytes": size},
            )
        )
    return figures


# --- server capacity, tracing, the durable mailbox ---------------------------------------


#: What the baseline is sent for a save: a sealed direct message's size of bytes.
_PLAIN_SEALED = b"\x02" + b"x" * 100


def save_request(client: SimClient, msg_id: str) -> bytes:
    """A save of a direct message for the offline "sink" (sealed in the session; in
    plaintext to the echo baseline, which only reflects it)."""
    if client.raw is None:
        return encode(SaveMessage(msg_id, "sink", _PLAIN_SEALED))
    return client.raw.seal(SaveMessage(msg_id, "sink", client.sealed))


def register_sink(server: Address) -> bytes:
    """An offline client ("sink") that every save is addressed to, so each one is stored;
    its key (the saves are sealed for it)."""
    [sink] = open_clients(1, "sink")
    assert sink.raw is not None
    sink.name = sink.raw.name = sink.raw.codec.name = "sink"
    try:
        register_all([sink], server)
        run_closed_loop(
            [sink],
            server,
            lambda c, msg_id: c.raw.seal(Deregister(msg_id, c.name)),  # type: ignore[union-attr]
            window=1,
            duration=5.0,
            repeat=False,
        )
    finally:
        close_clients([sink])
    return sink.raw.identity.public


class Target:
    """A server under load: its simulated clients, and the best rate each phase reached."""

    def __init__(self, port: int, clients: int, register: bool, pid: int | None = None) -> None:
        self.server = (HOST, port)
        self.pid = pid
        self.clients = open_clients(clients, "c", keys=register)
        self.best: dict[str, float] = {}
        self.extra: dict[str, float] = {}
        if register:
            sink = register_sink(self.server)
            register_all(self.clients, self.server)
            for client in self.clients:  # one sealed message each, saved again and again
                assert client.raw is not None
                chat = Chat(client.raw.new_id(), TEXT, bytes(8))
                client.sealed = client.raw.codec.to_peer(sink, chat)

    def load(self, phase: str, request: Request, sizes: Sizes, window: int) -> None:
        before = cpu_seconds(self.pid) if self.pid else None
        exchanged = sum(client.datagrams for client in self.clients)
        result = run_closed_loop(
            self.clients,
            self.server,
            request,
            window=window,
            duration=sizes.load_seconds,
            warmup=0.1,
        )
        after = cpu_seconds(self.pid) if self.pid else None
        _check(result, phase)
        if before is not None and after is not None and result.completed:
            # The server's own CPU per request: steadier than the rate on a shared machine
            # (warm-up requests are few and make it a slight overestimate).
            per_request = (after - before) / result.completed
            key = f"{phase}_server_cpu_us"
            self.extra[key] = min(self.extra.get(key, float("inf")), per_request * 1e6)
        if result.rate > self.best.get(phase, 0.0):
            self.best[phase] = result.rate
            # every datagram to or from the server, over the whole load (warm-up too)
            exchanged = sum(client.datagrams for client in self.clients) - exchanged
            self.extra[f"{phase}_datagrams_per_s"] = exchanged / (result.elapsed + 0.1)
            self.extra[f"{phase}_lost"] = result.lost
            self.extra[f"{phase}_generator_cpu_share"] = result.cpu / max(result.elapsed, 1e-9)
        settle(self.clients, 0.05)
        if phase == "registrations":
            # Each registration made a new session, and the answers to the last ones in
            # flight were not read: register once more so that the saves are accepted.
            register_all(self.clients, self.server)

    def saturate(self, sizes: Sizes) -> None:
        """The server's CPU per save when it always has a queue (see run_bursts)."""
        run_bursts(self.clients, self.server, save_request, bursts=1, size=BURST)  # warm-up
        before = cpu_seconds(self.pid) if self.pid else None
        result = run_bursts(
            self.clients, self.server, save_request, bursts=sizes.bursts, size=BURST
        )
        after = cpu_seconds(self.pid) if self.pid else None
        _check(result, "saturated saves")
        if before is not None and after is not None and result.completed:
            per_request = (after - before) / result.completed * 1e6
            key = "saturated_server_cpu_us"
            self.extra[key] = min(self.extra.get(key, float("inf")), per_request)
        self.best["saturated"] = max(self.best.get("saturated", 0.0), result.rate)
        settle(self.clients, 0.05)

    def close(self) -> None:
        close_clients(self.clients)


def _check(result: LoadResult, phase: str) -> None:
    if result.refused:
        raise BenchError(f"{phase}: the server refused {result.refused} requests")


#: ``PRAGMA synchronous`` answers a number.
_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def _store_pragmas(path: Path) -> dict[str, str]:
    """The journal mode and synchronous setting of a database opened as ``chatapp serve --db``
    opens it (read back from SQLite, so the floor always uses the store's own)."""
    store = open_store(str(path), 0)
    assert isinstance(store, SqliteStore)
    try:
        journal = store.pragma("journal_mode")
        synchronous = store.pragma("synchronous")
    finally:
        store.close()
    return {
        "journal_mode": str(journal).upper(),
        "synchronous": _SYNCHRONOUS.get(int(str(synchronous)), str(synchronous)),
    }


def _sqlite_floor(path: Path, seconds: float, pragmas: dict[str, str]) -> float:
    """Transactions per second of one INSERT each, with the store's pragmas: the disk's floor."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA locking_mode=EXCLUSIVE")  # as chatapp's store opens its file
    db.execute(f"PRAGMA journal_mode={pragmas['journal_mode']}")
    db.execute(f"PRAGMA synchronous={pragmas['synchronous']}")
    db.execute("CREATE TABLE m (seq INTEGER PRIMARY KEY, id TEXT, text TEXT, at REAL)")
    count = 0
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO m (id, text, at) VALUES (?, ?, ?)", (f"i{count}", TEXT, time.time())
        )
        db.execute("COMMIT")
        count += 1
    elapsed = time.monotonic() - start
    db.close()
    return count / elapsed


@dataclass
class _Capacity:
    """What the capacity loads measured: the echo baseline, the three servers, the disk."""

    echo: Target
    plain: Target
    traced: Target
    durable: Target
    floor: float
    pragmas: dict[str, str]


def bench_capacity(sizes: Sizes) -> list[Figure]:
    """Every server runs at once (an idle one costs nothing) and the loads take turns,
    round after round: a neighbour's burst on a shared machine then hits all of them
    alike, and each figure is the best round."""
    with contextlib.ExitStack() as stack:
        measured = _capacity_loads(sizes, stack)
    return [
        *_server_figures(measured, sizes),
        *_tracing_figures(measured),
        _sqlite_figure(measured),
    ]


def _capacity_loads(sizes: Sizes, stack: contextlib.ExitStack) -> _Capacity:
    limit = MAX_MAILBOX_LIMIT  # every save is stored for one offline client: never "mailbox full"
    n = sizes.load_clients
    work = stack.enter_context(scratch())
    echo_worker = stack.enter_context(Worker("echo"))
    started = stack.enter_context(
        chatapp_servers(
            {"mailbox_limit": limit, "unlimited": True},
            {"mailbox_limit": limit, "unlimited": True, "trace": str(work / "trace.jsonl")},
            {"mailbox_limit": limit, "unlimited": True, "db": str(work / "server.sqlite3")},
        )
    )
    servers = dict(zip(("plain", "traced", "sqlite"), started, strict=True))
    echo = Target(echo_worker.ready["port"], n, register=False, pid=echo_worker.proc.pid)
    stack.callback(echo.close)
    targets = {
        name: Target(port, n, register=True, pid=pid) for name, (port, pid) in servers.items()
    }
    for target in targets.values():
        stack.callback(target.close)
    pragmas = _store_pragmas(work / "pragmas.sqlite3")
    for _ in range(sizes.rounds):
        echo.load("saves", save_request, sizes, sizes.window)
        targets["plain"].load("saves", save_request, sizes, sizes.window)
        targets["traced"].load("saves", save_request, sizes, sizes.window)
        targets["plain"].load("registrations", register_request, sizes, 1)
        echo.saturate(sizes)
        targets["plain"].saturate(sizes)
        targets["traced"].saturate(sizes)
    floor = 0.0
    for index in range(2):  # the disk is shared too: take turns, keep the best
        path = work / f"floor{index}.sqlite3"
        floor = max(floor, _sqlite_floor(path, sizes.load_seconds, pragmas))
        targets["sqlite"].load("saves", save_request, sizes, sizes.window)
    return _Capacity(echo, targets["plain"], targets["traced"], targets["sqlite"], floor, pragmas)


def _server_figures(measured: _Capacity, sizes: Sizes) -> list[Figure]:
    plain, echo = measured.plain, measured.echo
    n, rounds = sizes.load_clients, sizes.rounds
    return [
        Figure(
            "server_saves",
            "server: saves + ACKs per second (memory store)",
            plain.best["saves"],
            "req/s",
            echo.best["saves"],
            "Trio UDP echo server",
            "higher",
            goal=">= 0.5x",
            goal_on="ratio",
            goal_limit=0.5,
            extra={
                "clients": n,
                "window": sizes.window,
                "rounds": rounds,
                **plain.extra,
                **{f"echo_{k}": v for k, v in echo.extra.items()},
            },
        ),
        Figure(
            "server_saves_saturated",
            f"server: saves per second, bursts of {BURST} (saturated)",
            plain.best["saturated"],
            "req/s",
            echo.best["saturated"],
            "Trio UDP echo server",
            "higher",
            goal=">= 0.5x",
            goal_on="ratio",
            goal_limit=0.5,
            extra={
                "bursts": sizes.bursts * rounds,
                "server_cpu_us": plain.extra.get("saturated_server_cpu_us"),
                "echo_cpu_us": echo.extra.get("saturated_server_cpu_us"),
            },
        ),
        _registration_figure(measured, n),
    ]


def _registration_figure(measured: _Capacity, n: int) -> Figure:
    """Registrations are not one datagram each: the newcomer's whole table and a delta to
    every other online client go out, and each is ACKed. The figure is the datagrams the
    server handled per second while clients registered again and again, beside the echo
    server's (two per request)."""
    plain, echo = measured.plain, measured.echo
    rate = plain.extra.get("registrations_datagrams_per_s")
    return Figure(
        "server_registrations",
        f"server: datagrams per second while registering ({n} online)",
        rate,
        "dgram/s",
        echo.best["saves"] * 2,
        "Trio UDP echo server (in + out)",
        "higher",
        goal=">= 0.5x",
        goal_on="ratio",
        goal_limit=0.5,
        extra={
            "clients": n,
            "registrations_per_second": plain.best["registrations"],
            "datagrams_per_registration": (rate or 0) / max(plain.best["registrations"], 1e-9),
        },
    )


def _tracing_figures(measured: _Capacity) -> list[Figure]:
    plain, traced = measured.plain, measured.traced
    return [
        Figure(
            "trace_share_saturated",
            f"tracing on: saves per second, bursts of {BURST}",
            traced.best["saturated"],
            "req/s",
            plain.best["saturated"],
            "tracing off",
            "higher",
            goal=">= 0.8x",
            goal_on="ratio",
            goal_limit=0.8,
        ),
        Figure(
            "trace_share",
            "tracing on: saves per second",
            traced.best["saves"],
            "req/s",
            plain.best["saves"],
            "tracing off",
            "higher",
            goal=">= 0.8x",
            goal_on="ratio",
            goal_limit=0.8,
            extra={
                "server_cpu_us_per_save_off": plain.extra.get("saves_server_cpu_us"),
                "server_cpu_us_per_save_on": traced.extra.get("saves_server_cpu_us"),
                "saturated_cpu_us_per_save_off": plain.extra.get("saturated_server_cpu_us"),
                "saturated_cpu_us_per_save_on": traced.extra.get("saturated_server_cpu_us"),
            },
        ),
    ]


def _sqlite_figure(measured: _Capacity) -> Figure:
    pragmas = measured.pragmas
    return Figure(
        "sqlite_saves",
        "SQLite: saves per second, commit before ACK",
        measured.durable.best["saves"],
        "req/s",
        measured.floor,
        f"bare SQLite commits, {pragmas['journal_mode']} synchronous={pragmas['synchronous']}",
        "higher",
        extra={**pragmas, **measured.durable.extra},
    )


# --- delivering stored messages on reg -------------------------------------------------------


def _prepare_db(
    path: Path, clients: list[tuple[str, int, bytes, str]], mailbox: dict[str, list[StoredItem]]
) -> None:
    """A server database with these clients (name, port, key, presence) and stored
    messages, as if a server had run."""
    changes: list[Change] = [
        ClientSaved(name, HOST, port, key, f"sid-{index:04d}".encode(), Presence(presence))
        for index, (name, port, key, presence) in enumerate(clients)
    ]
    changes += [
        MessageStored(recipient, item) for recipient, items in mailbox.items() for item in items
    ]
    store = SqliteStore(str(path))
    try:
        trio.run(store.commit, changes)
    finally:
        store.close()


class _Counting(NullRecorder):
    """Counts the mailbox batches a client receives, and their bytes."""

    def __init__(self) -> None:
        self.batches = 0
        self.bytes = 0

    def received(
        self, node: str, local: Address, peer: Address, data: bytes, seen: Received
    ) -> None:
        if isinstance(seen.message, Mailbox):
            self.batches += 1
            self.bytes += len(data)


async def _reg_delivery(
    server_port: int, port: int, state_dir: str, count: int, recorder: _Counting
) -> float:
    """From the moment alice (offline, with ``count`` stored messages) starts again until
    she has shown them all: her registration brings them, as ``reg`` would (each batch's
    delivery marks written to her state file before its lines are shown)."""
    shown = [0]
    done = trio.Event()

    def on_line(line: str) -> None:
        if line.startswith("("):
            shown[0] += 1
            if shown[0] >= count:
                done.set()

    options = ClientOptions("alice", HOST, server_port, port, host=HOST, state_dir=state_dir)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        node = await nursery.start(
            partial(run_node, options, screen=CapturedScreen(on_line), recorder=recorder)
        )
        with trio.fail_after(60):
            await done.wait()
        elapsed = time.perf_counter() - start
        node.stop()
    return elapsed


async def _stop_and_wait(port: int, rounds: int, request_size: int) -> float:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind((HOST, 0))
    request = b"x" * request_size
    with sock:
        return sum([await _ping(sock, request, port) for _ in range(rounds)])


def _sealed_for_alice(count: int, alice: Identity, bob: Identity) -> list[StoredItem]:
    """``count`` direct messages bob sealed for alice, stored while she was offline."""
    codec = ClientCodec(bob, "bob", lambda name: None, SystemEntropy())
    items = []
    for i in range(count):
        msg_id = f"bob-message-{i:05d}"
        sealed = codec.to_peer(alice.public, Chat(msg_id, f"message {i}: {TEXT}", bytes(8)))
        seq = Seq("bench", i + 1)
        items.append(StoredItem(seq, msg_id, "direct", "bob", 1_700_000_000.0 + i, sealed=sealed))
    return items


def bench_mailbox(sizes: Sizes) -> list[Figure]:
    count = sizes.mailbox_messages
    port = free_port()
    alice, bob = Identity.generate(), Identity.generate()
    items = _sealed_for_alice(count, alice, bob)
    recorder = _Counting()
    with scratch() as work:
        db = work / "server.sqlite3"
        clients = [("alice", port, alice.public, "deregistered")]
        clients.append(("bob", free_port(), bob.public, "deregistered"))
        _prepare_db(db, clients, {"alice": items})
        (work / "keys").mkdir(mode=0o700)
        key_file = work / "keys" / "alice.key"
        key_file.write_bytes(alice.seed)
        key_file.chmod(0o600)
        with chatapp_server(db=str(db)) as server_port:
            elapsed = trio.run(_reg_delivery, server_port, port, str(work), count, recorder)
    batches = max(recorder.batches, 1)
    size = recorder.bytes // batches
    with Worker("echo", reply_size=size) as echo:
        floor = trio.run(_stop_and_wait, echo.ready["port"], batches, 40)
    return [
        Figure(
            "reg_delivery",
            f"back online: {count:,} stored messages shown (SQLite)",
            elapsed,
            "s",
            floor,
            f"Trio stop-and-wait, {batches} x {size} B",
            "lower",
            extra={"messages": count, "batches": recorder.batches, "batch_bytes": size},
        )
    ]


# --- memory per registered client ----------------------------------------------------------


def _records(count: int) -> list[ClientRecord]:
    return [
        ClientRecord(
            f"user{i}",
            (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + i % 60000),
            secrets.token_bytes(32),  # its key
            secrets.token_bytes(8),  # its session's id
        )
        for i in range(count)
    ]


def _traced_bytes(build: object) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()  # type: ignore[operator]
        after = tracemalloc.get_traced_memory()[0]
        del kept
    finally:
        tracemalloc.stop()
    return after - before


def _online_server(records: list[ClientRecord]) -> ServerProtocol:
    """A server whose clients all registered in this epoch, each in a session of its own
    (its key kept by the server), and hold its current table: their records, the
    table's parts and history, and what it knows of their copies."""
    server = ServerProtocol(identity=Identity.generate(), epoch=1)
    for record in records:
        server.roster.add(record)
        session = Session(record.sid, secrets.token_bytes(32), record.name)
        server.codec.sessions[record.sid] = session
    server.roster.close_version()
    for record in records:
        server.followers.held[record.name] = server.roster.version
        server.followers.online(record.name)
    sends = server.followers.updates(server.roster, server.new_id, encode)
    assert not sends  # every one holds the current version: nothing to send
    return server


def bench_memory(sizes: Sizes) -> list[Figure]:
    figures = []
    for count in sizes.memory_clients:

        def chatapp_table(count: int = count) -> object:
            return _online_server(_records(count))

        def plain_table(count: int = count) -> object:
            return {r.name: (r.addr, r.key) for r in _records(count)}

        used = _traced_bytes(chatapp_table) / count
        floor = _traced_bytes(plain_table) / count
        figures.append(
            Figure(
                f"memory_{count}",
                f"server memory per client, {count:,} online",
                used,
                "B",
                floor,
                "dict name -> (addr, key)",
                "lower",
                goal="< 1 KiB",
                goal_on="value",
                goal_limit=1024,
            )
        )
    return figures


# --- replay -----------------------------------------------------------------------------------


#: The replay figures' baseline: not a measurement, the last event's time in the trace.
RECORDED = "the recorded run's length, from the trace"


def bench_replay(sizes: Sizes) -> list[Figure]:
    root = Path.cwd()
    trace = root / "traces" / "test1.jsonl"
    labels = [
        ("replay_virtual", "replay test1.jsonl, virtual", ["--virtual"]),
        ("replay_real", "replay test1.jsonl, real", ["--real"]),
    ]
    if not trace.exists():
        why = "no traces/test1.jsonl here (run from the repository)"
        return [unavailable(key, label, "s", RECORDED, why) for key, label, _ in labels]
    from ..replay.traces import read_trace

    recorded = max((float(event.t) for event in read_trace(str(trace)).events), default=0.0)
    figures = []
    for key, label, flags in labels:
        start = time.perf_counter()
        argv = [sys.executable, "-m", "chatapp_tools.replay", "replay", str(trace), *flags]
        done = subprocess.run(
            argv, capture_output=True, timeout=120, cwd=root, env=dict(os.environ)
        )
        elapsed = time.perf_counter() - start
        ok = done.returncode == 0
        figures.append(
            Figure(
                key,
                label,
                elapsed if ok else None,
                "s",
                recorded,
                RECORDED,
                "lower",
                goal="< 1 s" if key == "replay_virtual" else "",
                goal_on="value" if key == "replay_virtual" else "",
                goal_limit=1.0 if key == "replay_virtual" else None,
                note=""
                if ok
                else f"replay failed (status {done.returncode}):"
                f" {done.stderr.decode(errors='replace').strip()[-200:]}",
            )
        )
    return figures


def bench_floods(sizes: Sizes) -> list[Figure]:
    with scratch() as work:
        short = sizes.flood_junk < 100_000
        return bench_flood(sizes.flood_junk, sizes.flood_registrations, work, short=short)


def bench_pty(sizes: Sizes) -> list[Figure]:
    from .pty_latency import bench_pty_latency

    return bench_pty_latency(max(10, sizes.rtt_rounds // 5))


def bench_registrations(sizes: Sizes) -> list[Figure]:
    levels = registrations.measure_levels(sizes.online, sizes.samples)
    storm = registrations.measure_storm(sizes.storm)
    return [
        *(figure for level in levels for figure in registrations.level_figures(level)),
        registrations.memory_figure(levels[-1]),
        *registrations.storm_figures(storm),
    ]


BENCHMARKS = {
    "rtt": bench_round_trip,
    "crypto": bench_crypto,
    "pty": bench_pty,
    "capacity": bench_capacity,
    "fanout": bench_fanout,
    "memory": bench_memory,
    "mailbox": bench_mailbox,
    "replay": bench_replay,
    "flood": bench_floods,
    "registrations": bench_registrations,
    "mutation": bench_mutation,
}
