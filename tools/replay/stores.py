"""The replayed server's database: SQLite, as ``chatapp serve`` keeps it, in a scratch file.

A server's first start is given what the recorded one read from its database (its
``restore`` event): its key, counter, clients and stored messages. A later start of that
server on the same database (the recording's next ``restore`` names the same key) reads
what the replay itself committed, through the same SQL as a real restart: what the
replayed server wrote, kept or deleted, and how the store reads it back, shows in that
start's ``restore`` event, which is compared with the recording's. A start on another
database (a new key: ``--db :memory:`` restarted) starts again from its ``restore``.

Commits run inline, not in a worker thread: in virtual time nothing may wait on a thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from chatapp.protocol.changes import Change, ClientSaved, MessageStored
from chatapp.protocol.crypto import unb64
from chatapp.sqlite_store import SqliteStore
from chatapp.trace import Restored
from chatapp.wire import Address


class ReplayStore(SqliteStore):
    """A SQLite store whose commits run inline (no worker thread), written without fsync."""

    durable = False  # no group commit: one commit per handling, as the recording had

    def __init__(self, path: str) -> None:
        super().__init__(path, synchronous="OFF")

    async def commit(self, changes: list[Change]) -> None:
        self._commit(changes)

    def close(self) -> None:  # closed by ``ReplayStores.close`` (a restart reopens it)
        pass

    def really_close(self) -> None:
        super().close()

    def start_from(self, restored: Restored, new_address: Callable[[Address], Address]) -> None:
        """Make the database what ``restored`` says the recorded server read."""
        db = self._db
        db.execute("BEGIN")
        for key, value in (
            ("server_key", unb64(restored.server_key)),
            ("origin", restored.origin),
            ("last_n", restored.last_n),
        ):
            db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        db.execute("COMMIT")
        changes: list[Change] = []
        for name, ip, port, client_key, sid, presence in restored.clients:
            ip, port = new_address((ip, port))
            changes.append(ClientSaved(name, ip, port, unb64(client_key), unb64(sid), presence))
        for recipient, items in restored.mailbox.items():
            changes += [MessageStored(recipient, item) for item in items]
        self._commit(changes)
        self._loaded = None  # ``load`` reads it afresh


class ReplayStores:
    """The database of each replayed server, in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stores: dict[str, tuple[ReplayStore, str]] = {}  # node -> (store, its key)
        self._made = 0

    def for_start(
        self,
        node: str,
        restored: Restored | None,
        new_address: Callable[[Address], Address],
    ) -> ReplayStore:
        """The database ``node`` starts on: its own from before if the recording restarted
        it on the same database, else a new one made what ``restored`` says."""
        key = restored.server_key if restored is not None else ""
        kept = self._stores.get(node)
        if kept is not None and key and kept[1] == key:
            return kept[0]
        if kept is not None:
            kept[0].really_close()
        self._made += 1
        path = os.path.join(self.directory, f"server-{self._made}.db")
        store = ReplayStore(path)
        if restored is not None:
            store.start_from(restored, new_address)
        self._stores[node] = (store, key)
        return store

    def close(self) -> None:
        for store, _ in self._stores.values():
            store.really_close()
        self._stores.clear()
