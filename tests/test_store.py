"""The durable mailbox and table: SQLite, commit before ACK, schema migrations, limits."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from _harness import start_client, start_server

from chatapp import screen
from chatapp.launch import StartupError, open_store
from chatapp.protocol.changes import (
    Change,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
)
from chatapp.sqlite_store import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    SqliteStore,
    StoreError,
    default_db_path,
)
from chatapp.store import MemoryStore
from chatapp.testing import MemoryNetwork
from chatapp.wire import MAX_DATAGRAM, StoredItem

SERVER = ("127.0.0.1", 8001)
X = ("127.0.0.1", 9001)
Y = ("127.0.0.1", 9101)
Z = ("127.0.0.1", 9201)


def _client(name: str, addr: tuple[str, int], presence: str = "online") -> ClientSaved:
    return ClientSaved(name, addr[0], addr[1], f"tok-{name}", Presence(presence))


def _item(msg_id: str, text: str = "hello?", kind: str = "direct") -> StoredItem:
    return StoredItem(msg_id, kind, "user2", text, 1648153596.7672942)  # type: ignore[arg-type]


# --- the store on its own ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_what_is_committed_is_loaded_again(tmp_path: Path, kind: str) -> None:
    """Both stores take the changes through the one ``apply_changes``, with the same
    meaning: a record saved last comes last, a message stored twice is kept once."""
    path = str(tmp_path / "db.sqlite3")
    store: SqliteStore | MemoryStore = SqliteStore(path) if kind == "sqlite" else MemoryStore()
    await store.commit([_client("user1", X), _client("user2", Y)])
    await store.commit([MessageStored("user1", _item(i)) for i in ("a", "b")])
    await store.commit([MessageStored("user1", _item("a"))])  # stored twice: kept once
    await store.commit([MessagesRemoved("user1", ("a",)), _client("user1", X, "deregistered")])
    if isinstance(store, SqliteStore):
        store.close()
        store = SqliteStore(path)  # after reopening

    clients, mailbox = store.load()
    assert [(c.name, c.addr, c.token, c.presence) for c in clients] == [
        ("user2", Y, "tok-user2", Presence.ONLINE),
        ("user1", X, "tok-user1", Presence.DEREGISTERED),  # changed last
    ]
    assert mailbox == {"user1": [_item("b")]}


async def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite3")
    store = SqliteStore(path)
    with pytest.raises(TypeError, match="not a change a store knows"):
        await store.commit([MessageStored("user1", _item("a")), Change()])
    store.close()
    assert SqliteStore(path).load() == ([], {})


async def test_the_name_changed_last_owns_a_shared_address_after_restore(tmp_path: Path) -> None:
    # user2 registers from the port user1 had: on restart the address must be user2's.
    path = str(tmp_path / "db.sqlite3")
    store = SqliteStore(path)
    await store.commit([_client("user2", Y)])
    await store.commit([_client("user1", X)])
    await store.commit([_client("user1", X, "silent"), _client("user2", X)])
    store.close()
    clients, _ = SqliteStore(path).load()
    assert [c.name for c in clients if c.addr == X][-1] == "user2"


def test_the_file_is_in_wal_mode_with_the_current_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    SqliteStore(str(path)).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_version_1_database_migrates_forward_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[1])
    db.execute("INSERT INTO clients VALUES ('user1', '127.0.0.1', 9001, 't1', 'deregistered')")
    db.execute("INSERT INTO clients VALUES ('user2', '127.0.0.1', 9101, 't2', 'online')")
    db.execute(
        "INSERT INTO mailbox (recipient, id, kind, sender, text, stored_at)"
        " VALUES ('user1', 'm1', 'direct', 'user2', 'hello?', 1648153596.7672942)"
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()

    store = SqliteStore(str(path))
    clients, mailbox = store.load()
    store.close()
    assert [(c.name, c.presence) for c in clients] == [
        ("user1", Presence.DEREGISTERED),
        ("user2", Presence.ONLINE),
    ]
    assert mailbox == {"user1": [StoredItem("m1", "direct", "user2", "hello?", 1648153596.7672942)]}
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "changed" in {row[1] for row in db.execute("PRAGMA table_info(clients)")}
    finally:
        db.close()


def test_a_database_from_a_newer_chatapp_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")  # a later chatapp's file
    db.commit()
    db.close()
    with pytest.raises(StartupError, match=f"schema version {SCHEMA_VERSION + 1}") as caught:
        open_store(str(path), 8001)
    assert "\n" not in str(caught.value)


def test_a_file_that_is_not_a_database_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StartupError, match="cannot open the database"):
        open_store(str(path), 8001)


def test_a_second_server_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite3")
    first = SqliteStore(path)
    try:
        with pytest.raises(StoreError, match="another chatapp server"):
            SqliteStore(path)
    finally:
        first.close()
    SqliteStore(path).close()  # free again once the first one is closed


def test_default_path_is_per_port_under_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_db_path(8001) == str(tmp_path / "data" / "chatapp" / "server-8001.sqlite3")
    store = open_store(None, 8002)
    assert isinstance(store, SqliteStore)
    store.close()
    assert (tmp_path / "data" / "chatapp" / "server-8002.sqlite3").exists()

    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path(8001) == str(
        tmp_path / "home" / ".local" / "share" / "chatapp" / "server-8001.sqlite3"
    )


def test_memory_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert isinstance(open_store(":memory:", 8001), MemoryStore)
    assert list(tmp_path.iterdir()) == []


# --- the server with its store ----------------------------------------------------------


class InlineSqliteStore(SqliteStore):
    """SqliteStore committing in the event loop's own thread. Under an autojumping
    MockClock a worker thread looks like idleness and virtual time would race
    ahead during every commit (the thread itself is exercised by the real-process
    tests)."""

    async def commit(self, changes: list[Change]) -> None:
        self._commit(changes)
        await trio.lowlevel.checkpoint()


class StallingStore(InlineSqliteStore):
    """A store whose commits wait for the test's go-ahead."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.stalled = False
        self.release = trio.Event()
        self.committed: list[StoredItem] = []

    async def commit(self, changes: list[Change]) -> None:
        if self.stalled:
            await self.release.wait()
        await super().commit(changes)
        self.committed += [c.item for c in changes if isinstance(c, MessageStored)]


async def test_the_save_is_acked_only_after_the_commit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    path = str(tmp_path / "db.sqlite3")
    store = StallingStore(path)
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER, store=store)
        x = await start_client(nursery, network, "user1", X, SERVER)
        y = await start_client(nursery, network, "user2", Y, SERVER)
        await x.idle()
        await y.idle()
        await x.type("dereg user1")
        await x.expect(screen.YOU_ARE_OFFLINE)
        store.stalled = True
        await y.type("send user1 hello?")
        await y.expect(screen.no_ack("user1"))
        await trio.sleep(1.5)  # the commit hangs: the server must not ACK meanwhile
        assert screen.SAVED_BY_SERVER not in y.lines
        assert store.committed == []
        store.release.set()
        await y.expect(screen.SAVED_BY_SERVER)  # the client's retries get the ACK now
        assert [item.text for item in store.committed] == ["hello?"]
        await server.stop()
        nursery.cancel_scope.cancel()
    assert [item.text for item in SqliteStore(path).load()[1]["user1"]] == ["hello?"]


async def test_a_restarted_server_delivers_what_it_saved(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    path = str(tmp_path / "db.sqlite3")
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER, store=InlineSqliteStore(path))
        x = await start_client(nursery, network, "user1", X, SERVER)
        y = await start_client(nursery, network, "user2", Y, SERVER)
        await x.idle()
        await y.idle()
        await x.type("dereg user1")
        await x.expect(screen.YOU_ARE_OFFLINE)
        await y.type("send user1 hello?")
        await y.expect(screen.SAVED_BY_SERVER)
        await y.type("send_all hello guys")
        await y.expect(screen.CHANNEL_ACKED)
        await server.stop()

        await start_server(nursery, network, SERVER, store=InlineSqliteStore(path), epoch=2)
        start = len(x.lines)
        await x.type("reg user1")
        await x.expect(screen.YOU_HAVE_MESSAGE, start)
        await x.idle()
        shown = x.lines[x.lines.index(screen.YOU_HAVE_MESSAGE, start) + 1 :]
        assert shown[:2] == [
            screen.stored_direct(shown_time(shown[0]), "user2", "hello?"),
            screen.stored_channel(shown_time(shown[1]), "user2", "hello guys"),
        ]
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    # ...and, once user1 ACKed them, deletes them.
    assert SqliteStore(path).load()[1] == {}


def shown_time(line: str) -> float:
    return float(line[1 : line.index(")")])


async def test_a_full_mailbox_is_refused_with_a_clear_line_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_server(nursery, network, SERVER, mailbox_limit=2)
        x = await start_client(nursery, network, "user1", X, SERVER)
        y = await start_client(nursery, network, "user2", Y, SERVER)
        await x.idle()
        await y.idle()
        await x.type("dereg user1")
        await x.expect(screen.YOU_ARE_OFFLINE)
        for text in ("one", "two", "three"):
            await y.type(f"send user1 {text}")
            await y.idle()
        assert y.lines.count(screen.SAVED_BY_SERVER) == 2
        refusal = y.lines[-1]
        assert refusal.startswith("[The server refused: ") and "mailbox of user1 is full" in refusal
        assert y.alive  # a full box is not a dead server

        start = len(x.lines)
        await x.type("reg user1")
        await x.expect(screen.YOU_HAVE_MESSAGE, start)
        await x.idle()
        await trio.sleep(1)
        texts = [line.split(" : ", 1)[1] for line in x.lines[start:] if " : " in line]
        assert texts == ["one", "two"]
        nursery.cancel_scope.cancel()


async def test_a_message_too_long_for_a_datagram_gets_a_line_and_is_not_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_server(nursery, network, SERVER)
        x = await start_client(nursery, network, "user1", X, SERVER)
        y = await start_client(nursery, network, "user2", Y, SERVER)
        await x.idle()
        await y.idle()
        sent_before = network.sent
        for command in (f"send user2 {'a' * MAX_DATAGRAM}", f"send_all {'é' * MAX_DATAGRAM}"):
            start = len(x.lines)
            await x.type(command)
            await x.idle()
            assert len(x.lines) == start + 1
            assert x.lines[-1].startswith("[Message too long: ")
        assert network.sent == sent_before
        assert not any(" : " in line for line in y.lines)
        nursery.cancel_scope.cancel()


# --- group commit over real UDP -------------------------------------------------------


class _WatchedStore(SqliteStore):
    """Records what each commit made durable, to check every answer against it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits = 0
        self.committed_ids: set[str] = set()

    async def commit(self, changes: list[Change]) -> None:
        await super().commit(changes)
        self.commits += 1
        self.committed_ids |= {c.item.id for c in changes if isinstance(c, MessageStored)}


async def test_a_burst_of_saves_shares_commits_and_no_answer_leaves_before_its_commit(
    tmp_path: Path,
) -> None:
    from chatapp.launch import ServerOptions, run_node
    from chatapp.net import Endpoint, UdpEndpoint
    from chatapp.wire import Saved, SaveMessage, Table, decode, encode

    count = 200
    path = str(tmp_path / "db.sqlite3")
    sender = await UdpEndpoint.bind("127.0.0.1", 0)
    setup = SqliteStore(path)
    await setup.commit(
        [_client("user1", sender.local_address), _client("user2", Y, "deregistered")]
    )
    setup.close()
    store = _WatchedStore(path)
    answered_before_commit: list[str] = []

    class BurstFirst:
        """Real UDP, whose server socket holds the whole burst before the server reads
        any of it, and whose answers are checked against what was committed."""

        async def listen(self, host: str, port: int) -> Endpoint:
            endpoint = await UdpEndpoint.bind(host, port)
            real_send = endpoint.send

            async def checked_send(data: bytes, addr: tuple[str, int]) -> None:
                message = decode(data)
                if isinstance(message, Saved) and message.id not in store.committed_ids:
                    answered_before_commit.append(message.id)
                await real_send(data, addr)

            endpoint.send = checked_send  # type: ignore[method-assign]
            for i in range(count):
                save = SaveMessage(f"m{i}", "user1", "user2", f"hello {i}", "tok-user1")
                await sender.send(encode(save), endpoint.local_address)
            return endpoint

    options = ServerOptions(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        node = await nursery.start(partial(run_node, options, network=BurstFirst(), store=store))
        answers: set[str] = set()
        with trio.fail_after(10):
            while len(answers) < count:
                data, _ = await sender.receive()
                message = decode(data)
                if isinstance(message, Table):
                    continue  # a restarted server tells its online clients the table
                assert isinstance(message, Saved) and message.outcome == "stored"
                answers.add(message.id)
        node.stop()
    assert answered_before_commit == []
    assert store.commits < count  # grouped: one fsync served many saves
    store.close()
    assert len(SqliteStore(path).load()[1]["user2"]) == count
    sender.close()
