"""The table's versions and deltas, rule by rule: a client's copy (gaps, reordering,
duplicates, epochs), the server's history and its updates (one in flight per client,
coalesced under a storm), and registrations that never complete.

No Trio here: ``TableCopy`` and ``Roster`` driven directly, and the ``Sim`` harness of
``tests/_sim.py`` for whole exchanges (``tests/test_virtual_tables.py`` plays the same
rules on the Trio runtime in virtual time).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from _harness import first_only
from _sim import CLIENT_IP, SERVER, TABLES, TU, Sim, between, key_of, trio_of_clients

from chatapp.protocol import roster as roster_module
from chatapp.protocol.changes import ClientRecord, ClientRemoved, ClientSaved, Presence
from chatapp.protocol.client import ClientState
from chatapp.protocol.codecs import Sender, Via
from chatapp.protocol.common import Effect, Send
from chatapp.protocol.roster import Roster
from chatapp.protocol.tables import TableCopy, Window
from chatapp.testing.raw import RawClient
from chatapp.wire import (
    MAX_DATAGRAM,
    Address,
    Table,
    TableAck,
    TableDelta,
    TableEntry,
    encode,
)

#: The key and the session id (tag) of every entry made here (the rules do not read them).
KEY, TAG = bytes(range(32)), bytes(range(8))


def entry(name: str, port: int, online: bool = True) -> TableEntry:
    return TableEntry(name, CLIENT_IP, port, online, KEY, TAG)


def record(name: str, addr: Address) -> ClientRecord:
    return ClientRecord(name, addr, KEY, TAG)


def row(e: TableEntry) -> tuple[str, str, int, bool]:
    """An entry without its key and session id."""
    return (e.name, e.ip, e.port, e.online)


A, B, C = entry("a", 1), entry("b", 2), entry("c", 3)


def whole(epoch: int, version: int, *entries: TableEntry, part: int = 0, parts: int = 1) -> Table:
    return Table(f"t{epoch}.{version}.{part}", epoch, version, part, parts, list(entries))


def delta(
    epoch: int,
    base: int,
    to: int,
    *entries: TableEntry,
    gone: tuple[str, ...] = (),
    part: int = 0,
    parts: int = 1,
) -> TableDelta:
    return TableDelta(
        f"d{epoch}.{base}.{to}.{part}", epoch, base, to, part, parts, list(entries), list(gone)
    )


def held(copy: TableCopy) -> tuple[int, int]:
    return copy.epoch, copy.version


# === the client's copy ==========================================================================


def test_a_whole_table_replaces_the_copy_once() -> None:
    copy = TableCopy()
    assert held(copy) == (-1, -1)
    assert copy.take(whole(7, 1, A, B))
    assert copy.entries == {"a": A, "b": B} and held(copy) == (7, 1)
    assert not copy.take(whole(7, 1, A, B))  # a repeat
    assert not copy.take(whole(7, 0, C))  # an older version of this epoch
    assert copy.entries == {"a": A, "b": B}


def test_a_whole_table_of_another_epoch_replaces_any_version() -> None:
    # Epochs are a server's boot id, not ordered: a restarted server starts at version 1.
    copy = TableCopy()
    copy.take(whole(7, 40, A, B))
    assert copy.take(whole(3, 1, C))
    assert copy.entries == {"c": C} and held(copy) == (3, 1)


def test_a_table_in_parts_is_applied_once_every_part_is_in_in_any_order() -> None:
    copy = TableCopy()
    assert not copy.take(whole(1, 1, C, part=2, parts=3))
    assert not copy.take(whole(1, 1, A, part=0, parts=3))
    assert not copy.take(whole(1, 1, A, part=0, parts=3))  # a repeated part
    assert copy.entries == {} and held(copy) == (-1, -1)
    assert copy.take(whole(1, 1, B, part=1, parts=3))
    assert copy.entries == {"a": A, "b": B, "c": C}
    assert not copy.take(whole(1, 1, C, part=2, parts=3))  # late copies change nothing


def test_a_delta_applies_its_entries_and_removals_from_the_version_held() -> None:
    copy = TableCopy()
    copy.take(whole(1, 4, A, B))
    b_offline = entry("b", 2, online=False)
    assert copy.take(delta(1, 4, 6, b_offline, C, gone=("a",)))
    assert copy.entries == {"b": b_offline, "c": C} and held(copy) == (1, 6)


def test_a_delta_that_does_not_start_at_or_below_the_version_held_is_not_applied() -> None:
    copy = TableCopy()
    copy.take(whole(1, 4, A))
    assert not copy.take(delta(1, 5, 6, B))  # a gap: 4 -> 5 is missing
    assert not copy.take(delta(2, 4, 5, B))  # another epoch
    assert not copy.take(delta(1, 3, 4, B))  # nothing new: it ends at the version held
    assert copy.entries == {"a": A} and held(copy) == (1, 4)


def test_a_delta_from_an_older_version_that_reaches_further_is_applied() -> None:
    # Its entries are as they are at its end: the ones the copy had already change nothing.
    copy = TableCopy()
    copy.take(whole(1, 4, A, B))
    assert copy.take(delta(1, 2, 5, A, C))
    assert copy.entries == {"a": A, "b": B, "c": C} and held(copy) == (1, 5)


def test_reordered_deltas_are_applied_when_they_can_be_placed() -> None:
    copy = TableCopy()
    copy.take(whole(1, 1, A))
    assert not copy.take(delta(1, 2, 3, C))  # arrives first: cannot be placed, not kept
    assert copy.take(delta(1, 1, 2, B))
    assert held(copy) == (1, 2)
    assert copy.take(delta(1, 2, 3, C))  # the server sends it again from 2
    assert copy.entries == {"a": A, "b": B, "c": C}


def test_a_delta_in_parts_is_applied_once_whole() -> None:
    copy = TableCopy()
    copy.take(whole(1, 1, A))
    assert not copy.take(delta(1, 1, 2, B, part=1, parts=2))
    assert copy.entries == {"a": A}
    assert copy.take(delta(1, 1, 2, C, gone=("a",), part=0, parts=2))
    assert copy.entries == {"b": B, "c": C}
    assert not copy.take(delta(1, 1, 2, B, part=1, parts=2))


def test_a_part_numbered_past_its_count_is_ignored() -> None:
    copy = TableCopy()
    assert not copy.take(whole(1, 1, A, part=1, parts=1))
    assert copy.entries == {}


# === the server's history ========================================================================


def roster_with(*names: str) -> Roster:
    roster = Roster(epoch=5)
    for index, name in enumerate(names):
        roster.add(record(name, (CLIENT_IP, 1000 + index)))
        roster.close_version()
    return roster


def ids() -> Callable[[], str]:
    counter = iter(range(1_000_000))
    return lambda: f"s.{next(counter)}"


def update_for(roster: Roster, held: int | None) -> list[Table | TableDelta]:
    """The parts of the update for a client that holds ``held`` (each also encoded: the
    bytes are those of the part)."""
    update = roster.update_for(held, ids(), encode)
    assert all(data == encode(part) for part, data in update)
    return [part for part, _ in update]


def test_a_delta_holds_every_change_since_its_base_in_order() -> None:
    roster = roster_with("a", "b", "c")  # versions 1, 2, 3
    roster.set_presence(roster.clients["a"], Presence.DEREGISTERED)
    roster.set_presence(roster.clients["b"], Presence.SILENT)
    roster.close_version()  # 4
    roster.set_presence(roster.clients["a"], Presence.ONLINE)
    roster.close_version()  # 5
    (update,) = update_for(roster, 2)
    assert isinstance(update, TableDelta)
    assert (update.epoch, update.from_, update.to) == (5, 2, 5)
    # each name once, as it is now, in the order they first changed
    assert [(e.name, e.online) for e in update.entries] == [
        ("c", True),
        ("a", True),
        ("b", False),
    ]
    (update,) = update_for(roster, 4)
    assert [e.name for e in update.entries] == ["a"]  # type: ignore[union-attr]


def test_the_history_is_compacted_to_each_names_last_change() -> None:
    roster = roster_with("a", "b")  # versions 1, 2
    for _ in range(1500):  # 3,000 changes, far past twice the table: compacted on the way
        roster.set_presence(roster.clients["a"], Presence.SILENT)
        roster.close_version()
        roster.set_presence(roster.clients["a"], Presence.ONLINE)
        roster.close_version()
    parts = update_for(roster, 1)
    entries = [e for part in parts for e in part.entries]
    assert entries == [entry("b", 1001), entry("a", 1000)]
    copy = TableCopy()
    copy.take(whole(5, 1, entry("a", 1000)))
    for part in parts:
        copy.take(part)
    assert (copy.version, copy.entries) == (3002, {"a": entry("a", 1000), "b": entry("b", 1001)})


def test_a_client_with_no_table_of_this_epoch_gets_the_whole_table() -> None:
    roster = roster_with("a", "b")
    parts = update_for(roster, None)
    assert [type(p) for p in parts] == [Table]
    assert [e.name for e in parts[0].entries] == ["a", "b"]
    assert roster.whole(ids(), encode) is roster.whole(ids(), encode)  # made once


def test_removals_travel_in_deltas_and_a_forgotten_one_sends_the_whole_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(roster_module, "MAX_REMOVED", 2)
    roster = roster_with("a", "b", "c", "d")  # versions 1..4
    for name in ("a", "b", "c"):  # versions 5, 6, 7; "a" is forgotten when "c" leaves
        roster.remove(name)
        roster.close_version()
    (update,) = update_for(roster, 5)
    assert isinstance(update, TableDelta) and update.gone == ["b", "c"]
    (update,) = update_for(roster, 4)
    assert isinstance(update, Table)  # "a" left after 4 and is no longer remembered
    assert [e.name for e in update.entries] == ["d"]


def test_a_name_that_left_and_came_back_is_not_listed_as_gone() -> None:
    roster = roster_with("a", "b")
    roster.remove("a")
    roster.close_version()
    roster.add(record("a", (CLIENT_IP, 4242)))
    roster.close_version()
    (update,) = update_for(roster, 2)
    assert isinstance(update, TableDelta) and update.gone == []
    assert update.entries == [entry("a", 4242)]


def test_a_name_that_changed_and_then_left_is_only_listed_as_gone() -> None:
    # Were it also among the entries, a delta in parts applied gone-part first (parts
    # are put together in the order they arrive) would bring it back.
    names = [f"a_rather_long_name_for_peer_{n:04d}" for n in range(600)]
    roster = roster_with("a", *names)
    base = roster.version
    roster.set_presence(roster.clients["a"], Presence.SILENT)
    for name in names:
        roster.set_presence(roster.clients[name], Presence.SILENT)
    roster.close_version()
    roster.remove("a")
    roster.close_version()
    parts = update_for(roster, base)
    assert len(parts) > 1
    assert all(isinstance(part, TableDelta) for part in parts)
    assert [name for part in parts for name in part.gone] == ["a"]  # type: ignore[union-attr]
    assert "a" not in {e.name for part in parts for e in part.entries}
    copy = TableCopy()
    copy.take(whole(5, base, *(r.entry() for r in roster_with("a", *names).clients.values())))
    for part in reversed(parts):
        copy.take(part)
    assert copy.version == roster.version and "a" not in copy.entries


def test_big_tables_and_deltas_are_split_and_every_part_fits() -> None:
    names = [f"a_rather_long_name_for_peer_{n:04d}" for n in range(600)]
    roster = roster_with("first", *names)
    parts = update_for(roster, None)
    assert len(parts) > 1 and {p.parts for p in parts} == {len(parts)}
    assert sum(len(p.entries) for p in parts) == 601
    parts = update_for(roster, 1)
    assert len(parts) > 1 and all(isinstance(p, TableDelta) for p in parts)
    assert sum(len(p.entries) for p in parts) == 600
    assert all(len(encode(p)) <= MAX_DATAGRAM for p in parts)
    # the parts are well filled: about as few as the bytes allow
    assert len(parts) <= 1 + sum(len(encode(p)) for p in parts) // (MAX_DATAGRAM - 1024)


def test_a_name_keeps_its_part_and_a_name_that_left_makes_room() -> None:
    names = [f"a_rather_long_name_for_peer_{n:04d}" for n in range(600)]
    roster = roster_with(*names)
    before = [[e.name for e in p.entries] for p, _ in roster.whole(ids(), encode)]
    roster.set_presence(roster.clients[names[5]], Presence.SILENT)
    roster.remove(names[6])
    roster.add(record("newcomer", (CLIENT_IP, 9)))
    roster.close_version()
    after = [[e.name for e in p.entries] for p, _ in roster.whole(ids(), encode)]
    # names[5] changed in place, names[6] left its part, the newcomer joined the last
    assert after[0] == [name for name in before[0] if name != names[6]]
    assert after[1:-1] == before[1:-1]
    assert after[-1] == [*before[-1], "newcomer"]


# === whole exchanges ==============================================================================


def test_registering_sends_the_whole_table_to_the_newcomer_and_deltas_to_the_others() -> None:
    sim = trio_of_clients()
    mark = len(sim.sent)
    sim.join("user4")
    updates = [d for d in sim.sent[mark:] if isinstance(d.message, TABLES)]
    assert sorted((sim.label_of(d.dst), type(d.message).__name__) for d in updates) == [
        ("user1", "TableDelta"),
        ("user2", "TableDelta"),
        ("user3", "TableDelta"),
        ("user4", "Table"),
    ]
    for d in updates:
        if isinstance(d.message, TableDelta):
            assert (d.message.from_, d.message.to) == (3, 4)
            assert [row(e) for e in d.message.entries] == [("user4", CLIENT_IP, 9301, True)]
            assert len(d.send.data) < 300  # sealed, with the newcomer's key and session id
    assert all(sim.clients[n].table == sim.clients["user4"].table for n in ("user1", "user2"))


def test_a_client_that_says_it_holds_an_older_version_gets_the_delta_from_there() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "server", "user1", TableDelta))
    sim.run(1.0)
    sim.type("user2", "dereg user2")  # version 4: user1's delta is lost
    (lost,) = sim.datagrams(TableDelta, dst="user1", since=sim.now)
    sim.drop.clear()
    # user1 answers as a client that holds version 2 (a gap it could not place, say)
    sim.from_client("user1", TableAck(lost.message.id, 0, 2))
    resent = sim.datagrams(TableDelta, dst="user1")[-1].message
    assert isinstance(resent, TableDelta) and (resent.from_, resent.to) == (2, 4)
    assert {e.name for e in resent.entries} == {"user2", "user3"}


def test_a_client_whose_table_is_of_another_epoch_gets_the_whole_table() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "server", "user1", TableDelta))
    sim.run(1.0)
    sim.type("user2", "dereg user2")
    (lost,) = sim.datagrams(TableDelta, dst="user1", since=sim.now)
    sim.drop.clear()
    sim.from_client("user1", TableAck(lost.message.id, 99, 7))
    resent = sim.datagrams(TABLES, dst="user1")[-1].message
    assert isinstance(resent, Table) and resent.version == 4


def test_a_delta_that_reorders_behind_the_next_one_is_placed_and_shown_once() -> None:
    sim = trio_of_clients()
    user1 = sim.clients["user1"]
    sim.drop.append(between(sim, "server", "user1", TableDelta))
    sim.run(1.0)
    sim.type("user2", "dereg user2")  # 3 -> 4 to user1, held back here
    (first,) = sim.datagrams(TableDelta, dst="user1", since=sim.now)
    sim.drop.clear()
    mark = len(sim.lines("user1"))
    later = delta(0, 4, 5, entry("user9", 1))  # a delta from 4 that overtook it
    effects = user1.handle_message(later, Sender(Via.SERVER, SERVER), sim.now)
    assert [e.message for e in effects if isinstance(e, Send)] == [TableAck(later.id, 0, 3)]
    sim.from_server("user1", first.message)
    sim.from_server("user1", first.message)  # and again (sealed afresh: a resend)
    assert sim.lines_since("user1", mark) == [TU]
    assert user1.table["user2"].online is False


def test_a_restarted_server_sends_every_online_client_the_whole_table_of_its_epoch() -> None:
    sim = trio_of_clients()
    sim.type("user3", "dereg user3")
    marks = {name: len(sim.lines(name)) for name in ("user1", "user2", "user3")}
    old_delta = sim.datagrams(TableDelta, dst="user1")[-1].message
    mark = len(sim.sent)
    sim.restart_server(from_database=True)  # epoch 1: the clients rekey, then version 1
    sent = [d for d in sim.sent[mark:] if isinstance(d.message, TABLES)]
    assert {(sim.label_of(d.dst), type(d.message)) for d in sent} == {
        ("user1", Table),
        ("user2", Table),
    }
    assert sim.lines_since("user1", marks["user1"]) == [TU]
    assert sim.lines_since("user3", marks["user3"]) == []
    assert (sim.clients["user1"].copy.epoch, sim.clients["user1"].copy.version) == (1, 1)
    # a late delta of the old epoch (sealed in the new session) changes nothing
    sim.from_server("user1", old_delta)
    assert sim.lines_since("user1", marks["user1"]) == [TU]
    sim.join("user4")
    assert sim.datagrams(TableDelta, dst="user1")[-1].message.epoch == 1  # type: ignore[union-attr]
    assert sim.clients["user1"].table == sim.clients["user4"].table


def test_a_storm_of_joins_costs_each_client_a_bounded_number_of_deltas() -> None:
    sim = trio_of_clients()
    sim.run(1.0)
    mark = len(sim.sent)
    storm = 200
    # Every registration is in flight at once: the server handles them one by one, and
    # each client's ACK of its first delta comes back behind all of them.
    for n in range(storm):
        addr = ("10.0.2.1", 30000 + n)
        peer = AckingPeer(RawClient(f"peer{n}", addr[1], key_of(f"peer{n}")))
        sim.add_node(f"peer{n}", addr, peer)
        sim.apply(addr, [peer.hello()])
    sim.pump()
    sim.settle()
    for name in ("user1", "user2", "user3"):
        deltas = [d.message for d in sim.sent[mark:] if d.dst == sim.addr[name]]
        # (a delta of 200 entries with their keys is sent in parts)
        updates = {(d.from_, d.to) for d in deltas if isinstance(d, TableDelta)}
        assert 1 <= len(updates) <= 3, (name, updates)
        assert set(sim.clients[name].table) == set(sim.server.clients)
        assert sim.clients[name].copy.version == sim.server.roster.version
    assert len(sim.lines("user1")) <= 3 + 3


def test_at_most_a_window_of_parts_is_unanswered_and_the_others_follow_in_turn() -> None:
    sim = Sim(table_window=Window(parts=3))
    for n in range(8):
        sim.join(f"user{n}")
    assert all(sim.clients[f"user{n}"].copy.version == 8 for n in range(8))
    sim.run(1.0)
    held = between(sim, "user0", "server", TableAck)  # user0 answers late: 0.5 s
    sim.drop.append(first_only(held))
    mark = len(sim.sent)
    sim.join("user8")  # the whole table to user8, then a delta to user0 .. user7
    first = [sim.label_of(d.dst) for d in sim.sent[mark:] if isinstance(d.message, TABLES)]
    # the newcomer first; user0's unanswered delta holds one place until its retry, and
    # the others pass through the two left, one after another
    assert first[0] == "user8" and sorted(first[1:]) == [f"user{n}" for n in range(8)]
    assert all(sim.clients[f"user{n}"].copy.version == 9 for n in range(9))
    held = sim.server.followers.held
    assert held["user0"] == 8 and all(held[f"user{n}"] == 9 for n in range(1, 9))
    sim.run(0.5)  # the retry, answered
    assert held["user0"] == 9


def test_a_full_window_holds_the_others_back_until_parts_are_answered() -> None:
    sim = Sim(table_window=Window(parts=2))
    for n in range(6):
        sim.join(f"user{n}")
    sim.run(1.0)
    sim.drop.append(lambda src, send: isinstance(send.message, TableAck))  # nobody answers
    mark = len(sim.sent)
    sim.join("user6")
    updates = [d for d in sim.sent[mark:] if isinstance(d.message, TABLES)]
    assert len(updates) == 2  # the window: the newcomer's table and one delta
    sim.drop.clear()
    sim.run(0.5)  # the two are sent again and answered: the others follow, two at a time
    sim.settle()
    assert {sim.clients[f"user{n}"].copy.version for n in range(7)} == {7}
    assert all(record.online for record in sim.server.clients.values())


def test_the_window_counts_bytes_too() -> None:
    sim = Sim(table_window=Window(parts=1000, bytes=1400))  # a small table and a few deltas
    for n in range(10):
        sim.join(f"user{n}")
    sim.run(1.0)
    sim.drop.append(lambda src, send: isinstance(send.message, TableAck))
    mark = len(sim.sent)
    sim.join("user10")
    updates = [d for d in sim.sent[mark:] if isinstance(d.message, TABLES)]
    assert 2 <= len(updates) <= 5
    assert sum(len(d.send.data) for d in updates[:-1]) < 1400


def test_parts_sent_again_halve_the_window_and_answered_updates_grow_it_back() -> None:
    sim = Sim(table_window=Window(parts=8, least=2))
    for n in range(12):
        sim.join(f"user{n}")
    sim.run(1.0)
    followers = sim.server.followers
    assert followers.allowed == 8
    sim.drop.append(lambda src, send: isinstance(send.message, TableAck))  # late, all
    sim.join("user12")
    sim.run(0.5)  # the 8 parts out are sent again: half as many at once from now on
    assert followers.allowed == 4
    sim.run(0.4)  # another retry within one timeout of the cut: the same signal
    assert followers.allowed == 4
    sim.run(0.1)
    assert followers.allowed == 2  # the next timeout: halved again, not below 2
    sim.drop.clear()
    sim.settle()
    assert {sim.clients[f"user{n}"].copy.version for n in range(13)} == {13}
    assert 2 < followers.allowed <= 8  # every window of answered updates gives one back


class AckingPeer:
    """A client that registers through the handshake, then ACKs every part with the
    version it brings (a client that applies everything); ``ghost``: it says nothing
    once registered."""

    def __init__(self, raw: RawClient, *, ghost: bool = False) -> None:
        self.raw = raw
        self.ghost = ghost

    def hello(self) -> Send:
        data = self.raw.hello()
        return Send(self.raw.open(data) or Table("", 0, 0, 0, 1, []), data, SERVER)

    def handle_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> list[Effect]:
        if not self.raw.registered:
            reply = self.raw.answer(data)
            return [] if reply is None else [Send(Table("", 0, 0, 0, 1, []), reply, SERVER)]
        message = self.raw.open(data)
        if self.ghost or not isinstance(message, Table | TableDelta):
            return []
        return [Send(message, self.raw.table_ack(message), addr)]

    def handle_timer(self, now: float) -> list[Effect]:
        return []

    def next_deadline(self) -> float | None:
        return None


# === registrations that never complete ==========================================================


def ghost(sim: Sim, name: str, port: int) -> tuple[str, int]:
    """A client that registers ``name`` (with the key of the label ``name``) from
    ``port`` and then says nothing at all."""
    addr = (CLIENT_IP, port)
    peer = AckingPeer(RawClient(name, port, key_of(name)), ghost=True)
    sim.add_node(name, addr, peer)
    sim.apply(addr, [peer.hello()])
    sim.pump()
    assert peer.raw.registered
    return addr


def test_a_new_name_whose_first_table_is_never_acked_leaves_the_table_and_the_database() -> None:
    sim = trio_of_clients()
    ghost(sim, "ghost", 7000)
    assert sim.server.clients["ghost"].online
    assert sim.clients["user1"].table["ghost"].online
    sim.run(2.5)  # the whole table, 5 tries: marked offline, and sent once more
    assert sim.server.clients["ghost"].presence is Presence.SILENT
    assert sim.clients["user1"].table["ghost"].online is False
    sim.run(2.5)  # 5 more tries
    assert "ghost" not in sim.server.clients
    assert ClientRemoved("ghost") in sim.persisted
    for name in ("user1", "user2", "user3"):
        assert "ghost" not in sim.clients[name].table
    gone = sim.datagrams(TableDelta, dst="user1")[-1].message
    assert gone.gone == ["ghost"]
    sim.settle()
    assert sim.server.next_deadline() is None


def test_a_name_undone_is_unbound_unless_it_sent_something_still_stored() -> None:
    # A name is its key's only once its registration completes: undone, it is free for
    # any key. One whose channel message is still stored for someone stays (offline):
    # removing it would take that message (its sender's key gone) with it.
    sim = trio_of_clients()
    sim.type("user3", "dereg user3")
    poster = sim.nodes[ghost(sim, "poster", 7001)]
    assert isinstance(poster, AckingPeer)
    post = poster.raw.post("boo")
    sim.apply(sim.addr["poster"], [Send(Table("", 0, 0, 0, 1, []), post, SERVER)])
    sim.pump()
    assert [i.sender for i in sim.server.mailbox["user3"]] == ["poster"]
    ghost(sim, "ghost", 7000)  # after the post: nothing is stored for it
    sim.run(5.0)  # both registrations run out of tries
    assert "ghost" not in sim.server.clients and ClientRemoved("ghost") in sim.persisted
    assert sim.server.clients["poster"].presence is Presence.SILENT
    assert [i.sender for i in sim.server.mailbox["user3"]] == ["poster"]
    sim.settle()
    impostor = sim.join("ghost", label="other")  # another key: the name is free
    assert impostor.state is ClientState.ONLINE
    assert sim.server.clients["ghost"].key == key_of("other").public


def test_a_known_name_whose_registration_never_completes_only_goes_offline() -> None:
    sim = trio_of_clients()
    sim.kill("user1")
    sim.run(1.0)
    ghost(sim, "user1", 7001)  # user1 again, from another port: the holder is checked
    sim.settle()
    assert sim.server.clients["user1"].presence is Presence.SILENT
    assert not any(isinstance(c, ClientRemoved) for c in sim.persisted)
    assert sim.clients["user2"].table["user1"].online is False


def test_a_name_with_stored_messages_is_kept_offline() -> None:
    sim = trio_of_clients()
    ghost(sim, "ghost", 7000)
    sim.run(2.6)  # offline (silent)
    sim.type("user1", "send ghost are you there?")
    sim.settle()
    assert [i.sender for i in sim.server.mailbox["ghost"]] == ["user1"]
    assert sim.server.clients["ghost"].presence is Presence.SILENT
    assert screen_saved(sim, "user1")


def screen_saved(sim: Sim, name: str) -> bool:
    return "[Messages received by the server and saved.]" in sim.lines(name)


def test_a_new_name_from_the_address_of_one_that_never_completed_replaces_it_at_once() -> None:
    sim = trio_of_clients()
    for n in range(20):  # a flood of registrations from one socket, each with a new name
        ghost(sim, f"flood{n}", 7000)
    assert [name for name in sim.server.clients if name.startswith("flood")] == ["flood19"]
    removed = [c.name for c in sim.persisted if isinstance(c, ClientRemoved)]
    assert removed == [f"flood{n}" for n in range(19)]
    sim.settle()
    assert set(sim.server.clients) == {"user1", "user2", "user3"}
    assert set(sim.clients["user1"].table) == {"user1", "user2", "user3"}


def test_a_name_a_message_is_stored_for_is_never_undone_even_displaced() -> None:
    """The server stores a save before it relays it: a name something is stored for
    stays (offline), whatever happens to its registration, and the sender is told the
    message is saved."""
    sim = trio_of_clients()
    ghost(sim, "ghost", 7000)
    sim.type("user1", "send ghost hi")  # no ACK: saved, stored, relayed (0.5 -> 1.0)
    sim.run(0.7)
    ghost(sim, "other", 7000)  # ghost's address now registers another name
    sim.settle()
    assert sim.server.clients["ghost"].presence is Presence.SILENT
    assert [item.sender for item in sim.server.mailbox["ghost"]] == ["user1"]
    assert screen_saved(sim, "user1") and "user1" not in sim.exits
    assert not any(isinstance(c, ClientRemoved) and c.name == "ghost" for c in sim.persisted)


def test_a_completed_registration_is_never_undone() -> None:
    sim = trio_of_clients()
    sim.kill("user3")
    sim.type("user1", "send_all anyone?")
    sim.settle()
    assert sim.server.clients["user3"].presence is Presence.SILENT
    assert not any(isinstance(c, ClientRemoved) for c in sim.persisted)
    assert any(
        isinstance(c, ClientSaved) and c.name == "user3" and c.presence is Presence.SILENT
        for c in sim.persisted
    )
