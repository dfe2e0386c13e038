"""The server's rules, driven directly: no Trio, no sockets, time passed by hand.

The harness (``Sim``) is the one in ``test_protocol_client.py``: a real
``ServerProtocol`` and real clients, or stub peers where a test needs many.
"""

from __future__ import annotations

import ast
import inspect
import sys
import types

import pytest
import test_clean_ends
import test_durability
import test_input_line
import test_protocol_client
import test_protocol_shared
import test_protocol_stream
import test_protocol_trust
import test_scripts
import test_statefiles
import test_terminal
import test_virtual
from _harness import first_only
from _sim import (
    CLIENT_IP,
    SERVER,
    SERVER_KEY,
    SERVER_TEXT,
    TABLES,
    TU,
    WALL,
    Sim,
    between,
    entry,
    key_of,
    rows,  # the shared harness; see its docstring
    trio_of_clients,
)
from msgspec.structs import replace

from chatapp import screen
from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
)
from chatapp.protocol.client import ClientState
from chatapp.protocol.common import Effect, Log, Received, Send
from chatapp.protocol.crypto import CHANNEL_DOMAIN, REGISTER_DOMAIN
from chatapp.protocol.mailbox import Mailboxes
from chatapp.protocol.sealing import TO_SERVER, Session
from chatapp.protocol.server import ServerProtocol
from chatapp.wire import (
    MAX_DATAGRAM,
    Ack,
    Address,
    Challenge,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Deregister,
    Hello,
    Lookup,
    LookupResult,
    Mailbox,
    Message,
    Refused,
    Register,
    Registered,
    Rekey,
    Relay,
    Reregister,
    Saved,
    SaveMessage,
    Seq,
    Table,
    TableAck,
    TableDelta,
    TableEntry,
    encode,
)


def add_peers(sim: Sim, count: int, prefix: str = "peer") -> list[str]:
    """Register ``count`` clients from other addresses; returns their names."""
    names = [f"{prefix}{n:03d}" for n in range(count)]
    for n, name in enumerate(names):
        sim.join(name, port=20000 + n)
    return names


class SilentNode:
    """A node that takes every datagram and answers none."""

    def handle_datagram(self, data: bytes, addr: Address, now: float) -> list[Effect]:
        return []

    def handle_timer(self, now: float) -> list[Effect]:
        return []

    def next_deadline(self) -> float | None:
        return None


def restore_peers(sim: Sim, count: int, prefix: str) -> list[str]:
    """``count`` clients the server knows (as after a restart), without the table broadcast
    of each registration, and without sessions: they get no table."""
    records = []
    for n in range(count):
        name = f"{prefix}{n:03d}"
        addr = ("10.0.1.1", 20000 + n)
        sim.add_node(name, addr, SilentNode())
        records.append(ClientRecord(name, addr, key_of(name).public, bytes(8)))
    sim.server.restore(records, {})
    return [record.name for record in records]


def sends(effects: list[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def table_versions(sim: Sim, dst: str | None = None, since: float = -1.0) -> list[int]:
    """The versions that tables and deltas brought, in the order first sent."""
    versions = []
    for d in sim.datagrams(TABLES, dst=dst, since=since):
        version = d.message.version if isinstance(d.message, Table) else d.message.to  # type: ignore[union-attr]
        if version not in versions:
            versions.append(version)
    return versions


def index_of(effects: list[Effect], kind: type) -> int:
    return next(
        i
        for i, e in enumerate(effects)
        if (isinstance(e, Send) and isinstance(e.message, kind)) or isinstance(e, kind)
    )


# === registration ===========================================================================


def test_registration_records_the_client_and_persists_it_before_answering() -> None:
    sim = Sim()
    sim.join("user1", port=9001)
    record = sim.server.clients["user1"]
    assert (record.name, record.addr) == ("user1", (CLIENT_IP, 9001))
    assert record.presence is Presence.ONLINE
    effects = sim.server_effects
    assert index_of(effects, Change) < index_of(effects, Registered) < index_of(effects, Table)
    (persist,) = [e for e in effects if isinstance(e, Change)]
    key, sid = key_of("user1").public, record.sid
    assert persist == ClientSaved("user1", CLIENT_IP, 9001, key, sid, Presence.ONLINE)
    (table,) = sim.datagrams(Table)
    assert table.message.entries == [TableEntry("user1", CLIENT_IP, 9001, True, key, sid)]  # type: ignore[union-attr]


def test_the_table_goes_to_every_online_client_and_lists_the_offline_ones() -> None:
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    sim.type("user2", "dereg user2")
    since = sim.now + 1
    sim.run(1.0)
    sim.join("user3")
    updates = sim.datagrams(TABLES, since=since)
    assert sorted(sim.label_of(d.dst) for d in updates) == ["user1", "user3"]
    (whole,) = sim.datagrams(Table, dst="user3")
    entries = whole.message.entries  # type: ignore[union-attr]
    assert [(e.name, e.ip, e.port, e.online) for e in entries] == [
        entry("user1", 9001),
        entry("user2", 9101, online=False),
        entry("user3", 9201),
    ]
    # every entry carries the name's key and the client's session id (offline too: a
    # client the server thinks is gone may be alive, and its peers still reach it)
    assert [e.key for e in entries] == [key_of(n).public for n in ("user1", "user2", "user3")]
    assert [e.tag for e in entries] == [sim.clients[n].sid for n in ("user1", "user2", "user3")]
    (delta,) = sim.datagrams(TableDelta, dst="user1", since=since)
    assert [e.name for e in delta.message.entries] == ["user3"]  # type: ignore[union-attr]


def test_a_repeated_register_is_answered_again_and_registers_once() -> None:
    sim = Sim()
    sim.join("user1")
    (register,) = sim.datagrams(Register)
    (registered,) = sim.datagrams(Registered)
    persisted = len(sim.persisted)
    effects = sim.inject_raw(sim.addr["user1"], register.send.data, SERVER)
    # the same answer, the same bytes: one session, whichever copy arrives
    assert [s.data for s in sends(effects)] == [registered.send.data]
    assert len(sim.persisted) == persisted
    assert table_versions(sim) == [1]
    assert len(sim.server.codec.sessions) == 1


def test_a_register_from_another_address_has_a_stale_cookie_and_is_challenged_again() -> None:
    sim = Sim()
    sim.join("user1")
    (register,) = sim.datagrams(Register)
    effects = sim.inject_raw((CLIENT_IP, 7777), register.send.data, SERVER)
    (challenge,) = [s.message for s in sends(effects)]
    assert isinstance(challenge, Challenge) and challenge.cookie != register.message.cookie
    assert sim.server.clients["user1"].addr == (CLIENT_IP, 9001)


def test_a_cookie_lasts_one_to_two_periods() -> None:
    sim = Sim()
    sim.kill("server")
    sim.join("user1")
    (hello,) = sim.datagrams(Hello)
    effects = sim.server.handle_datagram(hello.send.data, hello.src, 0.0)
    (challenge,) = [e.message for e in effects if isinstance(e, Send)]
    assert isinstance(challenge, Challenge)
    register = _signed_register(challenge, "user1", 9001)
    for at, good in ((59.9, True), (60.0, False)):
        server = Sim().server
        effects = server.handle_datagram(encode(register), hello.src, at)
        answer = [e.message for e in effects if isinstance(e, Send)]
        assert isinstance(answer[0], Registered if good else Challenge), at


def _signed_register(challenge: Challenge, name: str, port: int) -> Register:
    key = key_of(name)
    fields = (challenge.server_key, challenge.cookie, name.encode(), str(port).encode())
    sig = key.sign(REGISTER_DOMAIN, *fields)
    return Register("r.1", name, port, key.public, challenge.cookie, sig)


def test_a_register_whose_signature_fails_is_dropped_and_binds_nothing() -> None:
    sim = Sim()
    sim.kill("server")
    sim.join("user1")
    (hello,) = sim.datagrams(Hello)
    effects = sim.server.handle_datagram(hello.send.data, hello.src, 0.0)
    (challenge,) = [e.message for e in effects if isinstance(e, Send)]
    assert isinstance(challenge, Challenge)
    good = _signed_register(challenge, "user1", 9001)
    for bad in (
        replace(good, sig=bytes([good.sig[0] ^ 1]) + good.sig[1:]),  # altered
        replace(good, name="user2"),  # the signature does not cover this name
        replace(good, port=9002),
        replace(good, key=key_of("mallory").public),  # someone else's key, not its signature
    ):
        effects = sim.server.handle_datagram(encode(bad), hello.src, 0.0)
        # dropped, or (a field the cookie covers changed) challenged again: nothing more
        answers = [e.message for e in effects if isinstance(e, Send)]
        assert all(isinstance(answer, Challenge) for answer in answers), bad
        assert not [e for e in effects if isinstance(e, Change)], bad
    assert sim.server.clients == {}


def test_a_client_restarted_on_its_address_registers_again() -> None:
    sim = trio_of_clients()
    old_sid = sim.server.clients["user1"].sid
    sim.kill("user1")
    sim.join("user1", port=9001)
    assert sim.lines("user1")[-1] == TU
    assert sim.server.clients["user1"].sid != old_sid
    assert old_sid not in sim.server.codec.sessions
    assert sim.lines("user2")[-1] == TU


@pytest.mark.parametrize("how", ["dereg", "silent"])
def test_a_name_that_is_not_online_comes_back_from_another_address_with_its_key(
    how: str,
) -> None:
    sim = trio_of_clients()
    if how == "dereg":
        sim.type("user1", "dereg user1")
    else:
        sim.kill("user1")
        sim.type("user2", "send_all anyone?")
        sim.run(0.5)
        assert sim.server.clients["user1"].presence is Presence.SILENT
    sim.kill("user1")
    sim.join("user1", port=9999)
    assert sim.lines("user1")[-1] == TU
    assert "user1" not in sim.exits
    assert sim.server.clients["user1"].addr == (CLIENT_IP, 9999)
    # with another key it could not: a name belongs to its key, offline or not
    sim.join("user1", label="newcomer", port=9998)
    assert sim.exits == {"newcomer": 1}


def test_registering_a_new_name_from_an_address_marks_its_old_name_offline() -> None:
    sim = trio_of_clients()
    sim.kill("user1")
    sim.join("renamed", port=9001)
    assert sim.server.clients["user1"].presence is Presence.SILENT
    assert sim.clients["user2"].table["user1"].online is False
    assert rows(sim.clients["user2"].table)["renamed"] == entry("renamed", 9001)


def test_a_newcomer_at_an_address_a_name_left_does_not_take_that_name_offline() -> None:
    sim = Sim()
    sim.join("user1", port=9001)
    sim.settle()
    sim.kill("user1")
    sim.join("user1", port=9002)  # the holder, restarted elsewhere: the name moves
    sim.settle()
    sim.join("user9", port=9001)  # a newcomer where user1 used to be
    sim.settle()
    assert sim.server.clients["user1"].addr == (CLIENT_IP, 9002)
    assert sim.server.clients["user1"].online
    assert sim.server.clients["user9"].online


def test_a_wait_in_a_names_old_session_does_not_take_it_offline_in_its_new_one() -> None:
    sim = trio_of_clients()
    sim.kill("user1")
    sim.drop.append(first_only(lambda src, send: isinstance(send.message, Hello)))
    sim.join("user1", port=9002)  # the first hello is lost: registered at 0.5
    sim.run(0.1)
    sim.type("user2", "send_all hi")  # sealed in user1's old session, sent to 9001 until 0.6
    sim.run(0.45)
    assert sim.server.clients["user1"].addr == (CLIENT_IP, 9002)
    sim.run(0.5)  # the old session did not ACK it: that says nothing of the new one
    for table in sim.datagrams(Table, since=0.55):
        online = {e.name: e.online for e in table.message.entries}  # type: ignore[union-attr]
        assert online["user1"], table
    assert sim.server.clients["user1"].online


# === dereg and reg ===========================================================================


def test_dereg_persists_acks_and_sends_the_table_to_the_others_only() -> None:
    sim = trio_of_clients()
    sim.run(1.0)
    start = len(sim.server_effects)
    sim.type("user1", "dereg user1")
    effects = sim.server_effects[start:]
    assert index_of(effects, Change) < index_of(effects, Ack) < index_of(effects, TableDelta)
    assert sim.server.clients["user1"].presence is Presence.DEREGISTERED
    assert sorted(sim.label_of(d.dst) for d in sim.datagrams(TABLES, since=1.0)) == [
        "user2",
        "user3",
    ]


def test_a_repeated_dereg_is_acked_again_without_a_second_table() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    (dereg,) = sim.datagrams(Deregister)
    versions = table_versions(sim)
    # the same bytes again are a replay: dropped before anything else
    assert sends(sim.inject_raw(sim.addr["user1"], dereg.send.data, SERVER)) == []
    # the same request sealed again (a retry) is answered again, not redone
    effects = sim.from_client("user1", dereg.message)
    assert [s.message for s in sends(effects)] == [Ack(dereg.message.id)]
    assert table_versions(sim) == versions


def test_reg_acks_delivers_the_mailbox_and_sends_the_table_to_everyone() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 hello?")
    sim.run(1.0)
    start = len(sim.server_effects)
    since = sim.now
    sim.type("user1", "reg user1")
    effects = sim.server_effects[start:]
    assert index_of(effects, Change) < index_of(effects, Ack) < index_of(effects, Mailbox)
    assert sorted(sim.label_of(d.dst) for d in sim.datagrams(TABLES, since=since)) == [
        "user1",
        "user2",
        "user3",
    ]
    (batch,) = sim.datagrams(Mailbox)
    assert isinstance(batch.message, Mailbox)
    (item,) = batch.message.items
    assert (item.kind, item.sender) == ("direct", "user2")
    assert sim.opened("user1", item.sealed) == ("user2", "hello?")
    assert item.text == "" and b"hello?" not in item.sealed  # the server cannot read it
    assert item.stored_at == WALL + 0.5


def test_stored_messages_are_removed_only_when_their_batch_is_acked() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    for n in range(4):
        sim.type("user2", f"send user1 {n} " + "x" * 3000)
        sim.run(1.0)
    mailbox_seqs = [item.seq for item in sim.server.mailbox["user1"]]
    # the client gets the batches but its ACKs are lost: nothing is removed
    sim.drop.append(between(sim, "user1", "server", Ack))
    sim.type("user1", "reg user1")
    assert [item.seq for item in sim.server.mailbox["user1"]] == mailbox_seqs
    assert not any(isinstance(p, MessagesRemoved) for p in sim.persisted)
    sim.drop.clear()
    sim.settle()
    removed = [p for p in sim.persisted if isinstance(p, MessagesRemoved)]
    assert len(removed) >= 2  # one per batch
    assert [seq for change in removed for seq in change.seqs] == mailbox_seqs
    assert sim.server.mailbox == {}


def test_a_mailbox_never_acked_keeps_its_messages_and_the_client_is_marked_offline() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 hello?")
    sim.run(1.0)
    sim.drop.append(between(sim, "user1", "server", (Ack, TableAck)))
    sim.drop.append(lambda src, send: src == SERVER and isinstance(send.message, Ack))
    sim.type("user1", "reg user1")
    sim.settle()
    assert len(sim.datagrams(Mailbox)) == 5
    assert sim.server.clients["user1"].presence is Presence.SILENT
    assert len(sim.server.mailbox["user1"]) == 1
    # once it is heard from again, the rest is delivered, and nothing is shown twice
    sim.drop.clear()
    sim.type("user1", "reg user1")
    sim.settle()
    assert sim.server.mailbox == {}
    assert sim.lines("user1").count("[You have message]") == 1
    assert sum("hello?" in line for line in sim.lines("user1")) == 1


def test_a_second_dereg_is_acked_without_a_new_table_or_a_change() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    versions, changes = table_versions(sim), len(sim.persisted)
    again = Deregister("user1.again", "user1")
    effects = sim.from_client("user1", again)
    assert [s.message for s in sends(effects)] == [Ack("user1.again")]
    assert table_versions(sim) == versions
    assert len(sim.persisted) == changes


# === saved messages ============================================================================


def test_a_message_for_an_offline_client_is_stored_and_persisted_before_saved() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    start = len(sim.server_effects)
    sim.type("user2", "send user1 hello?")
    sim.run(0.5)
    effects = sim.server_effects[start:]
    assert index_of(effects, Change) < index_of(effects, Saved)
    (save,) = sim.datagrams(Saved)
    assert save.message == Saved(sim.datagrams(Chat)[0].message.id, "stored")
    (item,) = sim.server.mailbox["user1"]
    assert item.stored_at == WALL + 0.5


def test_delivered_by_the_server_when_its_table_says_online() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))
    sim.type("user1", "send user2 hi")
    sim.run(0.5)
    (chat,) = sim.datagrams(Chat, src="user1")
    (relayed,) = sim.datagrams(Relay, src="server")
    assert isinstance(relayed.message, Relay)
    assert relayed.message.sealed == chat.send.data  # the sealed datagram, as it was sent
    (saved,) = sim.datagrams(Saved)
    assert saved.message == Saved(chat.message.id, "delivered")
    # stored first (committed before the relay left), removed once the relay was ACKed
    effects = sim.server_effects
    assert index_of(effects, MessageStored) < index_of(effects, Relay)
    (stored,) = [p for p in sim.persisted if isinstance(p, MessageStored)]
    (removed,) = [p for p in sim.persisted if isinstance(p, MessagesRemoved)]
    assert removed.seqs == (stored.item.seq,)
    assert sim.server.mailbox == {}


def test_a_recipient_that_misses_the_server_delivery_too_is_marked_offline_and_stored() -> None:
    sim = trio_of_clients()
    sim.kill("user2")
    sim.run(1.0)
    sim.type("user1", "send user2 hi")
    sim.advance_to(1.999)
    assert sim.server.clients["user2"].online
    sim.advance_to(2.0)
    assert sim.server.clients["user2"].presence is Presence.SILENT
    (saved,) = sim.datagrams(Saved)
    assert (saved.at, saved.message.outcome) == (2.0, "stored")  # type: ignore[union-attr]
    assert sim.timed("user1")[-3:] == [
        (1.5, "[No ACK from user2, message sent to server.]"),
        (2.0, "[Messages received by the server and saved.]"),
        (2.0, TU),
    ]
    assert sim.timed("user3")[-1] == (2.0, TU)
    assert sim.clients["user1"].table["user2"].online is False
    (item,) = sim.server.mailbox["user2"]
    assert item.sender == "user1" and sim.opened("user2", item.sealed) == ("user1", "hi")
    assert item.stored_at == WALL + 1.5  # stored when the save came, before the relay


def test_a_save_retried_during_the_delivery_is_not_delivered_twice() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))
    sim.drop.append(between(sim, "user2", "server", Ack))
    sim.type("user1", "send user2 hi")
    sim.run(0.5)
    (save,) = sim.datagrams(SaveMessage)
    effects = sim.from_client("user1", save.message)
    assert sends(effects) == []
    assert len(sim.datagrams(Relay, src="server")) == 1


def test_a_save_for_a_name_the_server_does_not_know_is_refused() -> None:
    sim = trio_of_clients()
    ghost = TableEntry("ghost", CLIENT_IP, 9901, True, key_of("ghost").public, b"g" * 8)
    sim.clients["user1"].table["ghost"] = ghost
    sim.type("user1", "send ghost boo")
    sim.run(0.5)
    assert sim.lines("user1")[-1] == "[The server refused: there is no user named ghost.]"
    assert "user1" not in sim.exits


def test_a_full_mailbox_refuses_more_with_a_clear_line() -> None:
    sim = trio_of_clients(mailbox_limit=2)
    sim.type("user1", "dereg user1")
    for n in range(3):
        sim.type("user2", f"send user1 m{n}")
        sim.run(1.0)
    assert sim.lines("user2")[-1] == (
        "[The server refused: the mailbox of user1 is full (2 messages). Try later.]"
    )
    sim.type("user3", "send_all too many")
    assert len(sim.server.mailbox["user1"]) == 2
    assert any("mailbox of user1 is full" in log.text for _, log in sim.logs)


def test_a_save_retried_after_a_crash_between_commit_and_answer_is_stored_once() -> None:
    # The server committed the message and died before its answer left: the sender's
    # next try reaches a server restarted from the database, which has the message.
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.drop.append(first_only(lambda src, send: isinstance(send.message, Saved)))
    sim.type("user2", "send user1 hello?")
    sim.run(0.6)  # the direct try timed out at 0.5; the save was stored, its answer lost
    (stored,) = [c for c in sim.persisted if isinstance(c, MessageStored)]
    sim.restart_server(from_database=True)
    sim.settle()  # the retry, at 1.0, reaches the new server
    assert sim.lines("user2")[-1] == "[Messages received by the server and saved.]"
    assert [item.id for item in sim.server.mailbox["user1"]] == [stored.item.id]
    assert sum(isinstance(c, MessageStored) for c in sim.persisted) == 1


def test_a_batch_acked_again_late_removes_only_its_own_messages() -> None:
    # Two deliveries can send the same first batch (the client went silent and came back
    # while the first was retried): the second ACK of it must not take the next messages.
    mailboxes = Mailboxes(limit=10, origin="o")
    stored = [
        mailboxes.store("user1", "direct", "user2", f"m{i}", WALL + i, sealed=b"x")
        for i in range(4)
    ]
    items = [change.item for change in stored if change is not None]
    first = mailboxes.remove("user1", items[:2])
    assert first == MessagesRemoved("user1", (Seq("o", 1), Seq("o", 2)))
    mailboxes.remove("user1", items[:2])
    assert [item.id for item in mailboxes.items("user1")] == ["m2", "m3"]
    # the numbers never go back: a message stored now comes after every one before
    change = mailboxes.store("user1", "direct", "user2", "m9", WALL + 9, sealed=b"x")
    assert change is not None and change.item.seq == Seq("o", 5)


def test_the_same_message_is_stored_once_and_a_full_box_takes_no_more() -> None:
    mailboxes = Mailboxes(limit=2, origin="o")
    assert mailboxes.store("user1", "direct", "user2", "m1", WALL, sealed=b"x") is not None
    assert mailboxes.store("user1", "direct", "user2", "m1", WALL, sealed=b"x") is None
    assert mailboxes.holds("user1", "user2", "m1")
    # another sender's id is another message: no one can take a sender's ids
    assert mailboxes.store("user1", "direct", "user3", "m1", WALL, sealed=b"x") is not None
    assert mailboxes.is_full("user1")
    assert mailboxes.store("user1", "channel", "user3", "m2", WALL, text="t") is None
    assert [i.seq.n for i in mailboxes.items("user1")] == [1, 2]


# === send_all ==================================================================================


def test_send_all_stores_for_offline_clients_acks_then_fans_out() -> None:
    sim = trio_of_clients()
    sim.type("user3", "dereg user3")
    start = len(sim.server_effects)
    sim.type("user1", "send_all hello guys")
    effects = sim.server_effects[start:]
    assert index_of(effects, Change) < index_of(effects, Ack) < index_of(effects, ChannelDelivery)
    assert [sim.label_of(d.dst) for d in sim.datagrams(ChannelDelivery)] == ["user2"]
    (item,) = sim.server.mailbox["user3"]
    assert (item.kind, item.sender, item.text) == ("channel", "user1", "hello guys")


def test_a_repeated_send_all_is_acked_again_and_not_broadcast_again() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send_all hello guys")
    (post,) = sim.datagrams(ChannelPost)
    effects = sim.from_client("user1", post.message)
    assert [s.message for s in sends(effects)] == [Ack(post.message.id)]
    assert len(sim.datagrams(ChannelDelivery)) == 2


def test_a_hundred_dead_receivers_cost_one_500_ms_wait_and_one_table() -> None:
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    peers = add_peers(sim, 100)
    for name in peers:
        sim.kill(name)
    sim.run(1.0)
    versions = table_versions(sim)
    mark1, mark2 = len(sim.lines("user1")), len(sim.lines("user2"))
    sim.type("user1", "send_all hello crowd")
    assert sim.timed("user2")[-1] == (1.0, "Channel_Message user1 : hello crowd")
    sim.advance_to(1.499)
    assert all(sim.server.clients[name].online for name in peers)
    sim.advance_to(1.5)
    assert not any(sim.server.clients[name].online for name in peers)
    assert len(table_versions(sim)) == len(versions) + 1
    assert sim.timed("user1")[mark1:] == [(1.0, "[Message received by the server.]"), (1.5, TU)]
    assert sim.timed("user2")[mark2:] == [(1.0, "Channel_Message user1 : hello crowd"), (1.5, TU)]
    assert all([i.text for i in sim.server.mailbox[name]] == ["hello crowd"] for name in peers)
    stores = [p for p in sim.persisted if isinstance(p, MessageStored)]
    assert len(stores) == 100
    sim.settle()
    assert len(table_versions(sim)) == len(versions) + 1


def test_a_lost_channel_ack_never_shows_the_message_twice() -> None:
    sim = trio_of_clients()
    sim.drop.append(first_only(between(sim, "user2", "server", Ack)))
    sim.type("user1", "send_all hello guys")
    sim.settle()
    # marked offline for a moment, then back (its table ACK speaks for it)
    assert sim.server.clients["user2"].online
    assert sim.server.mailbox == {}
    assert sim.lines("user2").count("Channel_Message user1 : hello guys") == 1
    assert "[You have message]" not in sim.lines("user2")
    assert sim.clients["user1"].table["user2"].online is True


# === the table: reliable, split, versioned ================================================


def test_a_table_never_acked_marks_the_client_offline_and_tells_the_others() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user3", "server", TableAck))
    sim.type("user2", "dereg user2")
    sim.advance_to(2.499)
    assert sim.server.clients["user3"].online
    sim.advance_to(2.5)
    assert sim.server.clients["user3"].presence is Presence.SILENT
    assert sim.clients["user1"].table["user3"].online is False
    assert len(sim.datagrams(TableDelta, src="server", dst="user3", since=0.0)) >= 5


def test_a_large_table_is_split_into_parts_and_shown_once() -> None:
    sim = Sim()
    peers = restore_peers(sim, 300, prefix="a_rather_long_name_for_peer_")
    sim.join("user1")
    tables = sim.datagrams(Table, dst="user1")
    parts = {d.message.part for d in tables}  # type: ignore[union-attr]
    assert len(parts) == tables[0].message.parts > 1  # type: ignore[union-attr]
    assert all(len(d.send.data) <= MAX_DATAGRAM for d in sim.sent)
    assert sim.lines("user1") == [TU]
    assert set(sim.clients["user1"].table) == {*peers, "user1"}


def test_a_lost_table_part_is_resent_alone_and_the_table_shown_once() -> None:
    sim = Sim()
    restore_peers(sim, 300, prefix="a_rather_long_name_for_peer_")
    sim.drop.append(
        first_only(
            lambda src, send: (
                isinstance(send.message, Table)
                and send.message.part == 1
                and send.addr[0] == CLIENT_IP
            )
        )
    )
    user1 = sim.join("user1")
    assert sim.lines("user1") == []
    assert len(user1.table) == 0
    since = sim.now + 0.001
    sim.run(0.5)
    assert sim.lines("user1") == [TU]
    assert len(user1.table) == 301
    assert [d.message.part for d in sim.datagrams(Table, dst="user1", since=since)] == [1]  # type: ignore[union-attr]


def test_a_restarted_server_asks_the_clients_that_were_online_to_register_again() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    mark = {name: len(sim.lines(name)) for name in ("user1", "user2", "user3")}
    sids = {name: c.sid for name, c in sim.clients.items()}
    sim.restart_server(from_database=True)
    # a rekey, signed, to each client that was online, then their registrations, silently
    rekeys = sim.datagrams(Rekey, src="server")
    assert sorted(sim.label_of(d.dst) for d in rekeys) == ["user2", "user3"]
    for name in ("user2", "user3"):
        assert sim.clients[name].sid != sids[name]
        assert set(sim.lines_since(name, mark[name])) == {TU}  # the new server's tables
    assert sim.lines_since("user1", mark["user1"]) == []  # deregistered: not asked
    assert sim.server.clients["user1"].presence is Presence.DEREGISTERED
    sim.settle()
    assert sim.server.next_deadline() is None


def test_a_client_that_does_not_come_back_after_a_restart_is_marked_offline() -> None:
    sim = trio_of_clients()
    sim.kill("user3")
    sim.restart_server(from_database=True)
    sim.advance_to(2.499)
    assert sim.server.clients["user3"].online
    sim.advance_to(2.5)
    assert sim.server.clients["user3"].presence is Presence.SILENT
    assert len(sim.datagrams(Rekey, dst="user3")) == 5
    assert sim.clients["user1"].table["user3"].online is False
    assert sim.lines("user3")[-1] != "[You are now offline. Bye.]"


def test_a_restored_server_with_nobody_online_sends_nothing() -> None:
    server = ServerProtocol(identity=SERVER_KEY)
    record = ClientRecord("user1", (CLIENT_IP, 9001), key_of("user1").public, b"s" * 8)
    record.presence = Presence.DEREGISTERED
    server.restore([record], {})
    assert sends(server.start(0.0)) == []
    assert server.next_deadline() is None


def test_changes_while_a_delta_is_in_flight_go_together_in_the_next_one() -> None:
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    sim.drop.append(first_only(between(sim, "user1", "server", TableAck)))
    mark = len(sim.sent)
    sim.join("user3")  # version 3: to user1 a delta from 2; its ACK is lost
    sim.run(0.2)
    sim.type("user2", "dereg user2")  # version 4: user1 still has 2 -> 3 in flight
    sim.join("user4")  # version 5
    sim.run(1.0)
    to_user1 = [
        (d.at, d.message.from_, d.message.to)  # type: ignore[union-attr]
        for d in sim.datagrams(TableDelta, dst="user1")
        if d in sim.sent[mark:]
    ]
    assert to_user1 == [(0.0, 2, 3), (0.5, 2, 3), (0.5, 3, 5)]
    assert sim.lines("user1") == [TU, TU, TU, TU]
    assert sim.clients["user1"].table == sim.clients["user4"].table


def test_a_server_restarted_from_its_database_resumes_delivery_by_itself() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    for n in range(3):
        sim.type("user2", f"send user1 m{n}")
        sim.run(1.0)
    sim.drop.append(lambda src, send: isinstance(send.message, Mailbox))  # cut short
    sim.type("user1", "reg user1")
    assert len(sim.server.mailbox["user1"]) == 3
    sim.drop.clear()
    sim.restart_server(from_database=True)  # user1 was online: asked to rekey
    sim.settle()
    stored = [line for line in sim.lines("user1") if line.startswith("(")]
    assert [line.split(" : ")[1] for line in stored] == ["m0", "m1", "m2"]
    assert sim.server.mailbox == {}


# === lookups ===================================================================================


def test_lookup_answers_with_the_entry_or_none() -> None:
    sim = trio_of_clients()
    sim.type("user2", "dereg user2")
    effects = sim.from_client("user1", Lookup("q.1", "user2"))
    (result,) = [s.message for s in sends(effects)]
    assert isinstance(result, LookupResult) and result.entry is not None
    assert (result.entry.name, result.entry.port, result.entry.online) == ("user2", 9101, False)
    assert result.entry.key == key_of("user2").public
    assert result.entry.tag == sim.clients["user2"].sid
    effects = sim.from_client("user1", Lookup("q.2", "nobody"))
    assert [s.message for s in sends(effects)] == [LookupResult("q.2", None)]


# === refusals: wrong address, wrong token ===================================================


FORGER: Address = (CLIENT_IP, 6666)


@pytest.mark.parametrize(
    ("kind", "forgery"),
    [
        (kind, forgery)
        for kind in ("dereg", "reg", "save", "send_all", "lookup")
        for forgery in ("wrong token", "wrong address", "wrong name")
        if (kind, forgery) != ("lookup", "wrong name")  # a lookup names no sender
    ],
)
def _request(kind: str, sim: Sim, as_name: str, signer: str) -> Message:
    """A request of ``kind`` made out for ``as_name`` (a save sealed, a post signed, by
    ``signer``)."""
    if kind == "dereg":
        return Deregister("f.1", as_name)
    if kind == "reg":
        return Reregister("f.1", as_name)
    if kind == "save":
        chat = Chat("f.1", "forged", sim.clients["user1"].sid)
        sealed = sim.clients[signer].codec.to_peer(key_of("user1").public, chat)
        return SaveMessage("f.1", "user1", sealed)
    if kind == "send_all":
        sig = key_of(signer).sign(CHANNEL_DOMAIN, as_name.encode(), b"f.1", b"forged")
        return ChannelPost("f.1", "forged", sig)
    return Lookup("f.1", "user1")


KINDS = ("dereg", "reg", "save", "send_all", "lookup")


def _unchanged(
    sim: Sim, before: dict[str, Presence], versions: list[int], stored: object = None
) -> None:
    assert {n: r.presence for n, r in sim.server.clients.items()} == before
    assert table_versions(sim) == versions
    assert sim.server.mailbox == (stored or {})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forgery", ["no session key", "in the clear", "replayed elsewhere"])
def test_a_request_without_the_session_key_is_dropped_unanswered(kind: str, forgery: str) -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")  # so that a forged reg would matter
    victim = "user2" if kind != "reg" else "user1"
    message = _request(kind, sim, victim, victim)
    sid = sim.clients[victim].sid
    if forgery == "replayed elsewhere":
        # the victim's own datagram, captured on the wire and sent again from elsewhere
        data = sim.clients[victim].codec.to_server(message)
        sim.inject_raw(sim.addr[victim], data, SERVER)
    elif forgery == "no session key":
        data = Session(sid, b"f" * 32).seal(TO_SERVER, message)
    else:
        data = encode(message)
    before = {n: r.presence for n, r in sim.server.clients.items()}
    versions, stored, posted = table_versions(sim), sim.server.mailbox, len(sim.sent)
    effects = sim.inject_raw(FORGER, data, SERVER)
    assert not [e for e in effects if isinstance(e, Send | Change)]
    assert len(sim.sent) == posted  # no answer, no broadcast, nothing at all
    assert any(isinstance(e, Log) for e in effects)  # logged
    _unchanged(sim, before, versions, stored)


@pytest.mark.parametrize("kind", ["dereg", "reg", "save", "send_all"])
def test_a_request_for_another_client_in_ones_own_session_is_refused(kind: str) -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    victim = "user2" if kind != "reg" else "user1"
    message = _request(kind, sim, victim, victim)
    before = {n: r.presence for n, r in sim.server.clients.items()}
    versions = table_versions(sim)
    effects = sim.from_client("user3", message)
    (answer,) = sends(effects)
    assert isinstance(answer.message, Refused) and answer.addr == sim.addr["user3"]
    _unchanged(sim, before, versions)
    assert sim.datagrams(ChannelDelivery) == []


# === presence by contact ======================================================================


def test_a_client_marked_offline_is_back_online_when_it_speaks() -> None:
    sim = trio_of_clients()
    sim.drop.append(lambda src, send: src == SERVER and send.addr == sim.addr["user2"])
    sim.type("user1", "send_all hello guys")
    sim.settle()
    assert sim.server.clients["user2"].presence is Presence.SILENT
    assert len(sim.server.mailbox["user2"]) == 1
    sim.drop.clear()
    sim.run(1.0)
    mark = len(sim.lines("user2"))
    sim.type("user2", "send_all i am back")
    assert sim.server.clients["user2"].online
    shown = sim.lines_since("user2", mark)
    # stored when the wait for its ACK ran out, 500 ms after it was posted
    assert shown[:2] == [
        "[You have message]",
        f"({WALL + 0.5!r}) Channel_Message user1 : hello guys",
    ]
    assert "[Message received by the server.]" in shown and TU in shown
    assert sim.server.mailbox == {}
    assert sim.clients["user1"].table["user2"].online


def test_a_dereg_from_a_client_marked_offline_is_not_a_return() -> None:
    sim = trio_of_clients()
    sim.drop.append(lambda src, send: src == SERVER and send.addr == sim.addr["user2"])
    sim.type("user1", "send_all hello guys")
    sim.settle()
    sim.drop.clear()
    sim.type("user2", "dereg user2")
    assert sim.lines("user2")[-1] == "[You are now offline. Bye.]"
    assert sim.server.clients["user2"].presence is Presence.DEREGISTERED
    assert len(sim.server.mailbox["user2"]) == 1
    assert [d for d in sim.datagrams(Mailbox)] == []


# === bad input =================================================================================


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b'{"t": "nonsense", "id": "1"}',
        b'{"t": "register", "id": "1", "name": "bad name!", "port": 9}',
        b'{"t": "register", "id": "1", "name": "x", "port": 9, "extra": 1}',
        b"x" * (MAX_DATAGRAM + 1),
    ],
)
def test_a_bad_datagram_is_dropped_and_logged_and_the_server_keeps_serving(data: bytes) -> None:
    sim = Sim()
    sim.join("user1")
    received, log = sim.server.handle_datagram(data, FORGER, sim.now)
    assert isinstance(received, Received) and received.message is None and received.error
    assert isinstance(log, Log) and log.level == "warning"
    sim.join("user2")
    assert sim.lines("user2") == [TU]


def test_a_message_the_server_does_not_take_is_dropped() -> None:
    sim = Sim()
    user1 = sim.join("user1")
    unexpected: list[Message] = [
        Chat("x.1", "hi", user1.sid),
        Table("x.2", 0, 9, 0, 1, []),
        Saved("x.3", "stored"),
        Hello("x.4", "user1", 9001, key_of("user1").public),  # a handshake in a session
    ]
    for message in unexpected:
        effects = sim.from_client("user1", message)
        assert effects[0] == Received(message)
        assert [type(e) for e in effects[1:]] == [Log]
        # and in the clear, it is not even read
        effects = sim.server.handle_datagram(encode(message), sim.addr["user1"], sim.now)
        assert effects[0].message is None or isinstance(message, Hello)  # type: ignore[union-attr]
    assert sim.server.clients["user1"].online


def test_an_ack_for_nothing_is_ignored() -> None:
    sim = Sim()
    sim.join("user1")
    effects = sim.inject(sim.addr["user1"], Ack("nothing.1"), SERVER)
    assert sends(effects) == []


# === screen coverage ==========================================================================


#: Every public line or line-maker in ``chatapp.screen``, a test that shows it on a client,
#: and for a line-maker the arguments that make a line that test expects.
SCREEN_COVERAGE: dict[str, tuple[str, tuple[object, ...]]] = {
    "printable": (
        "test_control_characters_from_the_network_cannot_fake_screen_lines",
        ("hi\n[Client Table Updated]\x1b[2J",),
    ),
    "PROMPT": ("test_a_half_typed_line_survives_an_incoming_message", ()),
    "TABLE_UPDATED": ("test_join_shows_table_updated_and_keeps_the_whole_table", ()),
    "YOU_ARE_OFFLINE": ("test_dereg_goes_offline_and_the_others_get_the_table", ()),
    "YOU_HAVE_MESSAGE": ("test_reg_shows_stored_messages_oldest_first_interleaved", ()),
    "SAVED_BY_SERVER": ("test_no_ack_within_500_ms_sends_the_message_to_the_server_once", ()),
    "CHANNEL_ACKED": ("test_send_all_is_acked_and_reaches_every_other_online_client", ()),
    "SEND_FAILED": ("test_seed_test_2_gives_up_exactly_3_seconds_after_send", ()),
    "SERVER_SHUT_DOWN": ("test_seed_test_2_gives_up_exactly_3_seconds_after_send", ()),
    "EXITING": ("test_seed_test_2_gives_up_exactly_3_seconds_after_send", ()),
    "SERVER_NOT_RESPONDING": ("test_dereg_not_answered_in_five_tries_exits", ()),
    "SERVER_NOT_RESPONDING_CHANNEL": (
        "test_send_all_not_answered_says_so_and_keeps_working",
        (),
    ),
    "KEYBOARD_INTERRUPT": ("test_ctrl_c_says_so_and_exits_0_without_deregistering", ()),
    "chat": (
        "test_direct_chat_is_shown_by_the_receiver_and_acked_to_the_sender",
        ("user1", "hello nice to meet you."),
    ),
    "received_by": (
        "test_direct_chat_is_shown_by_the_receiver_and_acked_to_the_sender",
        ("user2",),
    ),
    "no_ack": ("test_no_ack_within_500_ms_sends_the_message_to_the_server_once", ("user2",)),
    "channel_message": (
        "test_send_all_is_acked_and_reaches_every_other_online_client",
        ("user1", "hello guys"),
    ),
    "stored_direct": (
        "test_reg_shows_stored_messages_oldest_first_interleaved",
        (WALL + 1.5, "user2", "hello?"),
    ),
    "stored_channel": (
        "test_reg_shows_stored_messages_oldest_first_interleaved",
        (WALL + 2.0, "user3", "hello guys"),
    ),
    "time_prefix": ("test_a_stored_line_starts_with_the_time_prefix_replay_checks", (WALL,)),
    "HELP": ("test_help_and_table", ()),
    "OFFLINE_ONLY_REG": ("test_while_offline_the_only_command_is_reg", ()),
    "ALREADY_ONLINE": ("test_bad_commands_get_a_line_and_the_client_keeps_working", ()),
    "STILL_JOINING": ("test_commands_while_joining_or_deregistering_wait_for_the_server", ()),
    "BUSY_DEREGISTERING": (
        "test_a_line_past_the_limit_while_going_offline_is_refused_as_before",
        (),
    ),
    "REG_NOT_ANSWERED": (
        "test_reg_not_answered_keeps_the_client_offline_and_reg_can_be_tried_again",
        (),
    ),
    "EMPTY_TABLE": ("test_help_and_table", ()),
    "unknown_command": (
        "test_bad_commands_get_a_line_and_the_client_keeps_working",
        ("hello", "help"),
    ),
    "usage": (
        "test_bad_commands_get_a_line_and_the_client_keeps_working",
        ("send NAME MESSAGE",),
    ),
    "only_yourself": (
        "test_bad_commands_get_a_line_and_the_client_keeps_working",
        ("deregister", "user1"),
    ),
    "unknown_user": ("test_send_to_a_name_nobody_has_asks_the_server_then_says_unknown", ("bob",)),
    "lookup_not_answered": (
        "test_a_lookup_the_server_never_answers_says_nothing_was_sent",
        ("bob",),
    ),
    "too_long": (
        "test_a_message_too_long_for_a_datagram_is_refused_with_a_clear_line",
        (),  # the test works the sizes out, and says screen.too_long
    ),
    "refused": (
        "test_a_name_bound_to_another_key_is_refused_and_the_holder_is_not_disturbed",
        ("the name user1 belongs to another key. Choose another name.",),
    ),
    "request_refused": (
        "test_a_save_for_a_name_the_server_does_not_know_is_refused",
        ("there is no user named ghost.",),
    ),
    "join_not_answered": (
        "test_an_unanswered_hello_gets_five_tries_of_500_ms",
        (SERVER_TEXT,),
    ),
    "moving_server": (
        "test_a_client_whose_server_stops_answering_moves_to_the_next_with_its_request",
        (),  # the test says screen.moving_server
    ),
    "server_key_changed": (
        "test_a_changed_server_key_is_refused_with_a_line_that_says_how_to_accept_it",
        (),  # the test says screen.server_key_changed
    ),
    "own_fingerprint": (
        "test_fingerprint_shows_own_key_and_a_peers_key_with_the_safety_number",
        (),
    ),
    "peer_fingerprint": (
        "test_fingerprint_shows_own_key_and_a_peers_key_with_the_safety_number",
        (),
    ),
    "safety_number": (
        "test_fingerprint_shows_own_key_and_a_peers_key_with_the_safety_number",
        (),
    ),
    "no_key_for": (
        "test_fingerprint_shows_own_key_and_a_peers_key_with_the_safety_number",
        (),
    ),
    "not_stored": (
        "test_a_channel_message_not_stored_for_full_mailboxes_says_so_to_its_sender",
        (),
    ),
    "bad_key_file": (
        "test_a_key_file_that_is_not_what_chatapp_wrote_is_refused_never_replaced",
        (),
    ),
    "table_lines": (
        "test_help_and_table",
        (
            [
                ("user1", CLIENT_IP, 9001, True),
                ("user2", CLIENT_IP, 9101, False),
                ("user3", CLIENT_IP, 9201, True),
            ],
        ),
    ),
    "bad_input": ("test_a_client_node_writing_plain_lines", ("not UTF-8",)),
    "no_help": ("test_help_explains_one_command", ("sned", "send")),
    "CUT_BY_TERMINAL": ("test_a_line_the_terminal_may_have_cut_is_not_sent", ()),
    "trace_stopped": (
        "test_a_trace_on_a_full_disk_gets_one_line_and_the_chat_goes_on",
        ("No space left on device",),
    ),
    "LEAVING": ("test_exit_waits_for_the_answer_to_a_channel_message_then_leaves", ()),
    "CANNOT_STORE": (
        "test_while_the_database_fails_no_one_is_told_done_and_nothing_half_happens",
        (),
    ),
}

#: The modules whose tests SCREEN_COVERAGE names.
_COVERING_MODULES = (
    test_protocol_client,
    test_protocol_stream,
    test_protocol_trust,
    test_statefiles,
    test_virtual,
    test_terminal,
    test_input_line,
    test_durability,
    test_clean_ends,
    test_scripts,
    test_protocol_shared,
)


def _texts_in(test: types.FunctionType, module: types.ModuleType) -> list[str]:
    """The text a test's source holds: its string literals, its f-strings that use only
    the module's names, and the module's (or ``screen``'s) string constants it names."""
    tree = ast.parse(inspect.getsource(test))
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            try:
                value = eval(compile(ast.Expression(node), "<f-string>", "eval"), vars(module))
            except NameError:  # uses the test's own variables
                continue
            texts.append(value)
        elif isinstance(node, ast.Name) and isinstance(vars(module).get(node.id), str):
            texts.append(vars(module)[node.id])
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "screen"
            and isinstance(getattr(screen, node.attr, None), str)
        ):
            texts.append(getattr(screen, node.attr))
    return texts


def test_a_stored_line_starts_with_the_time_prefix_replay_checks() -> None:
    # chat-replay checks a shown prefix against screen.time_prefix of the stored time:
    # both stored lines must begin with exactly that
    for stored_at in (WALL, WALL + 0.25, 1648153596.77):
        prefix = screen.time_prefix(stored_at)
        assert prefix == f"({stored_at!r}) "
        assert screen.stored_direct(stored_at, "user2", "hi").startswith(prefix)
        assert screen.stored_channel(stored_at, "user3", "hi").startswith(prefix)


def test_every_screen_line_has_a_test_that_shows_it() -> None:
    public = {
        name
        for name, value in vars(screen).items()
        if not name.startswith("_")
        and (isinstance(value, str) or (callable(value) and value.__module__ == screen.__name__))
    }
    # a new line in chatapp.screen needs a test here that shows it
    assert public == set(SCREEN_COVERAGE)
    tests = {
        name: module
        for module in (*_COVERING_MODULES, sys.modules[__name__])
        for name in vars(module)
        if name.startswith("test_")
    }
    for name, (where, args) in SCREEN_COVERAGE.items():
        assert where in tests, (name, where)
        module = tests[where]
        test = getattr(module, where)
        if f"screen.{name}" in inspect.getsource(test):
            continue  # the test makes its line with it
        value = getattr(screen, name)
        made = value if isinstance(value, str) else value(*args)
        lines = made if isinstance(made, list) else [made]
        texts = _texts_in(test, module)
        missing = [line for line in lines if not any(line in text for text in texts)]
        assert not missing, (name, where, missing)


def test_the_client_state_after_a_clean_session() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send_all bye")
    sim.settle()
    assert {c.state for c in sim.clients.values()} == {ClientState.ONLINE}
    assert sim.server.next_deadline() is None
    assert all(c.next_deadline() is None for c in sim.clients.values())


def test_stored_times_follow_the_order_of_storage_even_after_a_failed_delivery() -> None:
    # A save is stored when it comes (then relayed); a channel message the server waited
    # on is stored when the wait fails. The stream stays in the order of storage, and
    # the times it shows follow it.
    sim = trio_of_clients()
    sim.kill("user3")
    sim.type("user2", "send user3 a")  # direct try fails at 0.5: stored, relayed until 1.0
    sim.run(0.6)
    sim.type("user1", "send user3 b")  # reaches the server at 1.1, after user3 is marked
    sim.run(0.1)
    sim.type("user2", "send_all c")  # the server waits on user3 until 1.2
    sim.settle()
    box = sim.server.mailbox["user3"]
    texts = [sim.opened("user3", i.sealed)[1] if i.kind == "direct" else i.text for i in box]
    assert texts == ["a", "b", "c"]
    assert [item.seq.n for item in box] == sorted(item.seq.n for item in box)
    assert [round(item.stored_at - WALL, 6) for item in box] == [0.5, 1.1, 1.2]


def test_a_repeated_reg_is_acked_again_without_a_second_delivery_or_table() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 hello?")
    sim.run(1.0)
    sim.type("user1", "reg user1")
    (reg,) = sim.datagrams(Reregister)
    versions = table_versions(sim)
    effects = sim.from_client("user1", reg.message)
    assert [s.message for s in sends(effects)] == [Ack(reg.message.id)]
    assert len(sim.datagrams(Mailbox)) == 1
    assert table_versions(sim) == versions
    assert sim.lines("user1").count("[You have message]") == 1


def test_a_late_copy_of_an_old_dereg_does_not_take_a_returned_client_offline() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    (dereg,) = sim.datagrams(Deregister)
    sim.type("user1", "reg user1")
    # the same datagram again: a replay, dropped before anything else
    assert sends(sim.inject_raw(sim.addr["user1"], dereg.send.data, SERVER)) == []
    # a retry of it sealed afresh: answered again, never redone
    effects = sim.from_client("user1", dereg.message)
    assert [s.message for s in sends(effects)] == [Ack(dereg.message.id)]
    assert sim.server.clients["user1"].online
