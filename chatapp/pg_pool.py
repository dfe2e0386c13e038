"""psycopg 3 from Trio without blocking the loop.

psycopg's asynchronous API is asyncio's; Trio has none. So: a few synchronous
connections, each database call (a whole transaction, never one statement per
hop) run in a worker thread with ``trio.to_thread.run_sync``. Waiting for a free
connection happens in Trio, so it can be cancelled and holds no thread.

Notifications: a dedicated autocommit connection LISTENs; Trio waits for its
socket to become readable, then ``conn.notifies(timeout=0)`` takes what came
without blocking (it also yields what psycopg read while LISTEN itself ran).
Only public psycopg API is used.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import sql

T = TypeVar("T")

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


class _Slot:
    """One place in the pool; its connection is (re)made by the thread that uses it."""

    conn: psycopg.Connection[Any] | None = None


class TrioPool:
    """A small pool of psycopg connections, used from worker threads."""

    def __init__(self, url: str, size: int = 3) -> None:
        self.url = url
        self._size = size
        self._send, self._idle = trio.open_memory_channel[_Slot](size)
        self._limiter = trio.CapacityLimiter(size)
        for _ in range(size):
            self._send.send_nowait(_Slot())  # connected on first use

    async def __aenter__(self) -> TrioPool:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection (after the pool's users are done: see ``run``)."""
        # Shielded: often called while leaving a cancelled scope, and an unclosed
        # connection would leak (and warn).
        with trio.CancelScope(shield=True):
            for _ in range(self._size):
                slot = await self._idle.receive()
                if slot.conn is not None:
                    await trio.to_thread.run_sync(slot.conn.close)

    def _in_thread(self, slot: _Slot, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if slot.conn is None or slot.conn.broken or slot.conn.closed:
            if slot.conn is not None:
                slot.conn.close()
            slot.conn = None
            slot.conn = connect(self.url)
        with slot.conn.transaction():
            return fn(slot.conn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction in a worker thread; its result. Returns
        only once the transaction is committed (or raises: it was rolled back).

        A connection found broken (the database restarted, a connection ended by an
        administrator, a failover) is made again and ``fn`` tried once more on it, so
        ``fn`` must be safe to run twice: when a connection breaks during COMMIT, nobody
        knows whether it took effect."""
        slot = await self._idle.receive()  # cancellable: waiting holds no thread
        try:
            # Not abandoned on cancel: when this returns, the commit is done (or failed).
            try:
                return await trio.to_thread.run_sync(
                    self._in_thread, slot, fn, args, limiter=self._limiter
                )
            except psycopg.OperationalError:
                if slot.conn is None or not slot.conn.broken:
                    raise
            return await trio.to_thread.run_sync(
                self._in_thread, slot, fn, args, limiter=self._limiter
            )
        finally:
            self._send.send_nowait(slot)


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
