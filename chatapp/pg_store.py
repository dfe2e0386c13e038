"""The shared store: a PostgreSQL database that any number of servers use at once.

Each server keeps the whole table and every mailbox in memory, as with SQLite,
and commits its own changes (``chatapp.protocol.changes``, through the one
``apply_changes``) in one transaction before it sends the answer that depends on
them. In the same transaction it writes the changes themselves, encoded, to
``changelog`` and notifies the channel ``chatapp`` with ``SERVER SEQ`` (a small
payload: the rows live in the table). The other servers LISTEN, read the row and
apply the changes to what they hold (``chatapp.shared``); a server that lost its
listening connection reads the tables again.

Every client row names its ``home``: the server that saved it last, which is the
one that pushes the table to it. Servers record a heartbeat in ``servers``; the
online clients of a server whose heartbeat is older than ``HEARTBEAT_TIMEOUT``
(and of one that is not there at all) are marked offline by whichever server sees
it first, in one transaction, announced like any other change.

Blocking calls run in worker threads (``chatapp.pg_pool``); the Trio loop never
waits on the database.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
import trio

from chatapp.pg_pool import TrioPool, connect
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
from chatapp.wire import MsgId, Name, Port, StoredItem, Text, Token

SCHEMA_VERSION = 1

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
}

#: The channel every server LISTENs on; a payload is ``SERVER SEQ`` (a row of changelog).
CHANNEL = "chatapp"
#: A server records its heartbeat this often (seconds) ...
HEARTBEAT_INTERVAL = 1.0
#: ... and one whose heartbeat is older than this is taken for stopped: its online
#: clients are marked offline (the README says so).
HEARTBEAT_TIMEOUT = 10.0
#: How long a changelog row is kept (a server that missed more reads the tables again).
CHANGELOG_KEPT = 30.0
#: How long a server whose commit failed keeps asking the database for what it holds
#: (it cannot go on without it: then it stops).
RELOAD_PATIENCE = 30.0
#: The key of the advisory lock that one migration at a time holds.
_MIGRATION_LOCK = 0x43484154  # "CHAT"


class StoreError(psycopg.DatabaseError):
    """The database cannot be used by this server (said in one line)."""


class NameTaken(psycopg.DatabaseError):
    """A commit would have taken a name that a client of another running server holds
    online at another address (two servers registering one name at once: the first
    commit wins, this one is rolled back)."""


def server_id(port: int) -> str:
    """A server's name in the database: its host and UDP port (a server restarted on the
    same port is the same server, and takes its clients back)."""
    return f"{socket.gethostname()}:{port}"


# --- rows as chatapp writes them (anything else is refused) ------------------------------


class _ClientRow(msgspec.Struct):
    name: Name
    ip: str
    port: Port
    token: Token
    presence: Literal["online", "deregistered", "silent"]
    home: str | None


class _MailboxRow(msgspec.Struct):
    recipient: Name
    id: MsgId
    kind: Literal["direct", "channel"]
    sender: Name
    text: Text
    stored_at: float


R = TypeVar("R")


def _checked(values: tuple[Any, ...], kind: type[R], table: str) -> R:
    fields = msgspec.structs.fields(kind)  # type: ignore[arg-type]
    try:
        return msgspec.convert(dict(zip((f.name for f in fields), values, strict=True)), kind)
    except msgspec.ValidationError as exc:
        raise StoreError(f"a row of {table} is not one chatapp writes: {exc}") from None


# --- the changes, as changelog holds them ---------------------------------------------------

_KINDS: dict[str, type[Change]] = {
    kind.__name__: kind for kind in (ClientSaved, ClientRemoved, MessageStored, MessagesRemoved)
}


def encode_changes(changes: list[Change]) -> bytes:
    return msgspec.msgpack.encode(
        [(type(change).__name__, msgspec.to_builtins(change)) for change in changes]
    )


def decode_changes(data: bytes) -> list[Change]:
    """The changes of a changelog row; ``ValueError`` if it is not one chatapp wrote."""
    try:
        rows = msgspec.msgpack.decode(data, type=list[tuple[str, dict[str, Any]]])
        return [msgspec.convert(fields, _KINDS[kind]) for kind, fields in rows]
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
        raise ValueError(f"a changelog row is not one chatapp writes: {exc}") from None


# --- what a server reads ---------------------------------------------------------------


@dataclass
class Snapshot:
    """The tables as one transaction saw them."""

    clients: list[ClientRecord]  # oldest change first
    mailbox: dict[str, list[StoredItem]]  # oldest first
    homes: dict[str, str | None]  # name -> the server that pushes its table
    logged: set[int] = field(default_factory=set)  # changelog rows already in the tables

    def elsewhere(self, me: str) -> set[str]:
        return {name for name, home in self.homes.items() if home != me}


def _read(conn: psycopg.Connection[Any]) -> Snapshot:
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    clients, homes = [], {}
    for values in conn.execute(
        "SELECT name, ip, port, token, presence, home FROM clients ORDER BY changed"
    ):
        row = _checked(values, _ClientRow, "clients")
        try:
            ipaddress.IPv4Address(row.ip)
        except ValueError:
            raise StoreError(f"a row of clients has {row.ip!r} for an IPv4 address") from None
        clients.append(
            ClientRecord(row.name, (row.ip, row.port), row.token, Presence(row.presence))
        )
        homes[row.name] = row.home
    mailbox: dict[str, list[StoredItem]] = {}
    for values in conn.execute(
        "SELECT recipient, id, kind, sender, text, stored_at FROM mailbox ORDER BY seq"
    ):
        stored = _checked(values, _MailboxRow, "mailbox")
        mailbox.setdefault(stored.recipient, []).append(
            StoredItem(stored.id, stored.kind, stored.sender, stored.text, stored.stored_at)
        )
    logged = {seq for (seq,) in conn.execute("SELECT seq FROM changelog")}
    return Snapshot(clients, mailbox, homes, logged)


# --- the store -----------------------------------------------------------------------------


class PgStore:
    """chatapp's tables in a PostgreSQL database shared with other servers."""

    durable = True

    def __init__(self, url: str, me: str, *, pool_size: int = 3) -> None:
        """Not connected yet: ``open`` connects, migrates and records the first heartbeat."""
        self.url = url
        self.me = me
        self.pool = TrioPool(url, pool_size)
        #: The names whose table another server pushes (as of the last ``load``).
        self.elsewhere: set[str] = set()
        self._loaded: Snapshot | None = None

    def open(self) -> None:
        """Connect, create or migrate the schema, record this server's first heartbeat,
        read the tables (blocking: call it in a worker thread)."""
        with connect(self.url) as conn:
            with conn.transaction():
                _migrate(conn)
            with conn.transaction():
                _beat(conn, self.me)
            with conn.transaction():
                self._loaded = _read(conn)

    def load(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        """The clients and stored messages as last committed (blocking: at start, or in a
        worker thread)."""
        snapshot, self._loaded = self._loaded, None
        if snapshot is None:
            with connect(self.url) as conn, conn.transaction():
                snapshot = _read(conn)
        self.elsewhere = snapshot.elsewhere(self.me)
        return snapshot.clients, snapshot.mailbox

    async def load_async(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        """``load`` without blocking the loop (after a failed commit). A database that does
        not answer is asked again for up to ``RELOAD_PATIENCE`` seconds."""
        deadline = trio.current_time() + RELOAD_PATIENCE
        while True:
            try:
                snapshot = await self.pool.run(_read)
                break
            except psycopg.OperationalError:
                if trio.current_time() >= deadline:
                    raise
                await trio.sleep(0.5)
        self.elsewhere = snapshot.elsewhere(self.me)
        return snapshot.clients, snapshot.mailbox

    async def snapshot(self) -> Snapshot:
        return await self.pool.run(_read)

    async def commit(self, changes: list[Change]) -> None:
        self._loaded = None  # what was read at start is not what the tables hold now
        await self.pool.run(_commit, changes, self.me)

    async def changelog(self, seqs: list[int]) -> dict[int, tuple[str, bytes]]:
        """The changelog rows ``seqs`` that are still kept: seq -> (server, changes)."""
        return await self.pool.run(_changelog, seqs)

    async def beat(self) -> None:
        await self.pool.run(_beat, self.me)

    async def sweep(self) -> list[Change]:
        """Mark offline the online clients of stopped servers; the changes made."""
        return await self.pool.run(_sweep, self.me)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def close(self) -> None:
        """The pool is closed by ``aclose`` (its connections belong to worker threads)."""


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


def _commit(conn: psycopg.Connection[Any], changes: list[Change], me: str) -> None:
    with conn.pipeline():
        apply_changes(changes, _Transaction(conn, me))
        _announce(conn, changes, me)


def _announce(conn: psycopg.Connection[Any], changes: list[Change], me: str) -> None:
    """The changes to changelog and their row's number to every listening server; both
    take effect at the commit (a notification is sent only if it commits)."""
    conn.execute(
        "WITH logged AS (INSERT INTO changelog (server, changes) VALUES (%s, %s) RETURNING seq)"
        " SELECT pg_notify(%s, %s || ' ' || seq) FROM logged",
        (me, encode_changes(changes), CHANNEL, me),
    )


def _changelog(conn: psycopg.Connection[Any], seqs: list[int]) -> dict[int, tuple[str, bytes]]:
    rows = conn.execute("SELECT seq, server, changes FROM changelog WHERE seq = ANY(%s)", (seqs,))
    return {seq: (server, bytes(data)) for seq, server, data in rows}


def _beat(conn: psycopg.Connection[Any], me: str) -> None:
    conn.execute(
        "INSERT INTO servers (id) VALUES (%s) ON CONFLICT (id) DO UPDATE SET beat = now()", (me,)
    )
    conn.execute(
        "DELETE FROM changelog WHERE at < now() - make_interval(secs => %s)", (CHANGELOG_KEPT,)
    )


def _sweep(conn: psycopg.Connection[Any], me: str) -> list[Change]:
    # SKIP LOCKED: two servers sweeping at once do not wait for each other.
    conn.execute(
        "DELETE FROM servers WHERE id IN (SELECT id FROM servers"
        " WHERE beat < now() - make_interval(secs => %s) AND id <> %s FOR UPDATE SKIP LOCKED)",
        (HEARTBEAT_TIMEOUT, me),
    )
    rows = conn.execute(
        "UPDATE clients SET presence = 'silent', home = NULL, changed = nextval('client_changes')"
        " WHERE presence = 'online'"
        " AND (home IS NULL OR NOT EXISTS (SELECT 1 FROM servers WHERE id = home))"
        " RETURNING name, ip, port, token"
    ).fetchall()
    changes: list[Change] = [
        ClientSaved(name, ip, port, token, Presence.SILENT) for name, ip, port, token in rows
    ]
    if changes:
        _announce(conn, changes, me)
    return changes


class _Transaction:
    """The SQL of each kind of change, inside a transaction (``ChangeSink``)."""

    def __init__(self, conn: psycopg.Connection[Any], me: str) -> None:
        self._conn = conn
        self._me = me

    def save_client(self, change: ClientSaved) -> None:
        # The row is replaced unless another running server's client holds the name
        # online at another address: then the name is that client's, and this
        # transaction is rolled back (the row is locked while a concurrent one decides).
        taken = self._conn.execute(
            "INSERT INTO clients (name, ip, port, token, presence, changed, home)"
            " VALUES (%s, %s, %s, %s, %s, nextval('client_changes'), %s)"
            " ON CONFLICT (name) DO UPDATE SET ip = excluded.ip, port = excluded.port,"
            " token = excluded.token, presence = excluded.presence,"
            " changed = excluded.changed, home = excluded.home"
            " WHERE clients.presence <> 'online' OR clients.home IS NOT DISTINCT FROM excluded.home"
            " OR (clients.ip = excluded.ip AND clients.port = excluded.port)"
            " OR NOT EXISTS (SELECT 1 FROM servers WHERE id = clients.home)"
            " RETURNING name",
            (change.name, change.ip, change.port, change.token, change.presence.value, self._me),
        ).fetchone()
        if taken is None:
            raise NameTaken(f"the name {change.name} is online at another server")

    def remove_client(self, change: ClientRemoved) -> None:
        self._conn.execute("DELETE FROM clients WHERE name = %s", (change.name,))

    def store_message(self, change: MessageStored) -> None:
        item = change.item
        self._conn.execute(
            "INSERT INTO mailbox (recipient, id, kind, sender, text, stored_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (recipient, id) DO NOTHING",
            (change.recipient, item.id, item.kind, item.sender, item.text, item.stored_at),
        )

    def remove_messages(self, change: MessagesRemoved) -> None:
        self._conn.execute(
            "DELETE FROM mailbox WHERE recipient = %s AND id = ANY(%s)",
            (change.recipient, list(change.ids)),
        )


__all__ = [
    "CHANNEL",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "NameTaken",
    "PgStore",
    "Snapshot",
    "StoreError",
    "decode_changes",
    "encode_changes",
    "server_id",
]
