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

What is not chatapp's is refused at start, in one line: a SQLite file of another
application (chatapp marks its files with ``PRAGMA application_id``; files of the
versions before the mark are known by their tables), and rows this chatapp never
wrote (every row is checked against the types of the wire at start). Before each
commit the store checks that its file (and its WAL) are still the ones it opened: a
file deleted or replaced under a running server makes every later commit fail, so
that nothing more is acknowledged as saved.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sqlite3
import threading
from pathlib import Path
from typing import Annotated, Literal

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
from chatapp.store import ServerDisk, checked_row, new_origin, stored_item
from chatapp.wire import Key, Name, Port, StoredItem

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

#: ``PRAGMA application_id`` of a chatapp database ("CHAT").
APPLICATION_ID = 0x43484154


class StoreError(sqlite3.DatabaseError):
    """The database cannot be used by this server (said in one line)."""


class _ClientRow(msgspec.Struct):
    """A row of ``clients`` as chatapp writes it."""

    name: Name
    ip: str
    port: Port
    key: Key
    sid: Annotated[bytes, msgspec.Meta(max_length=8)]  # a session's id (none yet: empty)
    presence: Literal["online", "deregistered", "silent"]


def _tables(db: sqlite3.Connection) -> dict[str, list[str]]:
    """Every table of ``db`` (SQLite's own left out) with its columns, in order."""
    names = [
        name
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not name.startswith("sqlite_")
    ]
    return {name: [row[1] for row in db.execute(f'PRAGMA table_info("{name}")')] for name in names}


def _schema_of(version: int) -> dict[str, list[str]]:
    """The tables and columns of a chatapp database of schema ``version``."""
    db = sqlite3.connect(":memory:")
    try:
        for target in range(1, version + 1):
            for statement in MIGRATIONS[target].split(";"):
                if statement.strip():
                    db.execute(statement)
        return _tables(db)
    finally:
        db.close()


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
            self._check_owner()  # before anything is written: a file not ours stays as it was
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
        #: Why commits fail from now on (the file was deleted or replaced), if they do.
        self.broken: str | None = None
        self._files = self._identities()

    def _check_owner(self) -> None:
        """Refuse a file that is not chatapp's; a chatapp file from before the mark (or a
        new, empty one) gets the mark in its first migration."""
        owner = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if owner == APPLICATION_ID:
            return
        if owner != 0:
            raise StoreError(f"it belongs to another application (application_id {owner:#x})")
        tables = _tables(self._db)
        if version == 0 and not tables:
            return  # an empty file: ours from now on
        if not 1 <= version <= SCHEMA_VERSION or tables != _schema_of(version):
            held = ", ".join(sorted(tables)) or "no tables"
            raise StoreError(f"it is not a chatapp database (schema version {version}, {held})")

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
                self._db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if self._db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            self._db.execute(f"PRAGMA application_id={APPLICATION_ID}")  # an up-to-date file

    # --- the file under the store ---------------------------------------------------------

    def _identities(self) -> dict[str, tuple[int, int] | None]:
        """(device, inode) of the file and of its WAL (None: not there), as they are now."""
        if self.path == ":memory:":
            return {}
        found: dict[str, tuple[int, int] | None] = {}
        for name in (self.path, self.path + "-wal"):
            try:
                stat = os.stat(name)
                found[name] = (stat.st_dev, stat.st_ino)
            except FileNotFoundError:
                found[name] = None
        return found

    def _check_files(self) -> None:
        """Fail (for good) if the file or its WAL is no longer the one this store opened:
        a commit would go to a file nobody will open again."""
        if self.broken is None:
            now = self._identities()
            for name, opened in self._files.items():
                if opened is not None and now[name] != opened:
                    what = "deleted" if now[name] is None else "replaced by another file"
                    self.broken = f"the database file {name} was {what} while the server ran"
                    if name != self.path and now[self.path] == self._files[self.path]:
                        self._rescue()
                    break
            else:
                self._files = now  # a WAL made since, say
        if self.broken is not None:
            raise StoreError(f"{self.broken}; nothing can be saved until it restarts")

    def _rescue(self) -> None:
        """A WAL deleted under the store still holds the last commits, open here: copy them
        into the database file, which is still the one the store opened."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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
        """Every row, checked against the types chatapp writes (a row of the wrong type
        would otherwise surface later, as an error in the middle of serving)."""
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        server_key, origin, last_n = (meta.get(k) for k in ("server_key", "origin", "last_n"))
        if not isinstance(server_key, bytes) or len(server_key) != 32:
            raise StoreError("the server's key in the database is not 32 bytes")
        if not isinstance(origin, str) or not origin or not isinstance(last_n, int):
            raise StoreError("the database's sequence counter is not one chatapp writes")
        clients = []
        for values in self._db.execute(
            "SELECT name, ip, port, key, sid, presence FROM clients ORDER BY changed, rowid"
        ):
            row = checked_row(values, _ClientRow, "clients", StoreError)
            try:
                ipaddress.IPv4Address(row.ip)
            except ValueError:
                raise StoreError(f"a row of clients has {row.ip!r} for an IPv4 address") from None
            clients.append(
                ClientRecord(row.name, (row.ip, row.port), row.key, row.sid, Presence(row.presence))
            )
        mailbox: dict[str, list[StoredItem]] = {}
        for recipient, *row in self._db.execute(
            "SELECT recipient, origin, n, id, kind, sender, stored_at, text, sig, sealed"
            " FROM mailbox ORDER BY origin, n"
        ):
            if not isinstance(recipient, str):
                raise StoreError("a row of mailbox is not one chatapp writes: its recipient")
            mailbox.setdefault(recipient, []).append(stored_item(row, StoreError))
        return ServerDisk(server_key, origin, last_n, clients, mailbox)

    def start_from(self, key: bytes, origin: str, last_n: int, changes: list[Change]) -> None:
        """Make a new database hold what another held (a replay's server starts from the
        recorded one's): its key, its sequence counter and the rows ``changes`` make."""
        with self._guard:
            for name, value in (("server_key", key), ("origin", origin), ("last_n", last_n)):
                self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, name))
        self._commit(changes)
        self._loaded = None

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
            self._check_files()
            db = self._db
            db.execute("BEGIN")
            try:
                apply_changes(changes, _Transaction(db))
                db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk); the first error is
                # the one to report.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
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
