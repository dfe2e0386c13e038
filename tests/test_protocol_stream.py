"""The delivery stream per recipient, driven directly (the ``Sim`` harness): stored
messages numbered in the order they were stored, delivered one batch at a time,
resumed after a server restart, and shown once per name even when the client is
killed between showing and ACKing; and the mailbox limit on every path."""

from __future__ import annotations

from _harness import first_only
from _sim import TU, Sim, between, trio_of_clients

from chatapp import screen
from chatapp.protocol.changes import DeliveryMarked, MessagesRemoved, MessageStored
from chatapp.protocol.common import Send
from chatapp.wire import Ack, Chat, Mailbox, NotStored, Rekey, Relay, Saved


def _stored_lines(lines: list[str]) -> list[str]:
    return [line.split(" : ", 1)[1] for line in lines if line.startswith("(")]


def _save_offline(sim: Sim, count: int, to: str = "user1", sender: str = "user2") -> None:
    for n in range(count):
        sim.type(sender, f"send {to} m{n}")
        sim.run(1.0)


def test_the_mark_is_written_before_the_stored_lines_and_the_ack_after_them() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    _save_offline(sim, 2)
    user1 = sim.clients["user1"]
    sim.drop.append(lambda src, send: isinstance(send.message, Mailbox))
    sim.type("user1", "reg user1")
    (batch,) = {d.send.data: d for d in sim.datagrams(Mailbox)}.values() or [None]
    assert batch is not None
    sim.drop.clear()
    effects = user1.handle_datagram(batch.send.data, batch.src, sim.now)[1:]
    kinds = [type(e).__name__ for e in effects]
    assert kinds == ["DeliveryMarked", "Show", "Show", "Show", "Send"]
    assert isinstance(effects[-1], Send) and isinstance(effects[-1].message, Ack)
    (marked,) = [e for e in effects if isinstance(e, DeliveryMarked)]
    assert dict(marked.marks) == {"o1": 2}


def test_a_client_killed_after_showing_and_before_its_ack_shows_nothing_twice() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    _save_offline(sim, 3)
    sim.drop.append(between(sim, "user1", "server", Ack))  # the ACK never leaves: killed
    sim.type("user1", "reg user1")
    assert _stored_lines(sim.lines("user1")) == ["m0", "m1", "m2"]
    sim.kill("user1")
    sim.drop.clear()
    mark = len(sim.lines("user1"))
    sim.join("user1", port=9001)  # restarted: its marks are on disk
    sim.settle()
    assert [line for line in sim.lines_since("user1", mark) if line != TU] == []
    assert sim.server.mailbox == {}  # ACKed, not shown, deleted


def test_a_relay_shown_before_a_kill_is_not_shown_again_from_the_mailbox() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))  # the direct try is lost
    sim.drop.append(between(sim, "user2", "server", Ack))  # user2 is killed before its ACK
    sim.type("user1", "send user2 hi")
    sim.run(0.5)
    assert sim.lines("user2")[-1] == "user1 : hi"  # the relay, shown as a live line
    sim.kill("user2")
    sim.run(0.5)  # no ACK: user2 is marked offline, the message stays stored
    assert sim.lines("user1")[-1] in ("[Messages received by the server and saved.]", TU)
    assert len(sim.server.mailbox["user2"]) == 1
    sim.drop.clear()
    mark = len(sim.lines("user2"))
    sim.join("user2", port=9101)
    sim.settle()
    assert "user1 : hi" not in sim.lines_since("user2", mark)
    assert not any(line.startswith("(") for line in sim.lines_since("user2", mark))
    assert sim.server.mailbox == {}


def test_a_stored_message_is_shown_once_per_name_not_per_process() -> None:
    # The marks are the name's, kept per server key: a client that lost its marks (a new
    # machine) would show again what the server still had, but never what it deleted.
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    _save_offline(sim, 2)
    sim.type("user1", "reg user1")
    sim.settle()
    assert _stored_lines(sim.lines("user1")) == ["m0", "m1"]
    assert sim.marks["user1"] == {sim.server.identity.public: {"o1": 2}}
    assert sim.server.mailbox == {}


def test_a_server_killed_in_the_middle_of_a_delivery_resumes_it_by_itself() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    texts = [f"long message {n} " + "x" * 200 for n in range(300)]
    for text in texts:
        sim.type("user2", f"send user1 {text}")
        sim.run(0.6)
    batches = 0

    def crash_after_three(src: object, send: Send) -> bool:
        nonlocal batches
        if isinstance(send.message, Mailbox):
            batches += 1
            return batches > 3  # the server dies with the fourth batch on its way
        return False

    sim.drop.append(crash_after_three)
    sim.type("user1", "reg user1")
    sim.run(0.1)
    remaining = len(sim.server.mailbox["user1"])
    assert 0 < remaining < 300
    sim.drop.clear()
    sim.restart_server(from_database=True)  # user1 was online: rekeyed, stream restarted
    sim.settle()
    assert _stored_lines(sim.lines("user1")) == texts  # all, once, in order
    assert sim.lines("user1").count("[You have message]") == 2  # one per delivery
    assert sim.server.mailbox == {}


def test_a_client_killed_in_the_middle_of_a_delivery_gets_the_rest_once() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    texts = [f"m{n} " + "y" * 300 for n in range(100)]
    for text in texts:
        sim.type("user2", f"send user1 {text}")
        sim.run(0.6)
    shown = 0

    def killed_after_five_batches(src: object, send: Send) -> bool:
        nonlocal shown
        if isinstance(send.message, Ack) and src == sim.addr["user1"]:
            shown += 1
            return shown > 5
        return False

    sim.drop.append(killed_after_five_batches)
    sim.type("user1", "reg user1")
    sim.kill("user1")
    first = _stored_lines(sim.lines("user1"))
    assert 0 < len(first) < len(texts)
    sim.drop.clear()
    sim.run(3.0)
    sim.join("user1", port=9001)
    sim.settle()
    assert first + _stored_lines(sim.lines("user1")) == texts  # nothing lost, nothing twice
    assert sim.server.mailbox == {}


def test_a_save_for_a_client_with_a_delivery_in_flight_waits_its_turn() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    _save_offline(sim, 1)
    acks = iter(range(3))  # the batch is retried twice: still in flight at 0.5
    sim.drop.append(
        lambda src, send: (
            between(sim, "user1", "server", Ack)(src, send) and next(acks, None) is not None
        )
    )
    sim.type("user1", "reg user1")
    sim.drop.append(first_only(between(sim, "user3", "user1", Chat)))
    sim.type("user3", "send user1 late")
    sim.run(0.5)
    # stored behind the batch in flight, and answered at once: no relay
    assert sim.datagrams(Relay) == []
    assert sim.lines("user3")[-2:] == [
        "[No ACK from user1, message sent to server.]",
        "[Messages received by the server and saved.]",
    ]
    sim.settle()
    assert _stored_lines(sim.lines("user1")) == ["m0", "late"]
    assert sim.server.mailbox == {}


# === the mailbox limit on every path =============================================================


def test_the_limit_holds_for_saves_to_a_client_online_but_silent() -> None:
    sim = trio_of_clients(mailbox_limit=3)
    sim.kill("user2")  # online in every table, but it answers nothing
    for n in range(6):
        sim.type("user1", f"send user2 m{n}")
        sim.run(1.0)
    assert len(sim.server.mailbox["user2"]) == 3
    assert sim.lines("user1")[-1] == (
        "[The server refused: the mailbox of user2 is full (3 messages). Try later.]"
    )
    stored = [p for p in sim.persisted if isinstance(p, MessageStored)]
    assert len(stored) == 3


def test_a_channel_message_not_stored_for_full_mailboxes_says_so_to_its_sender() -> None:
    sim = trio_of_clients(mailbox_limit=1)
    sim.type("user2", "dereg user2")
    sim.type("user1", "send_all fills it")
    sim.kill("user3")  # online, but will not ACK: its copy is stored (the box has room)
    sim.type("user1", "send_all one more")
    sim.settle()
    lines = [line for line in sim.lines("user1") if line != TU]
    assert lines == [
        "[Message received by the server.]",
        "[Message received by the server.]",
        "[Your channel message could not be stored for user2 (mailbox full):"
        " they will not see it.]",
    ]
    (notice,) = {d.message.id: d for d in sim.datagrams(NotStored)}.values()
    assert isinstance(notice.message, NotStored) and notice.message.names == ["user2"]
    sim.type("user1", "send_all and again")  # now user3's box is full too: one notice
    sim.settle()
    assert sim.lines("user1")[-1] == screen.not_stored(["user2", "user3"], 0)


def test_a_not_stored_notice_counts_what_it_does_not_name() -> None:
    assert screen.not_stored(["a", "b"], 18) == (
        "[Your channel message could not be stored for a, b and 18 more (mailbox full):"
        " they will not see it.]"
    )


def test_a_relay_acked_is_removed_and_the_sender_told_delivered() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user2", "user3", Chat))
    sim.type("user2", "send user3 via the server")
    sim.run(0.5)
    assert sim.lines("user3")[-1] == "user2 : via the server"
    assert sim.lines("user2")[-1] == "[Message has been received by user3.]"
    assert [type(p) for p in sim.persisted[-2:]] == [MessageStored, MessagesRemoved]
    (saved,) = sim.datagrams(Saved)
    assert saved.message.outcome == "delivered"  # type: ignore[union-attr]


def test_a_sender_who_joined_while_the_client_was_offline_is_opened_with_the_batchs_key() -> None:
    # A deregistered client takes no tables: user4 is in none it has. The batch names
    # each sender's key, as the server has it bound.
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.join("user4")
    sim.type("user4", "send user1 hello from a newcomer")
    sim.run(1.0)
    assert "user4" not in sim.clients["user1"].table
    sim.type("user1", "reg user1")
    assert _stored_lines(sim.lines("user1")) == ["hello from a newcomer"]
    (batch,) = sim.datagrams(Mailbox, dst="user1")
    assert isinstance(batch.message, Mailbox)
    assert batch.message.keys == {"user4": sim.server.clients["user4"].key}


def test_after_a_restart_the_table_goes_once_every_client_is_back() -> None:
    sim = trio_of_clients()
    before = {name: len(sim.lines(name)) for name in ("user1", "user2", "user3")}
    sim.drop.append(lambda src, send: isinstance(send.message, Rekey) and send.addr[1] == 9201)
    sim.restart_server(from_database=True)  # user3 does not get its rekey: it is late
    assert sim.lines("user1")[before["user1"] :] == []  # no table yet: one is missing
    sim.drop.clear()
    sim.run(0.5)  # the rekey's second try brings user3 back: now the one table
    for name in ("user1", "user2", "user3"):
        assert sim.lines(name)[before[name] :] == [TU], name
