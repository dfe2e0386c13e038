"""Keys and trust, driven directly (the ``Sim`` harness): pinning the server's key,
fingerprints, forged and altered datagrams of every kind, reflected and replayed
ones, and predicted ids. Nothing that fails to open or verify is shown, answered,
or counted as delivered."""

from __future__ import annotations

from _sim import (
    CLIENT_IP,
    SERVER,
    SERVER_KEY,
    TU,
    Sim,
    between,
    key_of,
    trio_of_clients,
)
from msgspec.structs import replace

from chatapp import screen
from chatapp.protocol.client import ClientState
from chatapp.protocol.codecs import Sender, ServerCodec, Via
from chatapp.protocol.common import Log, Send, Show
from chatapp.protocol.crypto import (
    CHANNEL_DOMAIN,
    REKEY_DOMAIN,
    Identity,
    SharedKeys,
    fingerprint,
    safety_number,
)
from chatapp.protocol.sealing import TO_CLIENT, TO_SERVER, Session, seal_peer
from chatapp.wire import (
    Ack,
    Address,
    Challenge,
    ChannelDelivery,
    Chat,
    Hello,
    Mailbox,
    Register,
    Registered,
    Rekey,
    Relay,
    Seq,
    StoredItem,
    Table,
    TableDelta,
    TableEntry,
    encode,
)

FORGER: Address = (CLIENT_IP, 6666)


# === the server's key: pinned on first use =======================================================


def test_a_changed_server_key_is_refused_with_a_line_that_says_how_to_accept_it() -> None:
    sim = Sim()
    sim.join("user1")
    assert sim.pins["user1"] == SERVER_KEY.public
    sim.kill("user1")
    other = Identity(b"O" * 32)
    sim.server.identity = other  # another server at the same address (or one in between)
    sim.server.codec.identity = other
    user1 = sim.join("user1", port=9002)
    sim.settle()
    assert sim.exits == {"user1": 1}
    assert sim.lines("user1") == [
        screen.server_key_changed(
            "10.0.0.1:8001", fingerprint(SERVER_KEY.public), fingerprint(other.public),
            "known_servers",
        ),
        screen.EXITING,
    ]  # fmt: skip
    assert "remove the line for 10.0.0.1:8001 from known_servers" in sim.lines("user1")[0]
    assert user1.pinned == SERVER_KEY.public  # never replaced without the person
    assert "user1" not in [r.name for r in sim.server.clients.values() if r.addr[1] == 9002]


def test_a_forged_challenge_cannot_make_a_pinned_client_give_up() -> None:
    sim = Sim()
    sim.join("user1")
    sim.kill("user1")
    forged_key = Identity(b"M" * 32).public

    def forge(src: Address, send: Send) -> bool:  # every hello is answered by a forger first
        if isinstance(send.message, Hello):
            challenge = Challenge(send.message.id, forged_key, b"c" * 16)
            sim.nodes[src].handle_datagram(encode(challenge), SERVER, sim.now)
        return False

    sim.drop.append(forge)
    user1 = sim.join("user1", port=9002)
    assert user1.state is ClientState.ONLINE
    assert sim.lines("user1") == [TU]
    assert user1.pinned == SERVER_KEY.public


def test_an_answer_boxed_by_another_key_registers_nothing() -> None:
    # A first contact trusts the key that answers (trust on first use), but the answer
    # must be boxed by the key the challenge offered: a forged "registered" does not open.
    sim = Sim()
    sim.drop.append(lambda src, send: isinstance(send.message, Registered))
    user1 = sim.join("user1")
    (register,) = sim.datagrams(Register)
    fake = Session(b"s" * 8, b"k" * 32)
    granted = Registered(register.message.id, fake.sid, fake.key, b"b" * 8)
    boxed = ServerCodec(Identity(b"M" * 32)).box_answer(key_of("user1").public, b"n" * 24, granted)
    effects = sim.inject_raw(SERVER, boxed, sim.addr["user1"])
    assert effects[0].message is None  # type: ignore[union-attr]
    assert user1.state is ClientState.JOINING
    assert user1.pinned is None and "user1" not in sim.pins


# === fingerprints and safety numbers ============================================================


def test_fingerprint_shows_own_key_and_a_peers_key_with_the_safety_number() -> None:
    sim = trio_of_clients()
    sim.type("user1", "fingerprint")
    own = fingerprint(key_of("user1").public)
    assert sim.lines("user1")[-1] == screen.own_fingerprint("user1", own)
    assert sim.lines("user1")[-1] == f"[Your key (user1): {own}]"
    sim.type("user1", "fingerprint user2")
    number = safety_number(key_of("user1").public, key_of("user2").public)
    assert sim.lines("user1")[-2:] == [
        screen.peer_fingerprint("user2", fingerprint(key_of("user2").public)),
        screen.safety_number("user2", number),
    ]
    # user2 sees the same number for the pair
    sim.type("user2", "key user1")
    assert sim.lines("user2")[-1] == screen.safety_number("user1", number)
    sim.type("user1", "fingerprint nobody")
    assert sim.lines("user1")[-1] == screen.no_key_for("nobody")
    assert sim.lines("user1")[-1] == "[nobody is not in the client table: no key to show.]"


# === forged, altered, reflected and replayed peer datagrams ====================================


def test_a_direct_message_from_a_key_that_is_not_the_senders_is_dropped_unacked() -> None:
    sim = trio_of_clients()
    user2 = sim.clients["user2"]
    shared = SharedKeys(Identity(b"M" * 32)).get(key_of("user2").public)
    forged = seal_peer(shared, b"n" * 24, "user1", Chat("f.1", "send me your password", user2.sid))
    mark = len(sim.lines("user2"))
    effects = sim.inject_raw(FORGER, forged, sim.addr["user2"])
    assert effects[0].message is None  # type: ignore[union-attr]
    assert sim.lines_since("user2", mark) == []
    assert [d for d in sim.sent if d.dst == FORGER] == []


def test_an_altered_direct_message_is_dropped_whatever_byte_changed() -> None:
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))
    sim.drop.append(lambda src, send: src == SERVER)  # nor may the server help
    sim.type("user1", "send user2 hi")
    (chat,) = sim.datagrams(Chat)
    mark = len(sim.lines("user2"))
    data = chat.send.data
    for index in range(len(data)):
        altered = data[:index] + bytes([data[index] ^ 0x40]) + data[index + 1 :]
        effects = sim.inject_raw(sim.addr["user1"], altered, sim.addr["user2"])
        assert not [e for e in effects if isinstance(e, Show | Send)], index
    assert sim.lines_since("user2", mark) == []


def test_a_message_reflected_back_at_its_sender_is_not_taken_for_the_peers() -> None:
    # Box is symmetric: user1 -> user2 opens with user2 -> user1's key too. The tag (the
    # recipient's session id) says for whom it was sealed.
    sim = trio_of_clients()
    sim.drop.append(between(sim, "user1", "user2", Chat))
    sim.drop.append(lambda src, send: src == SERVER)
    sim.type("user1", "send user2 hi")
    (chat,) = sim.datagrams(Chat)
    data = chat.send.data
    name_at = 1 + 24
    reflected = data[:name_at] + bytes([5]) + b"user2" + data[name_at + 1 + 5 :]
    mark = len(sim.lines("user1"))
    effects = sim.inject_raw(sim.addr["user2"], reflected, sim.addr["user1"])
    assert not [e for e in effects if isinstance(e, Show | Send)]
    assert sim.lines_since("user1", mark) == []


def test_a_forged_or_reflected_ack_never_says_a_message_was_received() -> None:
    sim = trio_of_clients()
    sim.type("user2", "dereg user2")
    sim.run(1.0)
    sim.drop.append(lambda src, send: src == SERVER)  # the server cannot answer either
    sim.type("user1", "send user2 hello?")
    (chat,) = sim.datagrams(Chat, src="user1")
    msg_id = chat.message.id
    user1 = sim.clients["user1"]
    acks = [
        # user3, a real client, knows (guesses) the id and ACKs as itself
        sim.clients["user3"].codec.to_peer(key_of("user1").public, Ack(msg_id, user1.sid)),
        # an outsider boxes an ACK under user2's name with its own key
        seal_peer(
            SharedKeys(Identity(b"M" * 32)).get(key_of("user1").public),
            b"n" * 24, "user2", Ack(msg_id, user1.sid),
        ),
        # user1's own chat, reflected back under user2's name
        chat.send.data[:25] + bytes([5]) + b"user2" + chat.send.data[31:],
    ]  # fmt: skip
    for ack in acks:
        sim.inject_raw(sim.addr["user2"], ack, sim.addr["user1"])
    assert "[Message has been received by user2.]" not in sim.lines("user1")
    sim.run(0.5)
    assert sim.lines("user1")[-1] == "[No ACK from user2, message sent to server.]"


def test_a_replayed_direct_message_from_an_earlier_session_is_dropped() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send user2 first")
    (chat,) = sim.datagrams(Chat, src="user1")
    sim.kill("user2")
    sim.join("user2", port=9101)  # user2 restarted: a new session, a new sid
    mark = len(sim.lines("user2"))
    effects = sim.inject_raw(sim.addr["user1"], chat.send.data, sim.addr["user2"])
    assert not [e for e in effects if isinstance(e, Show | Send)]
    assert any(isinstance(e, Log) and "not for this session" in e.text for e in effects)
    assert sim.lines_since("user2", mark) == []


def test_a_replayed_direct_message_in_the_same_session_is_acked_not_shown() -> None:
    sim = trio_of_clients()
    sim.type("user1", "send user2 once")
    (chat,) = sim.datagrams(Chat, src="user1")
    for _ in range(3):
        sim.inject_raw(sim.addr["user1"], chat.send.data, sim.addr["user2"])
    assert sim.lines("user2").count("user1 : once") == 1


def test_ids_are_random_and_dedup_is_per_sender_so_a_predicted_id_poisons_nothing() -> None:
    # user3 learns user1's id (a peer sees the ids it is sent) and sends its own message
    # under it first: user2 must still show user1's message with that id.
    sim = trio_of_clients()
    sim.type("user1", "send user3 hi")
    ids = [d.message.id for d in sim.datagrams(Chat, src="user1")]
    sim.type("user1", "send user3 again")
    ids += [d.message.id for d in sim.datagrams(Chat, src="user1")][1:]
    assert len(set(ids)) == 2 and all(len(i) == 16 for i in ids)
    assert ids[0].split(".")[0] != "user1"  # not the name and a counter any more
    stolen = "predicted-id-001"
    poison = sim.clients["user3"].codec.to_peer(
        key_of("user2").public, Chat(stolen, "first!", sim.clients["user2"].sid)
    )
    sim.inject_raw(sim.addr["user3"], poison, sim.addr["user2"])
    user1 = sim.clients["user1"]
    entry = user1.table["user2"]
    real = user1.codec.to_peer(entry.key, Chat(stolen, "the real one", entry.tag))
    sim.inject_raw(sim.addr["user1"], real, sim.addr["user2"])
    assert sim.lines("user2")[-2:] == ["user3 : first!", "user1 : the real one"]


# === forged server datagrams ===================================================================


def test_a_forged_rekey_is_ignored_and_a_genuine_one_is_only_for_the_current_session() -> None:
    sim = trio_of_clients()
    user1 = sim.clients["user1"]
    mallory = Identity(b"M" * 32)
    forged = Rekey("r.1", user1.sid, b"b" * 8, mallory.sign(REKEY_DOMAIN, user1.sid, b"b" * 8))
    effects = sim.inject(SERVER, forged, sim.addr["user1"])
    assert effects[0].message is None  # type: ignore[union-attr]
    assert not user1.rekeying
    # signed by the server, but for another session (an old one, replayed): ignored
    old = Rekey("r.2", b"o" * 8, b"b" * 8, SERVER_KEY.sign(REKEY_DOMAIN, b"o" * 8, b"b" * 8))
    sim.inject(SERVER, old, sim.addr["user1"])
    assert not user1.rekeying
    # altered after signing: does not verify
    genuine = SERVER_KEY.sign(REKEY_DOMAIN, user1.sid, b"b" * 8)
    sim.inject(SERVER, Rekey("r.3", user1.sid, b"c" * 8, genuine), sim.addr["user1"])
    assert not user1.rekeying
    assert len(sim.datagrams(Hello)) == 3  # the three joins, nothing more


def test_forged_server_datagrams_of_every_kind_show_nothing() -> None:
    sim = trio_of_clients()
    sim.type("user1", "dereg user1")
    sim.type("user2", "send user1 real")
    sim.run(1.0)
    user1 = sim.clients["user1"]
    sim.type("user1", "reg user1")
    mark = len(sim.lines("user1"))
    sid = user1.sid
    item = StoredItem(Seq("o1", 99), "f.1", "channel", "user2", 1.0, "forged", b"s" * 64)
    fakes = [
        ChannelDelivery("f.2", "user2", "f.2", "forged", b"s" * 64, key_of("user2").public),
        Mailbox("f.3", "f.4", [item]),
        Relay("f.5", Seq("o1", 98), b"\x02" + b"x" * 60, key_of("user2").public),
    ]
    for fake in fakes:
        for key in (b"f" * 32, b"\x00" * 32):
            forged = Session(sid, key).seal(TO_CLIENT, fake)
            for src in (FORGER, SERVER):
                sim.inject_raw(src, forged, sim.addr["user1"])
    assert sim.lines_since("user1", mark) == []


def test_a_table_or_delta_moves_a_clients_copy_only_from_its_own_session() -> None:
    # A delta that names a forger's key for user2: in the clear, in a session without
    # its key, from the forger's or the server's (forged) address, boxed by a peer: none
    # is taken, ACKed or shown. The same delta in user1's session is.
    sim = trio_of_clients()
    user1 = sim.clients["user1"]
    mallory = Identity(b"M" * 32)
    forged = TableEntry("user2", CLIENT_IP, 6666, True, mallory.public, bytes(8))
    held = (user1.copy.epoch, user1.copy.version)
    fakes = [
        TableDelta("f.1", held[0], held[1], held[1] + 1, 0, 1, [forged], ["user3"]),
        Table("f.2", held[0], held[1] + 1, 0, 1, [forged]),
        Table("f.3", 10**15, 1, 0, 1, [forged]),  # another epoch
    ]
    mark = len(sim.lines("user1"))
    for fake in fakes:
        datagrams = [encode(fake), Session(user1.sid, b"k" * 32).seal(TO_CLIENT, fake)]
        shared = SharedKeys(key_of("user3")).get(key_of("user1").public)
        datagrams.append(seal_peer(shared, b"n" * 24, "user3", fake))
        for data in datagrams:
            for src in (FORGER, SERVER, sim.addr["user3"]):
                effects = sim.inject_raw(src, data, sim.addr["user1"])
                assert not [e for e in effects if isinstance(e, Send | Show)], (fake, src)
    assert sim.lines_since("user1", mark) == []
    assert (user1.copy.epoch, user1.copy.version) == held
    assert user1.table["user2"].key == key_of("user2").public and "user3" in user1.table
    sim.from_server("user1", fakes[0])  # what only the server can do
    assert sim.lines_since("user1", mark) == [TU]
    assert user1.table["user2"].key == mallory.public and "user3" not in user1.table


def test_a_channel_message_that_comes_before_the_table_naming_its_sender_is_shown() -> None:
    # A newcomer's table update can arrive after a channel message from a client it does
    # not know yet: the delivery carries the sender's key as the server has it bound.
    sim = trio_of_clients()
    sim.drop.append(between(sim, "server", "user4", Table))
    sim.join("user4")
    assert "user1" not in sim.clients["user4"].table
    sim.drop.clear()
    sim.type("user1", "send_all hello newcomer")
    assert sim.lines("user4") == ["Channel_Message user1 : hello newcomer"]
    sim.settle()
    assert sim.lines("user4") == ["Channel_Message user1 : hello newcomer", TU]
    assert sim.server.clients["user4"].online


def test_a_channel_message_the_server_alters_is_not_shown() -> None:
    # The server relays channel messages but cannot forge them: the sender signed them.
    sim = trio_of_clients()
    user3 = sim.clients["user3"]
    sig = key_of("user1").sign(CHANNEL_DOMAIN, b"user1", b"p.1", b"hello guys")
    good = ChannelDelivery("d.1", "user1", "p.1", "hello guys", sig, key_of("user1").public)
    bad = [
        replace(good, id="d.2", text="hello fools"),
        replace(good, id="d.3", sender="user2"),
        replace(good, id="d.4", post="p.2"),
    ]
    mark = len(sim.lines("user3"))
    for delivery in bad:
        effects = sim.from_server("user3", delivery)
        # ACKed (the server vouched for the datagram) but never shown
        assert [e.message for e in effects if isinstance(e, Send)] == [Ack(delivery.id)]
    assert sim.lines_since("user3", mark) == []
    sim.from_server("user3", good)
    assert sim.lines_since("user3", mark) == ["Channel_Message user1 : hello guys"]
    assert user3.state is ClientState.ONLINE


def test_a_client_accepts_nothing_meant_for_a_peer_from_the_server_and_vice_versa() -> None:
    sim = trio_of_clients()
    user2 = sim.clients["user2"]
    # a chat inside the server's session is not a direct message
    effects = user2.handle_message(
        Chat("x.1", "hi", user2.sid), Sender(Via.SERVER, SERVER), sim.now
    )
    assert [type(e) for e in effects] == [Log]
    # an ACK in the clear is nobody's
    effects = user2.handle_message(Ack("x.2"), Sender(Via.PLAIN, FORGER), sim.now)
    assert [type(e) for e in effects] == [Log]


def test_rekeys_for_unknown_sessions_are_rate_limited() -> None:
    # A datagram of a session the server does not know draws a signed rekey: a forger
    # could make the server sign for every junk datagram, so it signs at most so many.
    sim = Sim()
    sim.join("user1")
    sent = 0
    for n in range(500):
        junk = Session(n.to_bytes(8, "big"), b"k" * 32).seal(TO_SERVER, Ack("x"))
        effects = sim.server.handle_datagram(junk, FORGER, sim.now)
        sent += sum(isinstance(e, Send) and isinstance(e.message, Rekey) for e in effects)
    assert sent == 100  # the burst; then 100 a second
    later = Session(b"z" * 8, b"k" * 32).seal(TO_SERVER, Ack("x"))
    effects = sim.server.handle_datagram(later, FORGER, sim.now + 0.05)
    assert sum(isinstance(e, Send) for e in effects) == 1


def test_the_quick_size_check_is_safe_for_the_worst_text() -> None:
    from chatapp.protocol.client import _SURELY_FITS, _fits

    # every character escaped to six bytes of JSON, then base64: it still fits
    assert _fits("\u0001" * _SURELY_FITS, "n" * 32, "m" * 32)
