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
    ClientRemoved,
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
from chatapp.wire import MAX_DATAGRAM, Seq, StoredItem

SERVER = ("127.0.0.1", 8001)
X = ("127.0.0.1", 9001)
Y = ("127.0.0.1", 9101)
Z = ("127.0.0.1", 9201)


def _client(name: str, addr: tuple[str, int], presence: str = "online") -> ClientSaved:
    key = name.encode().ljust(32, b".")
    return ClientSaved(
        name, addr[0], addr[1], key, b"sid-" + name.encode()[-4:], Presence(presence)
    )


def _item(n: int, msg_id: str, text: str = "hello?", kind: str = "channel") -> StoredItem:
    return StoredItem(
        Seq("o1", n),
        msg_id,
        kind,
        "user2",
        1648153596.7672942,
        text=text,
        sig=b"s" * 64,  # type: ignore[arg-type]
    )


# --- the store on its own ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_what_is_committed_is_loaded_again(tmp_path: Path, kind: str) -> None:
    """Both stores take the changes through the one ``apply_changes``, with the same
    meaning: a record saved last comes last, a message stored twice is kept once, the
    sequence numbers never go back, and the server's key stays."""
    path = str(tmp_path / "db.sqlite3")
    store: SqliteStore | MemoryStore = (
        SqliteStore(path) if kind == "sqlite" else MemoryStore(origin="o1")
    )
    key = store.load().key
    await store.commit([_client("user1", X), _client("user2", Y), _client("user3", Z)])
    await store.commit([MessageStored("user1", _item(n, i)) for n, i in ((1, "a"), (2, "b"))])
    await store.commit([MessageStored("user1", _item(3, "a"))])  # stored twice: kept once
    await store.commit([MessageStored("user3", _item(4, "c"))])
    await store.commit(
        [MessagesRemoved("user1", (Seq("o1", 1),)), _client("user1", X, "deregistered")]
    )
    await store.commit([ClientRemoved("user3")])  # released: its record and its mailbox go
    if isinstance(store, SqliteStore):
        store.close()
        store = SqliteStore(path)  # after reopening

    disk = store.load()
    assert disk.key == key and len(key) == 32
    assert [(c.name, c.addr, c.key, c.sid, c.presence) for c in disk.clients] == [
        ("user2", Y, _client("user2", Y).key, b"sid-ser2", Presence.ONLINE),
        ("user1", X, _client("user1", X).key, b"sid-ser1", Presence.DEREGISTERED),
    ]
    assert disk.mailbox == {"user1": [_item(2, "b")]}
    assert disk.last_n >= 4 if kind == "sqlite" else disk.last_n >= 2


async def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite3")
    store = SqliteStore(path)
    with pytest.raises(TypeError, match="not a change"):
        await store.commit([MessageStored("user1", _item(1, "a")), Change()])
    store.close()
    disk = SqliteStore(path).load()
    assert (disk.clients, disk.mailbox, disk.last_n) == ([], {}, 0)


async def test_the_name_changed_last_owns_a_shared_address_after_restore(tmp_path: Path) -> None:
    # user2 registers from the port user1 had: on restart the address must be user2's.
    path = str(tmp_path / "db.sqlite3")
    store = SqliteStore(path)
    await store.commit([_client("user2", Y)])
    await store.commit([_client("user1", X)])
    await store.commit([_client("user1", X, "silent"), _client("user2", X)])
    store.close()
    clients = SqliteStore(path).load().clients
    assert [c.name for c in clients if c.addr == X][-1] == "user2"


def test_the_server_key_and_the_origin_are_made_once_and_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite3")
    first = SqliteStore(path)
    disk = first.load()
    first.close()
    again = SqliteStore(path).load()
    assert (again.key, again.origin) == (disk.key, disk.origin)
    other = SqliteStore(str(tmp_path / "other.sqlite3")).load()
    assert other.key != disk.key and other.origin != disk.origin


def test_the_file_is_in_wal_mode_with_the_current_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    SqliteStore(str(path)).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def _version_2_database(path: Path, *, with_mail: bool) -> None:
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[1])
    db.executescript(MIGRATIONS[2])
    db.execute("INSERT INTO clients VALUES ('user1', '127.0.0.1', 9001, 't1', 'online', 1)")
    if with_mail:
        db.execute(
            "INSERT INTO mailbox (recipient, id, kind, sender, text, stored_at)"
            " VALUES ('user1', 'm1', 'direct', 'user2', 'hello?', 1648153596.7672942)"
        )
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()


def test_a_database_of_chatapp_1_migrates_forward_when_it_holds_no_messages(
    tmp_path: Path,
) -> None:
    # Its clients had no keys: they bind one when they next register.
    path = tmp_path / "old.sqlite3"
    _version_2_database(path, with_mail=False)
    store = SqliteStore(str(path))
    disk = store.load()
    store.close()
    assert (disk.clients, disk.mailbox) == ([], {})
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "key" in {row[1] for row in db.execute("PRAGMA table_info(clients)")}
    finally:
        db.close()


def test_a_database_of_chatapp_1_with_stored_messages_is_refused_not_emptied(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    _version_2_database(path, with_mail=True)
    with pytest.raises(StartupError, match="holds 1 messages stored by chatapp 1") as caught:
        open_store(str(path), 8001)
    assert "\n" not in str(caught.value)
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*) FROM mailbox").fetchone()[0] == 1
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
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
        assert [(item.kind, item.sender) for item in store.committed] == [("direct", "user2")]
        await server.stop()
        nursery.cancel_scope.cancel()
    (item,) = SqliteStore(path).load().mailbox["user1"]
    assert x.protocol.codec.open_sealed(item.sealed)[1].text == "hello?"  # type: ignore[attr-defined]


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
    assert SqliteStore(path).load().mailbox == {}


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
    from chatapp.net import UdpEndpoint
    from chatapp.protocol.common import Send
    from chatapp.protocol.crypto import Identity
    from chatapp.testing import RawClient, handshake
    from chatapp.wire import Chat, Saved, SaveMessage

    count = 200
    path = str(tmp_path / "db.sqlite3")
    user2 = Identity(b"2" * 32)
    setup = SqliteStore(path)
    offline = ClientSaved("user2", *Y, user2.public, b"s" * 8, Presence.DEREGISTERED)
    await setup.commit([offline])
    setup.close()
    store = _WatchedStore(path)
    answered_before_commit: list[str] = []
    options = ServerOptions(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        node = await nursery.start(partial(run_node, options, store=store))
        real_send = node._send

        async def checked_send(effect: Send) -> None:
            message = effect.message
            if isinstance(message, Saved) and message.id not in store.committed_ids:
                answered_before_commit.append(message.id)
            await real_send(effect)

        node._send = checked_send  # type: ignore[method-assign]
        server = ("127.0.0.1", node.endpoint.local_address[1])
        sender = await UdpEndpoint.bind("127.0.0.1", 0)
        client = RawClient("user1", sender.local_address[1])
        await handshake(sender, server, client)
        saves = []
        for i in range(count):
            chat = Chat(f"m{i}", f"hello {i}", bytes(8))
            sealed = client.codec.to_peer(user2.public, chat)
            saves.append(client.seal(SaveMessage(f"m{i}", "user2", sealed)))
        for data in saves:  # a UDP send that does not block does not yield: one burst
            await sender.send(data, server)
        answers: set[str] = set()
        with trio.fail_after(10):
            while len(answers) < count:
                data, _ = await sender.receive()
                message = client.open(data)
                if isinstance(message, Saved):
                    assert message.outcome == "stored"
                    answers.add(message.id)
        node.stop()
    assert answered_before_commit == []
    assert store.commits < count  # grouped: one fsync served many saves
    store.close()
    assert len(SqliteStore(path).load().mailbox["user2"]) == count
    sender.close()
