"""The durable store: SQLite in WAL mode, called off the event loop.

It holds the server's key (made at the first start), each name's binding to a
key, the clients' records and the delivery streams (with the counter of their
sequence numbers, which never goes back).

A run of changes (``chatapp.protocol.changes``) is one transaction, committed in a worker thread
before the node sends the ACK that depends on it; so a message the server
has ACKed as saved survives a crash of the server (SIGKILL included).

The file belongs to one server at a time: the connection holds SQLite's
exclusive lock from open to close, so a second server pointed at the same
file stops at start with a clear error instead of keeping a second, diverging
copy of the table. The lock dies with the process, so a server restarted
after SIGKILL opens the file (and recovers the WAL) at once.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import msgspec
import trio

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
    apply_changes,
)
from chatapp.protocol.crypto import Identity
from chatapp.store import ServerDisk, new_origin
from chatapp.wire import StoredItem

SCHEMA_VERSION = 3

#: version reached -> the statements that reach it from the one before. Statements are
#: split on ';', so none may contain one in a literal.
MIGRATIONS: dict[int, str] = {
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
    # Two records can hold one address (a name re-registered from a port that another
    # name had); the one changed last owns it, so restore must replay them in that order.
    2: """
        ALTER TABLE clients ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
        UPDATE clients SET changed = rowid;
    """,
    # Protocol 2: names bound to keys, sessions, sealed direct messages, and a delivery
    # stream per recipient (sequence numbers that never go back). Nothing of protocol 1
    # carries over: its clients had no keys (they bind one when they next register), and
    # a database with messages stored by protocol 1 is refused before this runs.
    3: """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
        DROP TABLE clients;
        CREATE TABLE clients (
            name TEXT PRIMARY KEY,
            ip TEXT NOT NULL,
            port INTEGER NOT NULL,
            key BLOB NOT NULL,
            sid BLOB NOT NULL,
            presence TEXT NOT NULL,
            changed INTEGER NOT NULL
        );
        DROP INDEX mailbox_by_recipient;
        DROP TABLE mailbox;
        CREATE TABLE mailbox (
            origin TEXT NOT NULL,
            n INTEGER NOT NULL,
            recipient TEXT NOT NULL,
            id TEXT NOT NULL,
            kind TEXT NOT NULL,
            sender TEXT NOT NULL,
            stored_at REAL NOT NULL,
            text TEXT NOT NULL,
            sig BLOB NOT NULL,
            sealed BLOB NOT NULL,
            PRIMARY KEY (origin, n),
            UNIQUE (recipient, sender, id)
        );
        CREATE INDEX mailbox_by_recipient ON mailbox (recipient, origin, n);
    """,
}

#: How long opening waits for another process's lock before giving up.
LOCK_TIMEOUT = 1.0


class StoreError(sqlite3.DatabaseError):
    """The database cannot be used by this server (said in one line)."""


def default_db_path(port: int) -> str:
    """``$XDG_DATA_HOME/chatapp/server-PORT.sqlite3`` (``~/.local/share`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return os.path.join(base, "chatapp", f"server-{port}.sqlite3")


class SqliteStore:
    durable = True

    def __init__(self, path: str, *, synchronous: str = "FULL") -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection, used by one worker thread at a time (the node serialises commits).
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=LOCK_TIMEOUT
        )
        self._guard = threading.Lock()
        try:
            # Exclusive before WAL: SQLite then keeps the WAL index in this process's
            # memory and no other process can open the file while we run.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("BEGIN IMMEDIATE")  # take the lock now, not at the first save
            self._db.execute("COMMIT")
            self._migrate()
            self._ensure_identity()
            # Read everything now, so a damaged file is refused at start (one error line)
            # rather than surfacing later as a traceback.
            self._loaded: ServerDisk | None = self._read()
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise StoreError(f"{exc} (is another chatapp server using it?)") from None
            raise
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema version {version}; this chatapp knows up to"
                f" {SCHEMA_VERSION} (use a newer chatapp, or another --db)"
            )
        if 1 <= version < 3:
            stored = self._db.execute("SELECT count(*) FROM mailbox").fetchone()[0]
            if stored:
                raise StoreError(
                    f"the database holds {stored} messages stored by chatapp 1 (protocol 1),"
                    " which protocol 2 cannot deliver: let chatapp 1 deliver them first,"
                    " or use another --db"
                )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _ensure_identity(self) -> None:
        """The server's key and the store's origin, made once, at the first start."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for key, value in (
                ("server_key", Identity.generate().seed),
                ("origin", new_origin()),
                ("last_n", 0),
            ):
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value)
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _read(self) -> ServerDisk:
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        try:
            server_key, origin, last_n = meta["server_key"], meta["origin"], meta["last_n"]
            if not isinstance(server_key, bytes) or len(server_key) != 32:
                raise ValueError("the server's key is not 32 bytes")
            clients = [
                ClientRecord(name, (ip, port), key, sid, Presence(presence))
                for name, ip, port, key, sid, presence in self._db.execute(
                    "SELECT name, ip, port, key, sid, presence FROM clients ORDER BY changed, rowid"
                )
            ]
            mailbox: dict[str, list[StoredItem]] = {}
            for recipient, *row in self._db.execute(
                "SELECT recipient, origin, n, id, kind, sender, stored_at, text, sig, sealed"
                " FROM mailbox ORDER BY origin, n"
            ):
                mailbox.setdefault(recipient, []).append(_item(*row))
        except (KeyError, ValueError, TypeError, msgspec.ValidationError) as exc:
            raise StoreError(f"the database holds a row chatapp cannot read: {exc}") from None
        return ServerDisk(bytes(server_key), str(origin), int(last_n), clients, mailbox)

    def load(self) -> ServerDisk:
        """The server's key, the clients (oldest change first) and the stored messages
        (oldest first)."""
        loaded, self._loaded = self._loaded, None
        return loaded if loaded is not None else self._read()

    async def commit(self, changes: list[Change]) -> None:
        # Not abandoned on cancel: a commit that started finishes before the node goes on.
        await trio.to_thread.run_sync(self._commit, changes)

    def _commit(self, changes: list[Change]) -> None:
        with self._guard:
            db = self._db
            db.execute("BEGIN")
            try:
                apply_changes(changes, _Transaction(db))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def release(self, name: str) -> tuple[bool, int]:
        """Unbind ``name`` (an operator's command, on a stopped server): its binding, its
        record and what was stored for it go. (Whether it was bound, messages deleted.)"""
        with self._guard:
            bound = self._db.execute("SELECT 1 FROM clients WHERE name = ?", (name,)).fetchone()
            (stored,) = self._db.execute(
                "SELECT count(*) FROM mailbox WHERE recipient = ? OR sender = ?", (name, name)
            ).fetchone()
        self._commit([ClientRemoved(name)])
        return bound is not None, int(stored)

    def pragma(self, name: str) -> object:
        """A setting as SQLite reports it (``journal_mode``, ``synchronous``, ...)."""
        with self._guard:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        with self._guard:
            self._db.close()


def _item(
    origin: str, n: int, msg_id: str, kind: str, sender: str, stored_at: float,
    text: str, sig: bytes, sealed: bytes,
) -> StoredItem:  # fmt: skip
    """A stored row as an item, checked as a datagram's would be."""
    fields = {
        "seq": [origin, n], "id": msg_id, "kind": kind, "sender": sender,
        "stored_at": stored_at, "text": text, "sig": bytes(sig), "sealed": bytes(sealed),
    }  # fmt: skip
    return msgspec.convert(fields, StoredItem, from_attributes=False)


class _Transaction:
    """The SQL of each kind of change, inside a transaction the store has begun."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def save_client(self, change: ClientSaved) -> None:
        self._db.execute(
            "INSERT INTO clients (name, ip, port, key, sid, presence, changed)"
            " VALUES (?, ?, ?, ?, ?, ?, (SELECT coalesce(max(changed), 0) + 1 FROM clients))"
            " ON CONFLICT (name) DO UPDATE SET ip=excluded.ip, port=excluded.port,"
            " key=excluded.key, sid=excluded.sid, presence=excluded.presence,"
            " changed=excluded.changed",
            (change.name, change.ip, change.port, change.key, change.sid, change.presence.value),
        )

    def remove_client(self, change: ClientRemoved) -> None:
        self._db.execute("DELETE FROM clients WHERE name = ?", (change.name,))
        # what was stored for it, and what it sent (its key is gone: it could not be
        # verified any more)
        self._db.execute(
            "DELETE FROM mailbox WHERE recipient = ? OR sender = ?", (change.name, change.name)
        )

    def store_message(self, change: MessageStored) -> None:
        item = change.item
        self._db.execute(
            "INSERT OR IGNORE INTO mailbox (origin, n, recipient, id, kind, sender, stored_at,"
            " text, sig, sealed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                item.seq.origin, item.seq.n, change.recipient, item.id, item.kind,
                item.sender, item.stored_at, item.text, item.sig, item.sealed,
            ),
        )  # fmt: skip
        # The counter never goes back, even when every item it numbered is deleted.
        self._db.execute(
            "UPDATE meta SET value = max(value, ?) WHERE key = 'last_n'", (item.seq.n,)
        )

    def remove_messages(self, change: MessagesRemoved) -> None:
        self._db.executemany(
            "DELETE FROM mailbox WHERE origin = ? AND n = ? AND recipient = ?",
            [(seq.origin, seq.n, change.recipient) for seq in change.seqs],
        )
