"""A PostgreSQL store (``--db postgresql://...``): chatapp's tables in a database
server rather than a file.

Under protocol 2 this store serves one chatapp server per database: the server's
key, the client table (each name's binding to a key and session) and the
delivery streams, as ``chatapp.sqlite_store`` keeps them. Changes
(``chatapp.protocol.changes``, through the one ``apply_changes``) are committed in
one transaction before the answer that depends on them. Several servers sharing
one database (issue 14: the changelog, NOTIFY, heartbeats, failover) were built
for protocol 1 and are not ported to protocol 2 yet: ``open`` refuses a database
another running server holds.

Blocking calls run in a worker thread; the Trio loop never waits on the database.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any, Literal

import msgspec
import psycopg
import trio

from chatapp.pg_pool import connect
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
from chatapp.wire import Name, Port, StoredItem

SCHEMA_VERSION = 2

#: version reached -> the statements that reach it from the one before (run as one string).
MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE chatapp_meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE SEQUENCE client_changes;
        CREATE TABLE clients (
            name text PRIMARY KEY,
            ip text NOT NULL,
            port integer NOT NULL,
            token text NOT NULL,
            presence text NOT NULL,
            changed bigint NOT NULL,
            home text
        );
        CREATE TABLE mailbox (
            seq bigserial PRIMARY KEY,
            recipient text NOT NULL,
            id text NOT NULL,
            kind text NOT NULL,
            sender text NOT NULL,
            text text NOT NULL,
            stored_at double precision NOT NULL,
            UNIQUE (recipient, id)
        );
        CREATE INDEX mailbox_by_recipient ON mailbox (recipient, seq);
        CREATE TABLE servers (
            id text PRIMARY KEY,
            started timestamptz NOT NULL DEFAULT now(),
            beat timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE changelog (
            seq bigserial PRIMARY KEY,
            server text NOT NULL,
            at timestamptz NOT NULL DEFAULT now(),
            changes bytea NOT NULL
        );
        CREATE INDEX changelog_by_time ON changelog (at);
    """,
    # Protocol 2: names bound to keys, the server's key in the database, delivery
    # streams numbered (origin, n). Protocol 1's clients had no keys (they bind one
    # when they next register); its stored messages were not signed and go.
    2: """
        CREATE TABLE server_key (only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                                 seed bytea NOT NULL);
        DROP TABLE changelog;
        ALTER TABLE servers ADD COLUMN origin text, ADD COLUMN last_n bigint NOT NULL DEFAULT 0;
        DROP TABLE clients;
        CREATE TABLE clients (
            name text PRIMARY KEY,
            ip text NOT NULL,
            port integer NOT NULL,
            key bytea NOT NULL,
            sid bytea NOT NULL,
            presence text NOT NULL,
            changed bigint NOT NULL,
            home text
        );
        DROP TABLE mailbox;
        CREATE TABLE mailbox (
            origin text NOT NULL,
            n bigint NOT NULL,
            recipient text NOT NULL,
            id text NOT NULL,
            kind text NOT NULL,
            sender text NOT NULL,
            stored_at double precision NOT NULL,
            text text NOT NULL,
            sig bytea NOT NULL,
            sealed bytea NOT NULL,
            PRIMARY KEY (origin, n),
            UNIQUE (recipient, sender, id)
        );
        CREATE INDEX mailbox_by_recipient ON mailbox (recipient, origin, n);
    """,
}

#: The key of the advisory lock that one migration at a time holds.
_MIGRATION_LOCK = 0x43484154  # "CHAT"


class StoreError(psycopg.DatabaseError):
    """The database cannot be used by this server (said in one line)."""


def server_id(port: int) -> str:
    """A server's name in the database: its host and UDP port (a server restarted on the
    same port is the same server: same origin, same sequence counter)."""
    return f"{socket.gethostname()}:{port}"


# --- rows as chatapp writes them (anything else is refused) ------------------------------


class _ClientRow(msgspec.Struct):
    name: Name
    ip: str
    port: Port
    key: bytes
    sid: bytes
    presence: Literal["online", "deregistered", "silent"]


# --- what a server reads ---------------------------------------------------------------


def _identity(conn: psycopg.Connection[Any], me: str) -> tuple[bytes, str, int]:
    """The server key (made by the first server to start), this server's origin and
    the highest sequence number it gave."""
    conn.execute(
        "INSERT INTO server_key (seed) VALUES (%s) ON CONFLICT DO NOTHING",
        (Identity.generate().seed,),
    )
    conn.execute(
        "INSERT INTO servers (id, origin) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE"
        " SET beat = now(), origin = coalesce(servers.origin, excluded.origin)",
        (me, new_origin()),
    )
    seed_row = conn.execute("SELECT seed FROM server_key").fetchone()
    meta_row = conn.execute("SELECT origin, last_n FROM servers WHERE id = %s", (me,)).fetchone()
    seed = bytes(seed_row[0]) if seed_row else b""
    if len(seed) != 32:
        raise StoreError("the server's key in the database is not 32 bytes")
    if meta_row is None or not isinstance(meta_row[0], str) or not meta_row[0]:
        raise StoreError("the database's sequence counter is not one chatapp writes")
    return seed, meta_row[0], int(meta_row[1])


def _read(conn: psycopg.Connection[Any], me: str) -> ServerDisk:
    seed, origin, last_n = _identity(conn, me)
    clients = []
    for values in conn.execute(
        "SELECT name, ip, port, key, sid, presence FROM clients ORDER BY changed"
    ):
        row = checked_row(tuple(bytes(v) if isinstance(v, memoryview) else v for v in values),
                       _ClientRow, "clients", StoreError)  # fmt: skip
        try:
            ipaddress.IPv4Address(row.ip)
        except ValueError:
            raise StoreError(f"a row of clients has {row.ip!r} for an IPv4 address") from None
        clients.append(
            ClientRecord(row.name, (row.ip, row.port), row.key, row.sid, Presence(row.presence))
        )
    mailbox: dict[str, list[StoredItem]] = {}
    for recipient, *row in conn.execute(
        "SELECT recipient, origin, n, id, kind, sender, stored_at, text, sig, sealed"
        " FROM mailbox ORDER BY origin, n"
    ):
        if not isinstance(recipient, str):
            raise StoreError("a row of mailbox is not one chatapp writes: its recipient")
        mailbox.setdefault(recipient, []).append(stored_item(row, StoreError))
    return ServerDisk(seed, origin, last_n, clients, mailbox)


# --- the store -----------------------------------------------------------------------------


class PgStore:
    """chatapp's tables in a PostgreSQL database."""

    durable = True

    def __init__(self, url: str, me: str) -> None:
        """Not connected yet: ``open`` connects, migrates and reads."""
        self.url = url
        self.me = me
        self._conn: psycopg.Connection[Any] | None = None
        self._guard = threading.Lock()
        self._loaded: ServerDisk | None = None

    def open(self) -> None:
        """Connect, create or migrate the schema, read the tables (blocking: call it in a
        worker thread)."""
        self._conn = conn = connect(self.url)
        try:
            with conn.transaction():
                _migrate(conn)
            with conn.transaction():
                self._loaded = _read(conn, self.me)
        except BaseException:
            conn.close()
            raise

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url)
        return self._conn

    def load(self) -> ServerDisk:
        """The server's key, its origin and counter, the clients (oldest change first)
        and the stored messages (oldest first)."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            return loaded
        with self._guard:
            conn = self._connection()
            with conn.transaction():
                return _read(conn, self.me)

    async def commit(self, changes: list[Change]) -> None:
        # Not abandoned on cancel: a commit that started finishes before the node goes on.
        await trio.to_thread.run_sync(self._commit, changes)

    def _commit(self, changes: list[Change]) -> None:
        with self._guard:
            conn = self._connection()
            with conn.transaction(), conn.pipeline():
                apply_changes(changes, _Transaction(conn, self.me))

    def close(self) -> None:
        with self._guard:
            if self._conn is not None:
                self._conn.close()


def _migrate(conn: psycopg.Connection[Any]) -> None:
    """Create or bring the schema up to ``SCHEMA_VERSION``; refuse a database that is not
    chatapp's (one that holds other tables) or is newer than this chatapp."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))  # one server at a time
    tables = {
        name
        for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    }
    if "chatapp_meta" in tables:
        found = conn.execute("SELECT value FROM chatapp_meta WHERE key = 'schema_version'")
        row = found.fetchone()
        version = int(row[0]) if row and str(row[0]).isdigit() else 0
    elif tables:
        held = ", ".join(sorted(tables)[:5])
        raise StoreError(f"it is not a chatapp database (it holds {held})")
    else:
        version = 0
    if version > SCHEMA_VERSION or (tables and version < 1):
        raise StoreError(
            f"the database has chatapp schema version {version}; this chatapp knows up to"
            f" {SCHEMA_VERSION} (use a newer chatapp, or another database)"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute(MIGRATIONS[target])
        conn.execute(
            "INSERT INTO chatapp_meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(target),),
        )


class _Transaction:
    """The SQL of each kind of change, inside a transaction (``ChangeSink``)."""

    def __init__(self, conn: psycopg.Connection[Any], me: str) -> None:
        self._conn = conn
        self._me = me

    def save_client(self, change: ClientSaved) -> None:
        self._conn.execute(
            "INSERT INTO clients (name, ip, port, key, sid, presence, changed, home)"
            " VALUES (%s, %s, %s, %s, %s, %s, nextval('client_changes'), %s)"
            " ON CONFLICT (name) DO UPDATE SET ip = excluded.ip, port = excluded.port,"
            " key = excluded.key, sid = excluded.sid, presence = excluded.presence,"
            " changed = excluded.changed, home = excluded.home",
            (
                change.name, change.ip, change.port, change.key, change.sid,
                change.presence.value, self._me,
            ),
        )  # fmt: skip

    def remove_client(self, change: ClientRemoved) -> None:
        self._conn.execute("DELETE FROM clients WHERE name = %s", (change.name,))
        # what was stored for it, and what it sent (its key is gone: it could not be
        # verified any more)
        self._conn.execute(
            "DELETE FROM mailbox WHERE recipient = %s OR sender = %s", (change.name, change.name)
        )

    def store_message(self, change: MessageStored) -> None:
        item = change.item
        self._conn.execute(
            "INSERT INTO mailbox (origin, n, recipient, id, kind, sender, stored_at, text,"
            " sig, sealed) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (
                item.seq.origin, item.seq.n, change.recipient, item.id, item.kind,
                item.sender, item.stored_at, item.text, item.sig, item.sealed,
            ),
        )  # fmt: skip
        # The counter never goes back, even when every item it numbered is deleted.
        self._conn.execute(
            "UPDATE servers SET last_n = greatest(last_n, %s) WHERE id = %s AND origin = %s",
            (item.seq.n, self._me, item.seq.origin),
        )

    def remove_messages(self, change: MessagesRemoved) -> None:
        for seq in change.seqs:
            self._conn.execute(
                "DELETE FROM mailbox WHERE origin = %s AND n = %s AND recipient = %s",
                (seq.origin, seq.n, change.recipient),
            )


__all__ = ["PgStore", "StoreError", "server_id"]
