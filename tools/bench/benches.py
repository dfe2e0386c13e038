"""The benchmarks. Each returns its figures, every one beside a baseline from the same run.

Servers always run in their own process (the real ``chatapp serve``, or a bare
Trio worker for the baseline), and load comes from another, so the two cores
are used as in a real deployment: server on one, clients on the other.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from chatapp import screen
from chatapp.launch import ClientOptions, open_store, run_node
from chatapp.protocol.changes import Change, ClientRecord, ClientSaved, MessageStored, Presence
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Received, Timers
from chatapp.protocol.inputs import ClientInput
from chatapp.protocol.mailbox import MAX_MAILBOX_LIMIT
from chatapp.protocol.server import ServerProtocol
from chatapp.sqlite_store import SqliteStore
from chatapp.testing import CapturedScreen
from chatapp.trace import NullRecorder
from chatapp.wire import (
    Address,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Deregister,
    Mailbox,
    SaveMessage,
    StoredItem,
    encode,
)

from . import registrations
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
from .procs import (
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

#: The ACK timeout of the servers the suite starts (they run with the default timers).
ACK_TIMEOUT = Timers().ack_timeout
#: Saves sent at once when measuring a server at saturation: well within the 4 MiB socket
#: buffer a chatapp server asks for (and the bare echo server too).
BURST = 2000
TEXT = "hello nice to meet you."  # the seed's first direct message


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark does; one set per mode."""

    rtt_rounds: int
    load_seconds: float
    load_clients: int
    window: int
    fanout: tuple[tuple[int, int], ...]
    fanout_trials: int
    memory_clients: tuple[int, ...]
    mailbox_messages: int
    rounds: int  # capacity: the loads take turns this many times; the best round counts
    bursts: int  # capacity: bursts of BURST saves per round (the saturated figures)
    online: tuple[int, ...]  # registrations: the N one registration is measured at
    samples: int  # registrations: how many at each N
    storm: int  # registrations: how many at once
    flood_junk: int  # flood: junk datagrams from one address
    flood_registrations: int  # flood: registrations from one address


TINY = Sizes(30, 0.2, 8, 2, ((10, 0), (10, 2)), 1, (2000,), 300, 1, 1, (50,), 3, 50, 20_000, 1_000)
QUICK = Sizes(
    300,
    0.5,
    32,
    4,
    ((10, 0), (100, 0), (1000, 0), (1000, 10), (1000, 100)),
    1,
    (10_000,),
    10_000,
    2,
    4,
    (1000, 5000),
    3,
    5000,
    200_000,
    5_000,
)
FULL = Sizes(
    2000,
    3.0,
    32,
    4,
    tuple((n, d) for n in (10, 100, 1000) for d in (0, 10, 100)),
    3,
    (10_000, 100_000),
    10_000,
    3,
    15,
    (1000, 5000, 10_000),
    10,
    10_000,
    1_000_000,
    20_000,
)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatapp-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
    options = ClientOptions("user1", HOST, server_port, 0, host=HOST, id_prefix="user1.bench")
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
    size = len(encode(Chat("user1.bench.1234567.1", "user1", TEXT)))
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


def _save_request(client: SimClient, msg_id: str) -> bytes:
    return encode(SaveMessage(msg_id, client.name, "sink", TEXT, client.token or "t"))


def _register_sink(server: Address) -> None:
    """An offline client ("sink") that every save is addressed to, so each one is stored."""
    [sink] = open_clients(1, "sink")
    sink.name = "sink"
    try:
        register_all([sink], server)
        run_closed_loop(
            [sink],
            server,
            lambda c, msg_id: encode(Deregister(msg_id, c.name, c.token)),
            window=1,
            duration=5.0,
            repeat=False,
        )
    finally:
        close_clients([sink])


class _Target:
    """A server under load: its simulated clients, and the best rate each phase reached."""

    def __init__(self, port: int, clients: int, register: bool, pid: int | None = None) -> None:
        self.server = (HOST, port)
        self.pid = pid
        self.clients = open_clients(clients, "c")
        self.best: dict[str, float] = {}
        self.extra: dict[str, float] = {}
        if register:
            _register_sink(self.server)
            register_all(self.clients, self.server)

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
            # Each registration gave a new token, and the answers to the last ones in flight
            # were not read: register once more so that the saves that follow are accepted.
            register_all(self.clients, self.server)

    def saturate(self, sizes: Sizes) -> None:
        """The server's CPU per save when it always has a queue (see run_bursts)."""
        run_bursts(self.clients, self.server, _save_request, bursts=1, size=BURST)  # warm-up
        before = cpu_seconds(self.pid) if self.pid else None
        result = run_bursts(
            self.clients, self.server, _save_request, bursts=sizes.bursts, size=BURST
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

    echo: _Target
    plain: _Target
    traced: _Target
    durable: _Target
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
    scratch = stack.enter_context(_scratch())
    echo_worker = stack.enter_context(Worker("echo"))
    started = stack.enter_context(
        chatapp_servers(
            {"mailbox_limit": limit, "unlimited": True},
            {"mailbox_limit": limit, "unlimited": True, "trace": str(scratch / "trace.jsonl")},
            {"mailbox_limit": limit, "unlimited": True, "db": str(scratch / "server.sqlite3")},
        )
    )
    servers = dict(zip(("plain", "traced", "sqlite"), started, strict=True))
    echo = _Target(echo_worker.ready["port"], n, register=False, pid=echo_worker.proc.pid)
    stack.callback(echo.close)
    targets = {
        name: _Target(port, n, register=True, pid=pid) for name, (port, pid) in servers.items()
    }
    for target in targets.values():
        stack.callback(target.close)
    pragmas = _store_pragmas(scratch / "pragmas.sqlite3")
    for _ in range(sizes.rounds):
        echo.load("saves", _save_request, sizes, sizes.window)
        targets["plain"].load("saves", _save_request, sizes, sizes.window)
        targets["traced"].load("saves", _save_request, sizes, sizes.window)
        targets["plain"].load("registrations", register_request, sizes, 1)
        echo.saturate(sizes)
        targets["plain"].saturate(sizes)
        targets["traced"].saturate(sizes)
    floor = 0.0
    for index in range(2):  # the disk is shared too: take turns, keep the best
        path = scratch / f"floor{index}.sqlite3"
        floor = max(floor, _sqlite_floor(path, sizes.load_seconds, pragmas))
        targets["sqlite"].load("saves", _save_request, sizes, sizes.window)
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
    path: Path, clients: list[tuple[str, int, str, str]], mailbox: dict[str, list[StoredItem]]
) -> None:
    """A server database with these clients and stored messages, as if a server had run."""
    changes: list[Change] = [
        ClientSaved(name, HOST, port, token, Presence(presence))
        for name, port, token, presence in clients
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
    server_port: int, port: int, token: str, count: int, recorder: _Counting
) -> float:
    """From the moment alice (offline, with ``count`` stored messages) starts again until
    she has shown them all: her registration brings them, as ``reg`` would."""
    shown = [0]
    done = trio.Event()

    def on_line(line: str) -> None:
        if line.startswith("("):
            shown[0] += 1
            if shown[0] >= count:
                done.set()

    options = ClientOptions("alice", HOST, server_port, port, host=HOST, id_prefix="alice.bench")
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


def bench_mailbox(sizes: Sizes) -> list[Figure]:
    count = sizes.mailbox_messages
    token = secrets.token_hex(8)
    port = free_port()
    items = [
        StoredItem(f"bob.{i}", "direct", "bob", f"message {i}: {TEXT}", 1_700_000_000.0 + i)
        for i in range(count)
    ]
    recorder = _Counting()
    with _scratch() as scratch:
        db = scratch / "server.sqlite3"
        _prepare_db(db, [("alice", port, token, "deregistered")], {"alice": items})
        with chatapp_server(db=str(db)) as server_port:
            elapsed = trio.run(_reg_delivery, server_port, port, token, count, recorder)
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


# --- channel fan-out ----------------------------------------------------------------------------


def _poll(receivers: Worker, sender: SimClient, done: object, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        report = receivers.command('{"do": "report"}')
        if done(report) or time.monotonic() > deadline:  # type: ignore[operator]
            return report  # type: ignore[no-any-return]
        settle([sender], 0.01)  # the sender is a client too: it ACKs its tables meanwhile


def _wait_quiet(receivers: Worker, sender: SimClient, quiet: float = ACK_TIMEOUT + 0.1) -> int:
    """Until no table has reached a receiver for ``quiet`` s (longer than one retry interval),
    so that a trial starts with no table broadcast or retry in flight; returns the tables seen."""
    receivers.command('{"do": "reset"}')
    start = time.monotonic()
    deadline = start + 15.0
    while time.monotonic() < deadline:
        report = receivers.command('{"do": "report"}')
        if time.monotonic() - max(report["table_last"], start) >= quiet:
            return int(report["tables"])
        settle([sender], 0.05)
    raise BenchError("the server kept sending tables: some clients do not ACK them")


def _fanout_trial(
    receivers: Worker, sender: SimClient, target: Address, n: int, d: int, floor: bool
) -> tuple[float, float]:
    """Seconds from the post to the last live ACK or (with dead clients) the server's give-up,
    and to the last table part that reports the dead offline."""
    receivers.command('{"do": "reset"}')
    msg_id = sender.next_id()
    if floor:
        data = encode(ChannelDelivery(msg_id, sender.name, TEXT))
    else:
        data = encode(ChannelPost(msg_id, sender.name, TEXT, sender.token))
    start = time.monotonic()
    sender.sock.sendto(data, target)

    def done(report: dict[str, object]) -> bool:
        acks = report["acks"].get(msg_id)  # type: ignore[attr-defined]
        live_done = acks is not None and acks[0] >= n
        return live_done and (floor or d == 0 or report["table_first"] > start)  # type: ignore[operator]

    report = _poll(receivers, sender, done, 5.0)
    acks = report["acks"].get(msg_id)  # type: ignore[attr-defined]
    if acks is None or acks[0] < n or not done(report):
        got = 0 if acks is None else acks[0]
        raise BenchError(
            f"fan-out to {n} (+{d} dead{', floor' if floor else ''}) did not complete:"
            f" {got} ACKs, tables {report['tables']}"
        )
    end = acks[2]
    tables = end
    if d and not floor:
        end = max(end, report["table_first"])
        tables = max(end, report["table_last"])
    return end - start, tables - start


def _fanout_figure(
    n: int, d: int, results: list[tuple[float, float]], floor: float, false_offline: int
) -> Figure:
    if d:
        strict = (n, d) == (1000, 100)  # the bound; elsewhere "about one timeout"
        goal = "~1 timeout" + ("; < 0.7 s" if strict else "")
        limit = 0.7 if strict else ACK_TIMEOUT * 1.5
        return Figure(
            f"fanout_n{n}_d{d}",
            f"send_all -> done, N={n} D={d}",
            median([r[0] for r in results]),
            "s",
            floor + ACK_TIMEOUT,
            f"Trio fan-out + 1 ACK timeout, {ACK_TIMEOUT:g} s",
            "lower",
            goal=goal,
            goal_on="value",
            goal_limit=limit,
            extra={
                "trials": len(results),
                "table_settled_s": median([r[1] for r in results]),
                "ack_timeout_s": ACK_TIMEOUT,
            },
        )
    return Figure(
        f"fanout_n{n}_d0",
        f"send_all -> done, N={n} D=0",
        median([r[0] for r in results]),
        "s",
        floor,
        "Trio fan-out",
        "lower",
        goal="~N x 1 datagram",
        note="the server lost ACKs and marked live clients offline" if false_offline else "",
        extra={"trials": len(results), "tables_after": false_offline},
    )


def bench_fanout(sizes: Sizes) -> list[Figure]:
    max_n = max(n for n, _ in sizes.fanout)
    max_d = max(d for _, d in sizes.fanout)
    figures: list[Figure] = []
    with (
        Worker("receivers", live=max_n, dead=max_d) as receivers,
        _scratch() as scratch,
        Worker("fanout") as floor_worker,
    ):
        live, dead = receivers.ready["live"], receivers.ready["dead"]
        floors: dict[int, float] = {}
        [sender] = open_clients(1, "sender")
        sender.name = "sender"
        try:
            for n in sorted({n for n, _ in sizes.fanout}):
                floor_worker.command(f'{{"targets": {live[:n]}}}')
                target = (HOST, floor_worker.ready["port"])
                floor_times = [
                    _fanout_trial(receivers, sender, target, n, 0, True)[0]
                    for _ in range(3 * sizes.fanout_trials)
                ]
                floors[n] = median(floor_times)
            for index, (n, d) in enumerate(sizes.fanout):
                sender.token = secrets.token_hex(8)
                clients = [("sender", sender.port, sender.token, "online")]
                clients += [(f"live{i}", p, f"tl{i}", "online") for i, p in enumerate(live[:n])]
                clients += [(f"dead{i}", p, f"td{i}", "online") for i, p in enumerate(dead[:d])]
                results = []
                false_offline = 0
                # With dead clients, each trial has a server of its own: bringing a hundred
                # dead clients back would cost a hundred table broadcasts to everyone.
                server_runs = sizes.fanout_trials if d else 1
                trial_count = 1 if d else 3 * sizes.fanout_trials
                for run in range(server_runs):
                    db = scratch / f"fanout{index}-{run}.sqlite3"
                    _prepare_db(db, clients, {})
                    with chatapp_server(db=str(db)) as port:
                        _wait_quiet(receivers, sender)  # a restarted server sends the table
                        if d:
                            receivers.command('{"do": "die"}')
                        for _ in range(trial_count):
                            results.append(
                                _fanout_trial(receivers, sender, (HOST, port), n, d, False)
                            )
                        receivers.command(f'{{"do": "revive", "port": {port}, "count": 0}}')
                        # With no dead clients, no table may follow: one would mean that the
                        # server missed live ACKs and marked live clients offline.
                        if not d and sizes.fanout_trials > 1:  # a quiet wait: full runs only
                            false_offline = _wait_quiet(receivers, sender)
                figures.append(_fanout_figure(n, d, results, floors[n], false_offline))
        finally:
            close_clients([sender])
    return figures


# --- memory per registered client ----------------------------------------------------------


def _records(count: int) -> list[ClientRecord]:
    return [
        ClientRecord(
            f"user{i}",
            (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + i % 60000),
            secrets.token_hex(8),
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
    """A server whose clients all registered in this epoch and hold its current table:
    their records, the table's parts and history, and what it knows of their copies."""
    server = ServerProtocol(id_prefix="s", epoch=1)
    for record in records:
        server.roster.add(record)
    server.roster.close_version()
    for record in records:
        server.followers.held[record.name] = server.roster.version
        server.followers.online(record.name)
    ids = iter(range(len(records) + 1))
    sends = server.followers.updates(server.roster, lambda: f"s.{next(ids)}", server.codec.encode)
    assert not sends  # every one holds the current version: nothing to send
    return server


def bench_memory(sizes: Sizes) -> list[Figure]:
    figures = []
    for count in sizes.memory_clients:

        def chatapp_table(count: int = count) -> object:
            return _online_server(_records(count))

        def plain_table(count: int = count) -> object:
            return {r.name: (r.addr, r.token) for r in _records(count)}

        used = _traced_bytes(chatapp_table) / count
        floor = _traced_bytes(plain_table) / count
        figures.append(
            Figure(
                f"memory_{count}",
                f"server memory per client, {count:,} online",
                used,
                "B",
                floor,
                "dict name -> (addr, token)",
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
    with _scratch() as scratch:
        short = sizes.flood_junk < 100_000
        return bench_flood(sizes.flood_junk, sizes.flood_registrations, scratch, short=short)


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


def bench_pg(sizes: Sizes) -> list[Figure]:
    from .postgres import bench_postgres

    return bench_postgres(
        sizes.load_seconds, sizes.load_clients, sizes.window, sizes.rounds, sizes.rtt_rounds // 4
    )


def bench_multiserver(sizes: Sizes) -> list[Figure]:
    from .multiserver import bench_servers

    clients = min(600, max(9, sizes.rtt_rounds // 2))
    return bench_servers(clients, 3 * sizes.fanout_trials, sizes.load_seconds)


BENCHMARKS = {
    "rtt": bench_round_trip,
    "pty": bench_pty,
    "capacity": bench_capacity,
    "fanout": bench_fanout,
    "memory": bench_memory,
    "mailbox": bench_mailbox,
    "replay": bench_replay,
    "flood": bench_floods,
    "registrations": bench_registrations,
    "postgres": bench_pg,
    "servers": bench_multiserver,
}
