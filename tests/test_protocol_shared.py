"""Several servers sharing one database, as state machines (no Trio, no sockets, no
database): two servers with the same key and their own origins, each one's committed
changes handed to the other as its listener would (``handle_shared``); clients given
both servers moving from one that stops answering to the other."""

from __future__ import annotations

from _sim import CLIENT_IP, ORIGIN, SERVER, SERVER_KEY, SERVER_TEXT, Sim, key_of

from chatapp import screen
from chatapp.protocol.changes import (
    Change,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
)
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Effect
from chatapp.protocol.crypto import SeededEntropy
from chatapp.protocol.server import ServerProtocol
from chatapp.store import MemoryStore
from chatapp.wire import Address, ChannelDelivery, Mailbox, Rekey, Table, TableDelta

B: Address = ("10.0.0.1", 8002)
B_TEXT = "10.0.0.1:8002"


class Linked:
    """A server node whose committed changes reach the other server, as NOTIFY would."""

    def __init__(self, sim: Sim, server: ServerProtocol, peer: Address) -> None:
        self.sim = sim
        self.server = server
        self.peer = peer
        self.down = False  # a killed server shares nothing any more

    def _shared(self, effects: list[Effect], now: float) -> list[Effect]:
        changes: list[Change] = [e for e in effects if isinstance(e, Change)]
        other = self.sim.nodes.get(self.peer)
        if changes and isinstance(other, Linked) and not self.down:
            self.sim.apply(self.peer, other.server.handle_shared(changes, now))
        return effects

    def handle_datagram(self, data: bytes, addr: Address, now: float) -> list[Effect]:
        return self._shared(self.server.handle_datagram(data, addr, now), now)

    def handle_timer(self, now: float) -> list[Effect]:
        return self._shared(self.server.handle_timer(now), now)

    def next_deadline(self) -> float | None:
        return self.server.next_deadline()

    def checkpoint(self) -> None:
        self.server.checkpoint()


def two_servers() -> tuple[Sim, ServerProtocol, ServerProtocol]:
    """Server A (the simulation's own, at ``SERVER``) and B, one key, two origins."""
    sim = Sim()
    a = sim.server
    b = sim._new_server(MemoryStore(key=SERVER_KEY.seed, origin="o2").load(), epoch=1)
    sim.add_node("server_b", B, Linked(sim, b, SERVER))
    sim.nodes[SERVER] = Linked(sim, a, B)
    return sim, a, b


def join(sim: Sim, name: str, server: Address, *others: Address) -> ClientProtocol:
    """A client of ``server``, given ``others`` too (``--server``)."""
    port = 9001 + 100 * len(sim.clients)
    client = ClientProtocol(
        name,
        server,
        port,
        identity=key_of(name),
        entropy=SeededEntropy(bytes([len(sim.clients) + 1]) * 32),
        pinned=SERVER_KEY.public,
        timers=sim.timers,
        other_servers=others,
    )
    addr = (CLIENT_IP, port)
    sim.nodes[addr] = client
    sim.addr[name] = addr
    sim.clients[name] = client
    sim.screens[name] = []
    sim.apply(addr, client.start(sim.now))
    sim.pump()
    sim.run(1.0)
    return client


def test_clients_of_two_servers_see_one_table_each_pushed_by_its_own_server() -> None:
    sim, a, b = two_servers()
    x = join(sim, "user1", SERVER)
    y = join(sim, "user2", B)
    assert set(x.table) == set(y.table) == {"user1", "user2"}
    assert x.table["user2"].online and y.table["user1"].online
    assert a.elsewhere == {"user2"} and b.elsewhere == {"user1"}
    # each client's table comes from its own server only
    tables = (Table, TableDelta)
    assert {d.src for d in sim.datagrams(tables, dst="user1")} == {SERVER}
    assert {d.src for d in sim.datagrams(tables, dst="user2")} == {B}
    assert sim.lines("user1") == [screen.TABLE_UPDATED, screen.TABLE_UPDATED]

    sim.type("user2", "dereg user2")
    assert not x.table["user2"].online  # A learned it from B's commit
    assert sim.lines("user1")[-1] == screen.TABLE_UPDATED


def test_send_all_reaches_the_other_servers_clients_live_and_leaves_the_database() -> None:
    sim, a, b = two_servers()
    join(sim, "user1", SERVER)
    join(sim, "user2", B)
    join(sim, "user3", B)
    sim.type("user1", "send_all hello across")
    for name in ("user2", "user3"):
        assert screen.channel_message("user1", "hello across") in sim.lines(name)
    # A stored it for B's clients; B delivered it live and removed it once ACKed
    stored = [c for c in sim.persisted if isinstance(c, MessageStored)]
    removed = [c for c in sim.persisted if isinstance(c, MessagesRemoved)]
    assert {c.recipient for c in stored} == {"user2", "user3"}
    assert {c.recipient for c in removed} == {"user2", "user3"}
    assert {d.src for d in sim.datagrams(ChannelDelivery, delivered=True)} == {B}
    assert a.mailbox == {} and b.mailbox == {}


def test_a_message_stored_at_one_server_is_delivered_by_the_recipients_server() -> None:
    sim, a, b = two_servers()
    join(sim, "user1", SERVER)
    join(sim, "user2", B)
    sim.type("user2", "dereg user2")
    sim.type("user1", "send user2 kept for you")
    sim.run(5.0)
    assert screen.SAVED_BY_SERVER in sim.lines("user1")
    assert [i.seq.origin for i in b.mailbox["user2"]] == [ORIGIN]  # A's number, B holds it
    sim.type("user2", "reg user2")
    assert screen.YOU_HAVE_MESSAGE in sim.lines("user2")
    assert any(line.endswith("user1 : kept for you") for line in sim.lines("user2"))
    assert {d.src for d in sim.datagrams(Mailbox, delivered=True)} == {B}
    assert a.mailbox == {} and b.mailbox == {}


def test_a_client_whose_server_stops_answering_moves_to_the_next_with_its_request() -> None:
    sim, _, b = two_servers()
    x = join(sim, "user1", SERVER, B)
    join(sim, "user2", B)
    sim.kill("server")
    sim.nodes.pop(SERVER, None)
    sim.type("user1", "send_all are you there")
    sim.run(5.0)
    lines = sim.lines("user1")
    assert screen.moving_server(SERVER_TEXT, B_TEXT) in lines
    assert lines[-1] == screen.CHANNEL_ACKED or screen.CHANNEL_ACKED in lines
    assert screen.channel_message("user1", "are you there") in sim.lines("user2")
    assert x.server == B and "user1" not in b.elsewhere
    assert screen.SERVER_NOT_RESPONDING_CHANNEL not in lines


def test_a_client_of_a_stopped_server_swept_by_another_is_asked_to_come_and_moves() -> None:
    sim, _, b = two_servers()
    x = join(sim, "user1", SERVER, B)
    join(sim, "user2", B)
    sim.nodes.pop(SERVER, None)  # A is killed: its clients hear nothing more from it
    sim.type("user2", "send_all stored for user1")  # user1 is A's: stored for it
    assert [i.text for i in b.mailbox["user1"]] == ["stored for user1"]
    record = b.clients["user1"]
    swept = ClientSaved(
        "user1", *record.addr, record.key, record.sid, Presence.SILENT
    )  # what B's sweep committed
    sim.apply(B, b.handle_swept([swept], sim.now))
    sim.pump()
    sim.run(2.0)
    assert sim.datagrams(Rekey, src="server_b", dst="user1")
    lines = sim.lines("user1")
    assert screen.moving_server(SERVER_TEXT, B_TEXT) in lines
    assert screen.YOU_HAVE_MESSAGE in lines
    assert any("Channel_Message user2 : stored for user1" in line for line in lines)
    assert x.server == B and b.clients["user1"].online and b.mailbox == {}


def test_a_client_given_no_other_server_asked_to_rekey_by_another_stays_while_its_own_answers() -> (
    None
):
    sim, _, b = two_servers()
    x = join(sim, "user1", SERVER)  # no --server
    record = b.clients["user1"]
    sim.apply(B, [b._ask_to_rekey(record, sim.now)])
    sim.pump()
    sim.run(3.0)
    assert x.server == SERVER and x.session is not None  # registered again at A
    assert not any("Moving" in line for line in sim.lines("user1"))


def test_a_client_swept_by_another_server_that_registers_again_at_its_own_stays_online() -> None:
    """A restarted inside the sweep window: B swept user1 and asked it to come, user1
    (no --server) registered again at A; B's wait for it runs out and B leaves it be
    (it does not mark offline a client another server registered meanwhile)."""
    sim, a, b = two_servers()
    x = join(sim, "user1", SERVER)  # no --server
    record = b.clients["user1"]
    swept = ClientSaved("user1", *record.addr, record.key, record.sid, Presence.SILENT)
    sim.apply(B, b.handle_swept([swept], sim.now))
    sim.pump()
    sim.run(30.0)  # user1 registers again at A; B's wait for it would have run out
    assert x.server == SERVER and a.clients["user1"].online
    assert b.clients["user1"].online and "user1" in b.elsewhere
    assert not any("did not come back" in log.text for _, log in sim.logs)
    saved = [c for c in sim.persisted if isinstance(c, ClientSaved) and c.name == "user1"]
    assert saved[-1].presence is Presence.ONLINE


def test_a_client_given_no_other_server_moves_to_the_one_that_swept_it_if_its_own_is_gone() -> None:
    sim, _, b = two_servers()
    x = join(sim, "user1", SERVER)  # no --server
    join(sim, "user2", B)
    sim.nodes.pop(SERVER, None)  # A is killed
    sim.type("user2", "send_all stored for user1")
    record = b.clients["user1"]
    swept = ClientSaved("user1", *record.addr, record.key, record.sid, Presence.SILENT)
    sim.apply(B, b.handle_swept([swept], sim.now))
    sim.pump()
    sim.run(5.0)  # a hello to A first (5 tries), then to B
    lines = sim.lines("user1")
    assert screen.moving_server(SERVER_TEXT, B_TEXT) in lines
    assert any("Channel_Message user2 : stored for user1" in line for line in lines)
    assert x.server == B and b.clients["user1"].online


def test_a_reload_takes_what_the_server_missed() -> None:
    sim, _, _ = two_servers()
    join(sim, "user1", SERVER)
    store = MemoryStore(sim.persisted, key=SERVER_KEY.seed, origin="o2")
    disk = store.load()
    disk.elsewhere = frozenset({"user1"})
    fresh = sim._new_server(MemoryStore(key=SERVER_KEY.seed, origin="o2").load())
    fresh.handle_reload(disk, sim.now)
    assert set(fresh.clients) == {"user1"} and fresh.elsewhere == {"user1"}
