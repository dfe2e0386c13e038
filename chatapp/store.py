"""Where the server keeps what must survive a crash: the client table and the mailbox.

The server's state machine announces every change as a ``Persist`` effect;
the node commits each run of them in one transaction before it sends the ACK
that follows. ``MemoryStore`` keeps nothing (``--db :memory:``);
``chatapp.sqlite_store.SqliteStore`` is the durable default.
"""

from __future__ import annotations

from typing import Protocol

from chatapp.protocol.common import Persist
from chatapp.protocol.server import ClientRecord
from chatapp.wire import StoredItem


class Store(Protocol):
    def load(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        """The clients and the stored messages (oldest first) as last committed."""
        ...

    async def commit(self, changes: list[Persist]) -> None:
        """Apply ``changes`` in one transaction; return only once it is durable."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """A store that keeps nothing: the server's own memory is all there is."""

    def load(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        return [], {}

    async def commit(self, changes: list[Persist]) -> None:
        pass

    def close(self) -> None:
        pass
