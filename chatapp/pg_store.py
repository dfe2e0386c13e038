"""A PostgreSQL store (``--db postgresql://...``): chatapp's tables in a database
that any number of servers share.

The database holds one server key (made by the first server to start: every
server signs with it, so a client's pin holds at each of them), the client
table (each name's binding to a key, its session id, and its ``home``: the
server that saved it last, which pushes it the table and its stored messages),
every recipient's delivery stream, and one row per server (its origin, its
sequence counter and its heartbeat). Each server keeps the whole table and every
mailbox in memory, as with SQLite, and commits its own changes
(``chatapp.protocol.changes``, through the one ``apply_changes``) in one
transaction before the answer that depends on them. In the same transaction it
writes the changes, encoded, to ``changelog`` and notifies the channel
``chatapp`` with ``SERVER SEQ`` (a small payload: the rows live in the table).
The other servers LISTEN, read the row and apply the changes to what they hold
(``chatapp.shared``); one that lost its listening connection reads the tables
again.

A name is decided by the committing transaction: a record saved for a name that
the database binds to another key is rolled back (``NameTaken``), so two servers
registering one name at once cannot both bind it. Servers record a heartbeat in
``servers`` every ``HEARTBEAT_INTERVAL``; the online clients of a server whose
heartbeat is older than ``HEARTBEAT_TIMEOUT`` are marked offline by whichever
server sees it first, in one transaction, announced like any other change.

Blocking calls run in worker threads; the Trio loop never waits on the database.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
import trio

from chatapp.pg_pool import Reconnecting
from chatapp.pg_schema import MIGRATIONS, SCHEMA_VERSION, StoreError, migrate
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
from chatapp.store import MemoryStore, ServerDisk, checked_row, new_origin, stored_item
from chatapp.wire import Name, Port

#: The channel every server LISTENs on; a payload is ``SERVER SEQ`` (a row of changelog).
CHANNEL = "chatapp"
#: A server records its heartbeat this often (seconds) ...
HEARTBEAT_INTERVAL = 1.0
#: ... and one whose heartbeat is older than this is taken for stopped: its online
#: clients are marked offline (the README says so).
HEARTBEAT_TIMEOUT = 10.0
#: How long a changelog row is kept (a server that missed more reads the tables again).
CHANGELOG_KEPT = 30.0


class NameTaken(psycopg.DatabaseError):
    """A commit would have bound a name that the database binds to another key (two
    servers registering one name at once: the first commit wins, this one is rolled
    back, and the client, registering again, is told the name belongs to another key)."""


class Superseded(psycopg.DatabaseError):
    """A commit would have marked offline (or deregistered) a client that registered
    again meanwhile, here or at another server (a server's "did not come back" after a
    restart or a sweep, racing the client's registration elsewhere): rolled back, and
    the server reads what the database holds."""


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
    return _tables(conn, me, ServerDisk(seed, origin, last_n, [], {}))


def _tables(conn: psycopg.Connection[Any], me: str, disk: ServerDisk) -> ServerDisk:
    """``disk`` with the clients (and which of them other servers push the table to)
    and the stored messages as this transaction sees them."""
    elsewhere = set()
    for *values, home in conn.execute(
        "SELECT name, ip, port, key, sid, presence, home FROM clients ORDER BY changed"
    ):
        row = checked_row(tuple(bytes(v) if isinstance(v, memoryview) else v for v in values),
                       _ClientRow, "clients", StoreError)  # fmt: skip
        try:
            ipaddress.IPv4Address(row.ip)
        except ValueError:
            raise StoreError(f"a row of clients has {row.ip!r} for an IPv4 address") from None
        disk.clients.append(
            ClientRecord(row.name, (row.ip, row.port), row.key, row.sid, Presence(row.presence))
        )
        if home != me:
            elsewhere.add(row.name)
    for recipient, *row in conn.execute(
        "SELECT recipient, origin, n, id, kind, sender, stored_at, text, sig, sealed"
        " FROM mailbox ORDER BY origin, n"
    ):
        if not isinstance(recipient, str):
            raise StoreError("a row of mailbox is not one chatapp writes: its recipient")
        disk.mailbox.setdefault(recipient, []).append(stored_item(row, StoreError))
    disk.elsewhere = frozenset(elsewhere)
    return disk


@dataclass
class Snapshot:
    """The tables as one transaction saw them, and the changelog rows they include."""

    disk: ServerDisk
    logged: set[int] = field(default_factory=set)


def _snapshot(conn: psycopg.Connection[Any], me: str, disk: ServerDisk) -> Snapshot:
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    logged = {seq for (seq,) in conn.execute("SELECT seq FROM changelog")}
    return Snapshot(_tables(conn, me, disk), logged)


# --- the changes, as changelog holds them ---------------------------------------------------

_KINDS: dict[str, type[Change]] = {
    kind.__name__: kind for kind in (ClientSaved, ClientRemoved, MessageStored, MessagesRemoved)
}


def encode_changes(changes: list[Change]) -> bytes:
    return msgspec.msgpack.encode(
        [(type(change).__name__, msgspec.msgpack.encode(change)) for change in changes]
    )


def decode_changes(data: bytes) -> list[Change]:
    """The changes of a changelog row; ``ValueError`` if it is not one chatapp wrote (a
    database is outside input too)."""
    try:
        rows = msgspec.msgpack.decode(data, type=list[tuple[str, bytes]])
        return [msgspec.msgpack.decode(raw, type=_KINDS[kind]) for kind, raw in rows]
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
        raise ValueError(f"a changelog row is not one chatapp writes: {exc}") from None


# --- the store -----------------------------------------------------------------------------

T = TypeVar("T")


class _Held:
    """What this server knows the database holds: what it read last, with every commit
    since (its own, its sweeps', the other servers' it was notified of) applied, each
    client with whether another server serves it. A failed commit while the database
    cannot be read either rolls back to this (the listener reads the tables again when
    the database answers)."""

    def __init__(self, disk: ServerDisk, me: str) -> None:
        self.me = me
        self.store = MemoryStore(key=disk.key, origin=disk.origin, last_n=disk.last_n)
        self.elsewhere = set(disk.elsewhere)
        apply_changes([ClientSaved.of(record) for record in disk.clients], self.store)
        for recipient, items in disk.mailbox.items():
            apply_changes([MessageStored(recipient, item) for item in items], self.store)

    def take(self, changes: list[Change], server: str | None) -> None:
        """``changes`` as committed by ``server`` (None: a sweep, the clients homeless)."""
        apply_changes(changes, self.store)
        for change in changes:
            if isinstance(change, ClientSaved) and server != self.me:
                self.elsewhere.add(change.name)
            elif isinstance(change, ClientSaved | ClientRemoved):
                self.elsewhere.discard(change.name)

    def disk(self) -> ServerDisk:
        disk = self.store.load()
        names = {record.name for record in disk.clients}
        disk.elsewhere = frozenset(self.elsewhere & names)
        return disk


class PgStore:
    """chatapp's tables in a PostgreSQL database shared with other servers."""

    durable = True

    def __init__(self, url: str, me: str) -> None:
        """Not connected yet: ``open`` connects, migrates and reads."""
        self.url = url
        self.me = me
        self._commits = Reconnecting(url)  # the node's commits
        self._link = Reconnecting(url)  # the link's reads, heartbeats and sweeps
        self._loaded: ServerDisk | None = None
        self._held = _Held(ServerDisk(b"", "", 0, [], {}), me)
        self._identity: tuple[bytes, str] = (b"", "")  # the key's seed and this origin

    def open(self) -> None:
        """Connect, create or migrate the schema, read the tables (blocking: call it in a
        worker thread)."""
        try:
            self._commits.transaction(migrate)
            self._loaded = self._commits.transaction(_read, self.me)
        except BaseException:
            self._commits.close()
            raise
        self._identity = (self._loaded.key, self._loaded.origin)
        self._held = _Held(self._loaded, self.me)

    def load(self) -> ServerDisk:
        """The server's key, its origin and counter, the clients (oldest change first)
        and the stored messages (oldest first)."""
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            loaded = self._commits.transaction(_read, self.me)
            self._held = _Held(loaded, self.me)
        return loaded

    async def load_async(self) -> ServerDisk:
        """The tables read in a worker thread (after a failed commit: the loop goes on)."""
        loaded = await trio.to_thread.run_sync(self._commits.transaction, _read, self.me)
        self._held = _Held(loaded, self.me)  # in the loop's thread, as every other change
        return loaded

    def held(self) -> ServerDisk:
        """What this server knows the database holds, without asking it (after a failed
        commit, when the database cannot be read either: the server goes on)."""
        return self._held.disk()

    def learned(self, changes: list[Change], server: str) -> None:
        """Another server committed ``changes`` (this one was notified)."""
        self._held.take(changes, server)

    async def commit(self, changes: list[Change]) -> None:
        # Not abandoned on cancel: a commit that started finishes before the node goes on.
        await trio.to_thread.run_sync(self._commits.transaction, _commit, changes, self.me)
        self._held.take(changes, self.me)

    # --- what the link to the other servers asks (``chatapp.shared``) ------------------

    async def snapshot(self) -> Snapshot:
        """The tables as they are now (after a reconnect, or a changelog row gone)."""
        seed, origin = self._identity
        disk = ServerDisk(seed, origin, 0, [], {})
        snapshot = await self._run(_snapshot, self.me, disk)
        self._held = _Held(snapshot.disk, self.me)
        return snapshot

    async def changelog(self, seqs: list[int]) -> dict[int, tuple[str, bytes]]:
        """The changelog rows ``seqs`` that are still kept: seq -> (server, changes)."""
        return await self._run(_changelog, seqs)

    async def beat(self) -> None:
        await self._run(_beat, self.me)

    async def sweep(self) -> list[Change]:
        """Mark offline the online clients of stopped servers; the changes made."""
        swept = await self._run(_sweep, self.me)
        self._held.take(swept, None)
        return swept

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(self._link.transaction, fn, *args)

    def close(self) -> None:
        self._commits.close()
        self._link.close()


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
    conn.execute("UPDATE servers SET beat = now() WHERE id = %s", (me,))
    conn.execute(
        "DELETE FROM changelog WHERE at < now() - make_interval(secs => %s)", (CHANGELOG_KEPT,)
    )


def _sweep(conn: psycopg.Connection[Any], me: str) -> list[Change]:
    """The online clients of servers whose heartbeat stopped (or whose home is no server
    at all), marked offline (silent) and homeless; announced like any other change."""
    # The stopped servers' rows stay locked until this commits: a server starting again
    # (its first act writes its heartbeat) waits, and registers its clients only after
    # this; one that started first is not stopped any more when its row is read here.
    dead = [
        server
        for (server,) in conn.execute(
            "SELECT id FROM servers WHERE id <> %s"
            " AND beat < statement_timestamp() - make_interval(secs => %s)"
            " ORDER BY id FOR UPDATE",  # one order: two sweeping servers never deadlock
            (me, HEARTBEAT_TIMEOUT),
        )
    ]
    rows = conn.execute(
        "UPDATE clients SET presence = 'silent', home = NULL,"
        " changed = nextval('client_changes')"
        " WHERE presence = 'online' AND home IS DISTINCT FROM %s AND (home = ANY(%s)"
        "  OR NOT EXISTS (SELECT 1 FROM servers WHERE id = clients.home))"
        " RETURNING name, ip, port, key, sid",
        (me, dead),
    ).fetchall()
    changes: list[Change] = [
        ClientSaved(name, ip, port, bytes(key), bytes(sid), Presence.SILENT)
        for name, ip, port, key, sid in rows
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
        # The row is replaced only by a record with the key the name is bound to: a name
        # another server bound to another key meanwhile rolls this transaction back (the
        # row is locked while a concurrent one decides).
        saved = self._conn.execute(
            "INSERT INTO clients (name, ip, port, key, sid, presence, changed, home)"
            " VALUES (%s, %s, %s, %s, %s, %s, nextval('client_changes'), %s)"
            " ON CONFLICT (name) DO UPDATE SET ip = excluded.ip, port = excluded.port,"
            " key = excluded.key, sid = excluded.sid, presence = excluded.presence,"
            " changed = excluded.changed, home = excluded.home"
            " WHERE clients.key = excluded.key"
            " AND (excluded.presence = 'online' OR clients.sid = excluded.sid"
            "  AND (clients.home = excluded.home OR clients.home IS NULL))"
            " RETURNING name",
            (
                change.name, change.ip, change.port, change.key, change.sid,
                change.presence.value, self._me,
            ),
        ).fetchone()  # fmt: skip
        if saved is not None:
            return
        # A client is marked offline (or deregistered) only in the session the row still
        # names, by the server the row names (or none, after a sweep): one that
        # registered again meanwhile, at any server, is not undone (the transaction is
        # rolled back; this server reads what the database holds).
        same_key = self._conn.execute(
            "SELECT key = %s FROM clients WHERE name = %s", (change.key, change.name)
        ).fetchone()
        if same_key is not None and same_key[0]:
            raise Superseded(f"{change.name} registered again meanwhile")
        raise NameTaken(f"the name {change.name} is bound to another key")

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


__all__ = [
    "CHANNEL",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "NameTaken",
    "PgStore",
    "Snapshot",
    "StoreError",
    "Superseded",
    "decode_changes",
    "encode_changes",
    "server_id",
]
