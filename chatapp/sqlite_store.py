"""The durable store: SQLite in WAL mode, called off the event loop.

A run of ``Persist`` changes is one transaction, committed in a worker thread
before the node sends the ACK that depends on it; so a message the server
has ACKed as saved survives a crash of the server (SIGKILL included).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import trio

from chatapp.protocol.common import Persist
from chatapp.protocol.server import ClientRecord, Presence
from chatapp.wire import StoredItem

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, str] = {
    # version reached -> the SQL that reaches it from the one before
    1: """
        CREATE TABLE clients (
            name TEXT PRIMARY KEY,
            ip TEXT NOT NULL,
            port INTEGER NOT NULL,
            token TEXT NOT NULL,
            presence TEXT NOT NULL
        );
        CREATE TABLE mailbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            id TEXT NOT NULL,
            kind TEXT NOT NULL,
            sender TEXT NOT NULL,
            text TEXT NOT NULL,
            stored_at REAL NOT NULL,
            UNIQUE (recipient, id)
        );
        CREATE INDEX mailbox_by_recipient ON mailbox (recipient, seq);
    """,
}


def default_db_path(port: int) -> str:
    """``$XDG_DATA_HOME/chatapp/server-PORT.sqlite3`` (``~/.local/share`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return os.path.join(base, "chatapp", f"server-{port}.sqlite3")


class SqliteStore:
    def __init__(self, path: str, *, synchronous: str = "FULL") -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection, used by one worker thread at a time (the node serialises commits).
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._guard = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the database has schema version {version}; this chatapp knows up to {SCHEMA_VERSION}"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def load(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        clients = [
            ClientRecord(name, (ip, port), token, Presence(presence))
            for name, ip, port, token, presence in self._db.execute(
                "SELECT name, ip, port, token, presence FROM clients"
            )
        ]
        mailbox: dict[str, list[StoredItem]] = {}
        for recipient, msg_id, kind, sender, text, stored_at in self._db.execute(
            "SELECT recipient, id, kind, sender, text, stored_at FROM mailbox ORDER BY seq"
        ):
            mailbox.setdefault(recipient, []).append(StoredItem(msg_id, kind, sender, text, stored_at))
        return clients, mailbox

    async def commit(self, changes: list[Persist]) -> None:
        await trio.to_thread.run_sync(self._commit, changes)

    def _commit(self, changes: list[Persist]) -> None:
        with self._guard:
            db = self._db
            db.execute("BEGIN")
            try:
                for change in changes:
                    _APPLY[change.op](db, change.args)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._guard:
            self._db.close()


def _upsert_client(db: sqlite3.Connection, args: tuple[object, ...]) -> None:
    db.execute(
        "INSERT INTO clients (name, ip, port, token, presence) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET ip=excluded.ip, port=excluded.port,"
        " token=excluded.token, presence=excluded.presence",
        args,
    )


def _store_message(db: sqlite3.Connection, args: tuple[object, ...]) -> None:
    recipient, item = args
    assert isinstance(item, StoredItem)
    db.execute(
        "INSERT OR IGNORE INTO mailbox (recipient, id, kind, sender, text, stored_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (recipient, item.id, item.kind, item.sender, item.text, item.stored_at),
    )


def _remove_messages(db: sqlite3.Connection, args: tuple[object, ...]) -> None:
    recipient, ids = args
    assert isinstance(ids, tuple)
    db.executemany(
        "DELETE FROM mailbox WHERE recipient = ? AND id = ?", [(recipient, i) for i in ids]
    )


_APPLY = {"client": _upsert_client, "store": _store_message, "remove": _remove_messages}
