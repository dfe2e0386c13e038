"""A server among several sharing a database: other servers' changes, driven directly
(no Trio, no database: the changes are handed to the state machine as the listener
hands them)."""

from __future__ import annotations

from chatapp import screen
from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
)
from chatapp.protocol.client import ClientProtocol, ClientState
from chatapp.protocol.common import Effect, Send, Show
from chatapp.protocol.server import ServerProtocol
from chatapp.wire import (
    Ack,
    ChannelDelivery,
    ChannelPost,
    Mailbox,
    Refused,
    Register,
    Registered,
    StoredItem,
    Table,
    TableAck,
    TableDelta,
    decode,
    encode,
)

HERE = ("10.0.0.1", 9001)  # user1, a client of this server
THERE = ("10.0.0.2", 9002)  # user2, a client of another server


def sends(effects: list[Effect]) -> list[Send]:
    return [effect for effect in effects if isinstance(effect, Send)]


def changes(effects: list[Effect]) -> list[Change]:
    return [effect for effect in effects if isinstance(effect, Change)]


def server_with_two_clients() -> ServerProtocol:
    """user1 online here (it holds the table); user2 online at another server."""
    server = ServerProtocol(id_prefix="s", epoch=1)
    server.restore(
        [ClientRecord("user1", HERE, "t1"), ClientRecord("user2", THERE, "t2")],
        {},
        elsewhere={"user2"},
    )
    (table,) = sends(server.start(0.0))  # the whole table, to user1 only
    assert table.addr == HERE and isinstance(table.message, Table)
    ack = TableAck(table.message.id, table.message.epoch, table.message.version)
    server.handle_datagram(encode(ack), HERE, 0.0)
    return server


def updates(effects: list[Effect]) -> list[Send]:
    """The table's updates (a whole table or a delta) among ``effects``."""
    return [s for s in sends(effects) if isinstance(s.message, Table | TableDelta)]


def test_another_servers_client_is_in_the_table_but_gets_it_from_its_own_server() -> None:
    server = server_with_two_clients()
    joined = ClientSaved("user3", "10.0.0.3", 9003, "t3", Presence.ONLINE)
    effects = server.handle_shared([joined], 0.0)
    (delta,) = updates(effects)
    assert delta.addr == HERE  # not THERE, not user3's address
    assert isinstance(delta.message, TableDelta)
    assert [entry.name for entry in delta.message.entries] == ["user3"]
    assert server.elsewhere == {"user2", "user3"}
    assert not changes(effects)  # committed by the other server already


def test_the_same_record_again_changes_nothing() -> None:
    server = server_with_two_clients()
    again = ClientSaved("user2", *THERE, "t2", Presence.ONLINE)
    assert server.handle_shared([again], 0.0) == []


def test_a_name_online_at_another_server_is_refused_at_once() -> None:
    server = server_with_two_clients()
    claim = Register("x.1", "user2", 9009)
    effects = server.handle_datagram(encode(claim), ("10.0.0.9", 9009), 0.0)
    (answer,) = sends(effects)
    assert isinstance(answer.message, Refused) and "user2" in answer.message.reason
    assert server.clients["user2"].addr == THERE and server.next_deadline() is None


def test_another_servers_client_that_speaks_here_moves_here() -> None:
    server = server_with_two_clients()
    post = ChannelPost("user2.1", "user2", "hello", "t2")
    effects = server.handle_datagram(encode(post), THERE, 0.0)
    assert ClientSaved("user2", *THERE, "t2", Presence.ONLINE) in changes(effects)
    assert "user2" not in server.elsewhere
    addressed = {(type(send.message), send.addr) for send in sends(effects)}
    assert (Ack, THERE) in addressed and (Table, THERE) in addressed  # its first table here


def test_a_message_stored_elsewhere_for_a_client_here_is_delivered_here() -> None:
    server = server_with_two_clients()
    item = StoredItem("m1", "direct", "user2", "hi", 1.0)
    effects = server.handle_shared([MessageStored("user1", item)], 0.0)
    (batch,) = sends(effects)
    assert isinstance(batch.message, Mailbox) and batch.addr == HERE
    assert batch.message.items == [item]
    # The same message announced again (a reload) is not held twice.
    server.handle_shared([MessageStored("user1", item)], 0.0)
    assert server.mailbox["user1"] == [item]


def test_a_channel_message_stored_elsewhere_for_a_client_here_goes_live() -> None:
    server = server_with_two_clients()
    item = StoredItem("c1", "channel", "user2", "hello guys", 1.0)
    effects = server.handle_shared([MessageStored("user1", item)], 0.0)
    (live,) = sends(effects)
    assert live.message == ChannelDelivery("c1", "user2", "hello guys") and live.addr == HERE
    effects = server.handle_datagram(encode(Ack("c1")), HERE, 0.1)
    assert changes(effects) == [MessagesRemoved("user1", ("c1",))]
    assert not server.mailbox.get("user1")


def test_a_channel_message_relayed_but_not_acked_stays_stored() -> None:
    server = server_with_two_clients()
    item = StoredItem("c1", "channel", "user2", "hello guys", 1.0)
    server.handle_shared([MessageStored("user1", item)], 0.0)
    effects = server.handle_timer(0.6)
    assert changes(effects) == [ClientSaved("user1", *HERE, "t1", Presence.SILENT)]
    assert server.mailbox["user1"] == [item]


def test_messages_delivered_by_another_server_leave_this_one_too() -> None:
    server = server_with_two_clients()
    items = [StoredItem(f"m{n}", "direct", "user1", "hi", 1.0) for n in range(3)]
    server.handle_shared([MessageStored("user2", item) for item in items], 0.0)
    server.handle_shared([MessagesRemoved("user2", ("m0", "m1"))], 0.0)
    assert [item.id for item in server.mailbox["user2"]] == ["m2"]


def test_a_reload_takes_what_differs_as_the_other_servers_changes() -> None:
    server = server_with_two_clients()
    server.handle_shared([MessageStored("user2", StoredItem("old", "direct", "a", "x", 1.0))], 0)
    moved = ClientRecord("user2", THERE, "t2", Presence.SILENT)
    kept = StoredItem("new", "direct", "user1", "y", 2.0)
    effects = server.handle_reload(
        [ClientRecord("user1", HERE, "t1"), moved], {"user2": [kept]}, {"user2"}, 0.0
    )
    assert server.clients["user2"].presence is Presence.SILENT
    assert server.mailbox["user2"] == [kept]
    (delta,) = updates(effects)
    assert delta.addr == HERE
    decoded = decode(delta.data)
    assert isinstance(decoded, TableDelta) and not decoded.entries[0].online


def test_a_registration_here_takes_the_name_back_from_the_other_servers_view() -> None:
    server = server_with_two_clients()
    server.handle_shared([ClientSaved("user2", *THERE, "t2", Presence.SILENT)], 0.0)
    claim = Register("x.1", "user2", 9009)
    effects = server.handle_datagram(encode(claim), ("10.0.0.9", 9009), 0.0)
    assert any(isinstance(send.message, Registered) for send in sends(effects))
    assert "user2" not in server.elsewhere


# --- a client given several servers --------------------------------------------------

S1 = ("10.0.9.1", 8001)
S2 = ("10.0.9.2", 8002)


def run_out(client: ClientProtocol, now: float) -> tuple[list[Effect], float]:
    """Let the tries of the client's current waits run out (5 x 0.5 s); the effects and
    the time."""
    effects: list[Effect] = []
    end = now + 2.5 + 1e-6
    while (deadline := client.next_deadline()) is not None and deadline <= end:
        now = deadline
        effects += client.handle_timer(now)
    return effects, now


def test_a_client_moves_to_the_next_server_when_its_server_stops_answering() -> None:
    client = ClientProtocol("user1", S1, 9001, id_prefix="c", other_servers=(S2,))
    (register,) = sends(client.start(0.0))
    assert register.addr == S1
    effects, now = run_out(client, 0.0)
    assert Show(screen.moving_server("10.0.9.1:8001", "10.0.9.2:8002")) in effects
    moved = sends(effects)[-1]
    assert moved.addr == S2 and moved.message == register.message  # the same request
    client.handle_datagram(encode(Registered(register.message.id, "t1")), S2, now)
    assert client.state is ClientState.ONLINE and client.server == S2
    # Its last server stops answering too: the request goes back to the first, once.
    (post,) = sends(client.handle_input("send_all hi", now))
    effects, now = run_out(client, now)
    assert [send.addr for send in sends(effects)].count(S1) == 1
    effects, now = run_out(client, now)
    assert Show(screen.SERVER_NOT_RESPONDING_CHANNEL) in effects and post.addr == S2


def test_with_one_server_a_client_gives_up_as_it_always_did() -> None:
    client = ClientProtocol("user1", S1, 9001, id_prefix="c")
    client.start(0.0)
    effects, _ = run_out(client, 0.0)
    shown = [effect.line for effect in effects if isinstance(effect, Show)]
    assert shown == [screen.join_not_answered("10.0.9.1:8001"), screen.EXITING]


def test_a_registration_another_server_undid_leaves_this_servers_table_too() -> None:
    server = server_with_two_clients()
    effects = server.handle_shared([ClientRemoved("user2")], 0.0)
    assert "user2" not in server.clients and "user2" not in server.elsewhere
    (delta,) = updates(effects)
    assert isinstance(delta.message, TableDelta) and delta.message.gone == ["user2"]
