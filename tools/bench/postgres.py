"""PostgreSQL benchmarks: a server on a shared PostgreSQL database beside one on SQLite
and beside a bare psycopg INSERT loop on the same database, in the same run.

The cluster is a throwaway one (``chatapp.testing.postgres``) with PostgreSQL's own
durable settings (fsync, synchronous_commit and full_page_writes on), on loopback.
Without PostgreSQL server binaries every figure says so and nothing runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from chatapp.protocol.mailbox import MAX_MAILBOX_LIMIT
from chatapp.testing.postgres import DURABLE_SETTINGS, ServerBinariesMissing, throwaway_server
from chatapp.wire import Deregister, SaveMessage, encode

from .loadgen import (
    HOST,
    SimClient,
    close_clients,
    decode_head,
    open_clients,
    register_all,
    run_closed_loop,
    settle,
)
from .procs import BenchError, chatapp_servers
from .report import Figure, median, percentile, unavailable

TEXT = "hello nice to meet you."
SETTINGS_NOTE = "PostgreSQL with fsync, synchronous_commit and full_page_writes on"


@contextlib.contextmanager
def postgres_database(name: str) -> Iterator[str]:
    """A database on a throwaway durable cluster; raises ``ServerBinariesMissing``."""
    with throwaway_server(settings=DURABLE_SETTINGS) as server:
        yield server.create_database(name)


def _save(client: SimClient, msg_id: str) -> bytes:
    return encode(SaveMessage(msg_id, client.name, "sink", TEXT, client.token or "t"))


def _register_sink(server: tuple[str, int]) -> None:
    """An offline client ("sink") that every save is addressed to: each one is stored."""
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


def _saves_per_second(clients: list[SimClient], port: int, seconds: float, window: int) -> float:
    result = run_closed_loop(
        clients, (HOST, port), _save, window=window, duration=seconds, warmup=0.1
    )
    if result.refused:
        raise BenchError(f"the server on port {port} refused {result.refused} saves")
    settle(clients, 0.05)
    return result.rate


def _save_latency(client: SimClient, port: int) -> float:
    """One save, from sending it to its ``saved`` answer (the commit is in between)."""
    msg_id = client.next_id()
    client.sock.setblocking(True)
    client.sock.settimeout(5.0)
    try:
        start = time.perf_counter()
        client.sock.sendto(_save(client, msg_id), (HOST, port))
        while True:
            data = client.sock.recv(65536)
            head = decode_head(data)
            if head.id == msg_id and head.t in ("saved", "refused"):
                if head.t == "refused":
                    raise BenchError(f"the server on port {port} refused a save")
                return time.perf_counter() - start
    except TimeoutError:
        raise BenchError(f"no answer to a save from the server on port {port}") from None
    finally:
        client.sock.setblocking(False)


class _BareInserts:
    """The floor: one psycopg connection, one INSERT per transaction, same database."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(
            "CREATE TABLE bench_floor (seq bigserial PRIMARY KEY, id text, text text, at float8)"
        )
        self.count = 0

    def once(self) -> float:
        start = time.perf_counter()
        with self.conn.transaction():
            self.conn.execute(
                "INSERT INTO bench_floor (id, text, at) VALUES (%s, %s, %s)",
                (f"i{self.count}", TEXT, time.time()),
            )
        self.count += 1
        return time.perf_counter() - start

    def per_second(self, seconds: float) -> float:
        done, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            self.once()
            done += 1
        return done / (time.monotonic() - start)

    def close(self) -> None:
        self.conn.close()


_LABELS = {
    "pg_saves": "PostgreSQL: saves per second, commit before answer",
    "pg_vs_sqlite": "PostgreSQL: saves per second, against a server on SQLite",
    "pg_save_latency_median": "PostgreSQL: save -> saved answer, median",
    "pg_save_latency_p99": "PostgreSQL: save -> saved answer, p99",
}
_BASELINES = {
    "pg_saves": "bare psycopg INSERT loop, same database",
    "pg_vs_sqlite": "chatapp serve --db FILE (SQLite)",
    "pg_save_latency_median": "one bare INSERT transaction, median",
    "pg_save_latency_p99": "one bare INSERT transaction, p99",
}


def bench_postgres(
    load_seconds: float, clients: int, window: int, rounds: int, latency_rounds: int
) -> list[Figure]:
    try:
        with postgres_database("bench") as url, contextlib.ExitStack() as stack:
            return _measure(url, stack, load_seconds, clients, window, rounds, latency_rounds)
    except ServerBinariesMissing as missing:
        return [
            unavailable(
                key,
                _LABELS[key],
                "/s" if "saves" in key else "s",
                _BASELINES[key],
                f"no PostgreSQL: {missing}",
            )
            for key in _LABELS
        ]


def _measure(
    url: str,
    stack: contextlib.ExitStack,
    seconds: float,
    n: int,
    window: int,
    rounds: int,
    latency_rounds: int,
) -> list[Figure]:
    scratch = Path(stack.enter_context(_scratch_dir()))
    common: dict[str, Any] = {"mailbox_limit": MAX_MAILBOX_LIMIT, "unlimited": True}
    (pg_port, _), (sqlite_port, _) = stack.enter_context(
        chatapp_servers({**common, "db": url}, {**common, "db": str(scratch / "s.sqlite3")})
    )
    floor = _BareInserts(url)
    stack.callback(floor.close)
    loads: dict[int, list[SimClient]] = {}
    for port in (pg_port, sqlite_port):
        _register_sink((HOST, port))
        loads[port] = open_clients(n, f"p{port}-")
        stack.callback(close_clients, loads[port])
        register_all(loads[port], (HOST, port))
    best = {"pg": 0.0, "sqlite": 0.0, "bare": 0.0}
    for _ in range(rounds):  # taking turns: a neighbour's burst hits all of them alike
        best["pg"] = max(best["pg"], _saves_per_second(loads[pg_port], pg_port, seconds, window))
        best["sqlite"] = max(
            best["sqlite"], _saves_per_second(loads[sqlite_port], sqlite_port, seconds, window)
        )
        best["bare"] = max(best["bare"], floor.per_second(seconds))
    pg_times, floor_times = _latencies(loads[pg_port][0], pg_port, floor, latency_rounds)
    extra = {"settings": SETTINGS_NOTE, "clients": n, "window": window}
    figures = [
        Figure("pg_saves", _LABELS["pg_saves"], best["pg"], "/s", best["bare"],
               _BASELINES["pg_saves"], "higher", extra=extra),
        Figure("pg_vs_sqlite", _LABELS["pg_vs_sqlite"], best["pg"], "/s", best["sqlite"],
               _BASELINES["pg_vs_sqlite"], "higher", extra=extra),
    ]  # fmt: skip
    for name, stat in (("median", median), ("p99", _p99)):
        key = f"pg_save_latency_{name}"
        figures.append(
            Figure(key, _LABELS[key], stat(pg_times), "s", stat(floor_times), _BASELINES[key],
                   "lower", extra={"rounds": len(pg_times), "settings": SETTINGS_NOTE})
        )  # fmt: skip
    return figures


def _p99(values: list[float]) -> float:
    return percentile(values, 99)


def _latencies(
    client: SimClient, port: int, floor: _BareInserts, rounds: int
) -> tuple[list[float], list[float]]:
    """Save latencies and bare INSERT latencies, in alternating blocks of 20."""
    settle([client], 0.1)
    chat: list[float] = []
    bare: list[float] = []
    while len(chat) < rounds:
        block = min(20, rounds - len(chat))
        chat += _repeat(lambda: _save_latency(client, port), block)
        bare += _repeat(floor.once, block)
    return chat, bare


def _repeat(once: Callable[[], float], count: int) -> list[float]:
    return [once() for _ in range(count)]


@contextlib.contextmanager
def _scratch_dir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="chatapp-bench-") as path:
        yield path


__all__ = ["bench_postgres", "postgres_database"]
