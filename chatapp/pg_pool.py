"""psycopg 3 connections as chatapp opens them.

psycopg's asynchronous API is asyncio's; Trio has none. So the store uses
synchronous connections and runs each whole transaction in a worker thread
(``trio.to_thread.run_sync``): the loop never waits on the database.

Notifications: a dedicated autocommit connection LISTENs; Trio waits for its
socket to become readable, then ``conn.notifies(timeout=0)`` takes what came
without blocking (it also yields what psycopg read while LISTEN itself ran).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import sql

#: A statement that runs longer is cancelled by the server (a worker thread is held at most
#: this long by one statement; the node's commit then fails and says so).
STATEMENT_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT = 5
#: A connection whose peer vanished (a half-open TCP connection) is noticed by the kernel
#: after about idle + interval * count seconds.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


def connect(url: str, **options: Any) -> psycopg.Connection[Any]:
    """An autocommit connection: each transaction is an explicit ``conn.transaction()``."""
    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        **KEEPALIVES,
        **options,
    )


async def listen(
    url: str,
    channels: Iterable[str],
    deliver: Callable[[list[psycopg.Notify]], Awaitable[Any]],
    listening: Callable[[], Awaitable[Any]],
) -> None:
    """LISTEN on ``channels``, await ``listening()`` (nothing is missed meanwhile: what
    comes is kept for later), then hand every run of notifications to ``deliver``
    (awaited), until cancelled.

    Raises ``psycopg.OperationalError`` when the connection is lost: the caller
    reconnects and catches up from the tables (PostgreSQL keeps no notifications for a
    listener that is away).
    """

    def connect_and_listen() -> psycopg.Connection[Any]:
        conn = connect(url)
        for channel in channels:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return conn

    conn = await trio.to_thread.run_sync(connect_and_listen)
    try:
        await listening()
        while True:
            # timeout=0: what libpq has already, or what the socket holds; never waits.
            batch = list(conn.notifies(timeout=0))
            if batch:
                await deliver(batch)
            await trio.lowlevel.wait_readable(conn.fileno())
    finally:
        conn.close()


T = TypeVar("T")


class Reconnecting:
    """One connection, used by one worker thread at a time; made again when broken."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection[Any] | None = None
        self.guard = threading.Lock()

    def transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction (blocking: call it in a worker thread).

        A connection that fails at ``BEGIN`` (the database ended it while it was idle: a
        restart, a failover, ``pg_terminate_backend``) is replaced and the transaction
        runs on a new one: nothing of it had reached the database. A failure after
        ``BEGIN`` is the caller's (the commit is refused; nothing is run twice)."""
        with self.guard, contextlib.ExitStack() as stack:
            conn = self._usable()
            try:
                stack.enter_context(conn.transaction())
            except psycopg.OperationalError:
                conn.close()
                conn = self._usable()
                stack.enter_context(conn.transaction())
            return fn(conn, *args)

    def _usable(self) -> psycopg.Connection[Any]:
        """The connection, or a new one if it is closed or known broken."""
        conn = self.conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self.conn = conn = connect(self.url)
        return conn

    def close(self) -> None:
        with self.guard:
            if self.conn is not None:
                self.conn.close()


__all__ = ["Reconnecting", "connect", "listen"]
