"""The client's rules, driven directly: no Trio, no sockets, time passed by hand,
with the ``Sim`` harness of ``tests/_sim.py`` (see its docstring).
"""

from __future__ import annotations

import pytest
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
    rows,
    trio_of_clients,
)
from msgspec.structs import replace

from chatapp import screen
from chatapp.protocol.changes import MessagesRemoved, MessageStored
from chatapp.protocol.client import WAITING_LINES_LIMIT, ClientState
from chatapp.protocol.codecs import Sender, Via
from chatapp.protocol.common import Exit, Log, Received, Send, Show, Timers
from chatapp.protocol.inputs import Signal
from chatapp.protocol.sealing import TO_CLIENT, Session
from chatapp.testing import SEED_SCREENS
from chatapp.wire import (
    MAX_DATAGRAM,
    Ack,
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
    Register,
    Registered,
    Rekey,
    Relay,
    Saved,
    SaveMessage,
    Table,
    TableAck,
    TableDelta,
    encode,
)

# === registration (rule 1) and the table (rule 2) ===========================================


def test_join_shows_table_updated_and_keeps_the_whole_table() -> None:
    sim = Sim()
    user1 = sim.join("user1")
    assert user1.state is ClientState.ONLINE
    assert sim.lines("user1") == [TU]
    assert rows(user1.table) == {"user1": entry("user1", 9001)}

    user2 = sim.join("user2")
    assert sim.lines("user1") == [TU, TU]
    assert sim.lines("user2") == [TU]
    both = {"user1": entry("user1", 9001), "user2": entry("user2", 9101)}
    assert rows(user1.table) == rows(user2.table) == both

    sim.join("user3")
    assert sim.lines("user1") == [TU, TU, TU]
    assert sim.lines("user2") == [TU, TU]
    assert sim.lines("user3") == [TU]
    assert rows(sim.clients["user3"].table) == rows(user1.table)
    # every table was ACKed: nothing is left to re-send
    sim.settle()
    assert sim.lines("user1") == [TU, TU, TU]


def test_the_handshake_carries_name_port_and_key_and_is_signed() -> None:
    sim = Sim()
    user1 = sim.join("user1", port=9013)
    (hello,) = sim.datagrams(Hello)
    (challenge,) = sim.datagrams(Challenge)
    (register,) = sim.datagrams(Register)
    assert isinstance(hello.message, Hello) and isinstance(register.message, Register)
    assert (register.message.name, register.message.port) == ("user1", 9013)
    assert register.message.key == hello.message.key == key_of("user1").public
    assert register.dst == hello.dst == SERVER
    assert isinstance(challenge.message, Challenge)
    assert challenge.message.server_key == SERVER_KEY.public
    assert register.message.cookie == challenge.message.cookie
    # the server's key is pinned once the registered answer proved it
    assert sim.pins["user1"] == SERVER_KEY.public == user1.pinned
    assert sim.server.clients["user1"].key == key_of("user1").public


def test_a_name_bound_to_another_key_is_refused_and_the_holder_is_not_disturbed() -> None:
    sim = Sim()
    holder = sim.join("user1")
    sim.settle()
    before = len(sim.sent)
    sim.join("user1", label="impostor")
    assert sim.lines("impostor") == [
        "[Registration refused: the name user1 belongs to another key. Choose another name.]"
    ]
    assert sim.exits == {"impostor": 1}
    assert sim.lines("user1") == [TU]
    assert rows(holder.table) == {"user1": entry("user1", 9001)}
    assert sim.server.clients["user1"].addr == (CLIENT_IP, 9001)
    # not one datagram went to the holder: it is not even asked
    assert [d for d in sim.sent[before:] if d.dst == sim.addr["user1"]] == []


def test_a_name_bound_to_another_key_is_refused_offline_too() -> None:
    sim = Sim()
    sim.join("user1")
    sim.type("user1", "dereg user1")
    sim.kill("user1")
    sim.join("user1", label="impostor", port=9002)
    sim.settle()
    assert sim.exits == {"impostor": 1}
    assert sim.server.clients["user1"].addr == (CLIENT_IP, 9001)
    assert sim.server.clients["user1"].key == key_of("user1").public


def test_the_holder_of_a_name_comes_back_from_another_port_with_its_key() -> None:
    # Ctrl-C does not deregister: the server still has the name online. The same person,
    # restarted on another port with its key, takes its name at once (no check needed).
    sim = Sim()
    sim.join("user1")
    sim.settle()
    sim.kill("user1")
    sim.join("user1", port=9002)
    assert sim.lines("user1")[-1:] == [TU]
    assert "user1" not in sim.exits
    assert sim.server.clients["user1"].addr == (CLIENT_IP, 9002)
    assert sim.server.clients["user1"].online


def test_an_unanswered_hello_gets_five_tries_of_500_ms() -> None:
    sim = Sim()
    sim.kill("server")
    sim.join("user1")
    sim.advance_to(2.499)
    assert sim.lines("user1") == []
    assert [d.at for d in sim.datagrams(Hello)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    sim.advance_to(5.0)
    assert sim.timed("user1") == [
        (2.5, f"[Server {SERVER_TEXT} not responding. Is `chatapp serve` running there?]"),
        (2.5, screen.EXITING),
    ]
    assert sim.exits == {"user1": 1}


def test_a_lost_registered_answer_is_retried_and_registers_once() -> None:
    sim = Sim()
    sim.drop.append(first_only(lambda src, send: isinstance(send.message, Registered)))
    user1 = sim.join("user1")
    assert user1.state is ClientState.JOINING
    sim.run(0.5)
    assert user1.state is ClientState.ONLINE
    sim.settle()
    assert sim.lines("user1") == [TU]
    # the retry got the same answer: one session
    assert user1.sid == sim.server.clients["user1"].sid
    assert len(sim.server.codec.sessions) == 1


def test_a_table_replaces_the_old_one_and_each_arrival_is_shown() -> None:
    sim = trio_of_clients()
    user2 = sim.clients["user2"]
    sim.type("user1", "dereg user1")
    assert sim.lines("user2") == [TU, TU, TU]
    assert rows(user2.table)["user1"] == entry("user1", 9001, online=False)
    sim.kill("user3")
    sim.type("user1", "reg user1")
    assert sim.lines("user2") == [TU, TU, TU, TU]
    assert rows(user2.table)["user1"] == entry("user1", 9001, online=True)


def test_a_repeated_or_resent_table_is_acked_again_but_shown_once() -> None:
    sim = Sim()
    sim.duplicate.append(lambda src, send: isinstance(send.message, TABLES))
    sim.join("user1")  # the whole table, version 1
    sim.join("user2")  # to user1: a delta from 1 to 2
    assert sim.lines("user1") == [TU, TU]
    assert sim.lines("user2") == [TU]
    # a copy of a session datagram is a replay: dropped before anything else, not ACKed;
    # each table or delta is ACKed once, with the version held
    acks = [d.message for d in sim.datagrams(TableAck, src="user1", dst="server")]
    assert [(a.epoch, a.version) for a in acks] == [(0, 1), (0, 2)]  # type: ignore[union-attr]

    # the ACK of the next delta is lost: the server re-sends it 500 ms later
    sim.drop.append(first_only(between(sim, "user2", "server", TableAck)))
    sim.duplicate.clear()
    sim.join("user3")
    mark = len(sim.datagrams(TableDelta, dst="user2"))
    sim.run(0.5)
    assert len(sim.datagrams(TableDelta, dst="user2")) == mark + 1
    assert sim.lines("user2") == [TU, TU]
    sim.settle()
    assert sim.server.next_deadline() is None


def test_an_older_table_arriving_late_does_not_replace_a_newer_one() -> None:
    """The first table again, sealed afresh in the session (a late arrival, not a copy):
    ACKed with the version held, and not taken."""
    sim = trio_of_clients()
    user1 = sim.clients["user1"]
    old = next(d.message for d in sim.datagrams(Table, dst="user1"))
    assert isinstance(old, Table) and [e.name for e in old.entries] == ["user1"]
    mark = len(sim.lines("user1"))
    effects = sim.from_server("user1", old)
    assert [e.message for e in effects if isinstance(e, Send)] == [TableAck(old.id, 0, 3)]
    assert len(user1.table) == 3
    assert sim.lines_since("user1", mark) == []


# === direct chat (rule 3) =====================================================================


def test_direct_chat_is_shown_by_the_receiver_and_acked_to_the_sender() -> None:
    sim = trio_of_clients()
    sim.run(1.0)
    sim.type("user1", "send user2 hello nice to meet you.")
    assert sim.timed("user2")[-1] == (1.0, "user1 : hello nice to meet you.")
    assert sim.timed("user1")[-1] == (1.0, "[Message has been received by user2.]")
    # peer to peer: the server hears nothing of it
    assert sim.datagrams((Chat, Ack, SaveMessage), dst="server", since=1.0) == []
    (chat,) = sim.datagrams(Chat, since=1.0)
    assert (chat.src, chat.dst) == (sim.addr["user1"], sim.addr["user2"])
    assert sim.clients["user1"].next_deadline() is None


def test_seed_test_1_screen_by_screen() -> None:
    sim = trio_of_clients(wall_offset=1648153596.7672942 - 2.5)
    for sender, to, text in [
        ("user1", "user2", "hello nice to meet you."),
        ("user1", "user3", "hi!"),
        ("user2", "user1", "hello, nice to meet you, too!"),
        ("user2", "user3", "hello"),
        ("user3", "user1", "hi~"),
        ("user3", "user2", "hello!"),
    ]:
        sim.type(sender, f"send {to} {text}")
    sim.run(1.0)
    sim.type("user1", "dereg user1")
    sim.run(1.0)
    sim.type("user2", "send user1 hello?")  # saved at 2.5
    sim.run(1.0)
    sim.type("user3", "send user1 are you still there?")  # saved at 3.5
    sim.run(1.0)
    sim.type("user1", "reg user1")
    for name in ("user1", "user2", "user3"):
        sim.apply(sim.addr[name], sim.clients[name].handle_input(Signal.INTERRUPT, sim.now))
    assert sim.lines("user1") == [
        TU,
        TU,
        TU,
        "[Message has been received by user2.]",
        "[Message has been received by user3.]",
        "user2 : hello, nice to meet you, too!",
        "user3 : hi~",
        "[You are now offline. Bye.]",
        "[You have message]",
        "(1648153596.7672942) user2 : hello?",
        "(1648153597.7672942) user3 : are you still there?",
        TU,
        "Caught keyboard interrupt. Exiting",
    ]
    assert sim.lines("user2") == SEED_SCREENS[1]["user2"]
    assert sim.lines("user3") == SEED_SCREENS[1]["user3"]
    assert sim.exits == {"user1": 0, "user2": 0, "user3": 0}


def test_every_pair_chats_both_ways_as_in_seed_test_1() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send user2 hello nice to meet you.")
    sim.type("user1", "send user3 hi!")
    sim.type("user2", "send user1 hello, nice to meet you, too!")
    sim.type("user2", "send user3 hello")
    sim.type("user3", "send user1 hi~")
    sim.type("user3", "send user2 hello!")
    assert sim.lines("user1")[3:] == [
        "[Message has been received by user2.]",
        "[Message has been received by user3.]",
        "user2 : hello, nice to meet you, too!",
        "user3 : hi~",
    ]
    assert sim.lines("user2")[2:] == [
        "user1 : hello nice to meet you.",
        "[Message has been received by user1.]",
        "[Message has been received by user3.]",
        "user3 : hello!",
    ]
    assert sim.lines("user3")[1:] == [
        "user1 : hi!",
        "user2 : hello",
        "[Message has been received by user1.]",
        "[Message has been received by user2.]",
    ]


def test_a_message_keeps_its_spaces_and_punctuation() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send user2 a  b :  c ")
    assert sim.lines("user2")[-1] == "user1 : a  b :  c"


def test_control_characters_from_the_network_cannot_fake_screen_lines() -> None:
    # A datagram is untrusted: a line break or an escape sequence in its text would let a
    # peer forge "[Message has been received ...]" lines or repaint the terminal.
    sim = trio_of_clients()
    user2 = sim.clients["user2"]
    forged = Chat("x.1", "hi\n[Client Table Updated]\x1b[2J", user2.sid)
    sender = Sender(Via.PEER, ("127.0.0.1", 9999), "user3")
    effects = user2.handle_message(forged, sender, 10.0)
    shown = [e.line for e in effects if isinstance(e, Show)]
    assert shown == ["user3 : hi\\x0a[Client Table Updated]\\x1b[2J"]


def test_a_duplicated_chat_is_acked_twice_and_shown_once() -> None:
    sim = trio_of_clients()
    sim.duplicate.append(lambda src, send: isinstance(send.message, Chat))
    sim.type("user1", "send user2 hi")
    assert sim.lines("user2").count("user1 : hi") == 1
    assert len(sim.datagrams(Ack, src="user2", dst="user1")) == 2
    assert sim.lines("user1").count("[Message has been received by user2.]") == 1


def test_no_ack_within_500_ms_sends_the_message_to_the_server_once() -> None:
    sim = trio_of_clients()
    sim.type("user2", "dereg user2")
    sim.run(1.0)
    sim.type("user1", "send user2 hello?")
    sim.advance_to(1.499)
    assert sim.datagrams(SaveMessage) == []
    assert len(sim.datagrams(Chat)) == 1  # one direct try, never repeated
    sim.advance_to(1.5)
    assert sim.timed("user1")[-2:] == [
        (1.5, "[No ACK from user2, message sent to server.]"),
        (1.5, "[Messages received by the server and saved.]"),
    ]
    (save,) = sim.datagrams(SaveMessage)
    (chat,) = sim.datagrams(Chat)
    # the same id, so that nobody can show it twice
    assert save.message.id == chat.message.id
    assert save.dst == SERVER


def test_the_server_delivers_itself_when_the_direct_try_is_lost() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))
    sim.type("user1", "send user2 hi")
    assert sim.lines("user2")[-1] == TU
    sim.run(0.5)
    assert sim.timed("user2")[-1] == (0.5, "user1 : hi")
    assert sim.timed("user1")[-2:] == [
        (0.5, "[No ACK from user2, message sent to server.]"),
        (0.5, "[Message has been received by user2.]"),
    ]
    # the sealed datagram the peer never got, relayed by the server (stored until ACKed)
    (relayed,) = sim.datagrams(Relay, src="server", dst="user2")
    (save,) = sim.datagrams(SaveMessage)
    assert isinstance(relayed.message, Relay) and isinstance(save.message, SaveMessage)
    assert relayed.message.sealed == save.message.sealed == sim.datagrams(Chat)[0].send.data
    assert sim.server.mailbox == {}


def test_a_lost_direct_ack_never_shows_the_message_twice() -> None:
    sim = trio_of_clients()
    sim.drop.append(first_only(between(sim, "user2", "user1", Ack)))
    sim.type("user1", "send user2 hi")
    sim.settle()
    assert sim.lines("user2").count("user1 : hi") == 1
    # the server's delivery was ACKed again, so the sender learns it arrived
    assert sim.lines("user1")[-2:] == [
        "[No ACK from user2, message sent to server.]",
        "[Message has been received by user2.]",
    ]
    assert sim.server.mailbox == {}


def test_a_late_direct_ack_after_the_timeout_is_ignored() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))
    sim.drop.append(between(sim, "user1", "server", SaveMessage))
    sim.type("user1", "send user2 hi")
    (chat,) = sim.datagrams(Chat)
    sim.run(0.6)
    mark = len(sim.lines("user1"))
    sim.inject(sim.addr["user2"], Ack(chat.message.id), sim.addr["user1"])
    assert sim.lines_since("user1", mark) == []


def test_an_ack_from_the_wrong_address_does_not_confirm_a_message() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))
    sim.type("user1", "send user2 hi")
    (chat,) = sim.datagrams(Chat)
    mark = len(sim.lines("user1"))
    sim.inject(sim.addr["user3"], Ack(chat.message.id), sim.addr["user1"])
    assert sim.lines_since("user1", mark) == []
    assert sim.clients["user1"].next_deadline() == 0.5


def test_send_to_yourself() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send user1 note to self")
    assert sim.lines("user1")[-2:] == [
        "user1 : note to self",
        "[Message has been received by user1.]",
    ]


# === the seed's Test 2: give-up after one direct try and five to the server (rule 5) =====


def test_seed_test_2_gives_up_exactly_3_seconds_after_send() -> None:
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    sim.type("user2", "dereg user2")
    assert sim.lines("user2") == [TU, "[You are now offline. Bye.]"]
    sim.kill("server")
    sim.run(10.0)
    sent_at = sim.now
    sim.type("user1", "send user2 hi")
    sim.advance_to(sent_at + 2.999)
    # the seed shows two tables; the dereg's table is the third (the seed leaves it out)
    assert sim.lines("user1") == [TU, TU, TU, "[No ACK from user2, message sent to server.]"]
    assert "user1" not in sim.exits
    sim.advance_to(sent_at + 10)
    assert sim.timed("user1")[3:] == [
        (sent_at + 0.5, "[No ACK from user2, message sent to server.]"),
        (sent_at + 3.0, "[Message sent failed]"),
        (sent_at + 3.0, "[Server is shut down]"),
        (sent_at + 3.0, "[Exiting]"),
    ]
    assert sim.exits == {"user1": 1}
    assert [d.at - sent_at for d in sim.datagrams(SaveMessage)] == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert len(sim.datagrams(Chat)) == 1


def test_a_lost_saved_answer_is_retried_and_stored_once() -> None:
    sim = trio_of_clients()
    sim.type("user2", "dereg user2")
    sim.drop.append(first_only(lambda src, send: isinstance(send.message, Saved)))
    sim.type("user1", "send user2 hi")
    sim.run(0.5)
    assert sim.lines("user1")[-1] == "[No ACK from user2, message sent to server.]"
    sim.run(0.5)
    assert sim.timed("user1")[-1] == (1.0, "[Messages received by the server and saved.]")
    assert len(sim.server.mailbox["user2"]) == 1
    assert sum(isinstance(p, MessageStored) for p in sim.persisted) == 1


# === dereg (rule 4) ==============================================================================


def test_dereg_goes_offline_and_the_others_get_the_table() -> None:
    sim = trio_of_clients()
    sim.run(1.0)
    sim.type("user1", "dereg user1")
    assert sim.timed("user1")[-1] == (1.0, "[You are now offline. Bye.]")
    assert sim.clients["user1"].state is ClientState.OFFLINE
    assert sim.lines("user1") == [TU, TU, TU, "[You are now offline. Bye.]"]
    assert sim.lines("user2")[-1] == TU and sim.lines("user3")[-1] == TU
    assert "user1" not in sim.exits


def test_dereg_not_answered_in_five_tries_exits() -> None:
    sim = trio_of_clients()
    sim.kill("server")
    sim.run(1.0)
    sim.type("user1", "dereg user1")
    sim.advance_to(3.499)
    assert "user1" not in sim.exits
    assert [d.at for d in sim.datagrams(Deregister)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    sim.advance_to(4.0)
    assert sim.timed("user1")[-2:] == [(3.5, "[Server not responding]"), (3.5, "[Exiting]")]
    assert sim.exits == {"user1": 1}


def test_a_lost_dereg_ack_is_retried_and_goes_offline_once() -> None:
    sim = trio_of_clients()
    sim.drop.append(first_only(lambda src, send: src == SERVER and isinstance(send.message, Ack)))
    sim.type("user1", "dereg user1")
    assert sim.clients["user1"].state is ClientState.DEREGISTERING
    sim.settle()
    assert sim.lines("user1")[-1] == "[You are now offline. Bye.]"
    assert sim.lines("user2") == [TU, TU, TU]  # one table for one dereg
    assert len(sim.datagrams(Deregister)) == 2


def test_an_offline_client_neither_shows_nor_acks_direct_messages() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    mark = len(sim.lines("user1"))
    before = len(sim.datagrams(Ack, src="user1"))
    stale = sim.clients["user2"].table["user1"]  # as if its table were stale:
    sim.clients["user2"].table["user1"] = replace(stale, online=True, tag=sim.clients["user1"].sid)
    sim.type("user2", "send user1 are you there?")
    sim.settle()
    assert sim.lines_since("user1", mark) == []
    assert len(sim.datagrams(Ack, src="user1")) == before
    assert sim.lines("user2")[-2:] == [
        "[No ACK from user1, message sent to server.]",
        "[Messages received by the server and saved.]",
    ]


def test_while_offline_the_only_command_is_reg() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    before = len(sim.sent)
    for line in ("send user2 hi", "send_all hi", "dereg user1"):
        sim.type("user1", line)
        assert sim.lines("user1")[-1] == screen.OFFLINE_ONLY_REG
    assert screen.OFFLINE_ONLY_REG == (
        "[You are offline. The only command now is: reg NAME (or exit).]"
    )
    assert len(sim.sent) == before


# === reg and the mailbox (rule 6) =============================================================


def test_reg_shows_stored_messages_oldest_first_interleaved() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.run(1.0)
    sim.type("user2", "send user1 hello?")  # stored at 1.5
    sim.run(1.0)
    sim.type("user3", "send_all hello guys")  # stored at 2.0 (user1 is offline)
    sim.run(1.0)
    sim.type("user3", "send user1 are you still there?")  # stored at 3.5
    sim.run(1.0)
    mark = len(sim.lines("user1"))
    sim.type("user1", "reg user1")
    assert sim.lines_since("user1", mark) == [
        "[You have message]",
        f"({WALL + 1.5!r}) user2 : hello?",
        f"({WALL + 2.0!r}) Channel_Message user3 : hello guys",
        f"({WALL + 3.5!r}) user3 : are you still there?",
        TU,
    ]
    assert sim.clients["user1"].state is ClientState.ONLINE
    assert sim.lines("user2")[-1] == TU and sim.lines("user3")[-1] == TU
    assert sim.server.mailbox == {}


def test_the_stored_time_is_printed_as_the_seed_prints_it() -> None:
    sim = trio_of_clients(wall_offset=1648153596.7672942 - 2.5)
    sim.type("user1", "dereg user1")
    sim.run(2.0)
    sim.type("user2", "send user1 hello?")  # stored 500 ms later, at 2.5
    sim.run(1.0)
    sim.type("user1", "reg user1")
    assert "(1648153596.7672942) user2 : hello?" in sim.lines("user1")


def test_reg_with_an_empty_mailbox_shows_only_the_table() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    mark = len(sim.lines("user1"))
    sim.type("user1", "reg user1")
    assert sim.lines_since("user1", mark) == [TU]


def test_a_lost_mailbox_ack_loses_nothing_and_shows_nothing_twice() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 one")
    sim.type("user3", "send user1 two")
    sim.run(1.0)
    mark = len(sim.lines("user1"))
    sim.drop.append(
        first_only(
            lambda src, send: (
                src == sim.addr["user1"]
                and isinstance(send.message, Ack)
                and any(
                    isinstance(d.message, Mailbox) and d.message.id == send.message.id
                    for d in sim.sent
                )
            )
        )
    )
    sim.type("user1", "reg user1")
    # shown, but the server keeps them until their ACK arrives
    assert len(sim.server.mailbox["user1"]) == 2
    assert not any(isinstance(p, MessagesRemoved) for p in sim.persisted)
    sim.settle()
    assert sim.lines_since("user1", mark) == [
        "[You have message]",
        f"({WALL + 0.5!r}) user2 : one",
        f"({WALL + 0.5!r}) user3 : two",
        TU,
    ]
    assert len(sim.datagrams(Mailbox)) == 2
    assert sim.server.mailbox == {}
    assert sum(isinstance(p, MessagesRemoved) for p in sim.persisted) == 1


def test_stored_messages_in_several_batches_show_one_header() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    texts = [f"{n} " + "x" * 3000 for n in range(6)]
    for n, text in enumerate(texts):
        sim.type("user2", f"send user1 {text}")
        sim.run(0.5 + n)
    mark = len(sim.lines("user1"))
    sim.type("user1", "reg user1")
    batches = sim.datagrams(Mailbox)
    assert len(batches) >= 3
    # the returning client's table may come between two batches
    shown = [line for line in sim.lines_since("user1", mark) if line != TU]
    assert shown[0] == "[You have message]"
    assert [line.split(" : ", 1)[1] for line in shown[1:]] == texts
    assert sim.lines_since("user1", mark).count(TU) == 1
    assert sim.server.mailbox == {}


# === send_all (rule 7) ========================================================================


def test_send_all_is_acked_and_reaches_every_other_online_client() -> None:
    sim = trio_of_clients()
    sim.run(1.0)
    sim.type("user1", "send_all hello guys")
    assert sim.timed("user1")[-1] == (1.0, "[Message received by the server.]")
    assert sim.timed("user2")[-1] == (1.0, "Channel_Message user1 : hello guys")
    assert sim.timed("user3")[-1] == (1.0, "Channel_Message user1 : hello guys")
    (post,) = sim.datagrams(ChannelPost)
    assert post.dst == SERVER
    assert {d.dst for d in sim.datagrams(ChannelDelivery)} == {sim.addr["user2"], sim.addr["user3"]}


def test_seed_test_3_a_dead_receiver_is_marked_offline_with_one_table() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send_all hello guys")
    user2 = sim.clients["user2"]
    sim.apply(sim.addr["user2"], user2.handle_input(Signal.INTERRUPT, sim.now))
    assert sim.lines("user2")[-1] == "Caught keyboard interrupt. Exiting"
    assert sim.exits == {"user2": 0}
    sim.run(1.0)
    sim.type("user1", "send_all hi")
    assert sim.timed("user3")[-1] == (1.0, "Channel_Message user1 : hi")
    sim.settle()
    assert sim.timed("user1")[-2:] == [(1.0, "[Message received by the server.]"), (1.5, TU)]
    assert sim.timed("user3")[-2:] == [(1.0, "Channel_Message user1 : hi"), (1.5, TU)]
    assert sim.clients["user1"].table["user2"].online is False
    (stored,) = sim.server.mailbox["user2"]
    assert (stored.kind, stored.sender, stored.text) == ("channel", "user1", "hi")


def test_send_all_not_answered_says_so_and_keeps_working() -> None:
    sim = trio_of_clients()
    sim.kill("server")
    sim.type("user1", "send_all anyone?")
    sim.advance_to(2.499)
    assert len(sim.datagrams(ChannelPost)) == 5
    sim.advance_to(3.0)
    assert sim.timed("user1")[-1] == (2.5, "[Server not responding.]")
    assert "user1" not in sim.exits
    sim.type("user1", "send user2 still here")
    assert sim.lines("user2")[-1] == "user1 : still here"


def test_a_retried_send_all_is_broadcast_once() -> None:
    sim = trio_of_clients()
    sim.drop.append(first_only(between(sim, "server", "user1", Ack)))
    sim.type("user1", "send_all hello guys")
    sim.settle()
    assert len(sim.datagrams(ChannelPost)) == 2
    assert len(sim.datagrams(ChannelDelivery)) == 2  # one per receiver, not one per try
    assert sim.lines("user2").count("Channel_Message user1 : hello guys") == 1
    assert sim.timed("user1")[-1] == (0.5, "[Message received by the server.]")


def test_a_duplicated_channel_message_is_shown_once() -> None:
    sim = trio_of_clients()
    sim.duplicate.append(lambda src, send: True)
    sim.type("user1", "send_all hello guys")
    sim.settle()
    assert sim.lines("user1").count("[Message received by the server.]") == 1
    assert sim.lines("user2").count("Channel_Message user1 : hello guys") == 1
    assert sim.lines("user3").count("Channel_Message user1 : hello guys") == 1


# === lookups: a name missing from the table ===================================================


def test_send_to_a_name_nobody_has_asks_the_server_then_says_unknown() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send bob hi")
    (lookup,) = sim.datagrams(Lookup)
    assert lookup.dst == SERVER and lookup.message.name == "bob"  # type: ignore[union-attr]
    assert sim.lines("user1")[-1] == (
        "[Unknown user bob: not in the client table and not known to the server.]"
    )
    assert sim.datagrams(Chat) == []


def test_send_to_a_name_missing_from_the_table_finds_it_through_the_server() -> None:
    sim = trio_of_clients()
    del sim.clients["user1"].table["user3"]  # as if the last table had not arrived yet
    sim.type("user1", "send user3 hi")
    assert sim.lines("user3")[-1] == "user1 : hi"
    assert sim.lines("user1")[-1] == "[Message has been received by user3.]"


def test_a_lookup_answered_with_another_name_sends_nothing() -> None:
    sim = trio_of_clients()
    sim.drop.append(lambda src, send: isinstance(send.message, LookupResult))
    sim.type("user1", "send user9 hi")
    (lookup,) = sim.datagrams(Lookup)
    found = sim.clients["user2"].table["user2"]
    sim.from_server("user1", LookupResult(lookup.message.id, found))
    assert sim.lines("user1")[-1] == screen.unknown_user("user9")
    assert sim.datagrams(Chat, src="user1") == []
    assert "user9" not in sim.clients["user1"].table


def test_a_lookup_the_server_never_answers_says_nothing_was_sent() -> None:
    sim = trio_of_clients()
    sim.kill("server")
    sim.type("user1", "send bob hi")
    sim.advance_to(3.0)
    assert sim.timed("user1")[-1] == (
        2.5,
        "[bob is not in the client table and the server is not responding. Nothing was sent.]",
    )
    assert "user1" not in sim.exits


def test_send_to_a_name_that_cannot_exist_is_answered_at_once() -> None:
    sim = trio_of_clients()
    for name in ("no/such/name", "x" * 33):
        sim.type("user1", f"send {name} hi")
        assert sim.lines("user1")[-1] == screen.unknown_user(name)
    sim.settle()
    assert sim.lines("user1")[-1] == screen.unknown_user("x" * 33)
    assert sim.datagrams(Lookup) == []


# === message size =============================================================================


def _limit(sim: Sim) -> int:
    sim.type("user1", "send user2 " + "x" * (MAX_DATAGRAM + 10))
    line = sim.lines("user1")[-1]
    prefix = f"[Message too long: {MAX_DATAGRAM + 10} bytes, the limit is "
    assert line.startswith(prefix) and line.endswith(". Nothing was sent.]")
    return int(line[len(prefix) :].split(".")[0])


def test_a_message_too_long_for_a_datagram_is_refused_with_a_clear_line() -> None:
    sim = trio_of_clients()
    before = len(sim.sent)
    limit = _limit(sim)
    assert len(sim.sent) == before
    # the sealed datagram travels in base64 inside a save, a relay or a batch
    assert 5500 < limit < MAX_DATAGRAM
    sim.type("user1", "send_all " + "y" * (limit + 1))
    assert sim.lines("user1")[-1] == screen.too_long(limit + 1, limit)
    assert len(sim.sent) == before


def test_the_longest_allowed_message_fits_every_datagram_that_carries_it() -> None:
    sim = trio_of_clients()
    limit = _limit(sim)
    text = "z" * limit
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 " + text)
    sim.type("user3", "send_all " + text)
    sim.settle()
    assert sim.lines("user2")[-1] == "[Messages received by the server and saved.]"
    assert sim.lines("user3")[-1] == "[Message received by the server.]"
    assert "Channel_Message user3 : " + text in sim.lines("user2")
    mark = len(sim.lines("user1"))
    sim.type("user1", "reg user1")
    # each takes a batch of its own; the table may come between them
    assert [line for line in sim.lines_since("user1", mark) if line != TU] == [
        "[You have message]",
        f"({WALL!r}) Channel_Message user3 : " + text,
        f"({WALL + 0.5!r}) user2 : " + text,
    ]
    assert len(sim.datagrams(Mailbox)) == 2
    # the harness checks every datagram against MAX_DATAGRAM as it is sent


# === a server that forgot, and forgers ========================================================


def test_a_server_that_forgot_the_session_asks_the_client_to_rekey_and_the_dereg_goes_on() -> None:
    sim = trio_of_clients()
    old_sid = sim.clients["user1"].sid
    sim.restart_server()  # no database: it knows no one
    sim.type("user1", "dereg user1")
    assert sim.datagrams(Rekey, dst="user1")
    assert sim.lines("user1")[-1] == "[You are now offline. Bye.]"
    assert sim.clients["user1"].state is ClientState.OFFLINE
    assert sim.clients["user1"].sid != old_sid
    # the dereg went once, in the new session, with its original id
    (first, *retries) = sim.datagrams(Deregister, src="user1")
    assert all(d.message.id == first.message.id for d in retries)


def test_a_reg_after_the_server_forgot_registers_again_and_comes_back_online() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.restart_server()
    sim.type("user1", "reg user1")
    assert sim.clients["user1"].state is ClientState.ONLINE
    assert sim.server.clients["user1"].online


def test_tables_channel_and_mailbox_from_anyone_but_the_server_are_ignored() -> None:
    sim = trio_of_clients()
    forger = (CLIENT_IP, 6666)
    user2 = sim.addr["user2"]
    sid = sim.clients["user2"].sid
    mark = len(sim.lines("user2"))
    fakes: list[Message] = [
        Table("f.1", 99, 99, 0, 1, [sim.clients["user2"].table["user3"]]),
        ChannelDelivery("f.2", "user1", "f.2", "fake", b"s" * 64, key_of("user1").public),
        Mailbox("f.3", "f.4", []),
    ]
    for fake in fakes:
        sim.inject(forger, fake, user2)  # in the clear
        forged = Session(sid, b"k" * 32).seal(TO_CLIENT, fake)  # in the session, a wrong key
        sim.inject_raw(forger, forged, user2)
        sim.inject_raw(SERVER, forged, user2)  # from the server's address too
    assert sim.lines_since("user2", mark) == []
    assert rows(sim.clients["user2"].table)["user1"] == entry("user1", 9001)
    assert [d for d in sim.sent if d.dst == forger] == []


def test_a_bad_datagram_is_logged_and_the_client_keeps_working() -> None:
    sim = trio_of_clients()
    user2 = sim.clients["user2"]
    effects = user2.handle_datagram(b"\xff not json", (CLIENT_IP, 6666), sim.now)
    received, log = effects
    assert received == Received(None, received.error) and received.error  # type: ignore[union-attr]
    assert isinstance(log, Log) and log.level == "warning"
    hello = Hello("x.1", "x", 1, b"k" * 32)
    effects = user2.handle_datagram(encode(hello), (CLIENT_IP, 6666), sim.now)
    assert effects[0].message is None  # type: ignore[union-attr]
    assert [type(e) for e in effects[1:]] == [Log]
    sim.type("user1", "send user2 still fine")
    assert sim.lines("user2")[-1] == "user1 : still fine"


# === commands: help, table, errors, and states ================================================


def test_bad_commands_get_a_line_and_the_client_keeps_working() -> None:
    sim = trio_of_clients()
    before = len(sim.sent)
    expected = {
        "hello": "[Unknown command 'hello'. Did you mean 'help'? Type help for the commands.]",
        "xyzzy": "[Unknown command 'xyzzy'. Type help for the commands.]",
        "send": "[Usage: send NAME MESSAGE]",
        "send user2": "[Usage: send NAME MESSAGE]",
        "send user2    ": "[Usage: send NAME MESSAGE]",
        "send_all": "[Usage: send_all MESSAGE]",
        "dereg": "[Usage: dereg NAME]",
        "reg": "[Usage: reg NAME]",
        "dereg user2": "[You can only deregister yourself (user1).]",
        "reg user2": "[You can only register yourself (user1).]",
        "reg user1": "[You are already online.]",
    }
    for line, answer in expected.items():
        mark = len(sim.lines("user1"))
        sim.type("user1", line)
        assert sim.lines_since("user1", mark) == [answer], line
    assert len(sim.sent) == before
    assert sim.type("user1", "   ") == []
    sim.type("user1", "send user2 still here")
    assert sim.lines("user2")[-1] == "user1 : still here"


def test_help_and_table() -> None:
    sim = Sim()
    sim.kill("server")
    sim.join("user1")
    sim.type("user1", "table")
    assert sim.lines("user1") == ["[The client table is empty.]"]
    sim.type("user1", "help")
    assert sim.lines("user1")[-1] == screen.HELP
    assert sim.lines("user1")[-1].startswith("[Commands: send NAME MESSAGE | send_all MESSAGE")

    sim = trio_of_clients()
    sim.type("user2", "dereg user2")
    for word in ("table", "list"):
        mark = len(sim.lines("user1"))
        sim.type("user1", word)
        assert sim.lines_since("user1", mark) == [
            "[user1            10.0.0.2:9001   online]",
            "[user2            10.0.0.2:9101   offline]",
            "[user3            10.0.0.2:9201   online]",
        ]


def test_commands_while_joining_or_deregistering_wait_for_the_server() -> None:
    """A request typed while the state settles waits its turn and goes, in order, once
    the server has answered; past the limit of lines waiting, a line is refused as it
    was before lines could wait."""
    sim = Sim()
    sim.drop.append(lambda src, send: src == SERVER)
    user1 = sim.join("user1")
    sim.type("user1", "send user1 hi")
    for n in range(WAITING_LINES_LIMIT - 1):
        sim.type("user1", f"send_all {n}")
    assert sim.lines("user1") == [] and user1.lines_waiting == WAITING_LINES_LIMIT
    sim.type("user1", "send_all one too many")
    assert sim.lines("user1") == [
        "[Still waiting for the server to accept the registration. Try again in a moment.]"
    ]
    sim.drop.clear()
    sim.run(0.5)  # the hello again: answered
    assert user1.state is ClientState.ONLINE and user1.lines_waiting == 0
    lines = sim.lines("user1")
    assert lines.count(screen.CHANNEL_ACKED) == WAITING_LINES_LIMIT - 1
    assert "user1 : hi" in lines and screen.received_by("user1") in lines
    requests = sim.datagrams((Chat, ChannelPost), src="user1")
    assert isinstance(requests[0].message, Chat)  # they went in the order typed
    channel = [d.message.text for d in requests if isinstance(d.message, ChannelPost)]
    assert channel == [str(n) for n in range(WAITING_LINES_LIMIT - 1)]

    sim.drop.append(lambda src, send: src == SERVER)
    sim.type("user1", "dereg user1")
    mark = len(sim.lines("user1"))
    sim.type("user1", "send_all hi")
    sim.type("user1", "help reg")  # behind a line that waits: it waits too
    sim.type("user1", "reg user1")
    assert sim.lines_since("user1", mark) == [] and user1.lines_waiting == 3
    sim.drop.clear()
    sim.run(0.5)  # the dereg again: answered; then each line in the state it finds
    assert sim.lines_since("user1", mark)[:3] == [
        screen.YOU_ARE_OFFLINE,
        screen.OFFLINE_ONLY_REG,
        screen.COMMAND_HELP["reg"],
    ]
    assert user1.state is ClientState.ONLINE  # the reg went, once offline


def test_a_line_past_the_limit_while_going_offline_is_refused_as_before() -> None:
    sim = trio_of_clients()
    sim.drop.append(lambda src, send: src == SERVER)
    sim.type("user1", "dereg user1")
    for n in range(WAITING_LINES_LIMIT):
        sim.type("user1", f"send_all {n}")
    sim.type("user1", "send_all one too many")
    assert sim.lines("user1")[-1] == screen.BUSY_DEREGISTERING


def test_reg_not_answered_keeps_the_client_offline_and_reg_can_be_tried_again() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.drop.append(lambda src, send: send.addr == SERVER)
    sim.run(1.0)
    sim.type("user1", "reg user1")
    sim.advance_to(3.5)
    assert sim.timed("user1")[-1] == (
        3.5,
        "[Server not responding. You are still offline; try reg again later.]",
    )
    assert sim.clients["user1"].state is ClientState.OFFLINE
    sim.drop.clear()
    sim.type("user1", "reg user1")
    assert sim.clients["user1"].state is ClientState.ONLINE
    assert sim.lines("user1")[-1] == TU


# === leaving: exit statuses ===================================================================


def test_ctrl_c_says_so_and_exits_0_without_deregistering() -> None:
    sim = trio_of_clients()
    user1 = sim.clients["user1"]
    effects = user1.handle_input(Signal.INTERRUPT, sim.now)
    assert effects == [Show("Caught keyboard interrupt. Exiting"), Exit(0)]
    assert user1.state is ClientState.EXITED
    assert sim.server.clients["user1"].online  # a silent leave


def test_hang_up_exits_0_quietly_and_exit_says_exiting() -> None:
    sim = trio_of_clients()
    assert sim.clients["user1"].handle_input(Signal.HANG_UP, sim.now) == [Exit(0)]
    for word in ("exit", "quit"):
        assert sim.clients["user2" if word == "exit" else "user3"].handle_input(word, 0.0) == [
            Show("[Exiting]"),
            Exit(0),
        ]


def test_an_exited_client_does_nothing_more() -> None:
    sim = trio_of_clients()
    user1 = sim.clients["user1"]
    sim.type("user1", "send_all hi")
    user1.handle_input(Signal.INTERRUPT, sim.now)
    assert user1.handle_input("send user2 hi", 9.0) == []
    assert user1.handle_message(Chat("x.1", "user2", "hi"), sim.addr["user2"], 9.0) == []
    assert user1.handle_timer(100.0) == []


@pytest.mark.parametrize(
    "line",
    [
        "[Client Table Updated]",
        "[You are now offline. Bye.]",
        "[You have message]",
        "[Messages received by the server and saved.]",
        "[Message received by the server.]",
        "[Message sent failed]",
        "[Server is shut down]",
        "[Exiting]",
        "[Server not responding]",
        "[Server not responding.]",
        "Caught keyboard interrupt. Exiting",
    ],
)
def test_the_seed_lines_are_word_for_word(line: str) -> None:
    seed_constants = {
        value for name, value in vars(screen).items() if name.isupper() and isinstance(value, str)
    }
    assert line in seed_constants


def test_seed_line_formats() -> None:
    assert screen.chat("user1", "hello nice to meet you.") == "user1 : hello nice to meet you."
    assert screen.received_by("user2") == "[Message has been received by user2.]"
    assert screen.no_ack("user1") == "[No ACK from user1, message sent to server.]"
    assert screen.channel_message("user1", "hello guys") == "Channel_Message user1 : hello guys"
    assert screen.stored_direct(1648153596.7672942, "user2", "hello?") == (
        "(1648153596.7672942) user2 : hello?"
    )
    assert screen.stored_channel(1648153615.750366, "user1", "hello guys") == (
        "(1648153615.750366) Channel_Message user1 : hello guys"
    )


def test_the_timer_settings_drive_every_wait() -> None:
    sim = trio_of_clients(timers=Timers(ack_timeout=0.2, tries=3))
    sim.type("user2", "dereg user2")
    sim.kill("server")
    sim.run(1.0)
    sim.type("user1", "send user2 hi")
    sim.run(5.0)
    assert [(round(t - 1.0, 6), line) for t, line in sim.timed("user1")[-4:]] == [
        (0.2, "[No ACK from user2, message sent to server.]"),
        (0.8, "[Message sent failed]"),
        (0.8, "[Server is shut down]"),
        (0.8, "[Exiting]"),
    ]


def test_requests_while_rejoining_wait_for_the_server() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.drop.append(lambda src, send: src == SERVER)
    sim.type("user1", "reg user1")
    before = len(sim.sent)
    mark = len(sim.lines("user1"))
    for line in ("send user2 hi", "send_all hi", "dereg user1"):
        sim.type("user1", line)
    assert sim.lines_since("user1", mark) == []
    assert len(sim.sent) == before  # nothing sent: they wait
    assert sim.clients["user1"].state is ClientState.REJOINING
    sim.drop.clear()
    sim.run(0.5)  # the reg again: answered, then the three lines in order
    lines = sim.lines_since("user1", mark)
    assert screen.received_by("user2") in lines and screen.CHANNEL_ACKED in lines
    assert lines[-1] == screen.YOU_ARE_OFFLINE
    assert "user1 : hi" in sim.lines("user2")
