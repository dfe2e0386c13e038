"""A SQLite store for virtual time: the real database code, committing in the event
loop's own thread.

``SqliteStore`` commits in a worker thread so that a server never waits on the
disk; under ``MockClock`` (virtual time), whose clock jumps ahead whenever every
task waits, a worker thread's time would be jumped over. ``InlineSqliteStore``
commits in the event loop's thread instead, so that a scenario recorded in virtual
time and its replay run the same SQL as a real server, instantly and repeatably.
"""

from __future__ import annotations

import trio

from chatapp.protocol.changes import Change
from chatapp.sqlite_store import SqliteStore


class InlineSqliteStore(SqliteStore):
    """SQLite (in memory unless given a path) that commits without a worker thread."""

    #: No group commit (``Node._gather``): each handling commits alone, as in the run
    #: recorded, so that a replay's commits follow the same datagrams even on real UDP.
    durable = False

    def __init__(self, path: str = ":memory:") -> None:
        super().__init__(path)

    async def commit(self, changes: list[Change]) -> None:
        self._commit(changes)
        await trio.lowlevel.checkpoint()


__all__ = ["InlineSqliteStore"]
