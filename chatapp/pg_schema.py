"""The PostgreSQL store's schema (``chatapp.pg_store``): created and migrated, one
server at a time, as the SQLite one is."""

from __future__ import annotations

from typing import Any

import psycopg

SCHEMA_VERSION = 3

#: Several servers sharing the database: each commit's changes, announced by NOTIFY
#: (created by version 1, dropped by 2, created again by 3).
_CHANGELOG = """
        CREATE TABLE changelog (
            seq bigserial PRIMARY KEY,
            server text NOT NULL,
            at timestamptz NOT NULL DEFAULT now(),
            changes bytea NOT NULL
        );
        CREATE INDEX changelog_by_time ON changelog (at);
"""

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
    """
    + _CHANGELOG,
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
    # Several servers sharing the database: each commit's changes, announced by NOTIFY.
    3: _CHANGELOG,
}

#: The key of the advisory lock that one migration at a time holds.
_MIGRATION_LOCK = 0x43484154  # "CHAT"


class StoreError(psycopg.DatabaseError):
    """The database cannot be used by this server (said in one line)."""


def migrate(conn: psycopg.Connection[Any]) -> None:
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


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "StoreError", "migrate"]
