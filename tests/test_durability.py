"""An answer means it is on disk: what the server does when its database fails or is not
its own.

The store alone: files of other applications and rows of the wrong type are refused at
start; a file deleted or replaced under the store makes every later commit fail. The
server in virtual time with a store that fails on demand: no request is told done while
its change was not committed, the state goes back to the database's, and a retry is tried
again. Real processes with a real full disk and real files deleted or replaced are in
``tests/test_disk_failures.py``.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing
from _harness import start_client, start_server

from chatapp import screen
from chatapp.launch import StartupError, open_store
from chatapp.protocol.changes import Change, ClientSaved, MessageStored, Presence
from chatapp.protocol.common import Send
from chatapp.protocol.server import ServerProtocol
from chatapp.sqlite_store import APPLICATION_ID, MIGRATIONS, SqliteStore, StoreError
from chatapp.store import MemoryStore
from chatapp.testing import MemoryNetwork
from chatapp.wire import Deregister, Refused, Register, Saved, SaveMessage, StoredItem, encode

SERVER = ("127.0.0.1", 8001)
X = ("127.0.0.1", 9001)
Y = ("127.0.0.1", 9101)
Z = ("127.0.0.1", 9201)


def _pragma(path: Path, name: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"PRAGMA {name}").fetchone()[0])
    finally:
        db.close()


def _refused_at_start(path: Path) -> str:
    with pytest.raises(StartupError) as caught:
        open_store(str(path), 8001)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"cannot open the database {path}: ")
    return line


# --- whose file it is ----------------------------------------------------------------------


def test_a_new_database_is_marked_as_chatapps(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    SqliteStore(str(path)).close()
    assert _pragma(path, "application_id") == APPLICATION_ID


def test_a_chatapp_database_from_before_the_mark_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[1])
    db.execute("INSERT INTO clients VALUES ('user1', '127.0.0.1', 9001, 't1', 'online')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = SqliteStore(str(path))
    assert [c.name for c in store.load()[0]] == ["user1"]
    store.close()
    assert _pragma(path, "application_id") == APPLICATION_ID


def test_a_database_of_another_application_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    db.execute("INSERT INTO notes (body) VALUES ('keep me')")
    db.commit()
    db.close()
    before = path.read_bytes()
    assert "not a chatapp database (schema version 0, notes)" in _refused_at_start(path)
    assert path.read_bytes() == before

    db = sqlite3.connect(path)
    db.execute("PRAGMA application_id=1234")
    db.commit()
    db.close()
    assert "belongs to another application (application_id 0x4d2)" in _refused_at_start(path)


def test_a_file_with_chatapps_tables_but_other_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lookalike.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE clients (name TEXT)")
    db.execute("CREATE TABLE mailbox (id TEXT)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    assert "not a chatapp database" in _refused_at_start(path)


@pytest.mark.parametrize(
    ("table", "row", "complaint"),
    [
        ("clients", "('user1', '127.0.0.1', 'abc', 't1', 'online', 1)", "port"),
        ("clients", "('user1', '127.0.0.1', 9001, 't1', 'asleep', 1)", "presence"),
        ("clients", "('user 1', '127.0.0.1', 9001, 't1', 'online', 1)", "name"),
        ("clients", "('user1', 'nowhere', 9001, 't1', 'online', 1)", "IPv4"),
        ("clients", "('user1', '127.0.0.1', 70000, 't1', 'online', 1)", "port"),
        ("clients", "('user1', X'00', 9001, 't1', 'online', 1)", "ip"),
        ("mailbox", "(1, 'user1', 'm1', 'direct', 'user2', 'hi', 'yesterday')", "stored_at"),
        ("mailbox", "(1, 'user1', 'm1', 'postcard', 'user2', 'hi', 1.5)", "kind"),
        ("mailbox", "(1, 'user1', 'm1', 'direct', 'user2', X'FF', 1.5)", "text"),
    ],
)
def test_a_row_of_the_wrong_type_is_refused_at_start(
    tmp_path: Path, table: str, row: str, complaint: str
) -> None:
    path = tmp_path / "typed.sqlite3"
    SqliteStore(str(path)).close()
    db = sqlite3.connect(path)
    db.execute(f"INSERT INTO {table} VALUES {row}")
    db.commit()
    db.close()
    line = _refused_at_start(path)
    assert f"a row of {table}" in line and complaint in line, line


# --- the file under a running store -----------------------------------------------------------


def _message(msg_id: str) -> list[Change]:
    return [MessageStored("user1", StoredItem(msg_id, "direct", "user2", "hi", 1.5))]


async def test_a_file_deleted_under_the_store_fails_every_later_commit(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(str(path))
    await store.commit(_message("m1"))
    path.unlink()
    for msg_id in ("m2", "m3"):
        with pytest.raises(StoreError, match=r"db.sqlite3 was deleted while the server ran"):
            await store.commit(_message(msg_id))
    store.close()


async def test_a_file_replaced_under_the_store_fails_every_later_commit(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(str(path))
    await store.commit(_message("m1"))
    backup = tmp_path / "backup.sqlite3"
    shutil.copyfile(path, backup)  # a restore from a backup, as an operator would do it
    os.replace(backup, path)
    with pytest.raises(StoreError, match="was replaced by another file"):
        await store.commit(_message("m2"))
    path.write_bytes(b"")  # even after the original comes back, the store stays stopped
    with pytest.raises(StoreError, match="replaced"):
        await store.commit(_message("m3"))
    store.close()


async def test_a_wal_deleted_under_the_store_is_rescued_then_commits_fail(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(str(path))
    await store.commit(_message("m1"))  # in the WAL only, until a checkpoint
    Path(f"{path}-wal").unlink()
    with pytest.raises(StoreError, match=r"db\.sqlite3-wal was deleted"):
        await store.commit(_message("m2"))
    # What a server started after this one was killed would find: the file alone.
    shutil.copyfile(path, tmp_path / "after.sqlite3")
    reopened = sqlite3.connect(tmp_path / "after.sqlite3")
    try:
        ids = [row[0] for row in reopened.execute("SELECT id FROM mailbox")]
    finally:
        reopened.close()
    assert ids == ["m1"]  # copied into the file before the store stopped
    store.close()


# --- the server when commits fail ---------------------------------------------------------------


class FailingStore(MemoryStore):
    """A memory store whose commits fail while ``full`` is set, as a full disk's do."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    async def commit(self, changes: list[Change]) -> None:
        await trio.lowlevel.checkpoint()
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().commit(changes)


def _answers(effects: list[object], to: tuple[str, int]) -> list[object]:
    return [e.message for e in effects if isinstance(e, Send) and e.addr == to]


def test_a_rolled_back_request_is_refused_not_cached_and_tried_again() -> None:
    """The issue's case: a retry of a save whose commit failed used to be answered
    ``saved`` from the cache of answers."""
    store = MemoryStore()
    server = ServerProtocol(id_prefix="s", token_factory=iter(["t1", "t2"]).__next__)
    for message, addr in [
        (Register("r1", "user1", X[1]), X),
        (Register("r2", "user2", Y[1]), Y),
        (Deregister("d1", "user1", "t1"), X),
    ]:
        effects = server.handle_message(message, addr, 0.0)
        trio.run(store.commit, [e for e in effects if isinstance(e, Change)])
        server.checkpoint()
    save = encode(SaveMessage("m1", "user2", "user1", "hello?", "t2"))
    effects = server.handle_datagram(save, Y, 1.0)
    assert Saved("m1", "stored") in _answers(effects, Y)
    assert server.mailbox["user1"]  # in memory, not yet on disk...
    effects = server.rollback(*store.load(), 1.0)  # ...and the commit failed
    assert _answers(effects, Y) == [Refused("m1", refused_reason(), "storage")]
    assert "user1" not in server.mailbox
    assert server.clients["user1"].presence is Presence.DEREGISTERED  # as the database has it

    effects = server.handle_datagram(save, Y, 1.5)  # the client's retry: tried again
    assert any(isinstance(e, MessageStored) for e in effects)
    assert Saved("m1", "stored") in _answers(effects, Y)


def refused_reason() -> str:
    from chatapp.protocol.server_state import CANNOT_STORE

    return CANNOT_STORE


async def test_while_the_database_fails_no_one_is_told_done_and_nothing_half_happens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    store = FailingStore()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER, store=store)
        x = await start_client(nursery, network, "user1", X, SERVER)
        y = await start_client(nursery, network, "user2", Y, SERVER)
        for client in (x, y):
            await client.idle()
        await x.type("dereg user1")
        await x.expect(screen.YOU_ARE_OFFLINE)
        await y.type("send user1 one")
        await y.expect(screen.SAVED_BY_SERVER)

        store.full = True
        start = len(y.lines)
        await y.type("send user1 two")
        await y.expect(screen.CANNOT_STORE, start)
        await y.type("send_all three")
        await y.expect(screen.CANNOT_STORE, y.lines.index(screen.CANNOT_STORE, start) + 1)
        await y.type("dereg user2")
        await y.idle()
        assert y.lines[-1] == screen.CANNOT_STORE and y.alive
        z = await start_client(nursery, network, "user3", Z, SERVER)
        await z.done.wait()
        assert z.lines == [screen.CANNOT_STORE, screen.EXITING] and z.status == 1
        assert screen.SAVED_BY_SERVER not in y.lines[start:]
        assert screen.CHANNEL_ACKED not in y.lines
        assert [item.text for item in server.protocol.mailbox["user1"]] == ["one"]
        assert set(server.protocol.clients) == {"user1", "user2"}
        assert any("No space left on device" in log.text for log in server.logs)

        store.full = False  # room again: the same requests now go through
        await y.type("send user1 four")
        await y.expect(screen.SAVED_BY_SERVER, start)
        await x.type("reg user1")
        await x.expect(screen.YOU_HAVE_MESSAGE)
        await x.idle()
        await trio.sleep(1)
        shown = [line.split(" : ", 1)[1] for line in x.lines if " : " in line]
        assert shown == ["one", "four"]
        assert any(log.text == "database writes work again" for log in server.logs)
        nursery.cancel_scope.cancel()


async def test_a_store_that_cannot_be_read_either_stops_the_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Unreadable(FailingStore):
        def load(self) -> tuple[list, dict]:  # type: ignore[type-arg]
            if self.full:
                raise OSError(errno.EIO, "Input/output error")
            return super().load()

    network = MemoryNetwork()
    store = Unreadable()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER, store=store)
        store.full = True
        await start_client(nursery, network, "user1", X, SERVER)
        with trio.fail_after(5):
            await server.done.wait()
        assert any("cannot read the database either" in log.text for log in server.logs)
        nursery.cancel_scope.cancel()


def test_a_client_record_saved_before_a_failure_is_what_the_server_goes_back_to() -> None:
    """The roster is the database's after a rollback: a registration that was not
    committed leaves no record, and one that was keeps its token."""
    store = MemoryStore([ClientSaved("user1", X[0], X[1], "t1", Presence.ONLINE)])
    server = ServerProtocol(token_factory=iter(["t8", "t9"]).__next__)
    server.restore(*store.load())
    server.handle_message(Register("r2", "user2", Y[1]), Y, 0.0)
    server.handle_message(Register("r3", "user1", X[1]), X, 0.0)  # user1 again: a new token
    server.rollback(*store.load(), 0.0)
    assert {name: c.token for name, c in server.clients.items()} == {"user1": "t1"}


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["wrong-typed row", "another application"])
def test_chatapp_serve_refuses_such_a_file_in_one_line(tmp_path: Path, kind: str) -> None:
    from _harness import Proc, chatapp_env, free_udp_ports, serve_args

    path = tmp_path / "db.sqlite3"
    if kind == "wrong-typed row":
        SqliteStore(str(path)).close()
        statement = "INSERT INTO mailbox VALUES (1, 'user1', 'm1', 'direct', 'user2', 'hi', 'x')"
    else:
        statement = "CREATE TABLE notes (body TEXT)"
    db = sqlite3.connect(path)
    db.execute(statement)
    db.commit()
    db.close()
    (port,) = free_udp_ports(1)
    server = Proc(serve_args(port, db=path), chatapp_env(tmp_path))
    assert server.popen.wait(20) == 1
    server.stop()
    assert server.lines() == [server.lines()[0]] and "listening" not in server.output
    assert server.lines()[0].startswith(f"chatapp: error: cannot open the database {path}: ")
