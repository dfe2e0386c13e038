"""The PostgreSQL benchmarks (``--only postgres,servers``; not in the default run: each
starts a throwaway PostgreSQL cluster, with PostgreSQL's durable settings).

- ``postgres``: saves per second against ``chatapp serve --db postgresql://...``
  beside a bare psycopg INSERT loop on the same cluster and beside a server on
  SQLite (the loads take turns), and one client's save -> saved answer beside one
  bare INSERT transaction.
- ``servers``: three servers sharing one database with N simulated clients spread
  over them, against one server with all N on a database of its own: registrations
  (every client at once), ``send_all`` until every other client has it, and saves
  for an offline client of another server.
"""

from __future__ import annotations

import contextlib
import selectors
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from chatapp.protocol.mailbox import MAX_MAILBOX_LIMIT
from chatapp.testing.postgres import (
    DURABLE_SETTINGS,
    PgServer,
    ServerBinariesMissing,
    throwaway_server,
)
from chatapp.wire import ChannelDelivery, Chat, Mailbox, NotStored, Relay, Table, TableDelta

from .benches import TEXT, Target, register_sink, save_request
from .loadgen import HOST, SimClient, close_clients, open_clients, register_all, run_closed_loop
from .procs import BenchError, chatapp_servers
from .report import Figure, median, unavailable
from .sizes import Sizes, scratch

_SERVE: dict[str, Any] = {"mailbox_limit": MAX_MAILBOX_LIMIT, "unlimited": True}


@contextlib.contextmanager
def _cluster() -> Iterator[PgServer]:
    with throwaway_server(settings=DURABLE_SETTINGS) as cluster:
        yield cluster


def _missing(key: str, label: str, unit: str, why: str) -> list[Figure]:
    return [unavailable(key, label, unit, "-", f"no PostgreSQL server here: {why}")]


# --- one server on PostgreSQL ----------------------------------------------------------------


def _insert_loop(url: str, seconds: float) -> float:
    """Transactions per second of one INSERT each, through psycopg, one connection."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS m (seq bigserial PRIMARY KEY, id text, text text, at float)"
        )
        count = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO m (id, text, at) VALUES (%s, %s, %s)",
                    (f"i{count}", TEXT, time.time()),
                )
            count += 1
        return count / (time.monotonic() - start)


def _stacked(
    bench: Callable[[Sizes, contextlib.ExitStack], list[Figure]],
    sizes: Sizes,
    missing: tuple[str, str, str],
) -> list[Figure]:
    """BENCH with a stack that closes what it started; without PostgreSQL's binaries,
    the figure MISSING (key, label, unit) saying why."""
    try:
        with contextlib.ExitStack() as stack:
            return bench(sizes, stack)
    except ServerBinariesMissing as exc:
        return _missing(*missing, str(exc))


def bench_postgres(sizes: Sizes) -> list[Figure]:
    return _stacked(_postgres, sizes, ("pg_saves", "PostgreSQL: saves per second", "req/s"))


def _postgres(sizes: Sizes, stack: contextlib.ExitStack) -> list[Figure]:
    cluster = stack.enter_context(_cluster())
    work = stack.enter_context(scratch())
    chat_url, bare_url = cluster.create_database("chat"), cluster.create_database("bare")
    started = stack.enter_context(
        chatapp_servers({**_SERVE, "db": chat_url}, {**_SERVE, "db": str(work / "s.sqlite3")})
    )
    pg, sqlite = (Target(port, sizes.load_clients, True, pid) for port, pid in started)
    stack.callback(pg.close)
    stack.callback(sqlite.close)
    floor = 0.0
    for _ in range(sizes.rounds):  # the loads take turns; each keeps its best round
        pg.load("saves", save_request, sizes, sizes.window)
        sqlite.load("saves", save_request, sizes, sizes.window)
        floor = max(floor, _insert_loop(bare_url, sizes.load_seconds))
    one = run_closed_loop(
        pg.clients[:1], pg.server, save_request, window=1, duration=sizes.load_seconds * 2
    )
    bare_one = _insert_loop(bare_url, sizes.load_seconds)
    n = sizes.load_clients
    return [
        Figure(
            "pg_saves", "PostgreSQL: saves per second, commit before answer",
            pg.best["saves"], "req/s", floor, "bare psycopg INSERT loop, same cluster",
            "higher", extra={"clients": n, "window": sizes.window, **DURABLE_SETTINGS},
        ),
        Figure(
            "pg_saves_vs_sqlite", "PostgreSQL: saves per second, against SQLite",
            pg.best["saves"], "req/s", sqlite.best["saves"], "the same load, server on SQLite",
            "higher", extra={"clients": n, "window": sizes.window},
        ),
        Figure(
            "pg_save_latency", "PostgreSQL: save -> saved answer, mean (one at a time)",
            1000 / one.rate if one.rate else None, "ms", 1000 / bare_one if bare_one else None,
            "one bare INSERT transaction, mean", "lower", extra={"saves": one.completed},
        ),
    ]  # fmt: skip


# --- three servers on one database ----------------------------------------------------------


def bench_servers(sizes: Sizes) -> list[Figure]:
    missing = ("servers_registrations", "3 servers: registrations", "reg/s")
    return _stacked(_servers, sizes, missing)


class _Deployment:
    """Servers (one, or three sharing a database) and N simulated clients spread over them
    round-robin (each group named apart: one name, one key)."""

    def __init__(self, ports: list[int], n: int) -> None:
        self.servers = [(HOST, port) for port in ports]
        self.groups = [
            open_clients(len(range(i, n, len(ports))), f"s{i}c") for i in range(len(ports))
        ]

    @property
    def clients(self) -> list[SimClient]:
        return [client for group in self.groups for client in group]

    def register(self) -> float:
        """Every client registers at its server, all servers at once: seconds to the last."""
        threads = [
            threading.Thread(target=register_all, args=(group, server))
            for group, server in zip(self.groups, self.servers, strict=True)
        ]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if any(c.raw is None or not c.raw.registered for c in self.clients):
            raise BenchError("not every simulated client was registered")
        return time.monotonic() - start

    def send_all(self, timeout: float = 10.0) -> float:
        """The first client posts; seconds until every other client has the message."""
        poster, others = self.groups[0][0], [c for c in self.clients][1:]
        assert poster.raw is not None
        waiting = {client.name for client in others}
        selector = selectors.DefaultSelector()
        for client in self.clients:
            selector.register(client.sock, selectors.EVENT_READ, client)
        start = time.monotonic()
        poster.sock.sendto(poster.raw.post("bench"), self.servers[0])
        try:
            while waiting and time.monotonic() - start < timeout:
                for key, _ in selector.select(0.05):
                    waiting -= _drain(key.data)
        finally:
            selector.close()
        if waiting:
            raise BenchError(f"send_all: {len(waiting)} clients never got the message")
        return time.monotonic() - start

    def saves_to_another_server(self, sizes: Sizes) -> float:
        """Clients of the first server save for an offline client of the last one."""
        sink = register_sink(self.servers[-1])
        savers = self.groups[0][:16]
        for client in savers:
            assert client.raw is not None
            client.sealed = client.raw.codec.to_peer(
                sink, Chat(client.raw.new_id(), TEXT, bytes(8))
            )
        result = run_closed_loop(
            savers, self.servers[0], save_request, window=sizes.window,
            duration=sizes.load_seconds, warmup=0.1,
        )  # fmt: skip
        if result.refused:
            raise BenchError(f"saves: {result.refused} refused")
        return result.rate

    def close(self) -> None:
        for group in self.groups:
            close_clients(group)


def _drain(client: SimClient) -> set[str]:
    """ACK what waits on ``client``'s socket; its name if a channel message came."""
    raw = client.raw
    assert raw is not None
    got: set[str] = set()
    while True:
        try:
            data, addr = client.sock.recvfrom(65536)
        except BlockingIOError:
            return got
        message = raw.open(data)
        if isinstance(message, Table | TableDelta):
            client.sock.sendto(raw.table_ack(message), addr)
        elif isinstance(message, ChannelDelivery | Mailbox | Relay | NotStored):
            client.sock.sendto(raw.ack(message.id), addr)
            if isinstance(message, ChannelDelivery):
                got.add(client.name)


def _servers(sizes: Sizes, stack: contextlib.ExitStack) -> list[Figure]:
    cluster = stack.enter_context(_cluster())
    shared, single = cluster.create_database("shared"), cluster.create_database("single")
    started = stack.enter_context(
        chatapp_servers(*({**_SERVE, "db": shared} for _ in range(3)), {**_SERVE, "db": single})
    )
    n = 3 * sizes.load_clients
    three = _Deployment([port for port, _ in started[:3]], n)
    one = _Deployment([started[3][0]], n)
    stack.callback(three.close)
    stack.callback(one.close)
    registered = (three.register(), one.register())
    posts: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(3, sizes.rounds)):
        posts[0].append(three.send_all())
        posts[1].append(one.send_all())
    saves = (three.saves_to_another_server(sizes), one.saves_to_another_server(sizes))
    extra = {"clients": n, "servers": 3}
    return [
        Figure(
            "servers_registrations", "3 servers: registrations per second, all at once",
            n / registered[0], "reg/s", n / registered[1], "one server, all N clients",
            "higher", extra=extra,
        ),
        Figure(
            "servers_send_all", "3 servers: send_all -> every other client has it, median",
            median(posts[0]) * 1000, "ms", median(posts[1]) * 1000, "one server, all N clients",
            "lower", extra={**extra, "posts": len(posts[0])},
        ),
        Figure(
            "servers_cross_saves", "3 servers: saves for an offline client of another server",
            saves[0], "req/s", saves[1], "one server: saves for its own offline client",
            "higher", extra={**extra, "savers": 16, "window": sizes.window},
        ),
    ]  # fmt: skip


__all__ = ["bench_postgres", "bench_servers"]
