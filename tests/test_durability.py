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
from _sim import ORIGIN, SERVER_KEY, Sim, key_of
from _sim import SERVER as SIM_SERVER

from chatapp import screen
from chatapp.launch import StartupError, open_store
from chatapp.protocol.changes import Change, MessagesRemoved, MessageStored, Presence, ServerPinned
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Effect, Exit, Log, Send
from chatapp.protocol.crypto import REKEY_DOMAIN
from chatapp.protocol.server import CANNOT_STORE, ServerProtocol
from chatapp.sqlite_store import APPLICATION_ID, MIGRATIONS, SqliteStore, StoreError
from chatapp.store import MemoryStore, ServerDisk
from chatapp.testing import MemoryNetwork
from chatapp.testing.raw import RawClient
from chatapp.wire import (
    Ack,
    Chat,
    Mailbox,
    Refused,
    Register,
    Rekey,
    Relay,
    Saved,
    SaveMessage,
    Seq,
    StoredItem,
    encode,
)

SERVER = ("127.0.0.1", 8001)
X = ("127.0.0.1", 9001)
Y = ("127.0.0.1", 9101)
Z = ("127.0.0.1", 9201)
CLIENT = ("10.0.0.2", 9001)  # a client of the simulated server, carried by hand


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
    """A file of chatapp 1 (protocol 1): adopted, and brought to the current schema. Its
    clients had no keys: they bind one when they next register."""
    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[1])
    db.execute("INSERT INTO clients VALUES ('user1', '127.0.0.1', 9001, 't1', 'online')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = SqliteStore(str(path))
    assert store.load().clients == []
    store.close()
    assert _pragma(path, "application_id") == APPLICATION_ID
    assert _pragma(path, "user_version") == max(MIGRATIONS)


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


_KEY, _SID = "zeroblob(32)", "zeroblob(8)"


@pytest.mark.parametrize(
    ("table", "row", "complaint"),
    [
        ("clients", f"('user1', '127.0.0.1', 'abc', {_KEY}, {_SID}, 'online', 1)", "port"),
        ("clients", f"('user1', '127.0.0.1', 9001, {_KEY}, {_SID}, 'asleep', 1)", "presence"),
        ("clients", f"('user 1', '127.0.0.1', 9001, {_KEY}, {_SID}, 'online', 1)", "name"),
        ("clients", f"('user1', 'nowhere', 9001, {_KEY}, {_SID}, 'online', 1)", "IPv4"),
        ("clients", f"('user1', '127.0.0.1', 70000, {_KEY}, {_SID}, 'online', 1)", "port"),
        ("clients", f"('user1', X'00', 9001, {_KEY}, {_SID}, 'online', 1)", "ip"),
        ("clients", f"('user1', '127.0.0.1', 9001, X'00', {_SID}, 'online', 1)", "key"),
        ("clients", f"('user1', '127.0.0.1', 9001, {_KEY}, zeroblob(9), 'online', 1)", "sid"),
        ("mailbox", "('o1', 1, 'user1', 'm1', 'direct', 'user2', 'yesterday', '', X'', X'')",
         "stored_at"),
        ("mailbox", "('o1', 1, 'user1', 'm1', 'postcard', 'user2', 1.5, '', X'', X'')", "kind"),
        ("mailbox", "('o1', 1, 'user1', 'm1', 'channel', 'user2', 1.5, X'FF', X'', X'')",
         "text"),
        ("mailbox", "('o1', 0, 'user1', 'm1', 'direct', 'user2', 1.5, '', X'', X'00')", "n"),
    ],
)  # fmt: skip
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
    n = int(msg_id[1:])
    item = StoredItem(Seq("o1", n), msg_id, "direct", "user2", 1.5, sealed=b"\x02sealed")
    return [MessageStored("user1", item)]


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


def _answers(effects: list[Effect], to: tuple[str, int]) -> list[object]:
    return [e.message for e in effects if isinstance(e, Send) and e.addr == to]


def _database(sim: Sim) -> ServerDisk:
    """What the simulated server's database holds: every change it committed so far."""
    return MemoryStore(sim.persisted, key=SERVER_KEY.seed, origin=ORIGIN).load()


def _save(sim: Sim, label: str, line: str) -> Send:
    """The save ``label``'s client sends when ``line``'s direct try is not ACKed (not
    carried to the server: the test hands it over)."""
    client = sim.clients[label]
    client.handle_input(line, sim.now)  # the direct try, lost
    [save] = [e for e in client.handle_timer(sim.now + 1.0) if isinstance(e, Send)]
    assert isinstance(save.message, SaveMessage)
    return save


def test_a_rolled_back_request_is_refused_not_cached_and_tried_again() -> None:
    """The issue's case: a retry of a save whose commit failed used to be answered
    ``saved`` from the cache of answers."""
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    sim.type("user1", "dereg user1")
    database = _database(sim)
    user2, y = sim.clients["user2"], sim.addr["user2"]
    save = _save(sim, "user2", "send user1 hello?")
    effects = sim.server.handle_datagram(save.data, y, sim.now)
    assert Saved(save.message.id, "stored") in _answers(effects, y)
    assert sim.server.mailbox["user1"]  # in memory, not yet on disk...
    effects = sim.server.rollback(database, sim.now)  # ...it failed
    assert _answers(effects, y) == [Refused(save.message.id, CANNOT_STORE, "storage")]
    assert "user1" not in sim.server.mailbox
    assert sim.server.clients["user1"].presence is Presence.DEREGISTERED  # as the database has it

    retry = user2.codec.to_server(save.message)  # the client's retry: tried again
    effects = sim.server.handle_datagram(retry, y, sim.now)
    assert any(isinstance(e, MessageStored) for e in effects)
    assert Saved(save.message.id, "stored") in _answers(effects, y)


def test_a_failed_commit_skips_sequence_numbers_never_gives_one_twice() -> None:
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 one")
    sim.run(1.0)  # no ACK from user1 (offline): saved
    database = _database(sim)
    [first] = database.mailbox["user1"]
    save = _save(sim, "user2", "send user1 two")
    sim.server.handle_datagram(save.data, sim.addr["user2"], sim.now)
    sim.server.rollback(database, sim.now)
    sim.type("user2", "send user1 three")
    sim.run(1.0)
    items = sim.server.mailbox["user1"]
    assert [item.seq.n for item in items] == [first.seq.n, first.seq.n + 2]


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
        assert len(server.protocol.mailbox["user1"]) == 1  # "one" (sealed: unreadable here)
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
        def load(self) -> ServerDisk:
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


def _register(sim: Sim, raw: RawClient, addr: tuple[str, int]) -> None:
    """``raw``'s handshake with the simulated server, no checkpoint after it (as if its
    commit were still to come)."""
    effects = sim.server.handle_datagram(raw.hello(), addr, sim.now)
    [challenge] = [e.data for e in effects if isinstance(e, Send)]
    register = raw.answer(challenge)
    assert register is not None
    effects = sim.server.handle_datagram(register, addr, sim.now)
    for e in effects:
        if isinstance(e, Send) and e.addr == addr:
            raw.answer(e.data)
    assert raw.registered


def test_a_client_record_saved_before_a_failure_is_what_the_server_goes_back_to() -> None:
    """The roster is the database's after a rollback: a registration that was not
    committed leaves no record, binding or session, and one that was keeps its session
    id; the sessions made since are forgotten."""
    sim = Sim()
    sim.join("user1")
    database = _database(sim)
    sid = sim.server.clients["user1"].sid
    newcomer = RawClient("user2", 9101)
    _register(sim, newcomer, ("10.0.0.2", 9101))
    again = RawClient("user1", sim.addr["user1"][1], key_of("user1"))  # a new session
    _register(sim, again, sim.addr["user1"])
    assert set(sim.server.clients) == {"user1", "user2"}
    sim.server.rollback(database, sim.now)
    assert {name: c.sid for name, c in sim.server.clients.items()} == {"user1": sid}
    assert newcomer.codec.session is not None and again.codec.session is not None
    sessions = sim.server.codec.sessions
    assert newcomer.codec.session.sid not in sessions
    assert again.codec.session.sid not in sessions


def test_a_registration_rolled_back_is_refused_in_a_box_and_leaves_the_name_free() -> None:
    """A new name's binding that was not committed is undone: the client is told, in a
    box only its key opens, that nothing was stored, and another key may take the name."""
    sim = Sim()
    sim.join("user1")
    database = _database(sim)
    addr = ("10.0.0.2", 9101)
    first = RawClient("user2", addr[1])
    _register(sim, first, addr)
    effects = sim.server.rollback(database, sim.now)
    [refusal] = [e.data for e in effects if isinstance(e, Send) and e.addr == addr]
    first.answer(refusal)
    assert first.refusal == CANNOT_STORE
    assert "user2" not in sim.server.clients
    sim.server.checkpoint()
    other = RawClient("user2", addr[1])  # another key: the name was never bound
    _register(sim, other, addr)
    assert sim.server.clients["user2"].key == other.identity.public


def test_a_batch_whose_removal_was_not_committed_comes_again_and_is_shown_once() -> None:
    """The client ACKed a batch, the server's commit of its removal failed: the server
    goes back to holding the message, sends it again of itself (the stream goes on), and
    the client ACKs it without showing it again (its mark)."""
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 one")
    sim.run(1.0)  # no ACK from user1 (offline): stored
    holding = [True]
    sim.drop.append(
        lambda src, send: (
            holding[0]
            and src == sim.addr["user1"]
            and send.addr == SIM_SERVER
            and isinstance(send.message, Ack)
        )
    )
    sim.type("user1", "reg user1")
    shown = [line for line in sim.lines("user1") if line.endswith("user2 : one")]
    assert len(shown) == 1  # stored, shown with its time
    database = _database(sim)  # reg is committed; the batch's removal is to come
    batch = sim.datagrams(Mailbox, dst="user1")[-1].message
    [ack] = [d.send for d in sim.sent if isinstance(d.message, Ack) and d.message.id == batch.id]
    effects = sim.server.handle_datagram(ack.data, sim.addr["user1"], sim.now)
    assert any(isinstance(e, MessagesRemoved) for e in effects)
    holding[0] = False
    effects = sim.server.rollback(database, sim.now)  # ...the commit failed
    assert [item.id for item in sim.server.mailbox["user1"]] == [_stored_id(database)]
    sim.apply(SIM_SERVER, effects)
    sim.pump()
    assert len(sim.datagrams(Mailbox, dst="user1")) == 2  # sent again
    assert "user1" not in sim.server.mailbox  # ACKed again, and removed
    assert [line for line in sim.lines("user1") if line.endswith("user2 : one")] == shown


def _stored_id(disk: ServerDisk, recipient: str = "user1") -> str:
    [item] = disk.mailbox[recipient]
    return item.id


def test_saved_for_a_message_an_earlier_commit_stored_stands_through_a_rollback() -> None:
    """user2's dereg cuts short the relay of user1's message (stored and committed when it
    was saved): user1 is told it is saved. The dereg's commit fails: user2 is refused,
    and user1's answer stands, for the message is on disk."""
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    sim.drop.append(lambda src, send: isinstance(send.message, Chat | Relay))
    sim.type("user1", "send user2 hi")
    sim.run(0.6)  # no ACK: saved, stored, and relayed (the relay is lost)
    assert [item.sender for item in sim.server.mailbox["user2"]] == ["user1"]
    database = _database(sim)
    user2 = sim.clients["user2"]
    [dereg] = [e for e in user2.handle_input("dereg user2", sim.now) if isinstance(e, Send)]
    effects = sim.server.handle_datagram(dereg.data, sim.addr["user2"], sim.now)
    assert Saved(_stored_id(database, "user2"), "stored") in _answers(effects, sim.addr["user1"])
    effects = sim.server.rollback(database, sim.now)
    assert _answers(effects, sim.addr["user1"]) == [Saved(_stored_id(database, "user2"), "stored")]
    refusal, batch = _answers(effects, sim.addr["user2"])  # and what is stored goes on
    assert refusal == Refused(dereg.message.id, CANNOT_STORE, "storage")
    assert isinstance(batch, Mailbox)
    assert sim.server.clients["user2"].online


def test_a_database_with_another_key_stops_the_server_at_a_rollback() -> None:
    sim = Sim()
    sim.join("user1")
    disk = _database(sim)
    disk.key = bytes(32)
    effects = sim.server.rollback(disk, sim.now)
    assert Exit(1) in effects
    assert any(isinstance(e, Log) and "another server's key" in e.text for e in effects)


def test_a_client_registering_again_keeps_its_session_when_the_server_cannot_store() -> None:
    """After a restart the server asks user1 to register again; that registration's
    commit fails. user1 stays, silently, in its old session (no line, no exit), and
    comes back at the server's next rekey."""
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    held: list[Send] = []

    def hold(src: tuple[str, int], send: Send) -> bool:
        if src == sim.addr["user1"] and isinstance(send.message, Register):
            held.append(send)
            return True
        return False

    sim.drop.append(hold)
    sim.restart_server(from_database=True)
    [register] = held[:1]
    sim.drop.clear()
    database = _database(sim)
    sim.server.handle_datagram(register.data, sim.addr["user1"], sim.now)
    effects = sim.server.rollback(database, sim.now)
    sim.apply(SIM_SERVER, effects)
    sim.pump()
    user1 = sim.clients["user1"]
    assert "user1" not in sim.exits and not user1.rekeying
    assert screen.CANNOT_STORE not in sim.lines("user1")
    mark = len(sim.lines("user1"))
    sim.type("user1", "send_all hello again")  # the old session: a rekey, then it goes
    sim.run(5.0)
    assert screen.CHANNEL_ACKED in sim.lines_since("user1", mark)
    assert "user1 : hello again" in " ".join(sim.lines("user2"))


def _handshake(client: ClientProtocol, server: ServerProtocol, first: list[Effect]) -> list[Effect]:
    """Carry the handshake that ``first`` (a client's effects) begins, by hand, with no
    checkpoint of the client: the client's effects of the last step."""
    effects = first
    for _ in range(3):  # hello -> challenge, register -> registered
        [send] = [e for e in effects if isinstance(e, Send)]
        answers = server.handle_datagram(send.data, CLIENT, 0.0)
        answer = next(e for e in answers if isinstance(e, Send) and e.addr == CLIENT)
        effects = client.handle_datagram(answer.data, SIM_SERVER, 0.0)
        if client.session is not None and not client.rekeying:
            return effects
    raise AssertionError("the handshake did not end")


def test_a_server_key_that_could_not_be_pinned_is_pinned_at_the_next_registration() -> None:
    server = Sim().server
    client = ClientProtocol("user1", SIM_SERVER, CLIENT[1], identity=key_of("user1"))
    effects = _handshake(client, server, client.start(0.0))
    assert ServerPinned(SIM_SERVER, SERVER_KEY.public) in effects
    client.rollback(0.0)  # known_servers could not be written
    assert client.pinned is None
    client.checkpoint()
    session = client.session
    assert session is not None
    boot = server.boot
    sig = SERVER_KEY.sign(REKEY_DOMAIN, session.sid, boot)
    rekey = encode(Rekey("k.1", session.sid, boot, sig))
    effects = _handshake(client, server, client.handle_datagram(rekey, SIM_SERVER, 0.0))
    assert ServerPinned(SIM_SERVER, SERVER_KEY.public) in effects
    assert client.pinned == SERVER_KEY.public


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["wrong-typed row", "another application"])
def test_chatapp_serve_refuses_such_a_file_in_one_line(tmp_path: Path, kind: str) -> None:
    from _harness import Proc, chatapp_env, free_udp_ports, serve_args

    path = tmp_path / "db.sqlite3"
    if kind == "wrong-typed row":
        SqliteStore(str(path)).close()
        statement = (
            "INSERT INTO mailbox VALUES ('o1', 1, 'user1', 'm1', 'direct', 'user2', 'x', '',"
            " X'', X'')"
        )
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
