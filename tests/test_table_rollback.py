"""A commit that fails takes the table back with it: the version, what the server knows of
each client's copy (the version it holds, a registration not yet complete) and the updates
made since the checkpoint, so that no client hears of a change the database does not hold.

No Trio here: ``ServerProtocol`` and ``Roster`` driven directly over a ``MemoryStore``, as
the runtime drives them (commit, then send and checkpoint; or roll back). The same on the
Trio runtime, with commits failing at random, is in ``tests/test_virtual_tables.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from _sim import CLIENT_IP, TABLES, key_of

from chatapp.protocol.changes import Change, ClientRecord, Presence
from chatapp.protocol.common import Effect, Send
from chatapp.protocol.crypto import Identity
from chatapp.protocol.roster import Roster
from chatapp.protocol.server import CANNOT_STORE, ServerProtocol
from chatapp.protocol.tables import TableCopy
from chatapp.store import MemoryStore
from chatapp.testing.raw import RawClient
from chatapp.wire import (
    Address,
    Deregister,
    Message,
    Refused,
    Table,
    TableAck,
    TableDelta,
    TableEntry,
    encode,
)

X, Y, Z, W = ((CLIENT_IP, port) for port in (9001, 9002, 9003, 9004))
#: The key and session id of the records made for the roster alone.
KEY, TAG = bytes(range(32)), bytes(range(8))


def row(e: TableEntry) -> tuple[str, str, int, bool]:
    return (e.name, e.ip, e.port, e.online)


class Runtime:
    """A server as the runtime drives it: each handling's changes committed (or, when
    ``fails``, the commit fails and the server rolls back), then what it sends goes out
    and the server is checkpointed. Every table part that goes out reaches a ``TableCopy``
    per address; each client (a ``RawClient`` per address) seals what it sends in its
    session."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        disk = self.store.load()
        self.server = ServerProtocol(identity=Identity(disk.key), origin=disk.origin)
        self.clients: dict[Address, RawClient] = {}
        self.copies: dict[Address, TableCopy] = {}
        self.now = 0.0

    def handle(self, message: Message, addr: Address, *, fails: bool = False) -> list[Send]:
        """``message`` from the client at ``addr``, sealed in its session."""
        return self.receive(self.clients[addr].seal(message), addr, fails=fails)

    def receive(self, data: bytes, addr: Address, *, fails: bool = False) -> list[Send]:
        effects = self.server.handle_datagram(data, addr, self.now)[1:]
        return self._carry_out(effects, fails)

    def register(self, name: str, addr: Address, *, fails: bool = False) -> list[Send]:
        """``name`` registers from ``addr`` with its key: the handshake, the register's
        commit failing if ``fails``; what the server sends for the register."""
        raw = RawClient(name, addr[1], key_of(name))
        [challenge] = self.receive(raw.hello(), addr)
        register = raw.answer(challenge.data)
        assert register is not None
        sent = self.receive(register, addr, fails=fails)
        for send in sent:
            if send.addr == addr:
                raw.answer(send.data)  # registered (a session), or refused
        if raw.registered:
            self.clients[addr] = raw
        return sent

    def timer(self, until: float, *, fails: bool = False) -> list[Send]:
        """Every deadline up to ``until``, each a handling (the commit of the first one
        that changes anything ``fails``)."""
        sent: list[Send] = []
        while (deadline := self.server.next_deadline()) is not None and deadline <= until:
            self.now = deadline
            effects = self.server.handle_timer(self.now)
            sent += self._carry_out(effects, fails)
            fails = fails and not any(isinstance(effect, Change) for effect in effects)
        self.now = until
        return sent

    def _carry_out(self, effects: list[Effect], fails: bool) -> list[Send]:
        changes = [effect for effect in effects if isinstance(effect, Change)]
        if changes and fails:
            effects = self.server.rollback(self.store.load(), self.now)
        elif changes:
            trio.run(self.store.commit, changes)
        self.server.checkpoint()
        sent = [effect for effect in effects if isinstance(effect, Send)]
        for send in sent:
            if isinstance(send.message, TABLES):
                self.copies.setdefault(send.addr, TableCopy()).take(send.message)
        return sent

    def ack(self, sent: list[Send], *, only: Callable[[Send], bool] = lambda send: True) -> None:
        """Every table part in ``sent`` answered as a client does, and what that causes,
        until nothing more goes out."""
        while parts := [s for s in sent if isinstance(s.message, TABLES) and only(s)]:
            sent = []
            for send in parts:
                copy = self.copies[send.addr]
                assert isinstance(send.message, Table | TableDelta)
                answer = TableAck(send.message.id, copy.epoch, copy.version)
                sent += self.handle(answer, send.addr)

    def join(self, name: str, addr: Address) -> None:
        self.ack(self.register(name, addr))

    def database_table(self) -> dict[str, object]:
        return {record.name: record.entry() for record in self.store.load().clients}


def table_parts(sent: list[Send]) -> list[Send]:
    return [send for send in sent if isinstance(send.message, TABLES)]


def storage_refusal(request_id: str) -> Refused:
    return Refused(request_id, CANNOT_STORE, "storage")


def is_storage_refusal(message: Message) -> bool:
    return isinstance(message, Refused) and message.cause == "storage"


def test_a_rollback_takes_the_table_back_and_sends_only_what_differs() -> None:
    run = Runtime()
    run.join("user1", X)
    run.join("user2", Y)
    version = run.server.roster.version
    # user2 goes offline and user3 registers, but neither commit goes through
    assert table_parts(run.handle(Deregister("d2", "user2"), Y, fails=True)) == []
    assert table_parts(run.register("user3", Z, fails=True)) == []
    assert run.server.roster.version == version
    assert set(run.server.clients) == {"user1", "user2"}
    # the next change that does go through: a delta of that change alone
    sent = run.register("user4", W)
    (delta,) = [s.message for s in table_parts(sent) if s.addr == X]
    assert isinstance(delta, TableDelta)
    assert (delta.from_, delta.to, delta.gone) == (version, version + 1, [])
    assert [row(e) for e in delta.entries] == [("user4", CLIENT_IP, W[1], True)]


def test_an_update_sent_before_the_failure_goes_on_and_nothing_of_the_failure_follows() -> None:
    run = Runtime()
    run.join("user1", X)
    run.join("user2", Y)
    sent = run.register("user3", Z)  # committed: deltas to user1 and 2
    version = run.server.roster.version
    run.ack(sent, only=lambda send: send.addr == Z)  # user3 takes its table
    in_flight = sorted((s for s in table_parts(sent) if s.addr in (X, Y)), key=lambda s: s.addr)
    assert [s.addr for s in in_flight] == [X, Y]
    # user2 deregisters while its delta is unanswered; the commit fails
    sent = run.handle(Deregister("d2", "user2"), Y, fails=True)
    assert sent[0].message == storage_refusal("d2")
    assert run.server.roster.version == version
    # user1's delta is still retried, as it was sent; user2's, which the dereg ended, is
    # made again (the same change: nothing of the dereg)
    (again,) = table_parts(sent)
    assert again.addr == Y and isinstance(again.message, TableDelta)
    assert again.message.to == version
    assert [row(e) for e in again.message.entries] == [("user3", CLIENT_IP, Z[1], True)]
    retried = run.timer(run.now + 0.5)  # (sealed afresh: the same message, new bytes)
    assert (X, in_flight[0].message) in [(s.addr, s.message) for s in table_parts(retried)]
    # answered: both hold the version the database has, and nothing more is sent
    run.ack([in_flight[0], again])
    for addr in (X, Y):
        assert (run.copies[addr].version, run.copies[addr].entries) == (
            version,
            run.database_table(),
        )
    assert run.server.followers.held == {"user1": version, "user2": version, "user3": version}
    assert table_parts(run.timer(run.now + 5)) == []


def test_a_failed_registration_gives_back_the_version_the_client_held() -> None:
    run = Runtime()
    run.join("user1", X)
    run.join("user2", Y)
    version = run.server.roster.version
    sid = run.server.clients["user1"].sid
    # user1 registers again from its address (a client started again on its port)
    sent = run.register("user1", X, fails=True)
    assert [is_storage_refusal(s.message) for s in sent] == [True]  # boxed to its key
    assert run.server.followers.held["user1"] == version  # not sent the whole table again
    assert not run.server.followers.is_joining("user1")
    assert run.server.clients["user1"].sid == sid
    assert sid in run.server.codec.sessions  # the session it had goes on
    assert table_parts(run.timer(run.now + 5)) == []
    run.join("user3", Z)  # and user1 hears of the next change in it
    assert run.copies[X].entries == run.database_table()


def test_an_undone_registration_that_fails_to_commit_is_undone_later() -> None:
    run = Runtime()
    run.join("user1", X)
    # user3 registers and never answers its table
    sent = run.register("user3", Z)
    run.ack(sent, only=lambda send: send.addr != Z)
    assert run.server.followers.joined_new("user3")
    # another name from its address undoes it, but that commit fails
    sent = run.register("user4", Z, fails=True)
    assert is_storage_refusal(sent[0].message)
    assert set(run.server.clients) == {"user1", "user3"}
    assert run.server.followers.joined_new("user3")  # still a registration to undo
    # the database's table to user3 again (the displacement had ended its update)
    (again,) = table_parts(sent)
    assert again.addr == Z and isinstance(again.message, Table)
    assert {e.name for e in again.message.entries} == {"user1", "user3"}
    # it goes on unanswered: the registration is undone in the end
    sent = run.timer(run.now + 6)
    run.ack(sent, only=lambda send: send.addr != Z)
    assert set(run.server.clients) == {"user1"}
    assert "user3" not in run.database_table()
    assert run.copies[X].entries == run.database_table()


def test_a_failed_timer_handling_leaves_a_silent_client_online_with_an_update_due() -> None:
    run = Runtime()
    run.join("user1", X)
    run.join("user2", Y)
    sent = run.register("user3", Z)
    run.ack(sent, only=lambda send: send.addr != Y)  # user2 does not answer its delta
    version = run.server.roster.version
    # its tries run out: marked offline (and probed), but that commit fails
    sent = run.timer(run.now + 2.6, fails=True)
    assert run.server.clients["user2"].online
    assert all(s.addr == Y for s in table_parts(sent))  # its update again, nothing new
    assert run.server.roster.version == version
    run.ack(sent)
    assert run.copies[Y].version == version
    assert run.copies[Y].entries == run.copies[X].entries == run.database_table()


# --- the roster alone ------------------------------------------------------------------------


def records(*names: str, offline: tuple[str, ...] = ()) -> list[ClientRecord]:
    return [
        ClientRecord(
            name,
            (CLIENT_IP, 1000 + index),
            KEY,
            TAG,
            Presence.SILENT if name in offline else Presence.ONLINE,
        )
        for index, name in enumerate(names)
    ]


def next_id() -> Callable[[], str]:
    counter = iter(range(1_000_000))
    return lambda: f"s.{next(counter)}"


def brought_up_to_date(roster: Roster, copy: TableCopy) -> TableCopy:
    for part, _ in roster.update_for(copy.version, next_id(), encode):
        copy.take(part)
    return copy


def roster_at_checkpoint(*names: str) -> tuple[Roster, TableCopy]:
    roster = Roster(epoch=5)
    for record in records(*names):
        roster.add(record)
        roster.close_version()
    roster.checkpoint()
    copy = TableCopy()
    for part, _ in roster.whole(next_id(), encode):
        copy.take(part)
    return roster, copy


def test_a_reload_with_nothing_different_makes_no_version() -> None:
    roster, copy = roster_at_checkpoint("a", "b")
    roster.set_presence(roster.clients["a"], Presence.SILENT)
    roster.remove("b")
    roster.add(records("a", "b", "c")[2])
    roster.close_version()
    roster.reload(records("a", "b"))
    assert not roster.close_version()
    assert roster.version == copy.version
    assert {part.version for part, _ in roster.whole(next_id(), encode)} == {copy.version}
    assert [e for part, _ in roster.whole(next_id(), encode) for e in part.entries] == [
        record.entry() for record in records("a", "b")
    ]


def test_a_reload_makes_a_version_of_what_the_database_has_otherwise() -> None:
    roster, copy = roster_at_checkpoint("a", "b", "c")
    roster.set_presence(roster.clients["b"], Presence.SILENT)  # never committed
    roster.close_version()
    database = records("a", "c", "d", offline=("a",))  # as another handling left it
    roster.reload(database)
    assert roster.close_version()
    assert roster.version == copy.version + 1
    brought_up_to_date(roster, copy)
    assert copy.entries == {record.name: record.entry() for record in database}


def test_a_reload_after_the_history_was_compacted_still_ends_at_the_databases_table() -> None:
    roster, copy = roster_at_checkpoint("a", "b")
    for _ in range(1500):  # far past twice the table: the history is compacted meanwhile
        roster.set_presence(roster.clients["a"], Presence.SILENT)
        roster.close_version()
        roster.set_presence(roster.clients["a"], Presence.ONLINE)
        roster.close_version()
    roster.set_presence(roster.clients["b"], Presence.DEREGISTERED)
    roster.remove("a")
    roster.close_version()
    database = records("a", "b")
    roster.reload(database)
    roster.close_version()
    brought_up_to_date(roster, copy)
    assert copy.entries == {record.name: record.entry() for record in database}
    whole = [e for part, _ in roster.whole(next_id(), encode) for e in part.entries]
    assert {e.name: e for e in whole} == {record.name: record.entry() for record in database}


def test_a_name_removed_then_rolled_back_is_not_listed_as_gone() -> None:
    roster, copy = roster_at_checkpoint("a", "b")
    roster.remove("b")
    roster.close_version()
    roster.reload(records("a", "b"))
    roster.checkpoint()
    roster.add(records("a", "b", "c")[2])
    roster.close_version()
    (part,) = [part for part, _ in roster.update_for(copy.version, next_id(), encode)]
    assert isinstance(part, TableDelta) and part.gone == []
    assert [e.name for e in part.entries] == ["c"]


def test_a_name_the_database_does_not_have_leaves_the_clients_copies() -> None:
    # The table at the checkpoint is the database's, unless something else wrote to it:
    # whatever differs is a new version.
    roster, copy = roster_at_checkpoint("a", "b")
    roster.reload(records("a"))
    roster.close_version()
    brought_up_to_date(roster, copy)
    assert set(copy.entries) == {"a"}
