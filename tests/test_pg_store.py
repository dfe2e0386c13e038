"""The PostgreSQL store and the link between servers that share it, against a real
(throwaway) PostgreSQL server; nodes on the in-memory network in real time (the
database's worker threads do not run on a virtual clock)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from _harness import VirtualClient, VirtualServer, chatapp_env, free_udp_ports, start_client

from chatapp import screen
from chatapp.launch import ServerOptions, StartupError, run_node
from chatapp.node import Node
from chatapp.pg_store import (
    SCHEMA_VERSION,
    NameTaken,
    PgStore,
    StoreError,
    decode_changes,
    encode_changes,
)
from chatapp.protocol.changes import (
    Change,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
)
from chatapp.protocol.common import Log
from chatapp.protocol.server import ServerProtocol
from chatapp.store import MemoryStore
from chatapp.testing import MemoryNetwork
from chatapp.testing.postgres import (
    ServerBinariesMissing,
    owner_mark,
    remove_abandoned_clusters,
    throwaway_server,
)
from chatapp.wire import StoredItem

pytestmark = pytest.mark.postgres

A = ("10.0.0.1", 8001)
B = ("10.0.0.2", 8002)

SOME_CHANGES: list[Change] = [
    ClientSaved("user1", "10.0.0.5", 9001, "t1", Presence.ONLINE),
    ClientSaved("user2", "10.0.0.6", 9002, "t2", Presence.ONLINE),
    MessageStored("user2", StoredItem("m1", "direct", "user1", "a", 1.5)),
    MessageStored("user2", StoredItem("m2", "channel", "user1", "b", 2.5)),
    ClientSaved("user1", "10.0.0.5", 9001, "t1", Presence.DEREGISTERED),
    MessagesRemoved("user2", ("m1",)),
]


def sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


def test_the_schema_is_made_once_and_versioned(pg_url: str) -> None:
    PgStore(pg_url, "a").open()
    PgStore(pg_url, "b").open()  # a second server: nothing to do
    assert sql(pg_url, "SELECT value FROM chatapp_meta") == [(str(SCHEMA_VERSION),)]
    assert sql(pg_url, "SELECT id FROM servers ORDER BY id") == [("a",), ("b",)]


def test_a_database_of_another_application_is_refused(pg_url: str) -> None:
    sql(pg_url, "CREATE TABLE invoices (id int)")
    with pytest.raises(StoreError, match="not a chatapp database"):
        PgStore(pg_url, "a").open()
    assert sql(pg_url, "SELECT count(*) FROM invoices") == [(0,)]


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    PgStore(pg_url, "a").open()
    sql(pg_url, "UPDATE chatapp_meta SET value = '99'")
    with pytest.raises(StoreError, match="schema version 99"):
        PgStore(pg_url, "a").open()


async def test_what_is_committed_is_what_a_memory_store_holds(pg_url: str) -> None:
    store = PgStore(pg_url, "a")
    store.open()
    async with store.pool:
        for change in SOME_CHANGES:
            await store.commit([change])
    assert store.load() == MemoryStore(SOME_CHANGES).load()
    (row,) = sql(pg_url, "SELECT server, changes FROM changelog ORDER BY seq DESC LIMIT 1")
    assert row[0] == "a" and decode_changes(bytes(row[1])) == [SOME_CHANGES[-1]]


async def test_a_name_online_at_another_running_server_cannot_be_taken(pg_url: str) -> None:
    a, b = PgStore(pg_url, "a"), PgStore(pg_url, "b")
    a.open()
    b.open()
    here = ClientSaved("user1", "10.0.0.5", 9001, "t1", Presence.ONLINE)
    there = ClientSaved("user1", "10.0.0.6", 9002, "t2", Presence.ONLINE)
    async with a.pool, b.pool:
        await a.commit([here])
        with pytest.raises(NameTaken):
            await b.commit(
                [MessageStored("user1", StoredItem("m", "direct", "x", "y", 1.0)), there]
            )
        assert sql(pg_url, "SELECT count(*) FROM mailbox") == [(0,)]  # all rolled back
        # The same address (the client moved to b), or an offline holder: b takes it.
        await b.commit([ClientSaved("user1", "10.0.0.5", 9001, "t1", Presence.ONLINE)])
        await a.commit([ClientSaved("user1", "10.0.0.5", 9001, "t1", Presence.SILENT)])
        await b.commit([there])
        with pytest.raises(NameTaken):
            await a.commit([here])
        # A holder whose server stopped (its heartbeat row gone) holds nothing.
        sql(pg_url, "DELETE FROM servers WHERE id = 'b'")
        await a.commit([here])
    assert sql(pg_url, "SELECT ip, home FROM clients") == [("10.0.0.5", "a")]


def test_a_changelog_row_chatapp_did_not_write_is_refused() -> None:
    assert decode_changes(encode_changes(SOME_CHANGES)) == SOME_CHANGES
    for junk in (b"", b"\x93\x01\x02", encode_changes([]) + b"x"):
        with pytest.raises(ValueError):
            decode_changes(junk)


def test_a_row_of_the_wrong_type_is_refused_at_start(pg_url: str) -> None:
    PgStore(pg_url, "a").open()
    sql(pg_url, "INSERT INTO clients VALUES ('user1', 'not an ip', 9001, 't', 'online', 1, 'a')")
    with pytest.raises(StoreError, match="IPv4"):
        PgStore(pg_url, "a").open()


async def test_the_clients_of_a_stopped_server_are_marked_offline(pg_url: str) -> None:
    store = PgStore(pg_url, "alive")
    store.open()
    sql(pg_url, "INSERT INTO servers (id, beat) VALUES ('gone', now() - interval '1 hour')")
    sql(pg_url, "INSERT INTO clients VALUES ('x', '10.0.0.5', 9001, 't', 'online', 1, 'gone')")
    sql(pg_url, "INSERT INTO clients VALUES ('y', '10.0.0.6', 9002, 't', 'online', 2, 'alive')")
    sql(pg_url, "INSERT INTO clients VALUES ('z', '10.0.0.7', 9003, 't', 'online', 3, 'never')")
    async with store.pool:
        swept = await store.sweep()
        assert await store.sweep() == []
    assert sorted(swept, key=lambda c: c.name) == [  # type: ignore[attr-defined]
        ClientSaved("x", "10.0.0.5", 9001, "t", Presence.SILENT),
        ClientSaved("z", "10.0.0.7", 9003, "t", Presence.SILENT),
    ]
    assert sql(pg_url, "SELECT id FROM servers") == [("alive",)]
    assert sql(pg_url, "SELECT name FROM clients WHERE presence = 'online'") == [("y",)]


def test_clusters_left_by_a_killed_run_are_removed(tmp_path: Path) -> None:
    dead = Path(tempfile.mkdtemp(prefix="chatapp-pg-"))
    (dead / "owner").write_text("999999999 1")  # no such process
    mine = Path(tempfile.mkdtemp(prefix="chatapp-pg-"))
    (mine / "owner").write_text(owner_mark())
    try:
        removed = remove_abandoned_clusters()
        assert dead in removed and not dead.exists()
        assert mine.exists()
    finally:
        for path in (dead, mine):
            if path.exists():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()


# --- servers in this process, on the in-memory network ----------------------------------


async def start_shared_server(
    nursery: trio.Nursery, network: MemoryNetwork, addr: tuple[str, int], url: str
) -> VirtualServer:
    options = ServerOptions(addr[1], host=addr[0], db=url, id_prefix=f"s{addr[1]}", epoch=addr[1])
    logs: list[Log] = []
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[Node]) -> None:
        try:
            await run_node(options, network=network, log=logs.append, task_status=task_status)
        finally:
            done.set()

    node = await nursery.start(run)
    assert isinstance(node.protocol, ServerProtocol)
    return VirtualServer(node, node.protocol, logs, done)


async def eventually(check: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not check():
            await trio.sleep(0.02)


def table_of(client: VirtualClient) -> dict[str, bool]:
    return {name: entry.online for name, entry in client.protocol.table.items()}


def backends(url: str, query: str) -> None:
    """End the connections to ``url``'s database whose query starts with ``query``."""
    sql(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE %s",
        query + "%",
    )


async def test_a_server_that_lost_the_notifications_catches_up_from_the_tables(
    pg_url: str,
) -> None:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a = await start_shared_server(nursery, network, A, pg_url)
        b = await start_shared_server(nursery, network, B, pg_url)
        user1 = await start_client(nursery, network, "user1", ("10.0.1.1", 9001), A)
        user2 = await start_client(nursery, network, "user2", ("10.0.1.2", 9002), B)
        await eventually(lambda: table_of(user2) == {"user1": True, "user2": True}, "user1")
        await eventually(lambda: table_of(user1) == {"user1": True, "user2": True}, "user2")

        backends(pg_url, "LISTEN")  # both servers lose their listening connections
        user3 = await start_client(nursery, network, "user3", ("10.0.1.3", 9003), A)
        await eventually(lambda: "user3" in table_of(user2), "user3 seen at B")
        assert any("lost the other servers' changes" in log.text for log in b.logs)
        await user3.type("send_all hello")
        await user3.expect(screen.CHANNEL_ACKED)
        await user1.expect("Channel_Message user3 : hello")
        nursery.cancel_scope.cancel()
    assert not a.protocol.elsewhere & {"user1", "user3"}
    assert b.protocol.elsewhere == {"user1", "user3"}


async def test_a_database_that_refuses_writes_gets_a_refusal_not_an_ack(pg_url: str) -> None:
    network = MemoryNetwork()
    name = pg_url.rsplit("/", 1)[1]
    admin = pg_url.rsplit("/", 1)[0] + "/postgres"
    async with trio.open_nursery() as nursery:
        server = await start_shared_server(nursery, network, A, pg_url)
        user1 = await start_client(nursery, network, "user1", ("10.0.1.1", 9001), A)
        await user1.expect(screen.TABLE_UPDATED)
        sql(admin, f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        backends(pg_url, "")  # connections made from now on cannot write
        await user1.type("dereg user1")
        await user1.expect(screen.CANNOT_STORE, limit=20)
        sql(admin, f"ALTER DATABASE {name} RESET default_transaction_read_only")
        backends(pg_url, "")
        await user1.type("dereg user1")
        await user1.expect(screen.YOU_ARE_OFFLINE, limit=20)
        nursery.cancel_scope.cancel()
    assert user1.lines.count(screen.YOU_ARE_OFFLINE) == 1
    assert any("read-only" in log.text for log in server.logs)
    assert sql(pg_url, "SELECT presence FROM clients") == [("deregistered",)]


def test_serve_says_in_one_line_why_a_database_cannot_be_used(tmp_path: Path, pg_url: str) -> None:
    from _harness import Proc, serve_args

    sql(pg_url, "CREATE TABLE invoices (id int)")
    (port, closed) = free_udp_ports(2)
    for url, why in (
        (pg_url, "not a chatapp database"),
        (f"postgresql://postgres@127.0.0.1:{closed}/x", "cannot use the database"),
    ):
        proc = Proc(serve_args(port, db=url), chatapp_env(tmp_path))
        assert proc.popen.wait(20) == 1
        proc.stop()
        errors = [line for line in proc.lines() if why in line]
        assert len(errors) == 1 and "Traceback" not in proc.output, proc.output
    assert StartupError  # the CLI's one line comes from StartupError


def test_without_server_binaries_the_reason_says_how_to_get_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import chatapp.testing.postgres as postgres

    monkeypatch.delenv("CHATAPP_PG_BINDIR", raising=False)
    monkeypatch.setattr(postgres.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres, "_debian_bindirs", list)
    assert postgres.find_server_bindir() is None
    with pytest.raises(ServerBinariesMissing) as missing, throwaway_server():
        pass
    assert "pip install '.[test]'" in str(missing.value)
    assert "apt-get install postgresql" in str(missing.value)
    assert "CHATAPP_PG_BINDIR" in str(missing.value)
    monkeypatch.setenv("CHATAPP_PG_BINDIR", str(tmp_path))  # a directory without them
    assert postgres.find_server_bindir() is None
