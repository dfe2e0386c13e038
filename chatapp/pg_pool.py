"""psycopg 3 connections as chatapp opens them.

psycopg's asynchronous API is asyncio's; Trio has none. So the store uses a
synchronous connection and runs each whole transaction in a worker thread
(``trio.to_thread.run_sync``): the loop never waits on the database.
"""

from __future__ import annotations

from typing import Any

import psycopg

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


__all__ = ["connect"]
